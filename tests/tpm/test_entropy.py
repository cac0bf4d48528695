"""Seeding the kernel's random pool from the TPM: TPM2_GetRandom sent raw to a real swtpm (its
character-device mode, over a socket pair: the bytes a /dev/tpmrm0 would carry), every malformed
or failed answer a SeedError, and RNDADDENTROPY on this host's /dev/random."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from unlocker.boot import entropy
from unlocker.boot.entropy import SeedError

pytestmark = pytest.mark.tpm


def _chardev_swtpm(state: Path, flags: str) -> Iterator[int]:
    if shutil.which("swtpm") is None:
        pytest.fail("swtpm is not installed (run .ci/run or the README's set-up command)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(["swtpm", "chardev", "--tpm2", "--fd", str(theirs.fileno()),
                             "--tpmstate", f"dir={state}", "--flags", flags],
                            pass_fds=[theirs.fileno()], stderr=subprocess.DEVNULL)
    theirs.close()
    try:
        yield ours.fileno()
    finally:
        ours.close()
        proc.wait(10)


@pytest.fixture
def tpm_fd(tmp_path: Path) -> Iterator[int]:
    """A started swtpm as a device would present it after the kernel's TPM2_Startup."""
    yield from _chardev_swtpm(tmp_path, "not-need-init,startup-clear")


@pytest.fixture
def unstarted_tpm_fd(tmp_path: Path) -> Iterator[int]:
    """A swtpm that never got TPM2_Startup: every command fails with TPM_RC_INITIALIZE."""
    yield from _chardev_swtpm(tmp_path, "not-need-init")


def test_the_tpm_returns_the_bytes_asked_for_fresh_each_time(tpm_fd: int) -> None:
    first = entropy.get_random(tpm_fd, 32)
    second = entropy.get_random(tpm_fd, 32)
    assert len(first) == len(second) == 32
    assert first != second


def test_a_tpm_that_says_no_is_a_seed_error_with_its_response_code(unstarted_tpm_fd: int) -> None:
    with pytest.raises(SeedError, match=r"TPM2_GetRandom returned 0x100"):  # TPM_RC_INITIALIZE
        entropy.get_random(unstarted_tpm_fd, 32)


def test_fewer_bytes_than_asked_for_is_a_seed_error(tpm_fd: int) -> None:
    # a TPM returns at most one digest's worth (swtpm: 64 bytes); never credit what is not there
    with pytest.raises(SeedError, match=r"returned 64 of 200"):
        entropy.get_random(tpm_fd, 200)


@pytest.mark.parametrize("response", [
    b"",
    b"\x80\x01\x00\x00",
    struct.pack(">HIIH", 0x8001, 99, 0, 32) + bytes(32),  # size field says 99
    struct.pack(">HIIH", 0x8001, 44, 0, 32) + bytes(20),  # cut short
])
def test_a_malformed_response_is_a_seed_error(response: bytes) -> None:
    with pytest.raises(SeedError):
        entropy.parse_get_random_response(response, 32)


def test_the_command_is_tpm2_getrandom() -> None:
    # tag TPM_ST_NO_SESSIONS, 12 bytes, TPM_CC_GetRandom, bytesRequested
    assert entropy.get_random_command(32).hex() == "80010000000c0000017b0020"


def test_no_device_and_no_tpm_announced_fails_without_waiting(tmp_path: Path) -> None:
    with pytest.raises(SeedError, match="no "):
        entropy.tpm_random(32, str(tmp_path / "tpmrm0"), wait=600, firmware_table=str(tmp_path / "TPM2"))


def test_a_device_that_is_no_tpm_is_a_seed_error_not_a_hang(tmp_path: Path) -> None:
    fake = tmp_path / "tpmrm0"
    fake.write_bytes(b"")  # a regular file: the command is written, the response is empty
    with pytest.raises(SeedError, match="short TPM response"):
        entropy.tpm_random(32, str(fake))


def test_credit_adds_to_this_hosts_pool_and_refuses_what_is_no_random_device(tpm_fd: int) -> None:
    data = bytearray(entropy.get_random(tpm_fd, 32))
    entropy.credit(data, "/dev/random")  # root on the host: RNDADDENTROPY is allowed
    with pytest.raises(SeedError, match="RNDADDENTROPY"):
        entropy.credit(data, "/dev/null")


def test_a_seeded_pool_gets_nothing_and_the_tpm_is_not_asked(tmp_path: Path) -> None:
    assert entropy.pool_seeded(), "this host's kernel pool is seeded long after boot"
    # the device does not exist: had it been asked, this would raise
    assert entropy.seed_from_tpm(str(tmp_path / "tpmrm0")) is False


@pytest.fixture
def early_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The kernel's state as early in a boot without a CPU RNG: the pool not seeded, a TPM device
    node (here a regular file: read, it gives a short response), a driver link, a command line."""
    monkeypatch.setattr(entropy, "pool_seeded", lambda: False)
    (tmp_path / "tpmrm0").write_bytes(b"")
    monkeypatch.setattr(entropy, "TPM_DRIVER", str(tmp_path / "driver"))
    (tmp_path / "cmdline").write_text("root=/dev/mapper/root quiet\n")
    monkeypatch.setattr(entropy, "CMDLINE", str(tmp_path / "cmdline"))
    return tmp_path


def test_a_firmware_or_virtual_tpm_is_asked(early_boot: Path) -> None:
    (early_boot / "driver").symlink_to("../../../bus/platform/drivers/tpm_crb")
    assert entropy.tpm_driver() == "tpm_crb"
    with pytest.raises(SeedError, match="short TPM response"):  # it was asked: the file was read
        entropy.seed_from_tpm(str(early_boot / "tpmrm0"))


@pytest.mark.parametrize("driver", ["tpm_tis", "tpm_tis_spi", None])
def test_a_tpm_on_a_bus_is_not_asked(driver: str | None, early_boot: Path) -> None:
    """Its GetRandom answer would cross the LPC/SPI bus in the clear, and the salted session is
    there against whoever listens on that bus: the kernel's own jitter is waited for instead."""
    if driver is not None:
        (early_boot / "driver").symlink_to(f"../../../bus/pnp/drivers/{driver}")
    with pytest.raises(SeedError, match=r"is on a bus where its answer could be read"):
        entropy.seed_from_tpm(str(early_boot / "tpmrm0"))


def test_a_kernel_told_to_credit_no_hwrng_gets_no_credit_from_the_tpm(early_boot: Path) -> None:
    (early_boot / "driver").symlink_to("../../../bus/platform/drivers/tpm_crb")
    (early_boot / "cmdline").write_text("quiet rng_core.default_quality=0\n")
    with pytest.raises(SeedError, match="rng_core.default_quality=0"):
        entropy.seed_from_tpm(str(early_boot / "tpmrm0"))
