"""reseal: seal the disk's TPM key to the current PCR values (after a firmware/boot/kernel update),
and with --predict to the chain the next boot will have as well (PolicyOR over both).

The chains kept: the one the PCRs are on now, those sealed after it (predicted, not booted yet) and
the new prediction; a chain sealed before the current one is stale (a newer one has booted) and goes.

Order, so a crash at any step leaves a disk that opens with the passphrase and the old or new key:
pending marker -> key (old TPM key, else a new keyslot added with the passphrase) -> new store -> new
token -> prove -> marker committed -> old token removed -> old store removed -> old keyslot removed
(only when a new one replaced it) -> marker removed. The next run undoes an interrupted re-seal up to
the commit and finishes one after it (commands/pending.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from unlocker import store
from unlocker.branch import pending_chains
from unlocker.commands import claims, pending
from unlocker.commands.enroll import KEY_SIZE, pin_auth, prove, seal_into_token
from unlocker.commands.keyslots import why_keep
from unlocker.commands.passphrase import existing_passphrase
from unlocker.commands.prediction import Prediction, predict
from unlocker.commands.undo import Undo
from unlocker.errors import CorruptError, PinNeededError, UnlockerError, UsageError
from unlocker.log import say
from unlocker.luks import LuksDevice
from unlocker.options import DEFAULT_LOCK_PCR
from unlocker.secret import Secret
from unlocker.signature import Signature
from unlocker.store import StoreSpec
from unlocker.token import Grace, PcrBranch, Signed, Token
from unlocker.tpm.client import Tpm
from unlocker.tpm.nv import DEFAULT_COUNTER_INDEX
from unlocker.tpm.policy import MAX_BRANCHES, PcrSelection
from unlocker.tpm.tcti import resolve_tcti

# --lock-pcr not given: the enrolment's own lock PCR stays (an enrolment without one gains the default)
KEEP = object()


@dataclass(frozen=True)
class ResealOptions:
    device: str
    selection: PcrSelection | None
    unlock_key_file: str | None
    tcti: str | None
    # KEEP: the old enrolment's; an older one without a lock PCR gains the default
    lock_pcr: int | None | object = KEEP
    # True: seal with a (new) PIN; False: without one; None: as the old enrolment was
    with_pin: bool | None = None
    pin_file: str | None = None
    # --predict: the chain after the update too (its components; None: the current one stays)
    predict: Prediction | None = None
    # chains to seal to besides the current one, as PCR values of the selection (tests; predict's output)
    predicted: tuple[dict[int, bytes], ...] = ()
    # prepare-update: a grace branch per chain for the next boot(s), without these PCRs
    grace: GraceRequest | None = None


@dataclass(frozen=True)
class GraceRequest:
    """prepare-update --firmware: leave out `left_out` (the firmware's PCRs) for one boot among the
    next `boots` TPM resets."""

    left_out: tuple[int, ...]
    boots: int


def further_chains(tpm: Tpm, old: Token, selection: PcrSelection, opts: ResealOptions) -> list[PcrBranch]:
    """The chains sealed to beside the current values: the old enrolment's still to come (after
    the one the PCRs are on), then what was predicted; duplicates and the current chain left out,
    the oldest dropped past PolicyOR's 8."""
    current = tpm.read_pcrs(selection)
    kept = [c for c in pending_chains(old, current) if c.selection == selection]
    predicted = list(opts.predicted)
    if opts.predict is not None:
        predicted.append(predict(tpm, selection, opts.predict))
    chains: list[PcrBranch] = []
    for chain in [*kept, *(PcrBranch(selection, values) for values in predicted)]:
        if chain.pcr_values != current and chain not in chains:
            chains.append(chain)
    if len(chains) > MAX_BRANCHES - 1:
        say(f"a policy holds at most {MAX_BRANCHES} chains: the {len(chains) - MAX_BRANCHES + 1} oldest predicted "
            "chain(s) are dropped")
        chains = chains[len(chains) - MAX_BRANCHES + 1:]
    return chains


