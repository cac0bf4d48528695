"""Seed the kernel's random pool from a firmware or virtual TPM's random number generator, early in boot.

The salted TPM session draws its ECDH key and nonces from the kernel (through OpenSSL), and
getrandom(2) blocks until the kernel's pool is seeded. A machine with a CPU RNG (RDRAND) is seeded
before userspace starts. Without one (QEMU's default CPU, some boards) nothing seeds the pool
early: the TPM's hwrng is off for a TPM on the CRB interface on AMD machines (the fTPM stutter
quirk) and, on kernels before 6.2 (Debian 12's 6.1), credited with nothing anyway
(rng_core.default_quality=0). The first reader that blocks then makes the kernel spin on timer
jitter for a second or more: on one CPU, time taken from udev and from us.

So, once, when the pool is not seeded yet: TPM2_GetRandom, 32 bytes, sent as a raw command to the
resource manager's device node (no TSS needed), credited with RNDADDENTROPY. Only for a TPM without
a bus of its own, one the kernel drives through the CRB interface (tpm_crb: firmware TPMs such as
AMD's fTPM or Intel's PTT, and virtual TPMs): the salted session is there so that whoever listens on
a discrete TPM's LPC/SPI/I2C bus learns nothing, and the GetRandom response would cross that bus in
the clear, making the session's randomness known to the listener. A discrete TPM (tpm_tis*) is not
asked: there the kernel's own timer jitter is awaited. Nor is any TPM when the kernel command line
says `rng_core.default_quality=0` (credit no hardware RNG). The bytes are mixed into a pool that
already holds every interrupt's timing since power-on.
"""

from __future__ import annotations

import fcntl
import os
import struct

from unlocker.tpm.node import ACPI_TPM2_TABLE, wait_for_node

TPM_DEVICE = "/dev/tpmrm0"
SEED_BYTES = 32  # 256 bits: what the kernel's crng needs to count as seeded
_TPM_ST_NO_SESSIONS = 0x8001
_TPM_CC_GET_RANDOM = 0x0000017B
_TPM_RC_SUCCESS = 0
_RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
# the kernel driver of the TPM behind /dev/tpmrm0 (tpm_crb: no bus outside the CPU package)
TPM_DRIVER = "/sys/class/tpm/tpm0/device/driver"
BUSLESS_DRIVERS = ("tpm_crb",)
CMDLINE = "/proc/cmdline"


class SeedError(Exception):
    """Why the pool was not seeded from the TPM (the caller falls back to waiting)."""


def pool_seeded() -> bool:
    """True once getrandom(2) no longer blocks."""
    try:
        os.getrandom(1, os.GRND_NONBLOCK)
    except BlockingIOError:
        return False
    return True


def get_random_command(count: int) -> bytes:
    """TPM2_GetRandom(bytesRequested=count), marshalled."""
    return struct.pack(">HIIH", _TPM_ST_NO_SESSIONS, 12, _TPM_CC_GET_RANDOM, count)


def parse_get_random_response(response: bytes, count: int) -> bytes:
    """The TPM2B_DIGEST out of a TPM2_GetRandom response; SeedError unless it is whole and successful."""
    if len(response) < 10:
        raise SeedError(f"short TPM response ({len(response)} bytes)")
    _tag, size, rc = struct.unpack(">HII", response[:10])
    if rc != _TPM_RC_SUCCESS:
        raise SeedError(f"TPM2_GetRandom returned 0x{rc:x}")
    if size != len(response) or len(response) < 12:
        raise SeedError("malformed TPM2_GetRandom response")
    (length,) = struct.unpack(">H", response[10:12])
    data = response[12:12 + length]
    if length != count or len(data) != count:
        raise SeedError(f"the TPM returned {len(data)} of {count} random bytes")
    return data


def get_random(fd: int, count: int = SEED_BYTES) -> bytes:
    """TPM2_GetRandom over an open TPM device (one command written, one response read)."""
    os.write(fd, get_random_command(count))
    return parse_get_random_response(os.read(fd, 4096), count)


def wait_for_device(device: str, wait: float = 0, firmware_table: str | None = None) -> None:
    """Up to `wait` seconds for the device node of a TPM the firmware announces; SeedError without it."""
    if wait_for_node((device,), wait, firmware_table or ACPI_TPM2_TABLE, poll=0.01) is None:
        raise SeedError(f"no {device}")


def tpm_random(count: int = SEED_BYTES, device: str | None = None, wait: float = 0,
               firmware_table: str | None = None) -> bytes:
    """`count` bytes from the TPM's RNG; up to `wait` seconds for the device node of a TPM the firmware announces."""
    device = device or TPM_DEVICE
    wait_for_device(device, wait, firmware_table)
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        return get_random(fd, count)
    finally:
        os.close(fd)


def tpm_driver(link: str | None = None) -> str | None:
    """The kernel driver of the TPM (tpm_crb, tpm_tis, tpm_tis_spi, ...), None if unknown."""
    try:
        return os.path.basename(os.readlink(link or TPM_DRIVER))
    except OSError:
        return None


def hwrng_refused(cmdline: str | None = None) -> bool:
    """`rng_core.default_quality=0` on the kernel command line: credit no hardware RNG."""
    try:
        with open(cmdline or CMDLINE) as f:
            return "rng_core.default_quality=0" in f.read().split()
    except OSError:
        return False


def credit(data: bytearray, random_device: str = "/dev/random") -> None:
    """Mix `data` into the kernel's pool and count it as full entropy (needs CAP_SYS_ADMIN)."""
    request = bytearray(struct.pack("ii", len(data) * 8, len(data)))
    request += data
    fd = os.open(random_device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _RNDADDENTROPY, request)
    except OSError as exc:
        raise SeedError(f"RNDADDENTROPY: {exc.strerror}") from None
    finally:
        os.close(fd)
        request[:] = bytes(len(request))


def seed_from_tpm(device: str | None = None, wait: float = 0) -> bool:
    """Seed the pool from the TPM unless it is seeded already; False if it was (nothing done)."""
    if pool_seeded():
        return False
    if hwrng_refused():
        raise SeedError("rng_core.default_quality=0: no hardware RNG is to be credited")
    device = device or TPM_DEVICE
    wait_for_device(device, wait)
    driver = tpm_driver()
    if driver not in BUSLESS_DRIVERS:
        raise SeedError(f"the TPM ({driver or 'driver unknown'}) is on a bus where its answer could be read")
    data = bytearray(tpm_random(SEED_BYTES, device))
    try:
        credit(data)
    finally:
        data[:] = bytes(len(data))
    return True
