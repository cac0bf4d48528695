"""unlock: unseal the key through the device's tokens and open it; else say why and ask the passphrase."""

from __future__ import annotations

import os

from unlocker import TYPE_CHECKING, recovery, store
from unlocker.boot.connection import TpmConnection
from unlocker.boot.deadline import within
from unlocker.boot.prompt import ask_passphrase
from unlocker.boot.refresh import try_refresh
from unlocker.branch import unmet
from unlocker.errors import (
    CorruptError,
    InternalError,
    NoTpmError,
    PinNeededError,
    PolicyError,
    UnlockerError,
    UsageError,
    WrongPassphraseError,
)
from unlocker.lean.record import record
from unlocker.log import hint, say, trace
from unlocker.luks import LuksDevice, PendingOpen
from unlocker.options import DEFAULT_TPM_TIMEOUT, DEFAULT_TRIES
from unlocker.secret import Secret
from unlocker.signature import signatures_in
from unlocker.token import Token
from unlocker.tpm.client import Tpm

if TYPE_CHECKING:
    from collections.abc import Callable

# device-mapper's control node: there once dm_mod is loaded
DM_CONTROL = "/dev/mapper/control"


@record(frozen=True)
class UnlockRequest:
    """What `unlock DEVICE` (or the boot, per device) was asked to do: the user's choices only."""

    device: str
    name: str | None = None
    test: bool = False
    tries: int = DEFAULT_TRIES
    tcti: str | None = None
    # False: straight to the passphrase (a first run tried the TPM and said why it failed)
    use_tpm: bool = True
    # seconds the TPM may take to connect and unseal before it counts as gone (then the prompt)
    tpm_timeout: float = DEFAULT_TPM_TIMEOUT
    # False: an enrolment with a PIN is left to a later run (PinNeededError), which asks
    ask_pin: bool = True


@record(frozen=True)
class BootContext:
    """The boot's live state that every device's unlock shares (at_boot.py makes it)."""

    # the connection opened while the disks were awaited (it waited for the TPM's device node)
    tpm: TpmConnection | None = None
    # waits for what `cryptsetup open` needs loaded (the warm-up's modprobe of dm-crypt)
    before_open: Callable[[], None] | None = None
    # `cryptsetup open` started while the key is unsealed, the key handed to it after
    open_early: bool = False
    # filled in for the lock at the end of the boot: the volumes it handled
    events: list[bytes] | None = None


NO_CONTEXT = BootContext()


def explain_policy_failure(tpm: Tpm, token: Token, exc: PolicyError) -> PolicyError:
    """Name the PCRs whose values differ from those recorded at sealing (of the closest chain), and
    the events behind them."""
    if exc.changed_pcrs or len(token.branches()) > 1:  # chosen from the PCRs read: the reason is known already
        return _with_events(token, exc)
    try:
        current = tpm.read_pcrs(token.read_selection())
    except UnlockerError:
        return exc
    return _with_events(token, unmet(token, current))


CHANGED = " changed since enrolment"


def _with_events(token: Token, error: PolicyError) -> PolicyError:
    """`error` (branch.unmet's "PCRs N changed since enrolment (...)") with the events behind the
    changed PCRs after its first words, when the token recorded the events of the boot it sealed to.
    The record is of the chain sealed from a booted system: with chains predicted beside it, the
    events named are those that differ from that one's, for the PCRs that differ from the closest chain."""
    if not error.changed_pcrs or CHANGED + " (" not in error.message:
        return error
    behind = _events_behind(token, error.changed_pcrs)
    if not behind:
        return error
    return PolicyError(error.message.replace(CHANGED, CHANGED + behind, 1), changed_pcrs=error.changed_pcrs,
                       hint=error.hint)


def _events_behind(token: Token, changed: list[int]) -> str:
    """': EV_... (kernel ...)' — the events behind the changed PCRs, when the token recorded them."""
    from unlocker.boot.measured import changed_events

    found = {p: e for p, e in changed_events(token, changed).items() if e}
    if not found:
        return ""
    if len(changed) == 1:
        return ": " + ", ".join(found[changed[0]])
    return ": " + "; ".join(f"PCR {p}: {', '.join(e)}" for p, e in found.items())