def _lock_pcr(opts: ResealOptions, old: Token, selection: PcrSelection) -> int | None:
    """--lock-pcr as given; else the old enrolment's; else (adopted, or enrolled before the lock
    existed) the default, unless the enrolment binds that PCR's value itself."""
    if opts.lock_pcr is not KEEP:
        return opts.lock_pcr  # type: ignore[return-value]
    if old.lock_pcr is not None:
        return old.lock_pcr
    return None if DEFAULT_LOCK_PCR in selection.pcrs else DEFAULT_LOCK_PCR


def _has_pin(tpm: Tpm, old: Token) -> bool:
    """Whether the old key needs a PIN, by the sealed key as well as the token: the token's `pin` is
    the header's, anyone's to write, and an enrolment of ours without a PIN is always noDA. A header
    edited to say "no PIN" must not make the re-seal drop it."""
    if not old.keyslot_owned:  # adopted: its DA protection is tpm2-tools' default, not a PIN
        return old.pin
    try:
        da_protected = store.da_protected(tpm, old)
    except UnlockerError:
        return old.pin
    if da_protected and not old.pin:
        say("the token says its key has no PIN, but the sealed key is DA-protected as keys with a PIN are: "
            "keeping a PIN (was the header edited? give --without-pin to drop it)")
    return old.pin or da_protected


def live_grace(tpm: Tpm, old: Token) -> Grace | None:
    """The old enrolment's grace while it can still be used (its counter not moved on, its boots not
    past): a re-seal before the firmware update's boot (the kernel's hook) keeps it."""
    if old.grace is None or not old.counter:
        return None
    try:
        live = tpm.counter_read(old.counter) == old.grace.count and tpm.reset_count() <= old.grace.reset_limit
    except UnlockerError:
        return None
    return old.grace if live else None


def new_grace(tpm: Tpm, old: Token, selection: PcrSelection, request: GraceRequest, undo: Undo) -> tuple[int, Grace]:
    """The enrolment's NV counter (the old one's if still ours, else one defined now: its undo pushed)
    and a grace on its value now, for the next `request.boots` TPM resets."""
    if old.store != "token":
        raise UsageError(f"prepare-update needs the token store (the boot re-seals it after the update), not a "
                         f"{old.describe_store()}: run 'tpm2-unlocker reseal' after the update instead")
    left_out = tuple(p for p in request.left_out if p in selection.pcrs)
    if not left_out:
        raise UsageError(f"the enrolment binds none of PCRs {', '.join(map(str, request.left_out))}: a firmware "
                         "update changes nothing it binds")
    if not [p for p in selection.pcrs if p not in left_out]:
        raise UsageError(f"the enrolment binds only the firmware's PCRs ({selection}): a grace would bind nothing but "
                         "the lock PCR; run 'tpm2-unlocker reseal' after the update instead")
    counter = old.counter
    if not counter or not tpm.is_our_counter(counter):
        counter = tpm.free_nv_index(DEFAULT_COUNTER_INDEX)
        tpm.counter_define(counter)
        undo.push(f"remove NV counter 0x{counter:08x}", lambda: tpm.nv_undefine(counter))
    grace = Grace(left_out, tpm.nv_name(counter), tpm.counter_read(counter), tpm.reset_count() + request.boots)
    return counter, grace


def _signed_for(old: Token, selection: PcrSelection) -> Signed | None:
    """The old enrolment's signing key (proven), for `selection`: a new --pcrs gives the signed branch a
    reference that binds the new PCRs (signatures for the old ones no longer apply)."""
    signed = old.signed
    if signed is None or signed.selection == selection:
        return signed
    return Signed(signed.key_public, signed.key_name, claims.policy_ref(signed.epoch_name, selection), selection,
                  signed.epoch, signed.epoch_name)


def _beside(tpm: Tpm, old: Token) -> StoreSpec:
    """Where the new key goes: beside the old one, the NV index chosen now (the marker names it)."""
    spec = StoreSpec.beside(old)
    if spec.kind == "nv":
        return StoreSpec("nv", nv_index=tpm.free_nv_index(spec.nv_index + 1))
    return spec


