"""A signing key's public area and its signatures in the TPM's own formats (TPM2B_PUBLIC,
TPMT_SIGNATURE), for PolicyAuthorize: enroll --signing-key and sign-policy make them, the boot only
unmarshals them (strictly: they come from the header). No TPM is needed here; the private key is
never here (commands/keys.py reads it)."""

from __future__ import annotations

from unlocker.errors import CorruptError, UsageError
from unlocker.tpm import tss
from unlocker.tpm.srk import srk_name_of
from unlocker.tpm.tss import TssError, lib

RSA_BITS = 2048
ECC_COORDINATE = 32  # NIST P-256


def rsa_public(modulus: bytes, exponent: int) -> bytes:
    """TPM2B_PUBLIC of an RSA-2048 signing key (RSASSA with SHA-256), marshalled."""
    if len(modulus) != RSA_BITS // 8:
        raise UsageError(f"the signing key is RSA with {len(modulus) * 8} bits; use RSA-{RSA_BITS} or ECC P-256")
    public = _signing_template(lib.TPM2_ALG_RSA)
    rsa = public.publicArea.parameters.rsaDetail
    rsa.symmetric.algorithm = lib.TPM2_ALG_NULL
    rsa.scheme.scheme = lib.TPM2_ALG_RSASSA
    rsa.scheme.details.rsassa.hashAlg = lib.TPM2_ALG_SHA256
    rsa.keyBits = RSA_BITS
    rsa.exponent = 0 if exponent == 65537 else exponent  # 0: the TPM's default, 2^16 + 1
    tss.fill_tpm2b(public.publicArea.unique.rsa, modulus)
    return tss.marshal("TPM2B_PUBLIC", public)


def ecc_public(x: bytes, y: bytes) -> bytes:
    """TPM2B_PUBLIC of an ECC NIST P-256 signing key (ECDSA with SHA-256), marshalled."""
    public = _signing_template(lib.TPM2_ALG_ECC)
    ecc = public.publicArea.parameters.eccDetail
    ecc.symmetric.algorithm = lib.TPM2_ALG_NULL
    ecc.scheme.scheme = lib.TPM2_ALG_ECDSA
    ecc.scheme.details.ecdsa.hashAlg = lib.TPM2_ALG_SHA256
    ecc.curveID = lib.TPM2_ECC_NIST_P256
    ecc.kdf.scheme = lib.TPM2_ALG_NULL
    tss.fill_tpm2b(public.publicArea.unique.ecc.x, x.rjust(ECC_COORDINATE, b"\0"))
    tss.fill_tpm2b(public.publicArea.unique.ecc.y, y.rjust(ECC_COORDINATE, b"\0"))
    return tss.marshal("TPM2B_PUBLIC", public)


def _signing_template(kind: int) -> tss.CData:
    public = tss.new("TPM2B_PUBLIC *")
    public.publicArea.type = kind
    public.publicArea.nameAlg = lib.TPM2_ALG_SHA256
    # a key outside the TPM: no fixedTPM/fixedParent; only signing, by anyone (no auth needed to verify)
    public.publicArea.objectAttributes = lib.TPMA_OBJECT_SIGN_ENCRYPT | lib.TPMA_OBJECT_USERWITHAUTH
    return public


def key_name(public: bytes) -> bytes:
    """The TPM name of a marshalled TPM2B_PUBLIC (nameAlg SHA-256): what PolicyAuthorize binds."""
    return srk_name_of(public)


def rsa_signature(signature: bytes) -> bytes:
    """TPMT_SIGNATURE of an RSASSA-PKCS1-v1_5 SHA-256 signature, marshalled."""
    out = tss.new("TPMT_SIGNATURE *")
    out.sigAlg = lib.TPM2_ALG_RSASSA
    out.signature.rsassa.hash = lib.TPM2_ALG_SHA256
    tss.fill_tpm2b(out.signature.rsassa.sig, signature)
    return tss.marshal("TPMT_SIGNATURE", out)


def ecdsa_signature(r: int, s: int) -> bytes:
    """TPMT_SIGNATURE of an ECDSA SHA-256 signature (r, s), marshalled."""
    out = tss.new("TPMT_SIGNATURE *")
    out.sigAlg = lib.TPM2_ALG_ECDSA
    out.signature.ecdsa.hash = lib.TPM2_ALG_SHA256
    tss.fill_tpm2b(out.signature.ecdsa.signatureR, r.to_bytes(ECC_COORDINATE, "big"))
    tss.fill_tpm2b(out.signature.ecdsa.signatureS, s.to_bytes(ECC_COORDINATE, "big"))
    return tss.marshal("TPMT_SIGNATURE", out)


def unmarshal_public(data: bytes) -> tss.CData:
    """A signing key's TPM2B_PUBLIC from a token (hostile input): CorruptError unless it is one, whole."""
    try:
        area, used = tss.unmarshal("TPM2B_PUBLIC", data)
    except TssError:
        raise CorruptError("the signing key's public area is malformed") from None
    if used != len(data):
        raise CorruptError("the signing key's public area has trailing bytes")
    return area


def unmarshal_signature(data: bytes) -> tss.CData:
    """A TPMT_SIGNATURE from a signature token (hostile input): CorruptError unless it is one, whole."""
    try:
        signature, used = tss.unmarshal("TPMT_SIGNATURE", data)
    except TssError:
        raise CorruptError("a signature token's signature is malformed") from None
    if used != len(data):
        raise CorruptError("a signature token's signature has trailing bytes")
    return signature