def unseal_any(device: LuksDevice, tokens: list[tuple[int, Token | CorruptError]],
               connection: TpmConnection) -> tuple[Secret, Token]:
    """The key of the first of the device's `tokens` that unseals, or the most telling error of why none did.
    A branch that leaves the enrolment behind the machine (prepare-update's grace, a predicted
    chain) has it re-sealed here, while the key is in hand (boot/refresh.py)."""
    if not tokens:
        raise UsageError(f"{device.path} has no tpm2-unlocker enrolment (run 'tpm2-unlocker enroll' first)")
    reasons: list[UnlockerError] = [t for _, t in tokens if isinstance(t, CorruptError)]
    # a key with a PIN is left to the caller, which asks for the PIN only when no key without one opens
    good = [t for _, t in tokens if isinstance(t, Token) and not t.pin]
    if not good and any(isinstance(t, Token) for _, t in tokens):
        raise PinNeededError("the key needs the TPM PIN")
    if good:
        tpm = connection.get()
        signatures = signatures_in(device.raw_tokens()) if any(t.signed for t in good) else []
        for token in good:
            try:
                key, branch = store.take_branch(tpm, token, None, signatures)
                trace(f"token {token.token_id}: unsealed ({branch.kind} branch)")
                try_refresh(tpm, device, token, branch, key, None)
                return key, token
            except PolicyError as exc:
                reasons.append(explain_policy_failure(tpm, token, exc))
            except NoTpmError as exc:
                reasons.append(exc)
                break
            except UnlockerError as exc:
                reasons.append(exc)
    # A corrupt token matters less than what the TPM said about a good one.
    reasons.sort(key=lambda e: isinstance(e, CorruptError) and len(good) > 0)
    raise reasons[0]


def _unseal_within(device: LuksDevice, tokens: list[tuple[int, Token | CorruptError]], connection: TpmConnection,
                   seconds: float) -> tuple[Secret, Token]:
    """unseal_any, but a TPM that stops answering costs at most `seconds` (then the prompt)."""
    return within(seconds, connection, lambda: unseal_any(device, tokens, connection), "unseal")


def spare_cpu() -> bool:
    """More than one CPU to run on: work started beside ours then runs at the same time."""
    return len(os.sched_getaffinity(0)) > 1


def start_open(device: LuksDevice, tokens: list[tuple[int, Token | CorruptError]], name: str, *,
               test: bool) -> PendingOpen | None:
    """Start `cryptsetup open` of the first enrolment's keyslot before its key is unsealed: its
    exec, libraries and header read then overlap the TPM's work. Only with a second CPU: on one,
    the two only take turns and the window grows (docs/performance.md, the change log). A mapping
    needs device-mapper there already (cryptsetup checks for it before it reads the key); without
    it, or on any error, the open runs after the unseal as usual and says what is wrong."""
    if not spare_cpu() or (not test and not os.path.exists(DM_CONTROL)):
        return None
    slots = [t.keyslot for _, t in tokens if isinstance(t, Token) and not t.pin]
    if not slots:
        return None
    try:
        return device.start_open(name, slots[0], test=test)
    except UnlockerError:
        return None


def open_or_test(device: LuksDevice, key: Secret, name: str, slot: int | None, *, test: bool,
                 context: BootContext, pending: PendingOpen | None = None) -> bool:
    """Open the mapping (or only test the key); False if the key opens no such slot. A `pending`
    open of that slot gets the key; of another slot, it is left for the caller to cancel."""
    if not test and context.before_open is not None:
        context.before_open()
    if pending is not None and pending.slot == slot:
        return pending.finish(key)
    if test:
        return device.test_key(key, slot)
    return device.open(key, name, slot)


# device-mapper's limit (DM_NAME_LEN less the terminating NUL)
MAX_MAPPING_NAME = 127


def check_mapping_name(name: str) -> None:
    """Refuse a mapping name that is no plain /dev/mapper name: from a kernel command line or a
    crypttab it is input like any other (a name cannot start with '-' or hold a '/')."""
    if (not name or len(name.encode()) > MAX_MAPPING_NAME or name.startswith("-") or name in (".", "..", "control")
            or "/" in name or not name.isprintable() or any(c.isspace() for c in name)):
        raise UsageError(f"{name!r} is not a usable mapping name (1-{MAX_MAPPING_NAME} printable characters, "
                         "no '/', no space, not starting with '-', not device-mapper's own 'control')")


