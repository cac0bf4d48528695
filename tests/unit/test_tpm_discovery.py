"""Which TPM the boot path talks to, and how long it waits for one the firmware announces."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from unlocker.errors import NoTpmError
from unlocker.tpm import node as tpmnode
from unlocker.tpm import tcti as tpm


@pytest.fixture
def fake_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """An ACPI table path and a device node path of our own, neither existing yet."""
    table, node = tmp_path / "TPM2", tmp_path / "tpmrm0"
    monkeypatch.setattr(tpm, "ACPI_TPM2_TABLE", str(table))
    monkeypatch.setattr(tpm, "DEVICE_NODES", (str(node),))
    monkeypatch.delenv("TPM2_UNLOCKER_TCTI", raising=False)
    monkeypatch.delenv("TPM2TOOLS_TCTI", raising=False)
    return table, node


def test_explicit_tcti_wins(fake_system: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TPM2TOOLS_TCTI", "swtpm:port=1")
    assert tpm.resolve_tcti("mssim:port=2") == "mssim:port=2"
    assert tpm.resolve_tcti(None) == "swtpm:port=1"


def test_no_tpm_announced_means_no_wait(fake_system: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sleep(_: float) -> None:
        raise AssertionError("waited for a TPM the firmware does not announce")

    monkeypatch.setattr(tpmnode.time, "sleep", no_sleep)
    with pytest.raises(NoTpmError, match="no TPM found"):
        tpm.resolve_tcti(None, wait=3600)


def test_announced_tpm_is_waited_for_until_its_node_appears(fake_system: tuple[Path, Path]) -> None:
    table, node = fake_system
    table.write_bytes(b"TPM2")
    timer = threading.Timer(0.3, node.touch)
    timer.start()
    try:
        assert tpm.resolve_tcti(None, wait=60) == f"device:{node}"
    finally:
        timer.cancel()


def test_announced_tpm_that_never_appears_is_reported(fake_system: tuple[Path, Path]) -> None:
    table, _ = fake_system
    table.write_bytes(b"TPM2")
    with pytest.raises(NoTpmError, match="no TPM found"):
        tpm.resolve_tcti(None, wait=0.2)
