"""The recovery key's text: 256 bits from the kernel's RNG as 64 modhex characters in eight groups
of eight, as systemd-cryptenroll writes its recovery keys.

Modhex ("cbdefghijklnrtuv" for the sixteen nibble values) types the same on every keyboard layout
the boot console may have. The text itself, dashes and all, is the keyslot's passphrase, so every
prompt takes it as typed (ours, systemd-ask-password's, cryptsetup's); ours also takes it typed
without dashes, with spaces, or in capitals (normalize).
"""

from __future__ import annotations

from unlocker.secret import Secret

MODHEX = "cbdefghijklnrtuv"
KEY_BYTES = 32
GROUP = 8
TEXT_LENGTH = KEY_BYTES * 2 + KEY_BYTES * 2 // GROUP - 1  # 64 characters and 7 dashes
_MODHEX_BYTES = MODHEX.encode()
_SEPARATORS = b"- \t"


def generate() -> Secret:
    """A new recovery key's text, built in its own buffer from the random bytes (both wiped)."""
    text = bytearray(TEXT_LENGTH)
    with Secret.random(KEY_BYTES) as raw:
        at = 0
        for i, byte in enumerate(raw.data):
            if i and i % (GROUP // 2) == 0:
                text[at] = 0x2D  # '-'
                at += 1
            text[at], text[at + 1] = _MODHEX_BYTES[byte >> 4], _MODHEX_BYTES[byte & 0x0F]
            at += 2
    return Secret(text)


def normalize(typed: Secret) -> Secret | None:
    """The recovery key's text for what was typed, when it is one typed another way (no dashes,
    spaces, capitals); None when it is no recovery key. Built in a buffer of its own."""
    letters = sum(1 for b in typed.data if b not in _SEPARATORS)
    if letters != KEY_BYTES * 2:
        return None
    text = bytearray(TEXT_LENGTH)
    at = count = 0
    for byte in typed.data:
        if byte in _SEPARATORS:
            continue
        lower = byte | 0x20 if 0x41 <= byte <= 0x5A else byte
        if lower not in _MODHEX_BYTES:
            text[:] = bytes(TEXT_LENGTH)
            return None
        if count and count % GROUP == 0:
            text[at] = 0x2D
            at += 1
        text[at] = lower
        at += 1
        count += 1
    return Secret(text)
