"""What a command may take from a token: only what the sealed key's policy proves.

The LUKS2 header is anyone's to write (an evil maid with the powered-off disk, a USB stick); the TPM
enforces the sealed key's policy digest and nothing else. A re-seal that carried over the header's
chains, signing key or grace as written would seal the key to an attacker's boot chain or key after
one prompt; a signature made over the header's epoch counter would retire nothing. So before a
command carries anything over or signs for a token: the sealed key's policy is the token's
policy_hash (the TPM loads the object: public and private bound), the token's description digests
to it (Token.policy_described), the signing key is the one named and its epoch counter the one
its policy reference binds.
"""

from __future__ import annotations

import hashlib

from unlocker import store
from unlocker.errors import CorruptError, UnlockerError
from unlocker.token import Token
from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import PcrSelection
from unlocker.tpm.signing import key_name

# signatures by this tool only (a key that also signs other tools' policies cannot be replayed here),
# over this enrolment's epoch counter and PCR selection only: the reference PolicyAuthorize binds is
# H(REF_PREFIX || the counter's NV name || TPML_PCR_SELECTION), so the sealed policy names the counter
# that retires and the PCRs a signature must cover. PolicyAuthorize opens to any policy the key signs:
# which PCRs the signers (sign-policy, the machine key in hooks) approve must not come from the header.
REF_PREFIX = b"tpm2-unlocker"
HINT = "the header was edited, or the sealed key is gone: 'tpm2-unlocker remove' it and enrol again"


def policy_ref(epoch_name: bytes, selection: PcrSelection) -> bytes:
    return hashlib.sha256(REF_PREFIX + epoch_name + selection.marshal()).digest()


def prove(tpm: Tpm, token: Token) -> None:
    """CorruptError (with HINT) unless the token's description of its policy is the sealed key's."""
    where = f"token {token.token_id}" if token.token_id is not None else "the token"
    try:
        store.check_placement(tpm, token)
    except CorruptError as exc:
        raise CorruptError(f"{where}: {exc}", hint=HINT) from None
    if not token.policy_described():
        raise CorruptError(f"{where} describes another policy than its sealed key carries", hint=HINT)
    signed = token.signed
    if signed is None:
        return
    try:
        named = key_name(signed.key_public)
    except (ValueError, UnlockerError):  # not a TPM2B_PUBLIC at all
        named = b""
    if named != signed.key_name:
        raise CorruptError(f"{where}: its signing key is not the one its policy names", hint=HINT)
    try:
        epoch_name = tpm.nv_name(signed.epoch)
    except UnlockerError:
        epoch_name = b""
    if signed.policy_ref != policy_ref(signed.epoch_name, signed.selection) or epoch_name != signed.epoch_name:
        raise CorruptError(f"{where}: its epoch counter or signed PCRs are not the ones its policy binds", hint=HINT)
    if signed.selection != token.selection:
        raise CorruptError(f"{where}: its signing key approves {signed.selection}, the enrolment binds "
                           f"{token.selection}", hint=HINT)
