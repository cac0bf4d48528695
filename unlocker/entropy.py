"""Seed the kernel's random pool from the TPM's random number generator, early in boot.

The salted TPM session draws its ECDH key and nonces from the kernel (through OpenSSL), and
getrandom(2) blocks until the kernel's pool is seeded. A machine with a CPU RNG (RDRAND) is seeded
before userspace starts. Without one (QEMU's default CPU, some boards) the kernel's only other early
source is the TPM's hwrng, which Linux turns off for every machine with an AMD CPU (the fTPM
stutter quirk); then nothing seeds the pool until a reader blocks, and the kernel spends a second
or more of CPU time on timer jitter while it waits: on one CPU, time taken from udev and from us.

What the kernel's TPM hwrng would have done is done here once: TPM2_GetRandom, 32 bytes, sent as a
raw command to the resource manager's device node (no TSS needed), credited to the pool with
RNDADDENTROPY. Only when the pool is not seeded yet: where the kernel already has its entropy
nothing is added. The bytes cross the bus in the clear, as they do for the kernel's hwrng; they are
mixed into a pool that already holds every interrupt's timing since power-on. A kernel told to
credit no hardware RNG (`rng_core.default_quality=0`) gets nothing from here either.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time

TPM_DEVICE = "/dev/tpmrm0"
# The firmware's ACPI table for a TPM 2.0: when present, a missing /dev/tpmrm0 only means its driver
# has not loaded yet (udev's coldplug, or the hook's modprobe, is still running beside us at boot).
ACPI_TPM2_TABLE = "/sys/firmware/acpi/tables/TPM2"
SEED_BYTES = 32  # 256 bits: what the kernel's crng needs to count as seeded
_TPM_ST_NO_SESSIONS = 0x8001
_TPM_CC_GET_RANDOM = 0x0000017B
_TPM_RC_SUCCESS = 0
_RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
# how much the kernel credits a hardware RNG without its own rating (0: nothing)
RNG_CORE_QUALITY = "/sys/module/rng_core/parameters/default_quality"


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


def tpm_random(count: int = SEED_BYTES, device: str | None = None, wait: float = 0,
               firmware_table: str | None = None) -> bytes:
    """`count` bytes from the TPM's RNG; up to `wait` seconds for the device node of a TPM the firmware announces."""
    device = device or TPM_DEVICE
    firmware_table = firmware_table or ACPI_TPM2_TABLE
    deadline = time.monotonic() + wait
    while not os.path.exists(device):
        if time.monotonic() >= deadline or not os.path.exists(firmware_table):
            raise SeedError(f"no {device}")
        time.sleep(0.01)
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        return get_random(fd, count)
    finally:
        os.close(fd)


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


def hwrng_trusted(parameter: str | None = None) -> bool:
    """False when the kernel was told to credit no hardware RNG (`rng_core.default_quality=0`):
    the TPM's hwrng would not be trusted by the kernel either, so neither is it here."""
    try:
        with open(parameter or RNG_CORE_QUALITY) as f:
            return f.read().strip() != "0"
    except OSError:
        return True  # no hwrng core in this kernel: nothing was said against it


def seed_from_tpm(device: str | None = None, wait: float = 0) -> bool:
    """Seed the pool from the TPM unless it is seeded already; False if it was (nothing done)."""
    if pool_seeded():
        return False
    if not hwrng_trusted():
        raise SeedError("rng_core.default_quality=0: hardware RNGs are not to be credited")
    data = bytearray(tpm_random(SEED_BYTES, device, wait))
    try:
        credit(data)
    finally:
        data[:] = bytes(len(data))
    return True
