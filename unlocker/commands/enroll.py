"""enroll: add a TPM-held key in a new keyslot beside the passphrase, seal it, store it, prove it.

Every step that changes the disk or the TPM pushes its undo; on any failure the undos run in reverse,
so the disk ends as it was before. The passphrase keyslot is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

from unlocker import store
from unlocker.commands import machine_key, pending
from unlocker.commands.passphrase import existing_passphrase
from unlocker.commands.undo import Undo
from unlocker.errors import CorruptError, UnlockerError, UsageError
from unlocker.log import say
from unlocker.luks import LuksDevice
from unlocker.measure.enrolment import events_at_sealing
from unlocker.options import DEFAULT_LOCK_PCR
from unlocker.secret import Secret
from unlocker.store import StoreSpec
from unlocker.token import Grace, PcrBranch, Signed, Token
from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import PcrSelection
from unlocker.tpm.tcti import resolve_tcti

KEY_SIZE = 32


@dataclass(frozen=True)
class EnrollOptions:
    device: str
    selection: PcrSelection
    spec: StoreSpec
    unlock_key_file: str | None
    tcti: str | None
    recovery_key: bool = False
    lock_pcr: int | None = DEFAULT_LOCK_PCR
    with_pin: bool = False
    pin_file: str | None = None  # the PIN (else asked on the terminal); given alone, it means with_pin
    # a PEM public key: sign-policy's signatures open the key too; MACHINE: the machine key's (made if
    # need be); NONE: no signing key; None (not given): the machine key's when STATE_DIR is encrypted
    signing_key: str | None = None


MACHINE, NONE = "machine", "none"


def prove(tpm: Tpm, device: LuksDevice, token: Token, key: Secret, auth: Secret | None = None) -> None:
    """Hold every branch's digest to the TPM's own (a trial session of its plan, PolicyOR's over
    them too), then unseal through the token as boot would and open-test its keyslot.

    On a booted system the lock PCR is extended: nothing sealed to its reset value unseals until
    the next boot, nor does a branch for a chain still to come (a predicted one). Then the proof is
    each link but the unseal itself: the digests above, the sealed object (or NV index) carries the
    policy and loads under the pinned SRK, and the key opens its keyslot."""
    branches = token.branches()
    for index, branch in enumerate(branches):
        if tpm.trial_plan(branch.plan) != token.branch_policy(index):
            raise CorruptError(f"the TPM computes another policy for branch {index} of the enrolment than the "
                               "token holds")
    if token.branch_policies and tpm.trial_plan(token.plan_for(branches[0])) != token.policy_hash:
        raise CorruptError("the TPM computes another PolicyOR over the branches than the token holds")
    current = tpm.read_pcrs(token.read_selection())
    if any(branch.matches(current) for branch in branches):
        with store.take(tpm, token, auth) as back:
            if back != key:
                raise CorruptError("the key unsealed from the TPM differs from the one enrolled")
            if not device.test_key(back, token.keyslot):
                raise CorruptError(f"the unsealed key does not open keyslot {token.keyslot}")
        return
    store.check_placement(tpm, token)
    if not device.test_key(key, token.keyslot):
        raise CorruptError(f"the new key does not open keyslot {token.keyslot}")


def seal_into_token(tpm: Tpm, device: LuksDevice, key: Secret, slot: int, selection: PcrSelection,
                    spec: StoreSpec, undo: Undo, *, lock_pcr: int | None, keyslot_owned: bool = True,
                    next_free_nv: bool = False, auth: Secret | None = None,
                    more_branches: list[PcrBranch] | None = None, counter: int = 0, grace: Grace | None = None,
                    signed: Signed | None = None) -> Token:
    """Seal `key` for `slot`, write the store and the token, pushing the undo of each. The policy
    binds `selection` to its current values and `lock_pcr` to its reset value; with `auth` (a PIN's
    auth value) PolicyAuthValue follows; `more_branches`: further chains, `grace`: prepare-update's
    branches on NV counter `counter`, `signed`: the branch a signing key opens (PolicyOR over them all)."""
    branches = [PcrBranch(selection, {})] + list(more_branches or [])
    if lock_pcr is not None and any(lock_pcr in b.selection.pcrs for b in branches):
        raise UsageError(f"PCR {lock_pcr} is the lock PCR: leave it out of --pcrs, or choose another --lock-pcr")
    values = tpm.read_pcrs(selection)
    token = Token(keyslot=slot, store=spec.kind, selection=selection, pcr_values=values, policy_hash=b"",
                  srk_name=tpm.srk_name(), srk_public=tpm.srk_public(), keyslot_owned=keyslot_owned,
                  lock_pcr=lock_pcr, pin=auth is not None, more_branches=branches[1:], counter=counter, grace=grace,
                  signed=signed, pcr_events=events_at_sealing(selection, values))
    token.compute_policy()
    placement = store.put(tpm, spec, key, token.policy_hash, next_free_nv=next_free_nv, auth=auth)
    token.store, token.public, token.private = placement.store, placement.public, placement.private
    token.nv_index, token.blob_dir, token.blob_name = placement.nv_index, placement.blob_dir, placement.blob_name
    undo.push("remove the sealed key", lambda: store.destroy(tpm, token))
    device.import_token(token)
    undo.push(f"remove token {token.token_id}", lambda: device.remove_token(token.token_id or 0))
    return token


def add_sealed_keyslot(tpm: Tpm, device: LuksDevice, existing: Secret, key: Secret, selection: PcrSelection,
                       spec: StoreSpec, undo: Undo, *, lock_pcr: int | None, auth: Secret | None = None,
                       signed: Signed | None = None) -> tuple[Token, pending.Marker]:
    """Add `key` in a new keyslot (authorised by `existing`, a secret that opens another keyslot), seal
    it into `spec`'s store with its token (`signed`: with a signing key's branch), and prove the
    enrolment; each step pushes its undo. The pending marker it writes first is the caller's to end
    (pending.end) once all it adds is in place."""
    slot = device.free_keyslot()
    # named before it is added: a run killed from here on leaves what the next run recognises
    marker = pending.begin(device, pending.Marker("enroll", slot, pending.Place.of_spec(spec)), undo)
    device.add_key(existing, key, slot)
    undo.push(f"remove keyslot {slot}", lambda: device.kill_slot(slot, existing))
    token = seal_into_token(tpm, device, key, slot, selection, spec, undo, lock_pcr=lock_pcr, auth=auth,
                            signed=signed)
    prove(tpm, device, token, key, auth)
    return token, marker


class PinAuth:
    """`with pin_auth(...) as auth:` auth.value is the new PIN's auth value (None: no PIN), wiped after."""

    def __init__(self, value: Secret | None) -> None:
        self.value = value

    def __enter__(self) -> PinAuth:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.value is not None:
            self.value.wipe()