def _reseal_one(tpm: Tpm, device: LuksDevice, old: Token, opts: ResealOptions) -> Token:
    # its chains, PCRs, signing key and grace are carried over only as the sealed key's policy proves them
    claims.prove(tpm, old)
    selection = opts.selection or old.selection
    chains = further_chains(tpm, old, selection, opts)  # before any change: a failed prediction changes nothing
    grace = live_grace(tpm, old) if opts.grace is None else None
    if grace is not None:  # new --pcrs: the grace leaves out only what the new selection binds
        left_out = tuple(p for p in grace.left_out if p in selection.pcrs)
        grace = Grace(left_out, grace.counter_name, grace.count, grace.reset_limit) if left_out else None
    counter = old.counter
    passphrase: Secret | None = None
    had_pin = _has_pin(tpm, old)
    with_pin = had_pin if opts.with_pin is None else opts.with_pin
    spec = _beside(tpm, old)
    with pin_auth(with_pin, opts.pin_file, opts.unlock_key_file) as auth, Undo("re-seal") as undo:
        if opts.grace is not None:
            counter, grace = new_grace(tpm, old, selection, opts.grace, undo)
        try:
            if had_pin:
                # its PIN is not asked: a wrong one would count towards the TPM's lockout, and the
                # passphrase (needed anyway on a booted system, where the lock PCR is extended) does
                raise PinNeededError("the old key needs its PIN")
            key = store.take(tpm, old)
            slot, new_slot = old.keyslot, False
        except UnlockerError as exc:
            if not old.keyslot_owned:
                raise UsageError(f"the adopted key no longer unseals ({exc}); re-run 'adopt' or 'enroll'") from None
            say(f"the old TPM key does not unseal ({exc}); a new key will replace it")
            passphrase = existing_passphrase(device, opts.unlock_key_file)
            undo.push("forget the passphrase", passphrase.wipe)  # runs last, after the keyslot's undo
            key = Secret.random(KEY_SIZE)
            slot, new_slot = device.free_keyslot(), True
        with key:
            # named before anything is added: a run killed from here on leaves what the next run recognises
            marker = pending.begin(device, pending.Marker("reseal", slot if new_slot else None, pending.Place.of_spec(spec),
                                                          old_token=old.token_id, old_keyslot=old.keyslot,
                                                          old=pending.Place.of(old)), undo)
            if new_slot:
                assert passphrase is not None
                device.add_key(passphrase, key, slot)
                undo.push(f"remove keyslot {slot}", lambda: device.kill_slot(slot, passphrase))  # type: ignore[arg-type]
            lock = _lock_pcr(opts, old, selection)
            token = seal_into_token(tpm, device, key, slot, selection, spec, undo, lock_pcr=lock,
                                    keyslot_owned=old.keyslot_owned, auth=auth.value,
                                    more_branches=chains, counter=counter, grace=grace,
                                    signed=_signed_for(old, selection))
            prove(tpm, device, token, key, auth.value)
    # The new enrolment works: from here on an interrupted run is finished, not undone. The old one
    # goes, token first.
    pending.commit(device, marker)
    device.remove_token(old.token_id if old.token_id is not None else -1)
    store.destroy(tpm, old, adopted_ok=True)  # proven at the start (claims.prove)
    if new_slot and passphrase is not None:
        with passphrase:
            kept = why_keep(device, old.keyslot, passphrase)
            if kept:
                say(f"keyslot {old.keyslot}, which the old token named, stays: {kept}")
            else:
                device.kill_slot(old.keyslot, passphrase)
    pending.end(device, marker)
    return token


class _Passphrase:
    """The passphrase for what interrupted runs left, asked once and only when a keyslot is to go."""

    def __init__(self, device: LuksDevice, key_file: str | None) -> None:
        self.device, self.key_file = device, key_file
        self.secret: Secret | None = None
        self.asked = False

    def __call__(self) -> Secret | None:
        if not self.asked:
            self.asked = True
            try:
                self.secret = existing_passphrase(self.device, self.key_file)
            except UnlockerError as exc:
                say(f"no passphrase for what an interrupted run left: {exc}")
        return self.secret

    def wipe(self) -> None:
        if self.secret is not None:
            self.secret.wipe()


