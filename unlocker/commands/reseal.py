"""reseal: seal the disk's TPM key to the current PCR values (after a firmware/boot/kernel update).

Order, so a crash at any step leaves a disk that opens with the passphrase and the old or new key:
key (old TPM key, else a new keyslot added with the passphrase) -> new store -> new token -> prove ->
old token removed -> old store removed -> old keyslot removed (only when a new one replaced it).
"""

from __future__ import annotations

from dataclasses import dataclass

from unlocker import store
from unlocker.commands.enroll import KEY_SIZE, Undo, prove, seal_into_token
from unlocker.commands.passphrase import existing_passphrase
from unlocker.errors import CorruptError, UnlockerError, UsageError
from unlocker.log import say
from unlocker.luks import LuksDevice
from unlocker.options import DEFAULT_LOCK_PCR
from unlocker.secret import Secret
from unlocker.store import StoreSpec
from unlocker.token import Token
from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import PcrSelection
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


def _lock_pcr(opts: ResealOptions, old: Token, selection: PcrSelection) -> int | None:
    """--lock-pcr as given; else the old enrolment's; else (adopted, or enrolled before the lock
    existed) the default, unless the enrolment binds that PCR's value itself."""
    if opts.lock_pcr is not KEEP:
        return opts.lock_pcr  # type: ignore[return-value]
    if old.lock_pcr is not None:
        return old.lock_pcr
    return None if DEFAULT_LOCK_PCR in selection.pcrs else DEFAULT_LOCK_PCR


def _reseal_one(tpm: Tpm, device: LuksDevice, old: Token, opts: ResealOptions) -> Token:
    selection = opts.selection or old.selection
    passphrase: Secret | None = None
    with Undo("re-seal") as undo:
        try:
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
            device.add_key(passphrase, key, slot)
            undo.push(f"remove keyslot {slot}", lambda: device.kill_slot(slot, passphrase))  # type: ignore[arg-type]
        with key:
            lock = _lock_pcr(opts, old, selection)
            token = seal_into_token(tpm, device, key, slot, selection, StoreSpec.beside(old), undo, lock_pcr=lock,
                                    keyslot_owned=old.keyslot_owned, next_free_nv=True)
            prove(tpm, device, token, key)
    # The new enrolment works: now remove the old one, token first.
    device.remove_token(old.token_id if old.token_id is not None else -1)
    store.destroy(tpm, old)
    if new_slot and passphrase is not None:
        with passphrase:
            device.kill_slot(old.keyslot, passphrase)
    return token


def reseal(opts: ResealOptions) -> list[Token]:
    device = LuksDevice(opts.device)
    device.metadata()
    tokens = device.our_tokens()
    if not tokens:
        raise UsageError(f"{opts.device} has no tpm2-unlocker enrolment (run 'tpm2-unlocker enroll' first)")
    corrupt = [(tid, t) for tid, t in tokens if isinstance(t, CorruptError)]
    if corrupt and len(corrupt) == len(tokens):
        tid, exc = corrupt[0]
        raise CorruptError(f"token {tid} cannot be read: {exc} (run 'tpm2-unlocker remove' and enroll again)")
    done: list[Token] = []
    with Tpm(resolve_tcti(opts.tcti)) as tpm:
        for _, old in tokens:
            if isinstance(old, Token):
                done.append(_reseal_one(tpm, device, old, opts))
    return done
