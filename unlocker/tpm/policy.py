"""PCR selections and policy digest math, in pure Python (no TPM needed).

Digests follow TPM 2.0 Part 3: PolicyPCR extends the policy digest with
H(old || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || H(selected PCR values)), PolicyAuthValue with
H(old || TPM_CC_PolicyAuthValue), PolicyNV with H(old || TPM_CC_PolicyNV || H(operandB || offset ||
operation) || NV name), PolicyCounterTimer with H(old || TPM_CC_PolicyCounterTimer || H(operandB ||
offset || operation)); PolicyAuthorize starts again from H(H(zeros || TPM_CC_PolicyAuthorize || key
name) || policyRef) and PolicyOR from H(zeros || TPM_CC_PolicyOR || branch digests). The policy itself
is always SHA-256 (our objects' nameAlg).

A PolicyPlan is one branch's assertions in the order a session makes them: the TPM client runs it
at unseal (tpm/session.py) and plan_digest() is its digest, held to the TPM's trial sessions.
"""

from __future__ import annotations

import struct

from unlocker import TYPE_CHECKING
from unlocker.errors import UsageError
from unlocker.lean.record import field, record

if TYPE_CHECKING:
    from typing import Any

TPM_CC_POLICY_PCR = 0x0000017F
TPM_CC_POLICY_AUTH_VALUE = 0x0000016B
TPM_CC_POLICY_OR = 0x00000171
TPM_CC_POLICY_NV = 0x00000149
TPM_CC_POLICY_COUNTER_TIMER = 0x0000016D
TPM_CC_POLICY_AUTHORIZE = 0x0000016A
# TPM_EO: how PolicyNV and PolicyCounterTimer compare (A: the TPM's value, B: the operand)
EO_EQ = 0x0000
EO_UNSIGNED_LE = 0x0009
# TPMS_TIME_INFO: time (8 bytes), then clockInfo: clock (8), resetCount (4), restartCount (4), safe (1)
RESET_COUNT_OFFSET = 16
MAX_BRANCHES = 8  # TPM2_PolicyOR takes 2 to 8 digests

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


def _args_digest(operand: bytes, offset: int, operation: int) -> bytes:
    return _sha256(operand + struct.pack(">HH", offset, operation)).digest()


def policy_nv(previous: bytes, nv_name: bytes, operand: bytes, offset: int, operation: int) -> bytes:
    """The digest after TPM2_PolicyNV: the NV index named `nv_name`, compared with `operand`."""
    return _sha256(previous + struct.pack(">I", TPM_CC_POLICY_NV) + _args_digest(operand, offset, operation)
                   + nv_name).digest()


def policy_counter_timer(previous: bytes, operand: bytes, offset: int, operation: int) -> bytes:
    """The digest after TPM2_PolicyCounterTimer (the TPM's TPMS_TIME_INFO compared with `operand`)."""
    return _sha256(previous + struct.pack(">I", TPM_CC_POLICY_COUNTER_TIMER)
                   + _args_digest(operand, offset, operation)).digest()


def policy_authorize(key_name: bytes, policy_ref: bytes) -> bytes:
    """The digest after TPM2_PolicyAuthorize by the key named `key_name` (whatever came before)."""
    first = _sha256(bytes(32) + struct.pack(">I", TPM_CC_POLICY_AUTHORIZE) + key_name).digest()
    return _sha256(first + policy_ref).digest()


def authorized_digest(approved: bytes, policy_ref: bytes) -> bytes:
    """What a signer signs to approve `approved`: aHash = H(approvedPolicy || policyRef)."""
    return _sha256(approved + policy_ref).digest()


@record(frozen=True)
class NvCheck:
    """TPM2_PolicyNV: the NV index `index` (named `name`: its name goes into the digest) compared
    with `operand` from byte `offset` on."""

    index: int
    name: bytes
    operand: bytes
    operation: int
    offset: int = 0


@record(frozen=True)
class Authorization:
    """TPM2_PolicyAuthorize: a signature by the key named `key_name` (TPM2B_PUBLIC `key_public`)
    approves the PCR policy asserted before it. At unseal also the signature's parts: `approved`
    (the approved policy), `signed_digest` (H(approved || policy_ref), what was signed) and
    `signature` (a marshalled TPMT_SIGNATURE)."""

    key_name: bytes
    policy_ref: bytes = b""
    key_public: bytes = b""
    approved: bytes = b""
    signed_digest: bytes = b""
    signature: bytes = b""


@record(frozen=True)
class PolicyPlan:
    """One branch of a policy, in the order a session asserts it:
    PolicyPCR(selection) -> PolicyNV(each of nv_checks) -> PolicyCounterTimer(resetCount <= reset_limit)
    -> PolicyAuthorize(authorize) -> PolicyPCR(lock, at its reset value) -> PolicyAuthValue -> PolicyOR(or_digests).

    `values` are the PCR values the digest binds; at unseal the TPM uses its own (and the session
    fails when they differ). `or_digests`: every branch's digest, when the policy has several."""

    selection: PcrSelection | None
    values: dict[int, bytes] = field(default_factory=dict)
    nv_checks: tuple[NvCheck, ...] = ()
    reset_limit: int | None = None
    authorize: Authorization | None = None
    lock: PcrSelection | None = None
    auth_value: bool = False
    or_digests: tuple[bytes, ...] = ()

    def reset_operand(self) -> bytes:
        return struct.pack(">I", self.reset_limit or 0)


def approved_digest(plan: PolicyPlan) -> bytes:
    """The digest of what comes before PolicyAuthorize: what a signature approves."""
    digest = bytes(32)
    if plan.selection is not None:
        digest = policy_pcr(plan.selection, plan.values, digest)
    for check in plan.nv_checks:
        digest = policy_nv(digest, check.name, check.operand, check.offset, check.operation)
    if plan.reset_limit is not None:
        digest = policy_counter_timer(digest, plan.reset_operand(), RESET_COUNT_OFFSET, EO_UNSIGNED_LE)
    return digest


def branch_digest(plan: PolicyPlan) -> bytes:
    """The session's digest after the branch's assertions, before PolicyOR: what the object's
    policy holds when it has this branch alone, and what PolicyOR lists for it."""
    digest = approved_digest(plan)
    if plan.authorize is not None:
        digest = policy_authorize(plan.authorize.key_name, plan.authorize.policy_ref)
    if plan.lock is not None:
        digest = policy_pcr(plan.lock, dict.fromkeys(plan.lock.pcrs, bytes(plan.lock.digest_size)), digest)
    if plan.auth_value:
        digest = policy_auth_value(digest)
    return digest


def combined_policy(branch_digests: list[bytes]) -> bytes:
    """The object's policy: the one branch's digest, or PolicyOR over 2..8 of them."""
    return branch_digests[0] if len(branch_digests) == 1 else policy_or(branch_digests)


def sealing_policy(selection: PcrSelection, values: dict[int, bytes], with_pin: bool = False) -> bytes:
    digest = policy_pcr(selection, values)
    return policy_auth_value(digest) if with_pin else digest


def changed_pcrs(expected: dict[int, bytes], current: dict[int, bytes]) -> list[int]:
    """PCR indexes whose current value differs from the one recorded at sealing."""
    return sorted(p for p, v in expected.items() if current.get(p) != v)
