"""Signed policies: the LUKS2 tokens of type tpm2-unlocker-signature that sign-policy writes beside
the enrolment, each a signature approving PCR values for enrolments with a signing key (PolicyAuthorize).

Parsed strictly like our own token (the header is anyone's to write); a forged or altered signature
only makes the TPM refuse. The boot tries those whose PCR values are the ones read, newest epoch
first; an epoch below the enrolment's counter is retired and the TPM refuses it too.
"""

from __future__ import annotations

import binascii

from unlocker import TYPE_CHECKING
from unlocker.errors import CorruptError
from unlocker.lean.record import field, record
from unlocker.token import Branch, Token, _b64, _hex, _need, _pcr_branch, _spelled_with, _whole  # our token's checks
from unlocker.tpm.policy import BANKS, Authorization, PcrSelection, PolicyPlan

if TYPE_CHECKING:
    from typing import Any

SIGNATURE_TYPE = "tpm2-unlocker-signature"
SIGNATURE_VERSION = 1
_FIELDS = {"type", "keyslots", "version", "key_name", "policy_ref", "pcr_bank", "pcrs", "pcr_values", "epoch",
           "approved", "signed_digest", "signature"}
# the boot tries at most this many signatures for one enrolment (each costs a few TPM commands)
MAX_TRIED = 4


@record
class Signature:
    """PCR values approved by the key named `key_name`: the signature over H(approved || policy_ref),
    `approved` being PolicyPCR(selection, values) then PolicyNV(epoch counter <= epoch)."""

    key_name: bytes
    policy_ref: bytes
    selection: PcrSelection
    pcr_values: dict[int, bytes]
    epoch: int
    approved: bytes
    signed_digest: bytes
    signature: bytes  # a marshalled TPMT_SIGNATURE
    token_id: int | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"type": SIGNATURE_TYPE, "keyslots": [], "version": SIGNATURE_VERSION,
                "key_name": self.key_name.hex(), "policy_ref": self.policy_ref.hex(),
                "pcr_bank": self.selection.bank, "pcrs": list(self.selection.pcrs),
                "pcr_values": {str(p): v.hex() for p, v in sorted(self.pcr_values.items())},
                "epoch": self.epoch, "approved": self.approved.hex(), "signed_digest": self.signed_digest.hex(),
                "signature": binascii.b2a_base64(self.signature, newline=False).decode()}

    def applies_to(self, token: Token) -> bool:
        signed = token.signed
        return (signed is not None and self.key_name == signed.key_name and self.policy_ref == signed.policy_ref
                and self.selection.bank == token.selection.bank)


def parse_signature(doc: Any, token_id: int | None = None) -> Signature:
    if not isinstance(doc, dict) or doc.get("type") != SIGNATURE_TYPE:
        raise CorruptError(f"signature token type is not '{SIGNATURE_TYPE}'")
    if set(doc) != _FIELDS:
        raise CorruptError("signature token has missing or unknown fields")
    if _need(doc, "version", int) != SIGNATURE_VERSION or _need(doc, "keyslots", list) != []:
        raise CorruptError("signature token version or keyslots are not ours")
    bank = _need(doc, "pcr_bank", str)
    if bank not in BANKS:
        raise CorruptError(f"signature token PCR bank '{bank}' is unknown")
    chain = _pcr_branch(doc, bank, "signature ")
    ref = _need(doc, "policy_ref", str)
    if ref and not _spelled_with(ref, "0123456789abcdef", range(2, 129)):
        raise CorruptError("signature token field 'policy_ref' is not lower-case hex")
    return Signature(_hex(_need(doc, "key_name", str), "key_name", (34,)), _hex(ref, "policy_ref", tuple(range(65))),
                     chain.selection, chain.pcr_values, _whole(doc, "epoch", 1 << 64),
                     _hex(_need(doc, "approved", str), "approved", (32,)),
                     _hex(_need(doc, "signed_digest", str), "signed_digest", (32,)),
                     _b64(_need(doc, "signature", str), "signature"), token_id)


def signatures_in(raw_tokens: dict[int, Any]) -> list[Signature]:
    """Every well-formed signature token of a header, newest epoch first (a malformed one is skipped:
    it can only ever make the TPM refuse)."""
    found = []
    for tid, doc in sorted(raw_tokens.items()):
        if isinstance(doc, dict) and doc.get("type") == SIGNATURE_TYPE:
            try:
                found.append(parse_signature(doc, tid))
            except CorruptError:
                continue
    return sorted(found, key=lambda s: -s.epoch)


def signed_branch(token: Token, signature: Signature) -> Branch:
    """The signed branch of `token` with the PCR policy `signature` approves before PolicyAuthorize."""
    assert token.signed is not None
    base = token.branches()[token.signed_index()]
    authorize = Authorization(token.signed.key_name, token.signed.policy_ref, token.signed.key_public,
                              signature.approved, signature.signed_digest, signature.signature)
    plan = PolicyPlan(signature.selection, signature.pcr_values, (token.epoch_check(signature.epoch),),
                      authorize=authorize, lock=base.plan.lock, auth_value=base.plan.auth_value)
    return Branch("signed", plan, base.index)
