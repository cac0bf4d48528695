"""Signed policies: enroll --signing-key gives the enrolment a branch that PolicyAuthorize opens to
any PCR values its key signs; sign-policy signs them (the values of now, predicted ones, or given
ones), with no re-seal on the machine and no passphrase.

What is signed is a PCR policy followed by PolicyNV(the enrolment's epoch counter <= the signature's
epoch): incrementing that counter (--retire-older) retires every older signature, which the header
would otherwise let anyone replay for ever. The signatures live in the disk's header, one LUKS2
token of type tpm2-unlocker-signature each (the initramfs reads the header anyway); the boot tries
those approving the PCR values it reads, newest epoch first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from unlocker.commands import claims
from unlocker.commands.keys import PrivateKey
from unlocker.commands.prediction import Prediction
from unlocker.commands.undo import Undo
from unlocker.errors import CorruptError, UnlockerError, UsageError
from unlocker.log import say
from unlocker.luks import LuksDevice
from unlocker.signature import Signature, signatures_in
from unlocker.token import Signed, Token
from unlocker.tpm.client import Tpm
from unlocker.tpm.nv import DEFAULT_COUNTER_INDEX
from unlocker.tpm.policy import BANKS, PcrSelection, PolicyPlan, approved_digest, authorized_digest
from unlocker.tpm.signing import key_name
from unlocker.tpm.tcti import resolve_tcti

# signatures kept per enrolment in the header (the oldest epochs go first)
KEPT = 4


def new_signed(tpm: Tpm, public: bytes, selection: PcrSelection, undo: Undo) -> Signed:
    """The signed branch of a new enrolment: the key as the TPM takes it, and an epoch counter defined
    now (its undo pushed)."""
    name = key_name(public)
    if tpm.external_key_name(public) != name:
        raise UsageError("the TPM names the signing key otherwise than its public area says")
    epoch = tpm.free_nv_index(DEFAULT_COUNTER_INDEX)
    tpm.counter_define(epoch)
    undo.push(f"remove NV counter 0x{epoch:08x}", lambda: tpm.nv_undefine(epoch))
    epoch_name = tpm.nv_name(epoch)
    return Signed(public, name, claims.policy_ref(epoch_name, selection), selection, epoch, epoch_name)


@dataclass(frozen=True)
class SignOptions:
    device: str | None
    key: str
    tcti: str | None
    pcrs: str | None = None  # BANK:N[=HEX],...: the PCRs approved (N alone: its value now or predicted)
    predict: Prediction | None = None  # approve the next boot's values
    retire_older: bool = False


def parse_pcr_values(text: str) -> tuple[PcrSelection, dict[int, bytes]]:
    """"sha256:0,4=HEX,7": the selection, and the values given for some of its PCRs."""
    bank, sep, rest = text.partition(":")
    if not sep:
        bank, rest = "sha256", text
    given: dict[int, bytes] = {}
    plain = []
    for item in rest.split(","):
        index, equals, value = item.partition("=")
        plain.append(index)
        if equals:
            try:
                given[int(index, 10)] = bytes.fromhex(value)
            except ValueError:
                raise UsageError(f"'{item}' in --pcrs is not N=HEX") from None
    selection = PcrSelection.parse(f"{bank}:{','.join(plain)}")
    for pcr, digest in given.items():
        if len(digest) != BANKS[selection.bank][1]:
            raise UsageError(f"the value given for PCR {pcr} has {len(digest)} bytes, {selection.bank} has "
                             f"{BANKS[selection.bank][1]}")
    return selection, given


def _signed_tokens(device: LuksDevice, path: str) -> list[Token]:
    found = [t for _, t in device.our_tokens() if isinstance(t, Token) and t.signed is not None]
    if not found:
        raise UsageError(f"{path} has no enrolment with a signing key (enroll it with --signing-key PUB.pem)")
    return found


def sign_one(tpm: Tpm, device: LuksDevice, token: Token, key: PrivateKey, opts: SignOptions) -> Signature:
    """Sign the values asked for `token`, check the signature with the TPM, write it; retire older
    ones when asked."""
    signed = token.signed
    assert signed is not None
    if key_name(key.public) != signed.key_name:
        raise UsageError(f"{opts.key} is not the signing key of token {token.token_id}")
    claims.prove(tpm, token)  # the epoch counter signed over and advanced is the one the sealed policy binds
    selection, given = parse_pcr_values(opts.pcrs) if opts.pcrs else (signed.selection, {})
    if selection.bank != token.selection.bank:
        raise UsageError(f"--pcrs names the {selection.bank} bank, the enrolment binds {token.selection.bank}")
    if selection.pcrs != signed.selection.pcrs and (token.lock_pcr is None or token.lock_pcr not in selection.pcrs):
        # the policy reference binds the enrolment's PCRs: a signature over others would be one over less
        raise UsageError(f"--pcrs must list the PCRs the enrolment binds, {signed.selection} (values as N=HEX "
                         "where they are not the current or predicted ones)")
    if token.lock_pcr is not None and token.lock_pcr in selection.pcrs:
        raise UsageError(f"PCR {token.lock_pcr} is the lock PCR: the enrolment binds it itself")
    if opts.predict is not None:
        from unlocker.commands.prediction import predict

        values = predict(tpm, selection, opts.predict)
    else:
        values = tpm.read_pcrs(selection)
    values.update(given)
    epoch = tpm.counter_read(signed.epoch) + (1 if opts.retire_older else 0)
    signature = approve(tpm, device, token, key, selection, values, epoch)
    if opts.retire_older:
        tpm.counter_increment(signed.epoch)
    _tidy(device, signature)
    return signature


def approve(tpm: Tpm, device: LuksDevice, token: Token, key: PrivateKey, selection: PcrSelection,
            values: dict[int, bytes], epoch: int) -> Signature:
    """Sign `values` of `selection` for `token` at `epoch`, check the policy and the signature with the
    TPM (a trial session; VerifySignature, the boot's own check), and write it into the header."""
    signed = token.signed
    assert signed is not None
    if selection != signed.selection:  # what the policy reference binds (commands/claims.py)
        raise UsageError(f"the signing key approves values of {signed.selection}, not of {selection}")
    plan = PolicyPlan(selection, values, (token.epoch_check(epoch),))
    approved = approved_digest(plan)
    if tpm.trial_plan(plan) != approved:
        raise UsageError("the TPM computes another policy for these values than this program: nothing signed")
    digest = authorized_digest(approved, signed.policy_ref)
    signature = Signature(signed.key_name, signed.policy_ref, selection, values, epoch, approved, digest,
                          key.sign(digest))
    tpm.verify_signature(signed.key_public, digest, signature.signature)
    signature.token_id = device.import_document(signature.to_json())
    return signature


def approve_and_retire(tpm: Tpm, device: LuksDevice, token: Token, key: PrivateKey,
                       chains: list[dict[int, bytes]]) -> list[Signature]:
    """Approve each of `chains` (values of the signed selection) at a new epoch, then advance the
    epoch counter so every older approval stops working (a kernel removed since no longer boots).

    The counter moves only once every new signature is in the header, read back and verified: a
    failure before that removes the new ones and leaves the old ones working (their epoch is
    still the counter's)."""
    signed = token.signed
    assert signed is not None
    claims.prove(tpm, token)
    epoch = tpm.counter_read(signed.epoch) + 1
    unique: list[dict[int, bytes]] = []
    for values in chains:
        if values not in unique:
            unique.append(values)
    made: list[Signature] = []
    with Undo("approval") as undo:
        for values in unique:
            signature = approve(tpm, device, token, key, signed.selection, values, epoch)
            undo.push(f"remove signature token {signature.token_id}", _remover(device, signature))
            made.append(signature)
        in_header = {s.token_id: s for s in signatures_in(device.raw_tokens())}
        for signature in made:
            written = in_header.get(signature.token_id)
            if written != signature:
                raise CorruptError(f"signature token {signature.token_id} does not read back as written: "
                                   "nothing retired")
            tpm.verify_signature(signed.key_public, written.signed_digest, written.signature)
        tpm.counter_increment(signed.epoch)
    if made:
        _tidy(device, made[-1], keep=made)
    return made


def _remover(device: LuksDevice, signature: Signature) -> Callable[[], object]:
    tid = signature.token_id
    return lambda: device.remove_token(tid if tid is not None else -1)


def _tidy(device: LuksDevice, newest: Signature, keep: list[Signature] | None = None) -> None:
    """Remove the signatures of this key the new one makes pointless: those of an older epoch (below
    the counter now: the TPM refuses them anyway), the same values again, and past KEPT the oldest.
    `keep`: signatures just made beside `newest`, which stay."""
    kept = {s.token_id for s in [newest, *(keep or [])]}
    mine = [s for s in signatures_in(device.raw_tokens())
            if s.key_name == newest.key_name and s.policy_ref == newest.policy_ref and s.token_id not in kept]
    going = [s for s in mine if s.epoch < newest.epoch
             or (s.selection, s.pcr_values) == (newest.selection, newest.pcr_values)]
    going += [s for s in mine if s not in going][KEPT - 1:]  # newest epoch first: the oldest go
    for signature in going:
        if signature.token_id is not None:
            device.remove_token(signature.token_id)


def sign_policy(opts: SignOptions) -> list[tuple[str, Signature]]:
    key = PrivateKey(opts.key)
    paths = [opts.device] if opts.device is not None else _signed_devices()
    done: list[tuple[str, Signature]] = []
    with Tpm(resolve_tcti(opts.tcti)) as tpm:
        for path in paths:
            device = LuksDevice(path)
            device.metadata()
            for token in _signed_tokens(device, path):
                done.append((path, sign_one(tpm, device, token, key, opts)))
    if not done:
        say("nothing signed")
    return done


def _signed_devices() -> list[str]:
    from unlocker.boot.devices import scan

    found = [target.source for target in scan()]
    if not found:
        raise UsageError("no LUKS2 device with a tpm2-unlocker enrolment found (name the DEVICE)")
    return found



def approved_now(tpm: Tpm, token: Token, current: dict[int, bytes], signatures: list[Signature]) -> bool:
    """Whether a signature in the header approves the PCR values of now for `token`, as the boot
    would find: its values, its approved digest (Python's), its epoch not retired and the signature
    itself (the TPM's VerifySignature; no unseal)."""
    signed = token.signed
    if signed is None:
        return False
    for signature in signatures:
        if not signature.applies_to(token) or any(current.get(p) != v for p, v in signature.pcr_values.items()):
            continue
        plan = PolicyPlan(signature.selection, signature.pcr_values, (token.epoch_check(signature.epoch),))
        if approved_digest(plan) != signature.approved or \
                authorized_digest(signature.approved, signed.policy_ref) != signature.signed_digest:
            continue
        try:
            if tpm.counter_read(signed.epoch) > signature.epoch:
                continue
            tpm.verify_signature(signed.key_public, signature.signed_digest, signature.signature)
        except UnlockerError:
            continue
        return True
    return False
