"""Authenticode digests of EFI images, held to pesign's (another implementation) and refused for what is no PE."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from unlocker.errors import EXIT_USAGE
from unlocker.measure.pe import PeError, authenticode_digests

SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")


def pesign_hash(path: Path) -> bytes:
    out = subprocess.run(["pesign", "--hash", "--in", str(path)], capture_output=True, check=True, text=True).stdout
    return bytes.fromhex(out.split("hash:")[1].strip())


@pytest.fixture
def loader(tmp_path: Path) -> Path:
    if shutil.which("pesign") is None or not SYSTEMD_BOOT.exists():
        pytest.fail("pesign and systemd-boot-efi are test dependencies (./run setup installs them)")
    return SYSTEMD_BOOT


def test_authenticode_digest_equals_pesigns(loader: Path) -> None:
    ours = authenticode_digests(str(loader), ["sha256", "sha1"])
    assert ours["sha256"] == pesign_hash(loader)
    assert len(ours["sha1"]) == 20


def test_data_appended_after_the_sections_is_hashed_as_the_firmware_does(loader: Path, tmp_path: Path) -> None:
    padded = tmp_path / "padded.efi"
    padded.write_bytes(loader.read_bytes() + b"tpm2u" * 100)
    ours = authenticode_digests(str(padded), ["sha256"])["sha256"]
    assert ours != authenticode_digests(str(loader), ["sha256"])["sha256"]
    assert ours == pesign_hash(padded)


@pytest.mark.parametrize("content", [b"", b"MZ", b"\x7fELF" + bytes(200), b"MZ" + bytes(58) + b"\xff\xff\xff\x7f" + bytes(100)])
def test_what_is_no_pe_image_is_one_usage_error(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "not.efi"
    path.write_bytes(content)
    with pytest.raises(PeError) as caught:
        authenticode_digests(str(path), ["sha256"])
    assert caught.value.exit_code == EXIT_USAGE and "\n" not in caught.value.message


def test_a_truncated_image_is_refused(loader: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.efi"
    cut.write_bytes(loader.read_bytes()[:4096])
    with pytest.raises(PeError, match="not a well-formed PE image|not a PE/COFF image"):
        authenticode_digests(str(cut), ["sha256"])


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PeError, match="cannot read .*missing.efi"):
        authenticode_digests(str(tmp_path / "missing.efi"), ["sha256"])
