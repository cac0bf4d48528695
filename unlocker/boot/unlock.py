"""unlock: unseal the key through the device's tokens and open it; else say why and ask the passphrase."""

from __future__ import annotations

import _thread
import os

from unlocker import TYPE_CHECKING, recovery, store
from unlocker.boot.connection import TpmConnection
from unlocker.boot.prompt import ask_passphrase
from unlocker.errors import (
    CorruptError,
    InternalError,
    NoTpmError,
    PolicyError,
    UnlockerError,
    UsageError,
    WrongPassphraseError,
)
from unlocker.lean.record import record
from unlocker.lean.threads import Background
from unlocker.log import hint, say, trace
from unlocker.luks import LuksDevice, PendingOpen
from unlocker.options import DEFAULT_TPM_TIMEOUT, DEFAULT_TRIES
from unlocker.secret import Secret
from unlocker.token import Token
from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import changed_pcrs

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
    """Name the PCRs whose values differ from those recorded at sealing."""
    try:
        current = tpm.read_pcrs(token.policy_selection())
    except UnlockerError:
        return exc
    changed = changed_pcrs(token.pcr_values, current)
    if not changed and token.lock_pcr is not None and current[token.lock_pcr] != token.expected_values()[token.lock_pcr]:
        return PolicyError(f"the key is locked for this boot (lock PCR {token.lock_pcr} was extended once the "
                           "disks were opened); it unseals again after a reboot",
                           changed_pcrs=[token.lock_pcr])
    if not changed:
        return PolicyError("the TPM refused the PCR policy although the PCR values match the enrolment")
    names = ", ".join(str(p) for p in changed)
    plural = "s" if len(changed) > 1 else ""
    return PolicyError(f"PCR{plural} {names} changed since enrolment ({token.selection.bank} bank)",
                       changed_pcrs=changed,
                       hint="after an intended update, run 'tpm2-unlocker reseal' once booted")


def unseal_any(device: LuksDevice, tokens: list[tuple[int, Token | CorruptError]],
               connection: TpmConnection) -> tuple[Secret, Token]:
    """The key of the first of the device's `tokens` that unseals, or the most telling error of why none did."""
    if not tokens:
        raise UsageError(f"{device.path} has no tpm2-unlocker enrolment (run 'tpm2-unlocker enroll' first)")
    reasons: list[UnlockerError] = [t for _, t in tokens if isinstance(t, CorruptError)]
    good = [t for _, t in tokens if isinstance(t, Token)]
    if good:
        tpm = connection.get()
        for token in good:
            try:
                key = store.take(tpm, token)
                trace(f"token {token.token_id}: unsealed")
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
    """unseal_any, but a TPM that stops answering (a hung chip, a paused emulator, something in
    between holding the answer) costs at most `seconds`: its command cannot be interrupted, so it is
    left to its thread, the connection abandoned, and the prompt follows. A key that arrives after
    that is wiped by the thread itself."""
    outcome: dict[str, object] = {}
    decided = _thread.allocate_lock()

    def work() -> None:
        try:
            found: object = unseal_any(device, tokens, connection)
        except BaseException as exc:  # handed to the caller below, whatever it is
            found = exc
        with decided:
            if "gave up" in outcome:
                if isinstance(found, tuple):
                    found[0].wipe()
            else:
                outcome["found"] = found

    worker = Background(work, "unseal")
    worker.join(seconds)
    with decided:
        if "found" not in outcome:
            outcome["gave up"] = True
            connection.abandon()
            raise NoTpmError(f"the TPM did not answer within {seconds:g} s")
    found = outcome["found"]
    if isinstance(found, BaseException):
        raise found
    return found  # type: ignore[return-value]


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
    slots = [t.keyslot for _, t in tokens if isinstance(t, Token)]
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
            key, token = _unseal_within(device, tokens, connection, opts.tpm_timeout)
            with key:
                if not open_or_test(device, key, name, token.keyslot, test=opts.test, context=context,
                                    pending=pending):
                    raise CorruptError(f"the unsealed key does not open keyslot {token.keyslot}")
            say(f"{opts.device}: unlocked with the TPM" + (" (test only)" if opts.test else f" as {name}"))
            return
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
