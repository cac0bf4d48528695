"""The PEM keys of signed policies (enroll --signing-key, sign-policy), read and used with
`cryptography`: on the installed system only, never imported at boot (the boot checks signatures
with the TPM: LoadExternal, VerifySignature)."""

from __future__ import annotations

from typing import Any

from unlocker.errors import UsageError
from unlocker.tpm import signing


def cryptography_serialization() -> Any:
    """cryptography's serialization module, or one line saying this build lacks it."""
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        raise UsageError("signed policies need Python's 'cryptography' package, which this build lacks") from None
    return serialization


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 16)
    except OSError as exc:
        raise UsageError(f"cannot read the {what} {path}: {exc.strerror}") from None


def public_area(key: Any) -> bytes:
    """The TPM2B_PUBLIC (marshalled) of a cryptography public key: RSA-2048 or ECC P-256."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        return signing.rsa_public(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"), numbers.e)
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        point = key.public_numbers()
        return signing.ecc_public(point.x.to_bytes(32, "big"), point.y.to_bytes(32, "big"))
    raise UsageError("the signing key must be RSA-2048 or ECC P-256")


def load_public(path: str) -> bytes:
    """A PEM public key (or the public half of a PEM private key), as a TPM2B_PUBLIC."""
    serialization = cryptography_serialization()
    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError):
            raise UsageError(f"{path} is not a PEM public key (RSA-2048 or ECC P-256)") from None
    return public_area(key)


class PrivateKey:
    """A PEM private key that signs policy digests (sign-policy)."""

    def __init__(self, path: str) -> None:
        serialization = cryptography_serialization()
        try:
            self._key = serialization.load_pem_private_key(_read(path, "private key"), password=None)
        except (ValueError, TypeError):
            raise UsageError(f"{path} is not an unencrypted PEM private key (RSA-2048 or ECC P-256)") from None
        self.public = public_area(self._key.public_key())

    def sign(self, digest: bytes) -> bytes:
        """The marshalled TPMT_SIGNATURE over a SHA-256 `digest` (what PolicyAuthorize's ticket needs)."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

        if isinstance(self._key, rsa.RSAPrivateKey):
            return signing.rsa_signature(self._key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256())))
        r, s = decode_dss_signature(self._key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
        return signing.ecdsa_signature(r, s)
