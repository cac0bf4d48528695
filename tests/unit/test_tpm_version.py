"""A TPM 1.2 chip (the kernel's tpm_version_major says 1) gets one line and exit 2, never a TSS error."""

from __future__ import annotations

from pathlib import Path

import pytest

from unlocker.errors import EXIT_NO_TPM, NoTpmError
from unlocker.tpm.tcti import check_tpm_version


def _sysfs(tmp_path: Path, major: str | None) -> str:
    chip = tmp_path / "tpm0"
    chip.mkdir()
    if major is not None:
        (chip / "tpm_version_major").write_text(major + "\n")
    return str(tmp_path)


@pytest.mark.parametrize("node", ["/dev/tpm0", "/dev/tpmrm0"])
def test_a_tpm_1_2_is_refused_in_one_line(node: str, tmp_path: Path) -> None:
    with pytest.raises(NoTpmError) as caught:
        check_tpm_version(node, _sysfs(tmp_path, "1"))
    assert caught.value.exit_code == EXIT_NO_TPM
    assert str(caught.value).startswith(f"TPM 1.2 is not supported: {node} is not a TPM 2.0")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("major", ["2", None])  # None: a kernel before 5.5, without the file
def test_a_tpm_2_0_or_an_older_kernel_passes(major: str | None, tmp_path: Path) -> None:
    check_tpm_version("/dev/tpmrm0", _sysfs(tmp_path, major))