def unlock(opts: UnlockRequest, context: BootContext = NO_CONTEXT, metadata: dict | None = None) -> None:
    """Open the device with the TPM, else with a passphrase asked up to opts.tries times.

    `metadata`: the LUKS2 header already read at boot (spares a `cryptsetup luksDump`)."""
    device = LuksDevice(opts.device)
    if metadata is not None:
        device.seed_metadata(metadata)
    device.metadata()
    name = opts.name or f"luks-{device.uuid()}"
    check_mapping_name(name)
    # what a failure exits with when no passphrase opens the disk either: the TPM's reason, if any
    failure: type[UnlockerError] = WrongPassphraseError
    if opts.use_tpm:
        connection = context.tpm or TpmConnection(opts.tcti)
        pending: PendingOpen | None = None
        try:
            tokens = device.our_tokens()  # parsed once, for the early open and the unseal
            pending = start_open(device, tokens, name, test=opts.test) if context.open_early else None
            try:
                key, token = _unseal_within(device, tokens, connection, opts.tpm_timeout)
            except UnlockerError as exc:
                pinned = [t for _, t in tokens if isinstance(t, Token) and t.pin]
                if not pinned or isinstance(exc, NoTpmError):  # no TPM: no PIN to ask for
                    raise
                if not opts.ask_pin:
                    raise PinNeededError("the key needs the TPM PIN: the next run asks for it") from None
                from unlocker.boot.pin import unseal_with_pin

                signatures = signatures_in(device.raw_tokens()) if any(t.signed for t in pinned) else []
                key, token = unseal_with_pin(opts.device, pinned, connection, opts.tpm_timeout, signatures)
            with key:
                if not open_or_test(device, key, name, token.keyslot, test=opts.test, context=context,
                                    pending=pending):
                    raise CorruptError(f"the unsealed key does not open keyslot {token.keyslot}")
            say(f"{opts.device}: unlocked with the TPM" + (" (test only)" if opts.test else f" as {name}"))
            return
        except PinNeededError as exc:
            failure = type(exc)
            if opts.ask_pin:
                say(f"{opts.device}: TPM unlock failed: {exc}")
            else:  # not a failure: the run that can ask for the PIN follows
                trace(f"{opts.device}: {exc}")
        except UnlockerError as exc:
            failure = type(exc)
            say(f"{opts.device}: TPM unlock failed: {exc}")
            if exc.hint:
                hint(exc.hint)
        except Exception as exc:  # a bug of ours on the TPM side must never cost the user the prompt
            failure = InternalError
            say(f"{opts.device}: TPM unlock failed: internal error: {type(exc).__name__}: {exc}")
        finally:
            if pending is not None:
                pending.cancel()  # unless it got the key: then nothing is left to cancel
            if context.tpm is None:
                connection.close()
        if opts.tries == 0:
            # TPM only: the line above said why; the device stays closed for whoever asks next
            raise failure(f"{opts.device}: not unlocked").as_said()
    # which keyslots a typed passphrase is tried on is decided on cryptsetup's own view of the header
    device.use_cryptsetups_view()
    for attempt in range(opts.tries):
        passphrase = ask_passphrase(f"Enter passphrase for {opts.device}: ")
        if passphrase is None:
            # Nobody can answer: exit with the TPM failure's own code (its line was said above).
            raise failure(f"{opts.device}: not unlocked (no passphrase given)")
        with passphrase:
            ok = open_or_test(device, passphrase, name, None, test=opts.test, context=context)
            if not ok:  # a recovery key typed without its dashes, with spaces or capitals
                retyped = recovery.normalize(passphrase)
                if retyped is not None:
                    with retyped:
                        ok = open_or_test(device, retyped, name, None, test=opts.test, context=context)
        if ok:
            say(f"{opts.device}: unlocked with the passphrase" + (" (test only)" if opts.test else f" as {name}"))
            return
        say(f"wrong passphrase ({attempt + 1} of {opts.tries})")
    raise WrongPassphraseError(f"{opts.device}: no passphrase opened the disk after {opts.tries} tries")
