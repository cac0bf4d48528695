"""Boot-time head start: load what `cryptsetup open` will need while we still wait for the disk.

Opening a LUKS2 device makes the kernel load dm-crypt and instantiate the cipher twice over (AF_ALG
for the keyslot, dm-crypt for the volume); each missing piece is a modprobe the kernel runs while
cryptsetup waits. Done here, in a thread that sleeps in system calls, that work moves off the path
from "the disk appeared" to "the disk is open". Everything is best effort: a failure only means
cryptsetup does the work itself later.
"""

from __future__ import annotations

import socket
import threading

from .log import trace
from .run import run, which

# LUKS2's default (cryptsetup >= 2.0): aes-xts-plain64 for the volume and its keyslots.
DEFAULT_CIPHER = "xts(aes)"


def _instantiate_cipher(cipher: str) -> bool:
    """Bind an AF_ALG skcipher socket: the kernel loads af_alg, algif_skcipher and the cipher's modules."""
    try:
        with socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0) as alg:
            alg.bind(("skcipher", cipher))
    except OSError as exc:
        trace(f"warm-up: {cipher} via AF_ALG not available ({exc.strerror})")
        return False
    return True


def _warm_up(cipher: str) -> None:
    try:
        modprobe = which("modprobe")
        if modprobe:
            run([modprobe, "-q", "-a", "dm_crypt"])
        loaded = _instantiate_cipher(cipher)
    except Exception as exc:  # a head start only: never a traceback on the boot console
        trace(f"warm-up: stopped ({type(exc).__name__}: {exc})")
        return
    trace("warm-up: dm-crypt and the cipher are loaded" if loaded else "warm-up: done without the cipher")


def start(cipher: str = DEFAULT_CIPHER) -> threading.Thread:
    thread = threading.Thread(target=_warm_up, args=(cipher,), name="warm-up", daemon=True)
    thread.start()
    return thread
