"""Which keyslot a verb may kill. A header is anyone's to write, so a token's word that a keyslot is
ours proves nothing: it may name the user's passphrase keyslot, the recovery key's or another tool's.

A keyslot goes only when all hold: no token that stays names it; it carries the mark of the keys we
add (PBKDF2-SHA256 at 1000 iterations, luks.FAST_PBKDF: the key is random, so a costly PBKDF would
add nothing), which no default luksFormat or luksAddKey gives a passphrase, and which a header's
writer cannot give the user's keyslot without breaking it (the PBKDF parameters derive its key); and
the secret given does not open it. The last alone is no proof when the secret given is the recovery
key, which cannot tell the passphrase's keyslot by trying it: the mark can.
"""

from __future__ import annotations

from collections.abc import Collection

from unlocker.luks import FAST_KDF, KeyBytes, LuksDevice


def names(doc: object, slot: int) -> bool:
    """Whether a token's JSON object names `slot` among its keyslots (read as hostile input)."""
    if not isinstance(doc, dict):
        return False
    slots = doc.get("keyslots")
    return isinstance(slots, list) and str(slot) in [s for s in slots if isinstance(s, str)]


def made_by_us(device: LuksDevice, slot: int) -> bool:
    """Whether the keyslot has the PBKDF we give the keys we add."""
    kdf = device.keyslot_kdf(slot)
    return isinstance(kdf, dict) and all(kdf.get(k) == v and type(kdf.get(k)) is type(v) for k, v in FAST_KDF.items())


def why_keep(device: LuksDevice, slot: int, secret: KeyBytes, going: Collection[int] = ()) -> str:
    """Why `slot` must stay ('' when it may go): `going` are the token ids removed with it."""
    for tid, doc in sorted(device.raw_tokens().items()):
        if tid not in going and names(doc, slot):
            kind = doc.get("type") if isinstance(doc, dict) else None
            return f"token {tid} ({str(kind)[:40]}) names it too"
    if not made_by_us(device, slot):
        return "it is not a keyslot tpm2-unlocker made (its PBKDF is not the one we give our keys)"
    if device.test_key(secret, slot):
        return "the secret given opens it"
    return ""
