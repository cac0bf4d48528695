"""remove: take out our keyslot, sealed key and token, keeping every keyslot that is not ours.

The user's passphrase is asked (or read from --unlock-key-file) and must open a keyslot that stays:
so a removal can never leave a disk that the passphrase does not open. The token goes last, so an
interrupted removal can be run again.
"""

from __future__ import annotations

from dataclasses import dataclass

from unlocker import store
from unlocker.commands.passphrase import existing_passphrase
from unlocker.commands.recovery import recovery_slots
from unlocker.errors import CorruptError, NoTpmError, UnlockerError, UsageError
from unlocker.log import say
from unlocker.luks import LuksDevice
from unlocker.token import Token
from unlocker.tpm.client import Tpm
from unlocker.tpm.tcti import resolve_tcti


@dataclass(frozen=True)
class RemoveOptions:
    device: str
    unlock_key_file: str | None
    tcti: str | None
    recovery_key: bool = False


def remove(opts: RemoveOptions) -> int:
    """Returns the number of enrolments removed."""
    device = LuksDevice(opts.device)
    device.metadata()
    tokens = device.our_tokens()
    recovery = recovery_slots(device) if opts.recovery_key else []
    if not tokens and not recovery:
        raise UsageError(f"{opts.device} has no tpm2-unlocker enrolment"
                         + (" or recovery key" if opts.recovery_key else ""))
    ours = {t.keyslot for _, t in tokens if isinstance(t, Token) and t.keyslot_owned} | {s for _, s in recovery}
    others = [s for s in device.keyslots() if s not in ours]
    if not others:
        raise UsageError(f"{opts.device}: refusing to remove keyslot(s) {sorted(ours)}: "
                         "no other keyslot would be left to open the disk")
    tpm: Tpm | None = None
    if any(isinstance(t, Token) and t.store == "nv" for _, t in tokens):
        try:
            tpm = Tpm(resolve_tcti(opts.tcti))
        except NoTpmError as exc:
            say(f"the TPM is not reachable, its NV index stays defined ({exc})")
    try:
        with existing_passphrase(device, opts.unlock_key_file) as passphrase:
            # the secret given must open a keyslot that stays: whatever the tokens claim (they are
            # anyone's to write), the disk then still opens with it afterwards
            if not any(device.test_key(passphrase, slot) for slot in others):
                raise UsageError(f"{opts.device}: the passphrase given opens only keyslots being removed; "
                                 "give one of a keyslot that stays")
            for tid, token in tokens:
                if isinstance(token, CorruptError):
                    say(f"token {tid} is corrupt ({token}); removing the token only")
                elif token.keyslot_owned and token.keyslot in device.keyslots():
                    device.kill_slot(token.keyslot, passphrase)
                if isinstance(token, Token):
                    try:
                        store.destroy(tpm, token)
                    except UnlockerError as exc:
                        say(f"could not remove the sealed key ({exc})")
                device.remove_token(tid)
            for tid, slot in recovery:  # only when asked: it is the user's way in when the TPM fails
                if slot in device.keyslots():
                    device.kill_slot(slot, passphrase)
                device.remove_token(tid)
    finally:
        if tpm is not None:
            tpm.close()
    return len(tokens) + len(recovery)
