"""The TPM PIN: the auth value a sealed key with a PIN is bound to, and PINs read from a file.

The auth value is SHA-256 of the PIN's bytes (as systemd-cryptenroll derives it from a PIN without
salt), with trailing zero bytes removed: the TPM removes them from an auth value before it keys an
HMAC with it, and doing it here as well makes the value the same whichever side strips.
"""

from __future__ import annotations

from unlocker.errors import UsageError
from unlocker.secret import Secret

MAX_PIN = 256
# A line break ends the answer at every boot prompt, a NUL plymouth's and systemd's agents' C strings
UNTYPABLE = (0x00, 0x0A, 0x0D)


def auth_value(pin: Secret) -> Secret:
    """The auth value of `pin` (a Secret of its own: wipe it after use)."""
    import hashlib  # only for a PIN: a boot without one never loads OpenSSL's digests

    digest = hashlib.sha256(pin.data)
    value = bytearray(digest.digest())
    while value and value[-1] == 0:
        value.pop()
    return Secret(value)


def checked(pin: Secret | None, what: str) -> Secret:
    """`pin` when it is a usable PIN (1 to MAX_PIN bytes); UsageError naming `what` otherwise."""
    if pin is None:
        raise UsageError(f"no {what} given (nobody at a terminal to ask; use --pin-file)")
    if not 0 < len(pin) <= MAX_PIN:
        size = len(pin)
        pin.wipe()
        raise UsageError(f"the {what} must have 1 to {MAX_PIN} bytes, not {size}")
    if any(byte in pin.data for byte in UNTYPABLE):
        pin.wipe()
        raise UsageError(f"the {what} cannot hold a line break or a NUL byte: no prompt at boot could take it, "
                         "and each try would count towards the TPM's lockout")
    return pin


def read_pin_file(path: str) -> Secret:
    """The PIN in `path` ('-': stdin): its bytes, less one line ending (as typed at a prompt)."""
    try:
        pin = Secret.read_file(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the PIN from {path}: {getattr(exc, 'strerror', None) or exc}") from None
    for ending in (0x0A, 0x0D):
        if pin.data and pin.data[-1] == ending:
            pin.data[-1] = 0
            pin.data.pop()
    return checked(pin, "TPM PIN")