def reseal(opts: ResealOptions) -> list[Token | Approval]:
    device = LuksDevice(opts.device)
    device.metadata()
    left = pending.anything_left(device)
    if not left:
        _enrolled(device)
    done: list[Token | Approval] = []
    with Tpm(resolve_tcti(opts.tcti)) as tpm:
        if left:
            asked = _Passphrase(device, opts.unlock_key_file)
            try:
                pending.clean_up(device, asked, tpm)
            finally:
                asked.wipe()
        for _, old in _enrolled(device):
            if isinstance(old, Token):
                approval = _approve_with_machine_key(tpm, device, old, opts)
                done.append(approval if approval is not None else _reseal_one(tpm, device, old, opts))
    return done


@dataclass(frozen=True)
class Approval:
    """reseal --predict on an enrolment whose signing key is the machine key: nothing re-sealed, the
    chains approved by signatures (the current one first, then the predicted), older ones retired."""

    token: Token
    signatures: tuple[Signature, ...]


def _approve_with_machine_key(tpm: Tpm, device: LuksDevice, old: Token, opts: ResealOptions) -> Approval | None:
    """Approve the current and the predicted chains with the machine key instead of re-sealing: no
    unseal, so no passphrase (the booted system's lock PCR forbids the unseal). None when that does
    not apply: no prediction asked, a change only a re-seal makes (PCRs, lock PCR, PIN), no signed
    branch, or the machine key absent or not this enrolment's (then reseal does what it always did)."""
    signed = old.signed
    if signed is None or (opts.predict is None and not opts.predicted) or opts.grace is not None:
        return None
    if opts.selection not in (None, old.selection) or opts.lock_pcr is not KEEP or opts.with_pin is not None:
        return None
    from unlocker.commands import machine_key
    from unlocker.commands.sign_policy import approve_and_retire
    from unlocker.tpm.signing import key_name

    if not machine_key.machine_key_present():
        return None
    try:
        key = machine_key.load()
    except UnlockerError as exc:
        say(f"the machine key is not usable ({exc}): re-sealing instead")
        return None
    if key_name(key.public) != signed.key_name:
        say(f"the machine key {machine_key.key_path()} is not the signing key of token {old.token_id}: "
            "re-sealing instead")
        return None
    if not machine_key.state_dir_encrypted():
        # checked at each use, not only when it was made: moved or copied to plain storage since, it is
        # anyone's who holds that disk, and what it signs is not to be trusted
        raise UsageError(f"the machine key {machine_key.key_path()} is no longer on encrypted storage: nothing "
                         "approved (remove it; enrol again for a new one)")
    claims.prove(tpm, old)  # the PCRs it approves are the ones the sealed policy's reference binds

    selection = signed.selection
    chains = [tpm.read_pcrs(selection)]  # the chain booted now: its next boot too
    for values in opts.predicted:
        if any(p not in values for p in selection.pcrs):
            raise UsageError(f"a predicted chain lacks values for {selection}, the PCRs the signing key approves")
        chains.append({p: values[p] for p in selection.pcrs})
    if opts.predict is not None:
        chains.append(predict(tpm, selection, opts.predict))  # before any change: a failed prediction changes nothing
    signatures = approve_and_retire(tpm, device, old, key, chains)
    return Approval(old, tuple(signatures))


def _enrolled(device: LuksDevice) -> list[tuple[int, Token | CorruptError]]:
    tokens = device.our_tokens()
    if not tokens:
        raise UsageError(f"{device.path} has no tpm2-unlocker enrolment (run 'tpm2-unlocker enroll' first)")
    corrupt = [(tid, t) for tid, t in tokens if isinstance(t, CorruptError)]
    if corrupt and len(corrupt) == len(tokens):
        tid, exc = corrupt[0]
        raise CorruptError(f"token {tid} cannot be read: {exc} (run 'tpm2-unlocker remove' and enroll again)")
    return tokens
