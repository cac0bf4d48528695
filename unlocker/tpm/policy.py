"""PCR selections and policy digest math, in pure Python (no TPM needed).

Digests follow TPM 2.0 Part 3: PolicyPCR extends the policy digest with
H(old || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || H(selected PCR values)), PolicyAuthValue with
H(old || TPM_CC_PolicyAuthValue). The policy itself is always SHA-256 (our objects' nameAlg).
"""

from __future__ import annotations

import struct

from unlocker import TYPE_CHECKING
from unlocker.errors import UsageError
from unlocker.lean.record import record

if TYPE_CHECKING:
    from typing import Any

TPM_CC_POLICY_PCR = 0x0000017F
TPM_CC_POLICY_AUTH_VALUE = 0x0000016B
TPM_CC_POLICY_OR = 0x00000171

# bank name -> (TPM_ALG_ID, digest size)
BANKS: dict[str, tuple[int, int]] = {
    "sha1": (0x0004, 20),
    "sha256": (0x000B, 32),
    "sha384": (0x000C, 48),
    "sha512": (0x000D, 64),
}
PCR_COUNT = 24
DEFAULT_PCRS = "sha256:0,2,4,7"


@record(frozen=True)
class PcrSelection:
    """One bank and a sorted set of PCR indexes, e.g. sha256:0,2,4,7."""

    bank: str
    pcrs: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> PcrSelection:
        """Parse "sha256:0,2,4,7" (bank optional, default sha256; "7+0" also accepted)."""
        bank, sep, rest = text.strip().partition(":")
        if not sep:
            bank, rest = "sha256", text.strip()
        bank = bank.lower()
        if bank not in BANKS:
            raise UsageError(f"unknown PCR bank '{bank}' (use one of {', '.join(BANKS)})")
        items = [p for p in rest.replace("+", ",").split(",") if p.strip()]
        if not items:
            raise UsageError(f"no PCRs in '{text}' (write them like sha256:0,2,4,7)")
        pcrs: set[int] = set()
        for item in items:
            try:
                n = int(item.strip(), 0)
            except ValueError:
                raise UsageError(f"'{item.strip()}' is not a PCR number (0-23) in '{text}'") from None
            if not 0 <= n < PCR_COUNT:
                raise UsageError(f"PCR {n} is out of range 0-23 in '{text}'")
            pcrs.add(n)
        return cls(bank, tuple(sorted(pcrs)))

    def __str__(self) -> str:
        return f"{self.bank}:{','.join(str(p) for p in self.pcrs)}"

    @property
    def alg_id(self) -> int:
        return BANKS[self.bank][0]

    @property
    def digest_size(self) -> int:
        return BANKS[self.bank][1]

    def bitmap(self) -> bytes:
        """The pcrSelect bytes of a TPMS_PCR_SELECTION: bit p % 8 of byte p // 8 for PCR p."""
        bits = bytearray(PCR_COUNT // 8)
        for p in self.pcrs:
            bits[p // 8] |= 1 << (p % 8)
        return bytes(bits)

    @staticmethod
    def pcrs_in(bitmap: bytes) -> tuple[int, ...]:
        """The PCRs a pcrSelect bitmap selects (the inverse of bitmap())."""
        return tuple(p for p in range(len(bitmap) * 8) if bitmap[p // 8] & (1 << (p % 8)))

    def marshal(self) -> bytes:
        """TPML_PCR_SELECTION with this one bank, as the TPM hashes it."""
        return struct.pack(">IHB", 1, self.alg_id, PCR_COUNT // 8) + self.bitmap()


def _sha256(data: bytes = b"") -> Any:
    # hashlib loads OpenSSL's digests on import; the boot path (unlock) never needs it
    import hashlib

    return hashlib.sha256(data)


def pcr_composite_digest(values: dict[int, bytes], selection: PcrSelection) -> bytes:
    """H(values of the selected PCRs in index order) — the digest PolicyPCR binds to."""
    h = _sha256()
    for p in selection.pcrs:
        value = values[p]
        if len(value) != selection.digest_size:
            raise ValueError(f"PCR {p} value has {len(value)} bytes, {selection.bank} needs {selection.digest_size}")
        h.update(value)
    return h.digest()


def policy_pcr(selection: PcrSelection, values: dict[int, bytes], previous: bytes = bytes(32)) -> bytes:
    """The policy digest after TPM2_PolicyPCR(selection) with the given PCR values."""
    return _sha256(
        previous
        + struct.pack(">I", TPM_CC_POLICY_PCR)
        + selection.marshal()
        + pcr_composite_digest(values, selection)
    ).digest()


def policy_auth_value(previous: bytes) -> bytes:
    return _sha256(previous + struct.pack(">I", TPM_CC_POLICY_AUTH_VALUE)).digest()


def policy_or(branches: list[bytes]) -> bytes:
    """The digest after TPM2_PolicyOR over 2..8 branch digests."""
    if not 2 <= len(branches) <= 8:
        raise ValueError("PolicyOR takes 2 to 8 branches")
    return _sha256(bytes(32) + struct.pack(">I", TPM_CC_POLICY_OR) + b"".join(branches)).digest()


def sealing_policy(selection: PcrSelection, values: dict[int, bytes], with_pin: bool = False) -> bytes:
    digest = policy_pcr(selection, values)
    return policy_auth_value(digest) if with_pin else digest


def changed_pcrs(expected: dict[int, bytes], current: dict[int, bytes]) -> list[int]:
    """PCR indexes whose current value differs from the one recorded at sealing."""
    return sorted(p for p, v in expected.items() if current.get(p) != v)
