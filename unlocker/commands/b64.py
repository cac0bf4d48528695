"""Base64 of secrets, written into wipeable buffers.

The standard library's base64 and binascii return immutable bytes, which stay in memory unwiped:
for a key or passphrase we encode and decode byte by byte into a Secret's bytearray instead (the
small ints on the way are Python's, as for every byte we handle).
"""

from __future__ import annotations

from unlocker.secret import Secret

_STANDARD = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_URLSAFE_VALUES = {c: i for i, c in enumerate(_STANDARD[:62] + b"-_")}


def encode(secret: Secret) -> Secret:
    """Standard base64 with padding: how systemd-cryptenroll turns the secret it seals into the
    keyslot's passphrase (base64mem)."""
    data = secret.data
    out = bytearray(4 * ((len(data) + 2) // 3))
    for o, i in zip(range(0, len(out), 4), range(0, len(data), 3), strict=True):
        count = min(3, len(data) - i)
        n = data[i] << 16 | (data[i + 1] << 8 if count > 1 else 0) | (data[i + 2] if count > 2 else 0)
        for k in range(4):
            out[o + k] = _STANDARD[(n >> (18 - 6 * k)) & 0x3F] if k <= count else 0x3D  # '='
    return Secret(out)


def decode_urlsafe(text: bytes | bytearray | memoryview, what: str) -> Secret:
    """The bytes of base64url `text` without padding (JOSE's form). ValueError naming `what` (never
    a character of it) when it is not that."""
    if len(text) % 4 == 1:
        raise ValueError(f"{what} is not base64url")
    out = bytearray(len(text) * 3 // 4)
    acc = bits = o = 0
    for c in text:
        value = _URLSAFE_VALUES.get(c)
        if value is None:
            out[:] = bytes(len(out))
            raise ValueError(f"{what} is not base64url")
        acc = ((acc << 6) | value) & 0xFFFF
        bits += 6
        if bits >= 8:
            bits -= 8
            out[o] = (acc >> bits) & 0xFF
            o += 1
    return Secret(out)
