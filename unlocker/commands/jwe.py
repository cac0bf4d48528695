"""Clevis's JWE: AES-256-GCM with the key given directly (alg dir), decrypted with `cryptography`.

Installed-system code only (adopt --from clevis): the boot never imports it. The plaintext is written
into a Secret's buffer (update_into), never into an immutable bytes.
"""

from __future__ import annotations

from unlocker.errors import CorruptError, UsageError
from unlocker.secret import Secret

KEY_SIZE = 32  # A256GCM
BLOCK = 16


def decrypt_a256gcm(key: Secret, protected: bytes, iv: bytes, ciphertext: bytes, tag: bytes) -> Secret:
    """The plaintext of a JWE (RFC 7516) encrypted with A256GCM under `key`; the additional
    authenticated data is the protected header's base64url text. CorruptError when the tag does not
    verify (another key, or a JWE changed since it was made)."""
    try:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    except ImportError:
        raise UsageError("decrypting Clevis's JWE needs the Python package 'cryptography', which this build "
                         "lacks") from None
    if len(key) != KEY_SIZE:
        raise CorruptError(f"the JWE's key has {len(key)} bytes, A256GCM takes {KEY_SIZE}")
    decryptor = Cipher(algorithms.AES(key.data), modes.GCM(iv, tag)).decryptor()
    decryptor.authenticate_additional_data(protected)
    # update_into needs room for a block more than it writes
    out = Secret(bytearray(len(ciphertext) + BLOCK - 1))
    try:
        written = decryptor.update_into(ciphertext, out.data)
        decryptor.finalize()
    except InvalidTag:  # the plaintext was written before the tag was checked: it goes
        out.wipe()
        raise CorruptError("the JWE does not decrypt with the key the TPM unsealed (its tag does not verify)") from None
    plaintext = Secret(bytearray(written))  # its exact size, copied: shrinking a bytearray may move it unwiped
    plaintext.data[:] = memoryview(out.data)[:written]
    out.wipe()
    return plaintext


def jwk_key(jwk: Secret) -> Secret:
    """The key of a symmetric JWK (`{"kty":"oct","k":"<base64url>",...}`, the JSON Clevis seals),
    read in place: the JSON is checked on a copy whose key text is blanked, so that the key never
    lands in an immutable str."""
    import json

    data = jwk.data
    start = _key_text_start(data)
    end = data.find(b'"', start) if start >= 0 else -1
    if end < 0:
        raise CorruptError("the unsealed JWK has no key ('k')")
    blanked = bytearray(data)
    blanked[start:end] = b"A" * (end - start)
    try:
        parsed = json.loads(bytes(blanked))
    except (ValueError, RecursionError):
        raise CorruptError("the unsealed JWK is not JSON") from None
    finally:
        blanked[:] = bytes(len(blanked))
    if not isinstance(parsed, dict) or parsed.get("kty") != "oct" or parsed.get("k") != "A" * (end - start):
        raise CorruptError("the unsealed JWK is not a symmetric key (kty oct)")
    from unlocker.commands.b64 import decode_urlsafe

    try:
        return decode_urlsafe(memoryview(data)[start:end], "the unsealed JWK's key")
    except ValueError as exc:
        raise CorruptError(str(exc)) from None


def _key_text_start(data: bytearray) -> int:
    """Where the text of the "k" member's string value starts (-1: none)."""
    at = 0
    while (at := data.find(b'"k"', at)) >= 0:
        i = at + 3
        while i < len(data) and data[i] in b" \t\r\n":
            i += 1
        if i < len(data) and data[i] == ord(":"):
            i += 1
            while i < len(data) and data[i] in b" \t\r\n":
                i += 1
            if i < len(data) and data[i] == ord('"'):
                return i + 1
        at += 3
    return -1
