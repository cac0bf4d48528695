"""enroll: add a TPM-held key in a new keyslot beside the passphrase, seal it, store it, prove it.

Every step that changes the disk or the TPM pushes its undo; on any failure the undos run in reverse,
so the disk ends as it was before. The passphrase keyslot is never touched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from unlocker import store
from unlocker.commands.passphrase import existing_passphrase
from unlocker.errors import CorruptError, UsageError
from unlocker.log import say
from unlocker.luks import LuksDevice
from unlocker.options import DEFAULT_LOCK_PCR
from unlocker.secret import Secret
from unlocker.store import StoreSpec
from unlocker.token import Token
from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import PcrSelection, pcr_composite_digest, sealing_policy
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


class Undo:
    """A stack of undo steps; `with Undo("enrolment") as undo:` runs them in reverse if the block fails."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, step: Callable[[], object]) -> None:
        self._steps.append((what, step))

    def __enter__(self) -> Undo:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None:  # any failure, a bug or Ctrl-C included, leaves the disk as it was
            say(f"{self._what} failed, undoing what was added: {exc or type(exc).__name__}")
            self._run()
        self._steps.clear()

    def _run(self) -> None:
        while self._steps:
            what, step = self._steps.pop()
            try:
                step()
            except Exception as exc:  # keep undoing; say what could not be undone
                say(f"could not undo: {what} ({exc})")


def prove(tpm: Tpm, device: LuksDevice, token: Token, key: Secret) -> None:
    """Unseal through the token as boot would, and open-test its keyslot.

    On a booted system the lock PCR is extended: nothing sealed to its reset value unseals until
    the next boot. Then the proof is each link but the unseal itself: the TPM computes the policy
    for the values the token binds (a trial session takes them as given) and it equals the token's,
    the sealed object (or NV index) carries that policy and loads under the pinned SRK, and the key
    opens its keyslot."""
    selection, expected = token.policy_selection(), token.expected_values()
    if tpm.read_pcrs(selection) == expected:
        with store.take(tpm, token) as back:
            if back != key:
                raise CorruptError("the key unsealed from the TPM differs from the one enrolled")
            if not device.test_key(back, token.keyslot):
                raise CorruptError(f"the unsealed key does not open keyslot {token.keyslot}")
        return
    if tpm.trial_policy_pcr(selection, values_digest=pcr_composite_digest(expected, selection)) != token.policy_hash:
        raise CorruptError("the TPM computes another policy for the enrolled PCR values than the token holds")
    store.check_placement(tpm, token)
    if not device.test_key(key, token.keyslot):
        raise CorruptError(f"the new key does not open keyslot {token.keyslot}")


def seal_into_token(tpm: Tpm, device: LuksDevice, key: Secret, slot: int, selection: PcrSelection,
                    spec: StoreSpec, undo: Undo, *, lock_pcr: int | None, keyslot_owned: bool = True,
                    next_free_nv: bool = False) -> Token:
    """Seal `key` for `slot`, write the store and the token, pushing the undo of each. The policy
    binds `selection` to its current values and `lock_pcr` to its reset value."""
    if lock_pcr is not None and lock_pcr in selection.pcrs:
        raise UsageError(f"PCR {lock_pcr} is the lock PCR: leave it out of --pcrs, or choose another --lock-pcr")
    values = tpm.read_pcrs(selection)
    token = Token(keyslot=slot, store=spec.kind, selection=selection, pcr_values=values, policy_hash=b"",
                  srk_name=tpm.srk_name(), srk_public=tpm.srk_public(), keyslot_owned=keyslot_owned,
                  lock_pcr=lock_pcr)
    token.policy_hash = sealing_policy(token.policy_selection(), token.expected_values())
    placement = store.put(tpm, spec, key, token.policy_hash, next_free_nv=next_free_nv)
    token.store, token.public, token.private = placement.store, placement.public, placement.private
    token.nv_index, token.blob_dir, token.blob_name = placement.nv_index, placement.blob_dir, placement.blob_name
    undo.push("remove the sealed key", lambda: store.destroy(tpm, token))
    device.import_token(token)
    undo.push(f"remove token {token.token_id}", lambda: device.remove_token(token.token_id or 0))
    return token


def enroll(opts: EnrollOptions) -> Token:
    device = LuksDevice(opts.device)
    device.metadata()
    existing = [tid for tid, _ in device.our_tokens()]
    if existing:
        raise UsageError(f"{opts.device} is already enrolled (token {existing[0]}); "
                         "use 'reseal' to re-seal or 'remove' first")
    if opts.spec.kind == "file" and not opts.spec.blob_dir.startswith("/etc/tpm2-unlocker/"):
        say(f"{opts.spec.blob_dir} is not under /etc/tpm2-unlocker/: the initramfs hooks carry no files from there, "
            "so this enrolment opens the disk on the running system only, not at boot")
    tcti = resolve_tcti(opts.tcti)
    with existing_passphrase(device, opts.unlock_key_file) as passphrase, Tpm(tcti) as tpm, \
            Secret.random(KEY_SIZE) as key:
        tpm.srk()  # fail on a missing TPM before the disk is touched
        with Undo("enrolment") as undo:
            slot = device.free_keyslot()
            device.add_key(passphrase, key, slot)
            undo.push(f"remove keyslot {slot}", lambda: device.kill_slot(slot, passphrase))
            token = seal_into_token(tpm, device, key, slot, opts.selection, opts.spec, undo, lock_pcr=opts.lock_pcr)
            prove(tpm, device, token, key)
            recovery = None
            if opts.recovery_key:
                from unlocker.commands.recovery import add_recovery_key

                recovery = add_recovery_key(device, passphrase, undo)
    if recovery is not None:
        from unlocker.commands.recovery import show

        with recovery[1] as text:
            show(opts.device, recovery[0], text)
    return token