def pin_auth(with_pin: bool, pin_file: str | None, unlock_key_file: str | None) -> PinAuth:
    if not with_pin:
        return PinAuth(None)
    from unlocker.commands.pin import new_pin
    from unlocker.pin import auth_value

    with new_pin(pin_file, unlock_key_file) as pin:
        return PinAuth(auth_value(pin))


def _not_enrolled(device: LuksDevice) -> None:
    existing = [tid for tid, _ in device.our_tokens()]
    if existing:
        raise UsageError(f"{device.path} is already enrolled (token {existing[0]}); "
                         "use 'reseal' to re-seal or 'remove' first")


def enroll(opts: EnrollOptions) -> Token:
    device = LuksDevice(opts.device)
    device.metadata()
    if not pending.anything_left(device):  # else an interrupted run's token may go first
        _not_enrolled(device)
    if opts.spec.kind == "file" and not opts.spec.blob_dir.startswith("/etc/tpm2-unlocker/"):
        say(f"{opts.spec.blob_dir} is not under /etc/tpm2-unlocker/: the initramfs hooks carry no files from there, "
            "so this enrolment opens the disk on the running system only, not at boot")
    signing_key = None
    machine = _wants_machine_key(opts.signing_key)
    if opts.signing_key not in (None, MACHINE, NONE):
        from unlocker.commands.keys import load_public

        signing_key = load_public(opts.signing_key)  # a bad key file is said before anything changes
    created = False
    if machine:
        try:
            created = machine_key.create()
            signing_key = machine_key.load().public
        except UnlockerError as exc:
            if opts.signing_key == MACHINE:
                raise
            say(f"no machine key ({exc}): enrolling without a signing key; kernel and initramfs updates will "
                "need the passphrase")
            machine = False
    try:
        token = _enroll(opts, device, signing_key)
    except BaseException:
        if created:  # nothing took its public half: a key made for nothing goes
            machine_key.remove()
        raise
    if machine:
        say(f"kernel and initramfs updates will be approved by the machine key at {machine_key.key_path()}, "
            "no passphrase ('--signing-key none' at enrolment opts out)")
    return token


def _wants_machine_key(signing_key: str | None) -> bool:
    """--signing-key machine: yes, and only on encrypted storage; not given: yes if STATE_DIR is
    encrypted (else as before the machine key existed); none or a key file: no."""
    if signing_key not in (None, MACHINE):
        return False
    if machine_key.state_dir_encrypted():
        return True
    if signing_key == MACHINE:
        raise UsageError(f"--signing-key machine: {machine_key.state_dir()} is not on encrypted storage (dm-crypt); "
                         "a key there would let anyone holding the disk approve any boot chain")
    return False


def _enroll(opts: EnrollOptions, device: LuksDevice, signing_key: bytes | None) -> Token:
    tcti = resolve_tcti(opts.tcti)
    with existing_passphrase(device, opts.unlock_key_file) as passphrase, Tpm(tcti) as tpm, \
            Secret.random(KEY_SIZE) as key, pin_auth(opts.with_pin or opts.pin_file is not None, opts.pin_file,
                                                     opts.unlock_key_file) as auth:
        tpm.srk()  # fail on a missing TPM before the disk is touched
        pending.clean_up(device, lambda: passphrase, tpm)
        _not_enrolled(device)
        if opts.spec.kind == "nv" and tpm.nv_info(opts.spec.nv_index) is not None:
            # said before the marker names it: a marker names only an index that was free
            raise UsageError(f"NV index 0x{opts.spec.nv_index:08x} is already defined "
                             "(choose another with --store nv=INDEX)")
        with Undo("enrolment") as undo:
            signed = None
            if signing_key is not None:
                from unlocker.commands.sign_policy import new_signed

                signed = new_signed(tpm, signing_key, opts.selection, undo)
            token, marker = add_sealed_keyslot(tpm, device, passphrase, key, opts.selection, opts.spec, undo,
                                               lock_pcr=opts.lock_pcr, auth=auth.value, signed=signed)
            recovery = None
            if opts.recovery_key:
                from unlocker.commands.recovery import add_recovery_key

                recovery = add_recovery_key(device, passphrase, undo)
            pending.end(device, marker)
    if recovery is not None:
        from unlocker.commands.recovery import show

        with recovery[1] as text:
            show(opts.device, recovery[0], text)
    return token
