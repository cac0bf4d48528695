"""remove: take out our keyslot, sealed key (and NV counter) and token, keeping every keyslot that is not ours.

The user's passphrase is asked (or read from --unlock-key-file) and must open a keyslot that stays:
so a removal can never leave a disk that the passphrase does not open; a keyslot goes only under
commands/keyslots.py's rule, which also holds when the secret given is the recovery key. The token
goes last, so an interrupted removal can be run again.
"""

from __future__ import annotations

from dataclasses import dataclass

from unlocker import store
from unlocker.commands import claims, pending
from unlocker.commands.keyslots import why_keep
from unlocker.commands.passphrase import existing_passphrase
from unlocker.commands.recovery import recovery_slots
from unlocker.errors import CorruptError, NoTpmError, UnlockerError, UsageError
from unlocker.log import say
from unlocker.luks import LuksDevice
from unlocker.secret import Secret
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
    left = pending.anything_left(device)
    tokens, recovery = _ours(device, opts)
    if not tokens and not recovery and not left:
        raise UsageError(f"{opts.device} has no tpm2-unlocker enrolment"
                         + (" or recovery key" if opts.recovery_key else ""))
    _keeps_another(device, tokens, recovery)
    tpm: Tpm | None = None
    if any(isinstance(t, Token) and (t.store == "nv" or t.counter or t.signed) for _, t in tokens) or left:
        try:
            tpm = Tpm(resolve_tcti(opts.tcti))
        except NoTpmError as exc:
            say(f"the TPM is not reachable, its NV index stays defined ({exc})")
    try:
        with existing_passphrase(device, opts.unlock_key_file) as passphrase:
            if left:
                pending.clean_up(device, lambda: passphrase, tpm)
                tokens, recovery = _ours(device, opts)
                _keeps_another(device, tokens, recovery)
            others = [s for s in device.keyslots() if s not in _slots(tokens, recovery)]
            # the secret given must open a keyslot that stays: whatever the tokens claim (they are
            # anyone's to write), the disk then still opens with it afterwards
            if not any(device.test_key(passphrase, slot) for slot in others):
                raise UsageError(f"{opts.device}: the passphrase given opens only keyslots being removed; "
                                 "give one of a keyslot that stays")
            going = {t for t, _ in tokens} | {t for t, _ in recovery}
            # each enrolment's sealed key first, its keyslot next, its token last: a run killed half-way
            # leaves a token that still says what is left to remove (or, its keyslot gone, names none:
            # the next run removes it)
            for tid, token in tokens:
                if isinstance(token, CorruptError):
                    say(f"token {tid} is corrupt ({token}); removing the token only")
                else:
                    try:
                        counters = _bound_counters(tpm, token)  # before the sealed key goes: it proves them
                        store.destroy(tpm, token)
                        for counter in counters:
                            if tpm is not None and tpm.is_our_counter(counter):
                                tpm.nv_undefine(counter)
                    except UnlockerError as exc:
                        say(f"could not remove the sealed key ({exc})")
                    if token.keyslot_owned and token.keyslot in device.keyslots():
                        _kill(device, token.keyslot, passphrase, going)
                device.remove_token(tid)
            for tid, slot in recovery:  # only when asked: it is the user's way in when the TPM fails
                if slot in device.keyslots():
                    _kill(device, slot, passphrase, going)
                device.remove_token(tid)
    finally:
        if tpm is not None:
            tpm.close()
    return len(tokens) + len(recovery)


def _ours(device: LuksDevice, opts: RemoveOptions) -> tuple[list[tuple[int, Token | CorruptError]], list[tuple[int, int]]]:
    return device.our_tokens(), recovery_slots(device) if opts.recovery_key else []


def _slots(tokens: list[tuple[int, Token | CorruptError]], recovery: list[tuple[int, int]]) -> set[int]:
    return {t.keyslot for _, t in tokens if isinstance(t, Token) and t.keyslot_owned} | {s for _, s in recovery}


def _keeps_another(device: LuksDevice, tokens: list[tuple[int, Token | CorruptError]],
                   recovery: list[tuple[int, int]]) -> None:
    ours = _slots(tokens, recovery)
    if ours and not [s for s in device.keyslots() if s not in ours]:
        raise UsageError(f"{device.path}: refusing to remove keyslot(s) {sorted(ours)}: "
                         "no other keyslot would be left to open the disk")


def _kill(device: LuksDevice, slot: int, passphrase: Secret, going: set[int]) -> None:
    """Kill a keyslot a token of ours names, unless commands/keyslots.py's rule keeps it (a header is
    anyone's to write: the token may name the passphrase's keyslot, the recovery key's, another tool's)."""
    why = why_keep(device, slot, passphrase, going)
    if why:
        say(f"keyslot {slot} stays: {why}")
    else:
        device.kill_slot(slot, passphrase)


def _bound_counters(tpm: Tpm | None, token: Token) -> list[int]:
    """The NV counters this enrolment's sealed policy names (the grace's; the signatures' epoch, which
    the policy reference binds): the only ones `remove` takes. A counter the header names that nothing
    binds (prepare-update's, once its grace was spent) stays, said: the header is anyone's to write and
    could name another disk's."""
    named = [c for c in (token.counter, token.signed.epoch if token.signed else 0) if c]
    if tpm is None or not named:
        return []
    try:
        claims.prove(tpm, token)
        bound = [token.signed.epoch] if token.signed is not None else []
        if token.grace is not None and token.counter and tpm.nv_name(token.counter) == token.grace.counter_name:
            bound.append(token.counter)
    except (UnlockerError, ValueError):  # a hostile token: nothing is proven bound
        bound = []
    for counter in named:
        if counter not in bound:
            say(f"NV counter 0x{counter:08x} stays: nothing binds it to this enrolment's sealed key "
                f"('tpm2_nvundefine 0x{counter:08x}' once no other disk's enrolment names it)")
    return bound
