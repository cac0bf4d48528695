"""Boot-time head start: get what unsealing and `cryptsetup open` need while the disk is on its way.

Opening a LUKS2 device makes the kernel load dm-crypt and instantiate the cipher (a template such
as xts around aes, each piece a modprobe the kernel runs and a self-test) while cryptsetup waits.
Done here, in a thread that sleeps in system calls, that work moves off the path from "the disk
appeared" to "the disk is open". The frozen binary starts it before it imports the rest of the
program (`start_early`): in a busybox initramfs the disk often appears while Python still starts.

The other wait is for the kernel's random pool: the salted TPM session draws its ECDH key and
nonces from it (through OpenSSL), and on a machine without a CPU RNG nothing seeds it early in boot
(`entropy` says why). The warm-up seeds it from the TPM when it is not seeded yet, and only if that
fails waits for it, so that the kernel's timer-jitter loop runs beside udev and our own start
instead of after the disk appeared.

Everything is best effort: a failure only means the work is done later, where it is needed.
"""

from __future__ import annotations

# _socket, not socket: the C module alone binds an AF_ALG socket, and socket.py turns every
# constant into enums at import (tens of ms of a boot under emulation).
import _socket
import os

from unlocker import TYPE_CHECKING, initrd
from unlocker.boot import entropy
from unlocker.lean.threads import Background, Signal
from unlocker.log import debug_on_cmdline, set_debug, trace

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

# LUKS2's default (cryptsetup >= 2.0): aes-xts-plain64 for the volume and its keyslots.
DEFAULT_CIPHER = "xts(aes)"
_started: list[Background] = []
TPM_WAIT = 5.0  # seconds for the device node of a TPM the firmware announces (its driver may still load)
_dm_tried: Signal | None = None  # set once the warm-up's modprobe of dm-crypt finished (or failed)


def _instantiate_cipher(cipher: str) -> bool:
    """Bind an AF_ALG skcipher socket: the kernel loads af_alg, algif_skcipher and the cipher's modules."""
    try:
        alg = _socket.socket(_socket.AF_ALG, _socket.SOCK_SEQPACKET, 0)
        try:
            alg.bind(("skcipher", cipher))
        finally:
            alg.close()
    except OSError as exc:
        trace(f"warm-up: {cipher} via AF_ALG not available ({exc.strerror})")
        return False
    return True


def _load_dm_crypt(sysfs: str = "/sys/module") -> None:
    """modprobe dm_crypt, unless it is loaded already (the busybox hook's early modprobe loads it)."""
    try:
        with open(os.path.join(sysfs, "dm_crypt", "initstate")) as f:
            if f.read().strip() == "live":
                return
    except OSError:
        pass  # not loaded, or built in (no initstate): modprobe tells
    from unlocker.lean.run import run, which  # here, not at the top: not needed before the cipher's thread starts

    modprobe = which("modprobe")
    if modprobe:
        run([modprobe, "-q", "-a", "dm_crypt"])


def _seed_entropy(tpm_wait: float = TPM_WAIT) -> None:
    """See that the kernel's random pool gets seeded now: from the TPM, else by waiting for it."""
    try:
        if not entropy.seed_from_tpm(wait=tpm_wait):
            return  # seeded already (a CPU RNG, or the kernel's TPM hwrng)
        trace("warm-up: the kernel's random pool is seeded from the TPM")
        return
    except (entropy.SeedError, OSError) as exc:
        trace(f"warm-up: the random pool not seeded from the TPM ({exc}); waiting for the kernel")
    # a read of /dev/random blocks until the pool is seeded, like getrandom(2), but os.read lets
    # the other threads run meanwhile (os.getrandom holds the GIL while it waits)
    fd = os.open("/dev/random", os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.read(fd, 1)
    finally:
        os.close(fd)
    trace("warm-up: the kernel's random pool is seeded")


def _best_effort(step: Callable[[], None]) -> Callable[[], None]:
    def run_step() -> None:
        try:
            step()
        except Exception as exc:  # a head start only: never a traceback on the boot console
            trace(f"warm-up: stopped ({type(exc).__name__}: {exc})")
    return run_step


def _dm_crypt_step() -> None:
    try:
        _load_dm_crypt()
    finally:
        if _dm_tried is not None:
            _dm_tried.set()


def _cipher_step(cipher: str) -> Callable[[], None]:
    def step() -> None:
        loaded = _instantiate_cipher(cipher)
        trace("warm-up: the cipher is loaded" if loaded else "warm-up: done without the cipher")
    return step


def wait_for_dm_crypt(timeout: float = 10) -> None:
    """Before `cryptsetup open`: let the warm-up's modprobe of dm-crypt finish, if it started one.

    Without device-mapper loaded cryptsetup fails ("Cannot initialize device-mapper"), and with a
    fast TPM the key can be unsealed before that modprobe is done.
    """
    if _started and _dm_tried is not None:
        _dm_tried.wait(timeout)


def start(cipher: str = DEFAULT_CIPHER) -> list[Background]:
    """Start the warm-up once per run; later calls return the threads already started.

    Three threads, as each mostly waits: on the kernel's modprobe helpers (one per piece of the
    cipher), on modprobe, on the TPM (or, without a usable one, on timer jitter). The cipher's comes
    first (nothing joins it): the kernel's work for it is the longest.
    """
    global _dm_tried
    if not _started:
        Background(_best_effort(_cipher_step(cipher)), "warm-up: cipher")
        _dm_tried = Signal()
        steps = {"dm-crypt": _dm_crypt_step, "entropy": _seed_entropy}
        _started.extend(Background(_best_effort(step), f"warm-up: {name}") for name, step in steps.items())
    return _started


def start_early(argv: Sequence[str], marker: str = initrd.MARKER) -> None:
    """Start the warm-up for an `unlock` in the initrd, before the rest of the program is imported."""
    if argv[:1] == ["unlock"] and initrd.in_initrd(marker):
        set_debug(debug_on_cmdline(marker))  # the warm-up's own lines, when they are asked for
        start()
