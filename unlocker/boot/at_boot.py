"""`unlock` without a device, at boot: every device the boot names, one TPM connection for all."""

from __future__ import annotations

import os

from unlocker import TYPE_CHECKING
from unlocker.boot.connection import TpmConnection
from unlocker.boot.deadline import within
from unlocker.boot.lock import lock, volume_event
from unlocker.boot.unlock import BootContext, UnlockRequest, check_mapping_name, unlock
from unlocker.errors import DeviceNotFoundError, InternalError, NoTpmError, PinNeededError, UnlockerError
from unlocker.lean.record import record
from unlocker.log import say, trace
from unlocker.options import DEFAULT_TPM_TIMEOUT

if TYPE_CHECKING:
    from unlocker.boot.devices import Target


# what a run told to defer leaves to the next run of the hook: devices not there yet, PINs to ask
DEFERRED = (DeviceNotFoundError, PinNeededError)


@record(frozen=True)
class BootOptions:
    """What `unlock` without a device was asked to do: every device the boot names."""

    tries: int
    tcti: str | None
    timeout: float
    use_tpm: bool = True
    defer_lock: bool = False
    tpm_timeout: float = DEFAULT_TPM_TIMEOUT
    defer_pin: bool = False


def unlock_at_boot(opts: BootOptions) -> None:
    """Open every device the boot asks for (cmdline, crypttab, else every device with our token);
    raise the first failure after trying them all."""
    from unlocker.boot import warmup
    from unlocker.boot.devices import boot_targets

    targets = boot_targets()
    trace("boot targets: " + (", ".join(t.source for t in targets) or "none"))
    if not targets:
        say("no LUKS device to open (none on the command line, in crypttab, or with a tpm2-unlocker token)")
        lock_within(None, [], opts.tcti, opts.tpm_timeout)  # a later shell must not unseal either
        return
    warmup.start()
    connection = TpmConnection(opts.tcti, opts.timeout) if opts.use_tpm else None
    context = BootContext(tpm=connection, before_open=warmup.wait_for_dm_crypt, open_early=True, events=[])
    failures: list[UnlockerError] = []
    try:
        if connection is not None:
            connection.connect_in_background()  # while the disks are still on their way
        failures = _open_targets(targets, opts, context)
    finally:
        # every path locks: TPM unlock, passphrase, recovery key, failure; only a run told to defer
        # (the busybox hook's early one) leaves a device not found yet to the second run, which locks
        if not (opts.defer_lock and any(isinstance(f, DEFERRED) for f in failures)):
            lock_within(connection, context.events or [], opts.tcti, opts.tpm_timeout)
        if connection is not None:
            connection.close()
    if len(failures) == 1 and len(targets) == 1:
        raise failures[0].as_said()
    if failures:
        # each failure was said above; the exit code is the first one's, unless one is left to the
        # next run (a device not there yet, a PIN to ask): the hook then gives the TPM another go
        first = next((f for f in failures if isinstance(f, DEFERRED)), failures[0]) if opts.defer_lock else failures[0]
        raise type(first)(f"{len(failures)} of {len(targets)} device(s) not opened")


def _open_targets(targets: list[Target], opts: BootOptions, context: BootContext) -> list[UnlockerError]:
    """Each target in turn: waited for, then unlocked; the failures, each said as it happened."""
    failures: list[UnlockerError] = []
    for target in targets:
        try:
            _open_target(target, opts, context)
        except UnlockerError as exc:
            if not exc.said:
                say(exc.message)
            failures.append(exc)
        except Exception as exc:  # a bug of ours: said for this device, and the others still opened
            failures.append(InternalError(f"{target.source}: internal error: {type(exc).__name__}: {exc}"))
            say(failures[-1].message)
    return failures


def _open_target(target: Target, opts: BootOptions, context: BootContext) -> None:
    from unlocker.boot.devices import read_luks_header, wait_for

    found = wait_for(target.source, opts.timeout)
    if found is None:
        raise DeviceNotFoundError(f"{target.source}: no such device after {opts.timeout:g} s")
    path = found.path
    trace(f"{target.source}: found at {path}")
    header = found.header or read_luks_header(path)
    name = target.name
    if name is None:
        name = f"luks-{header[0]}" if header else os.path.basename(path)
    check_mapping_name(name)
    if context.events is not None:  # measured whatever happens next
        context.events.append(volume_event(name, header[0] if header else path))
    if os.path.exists(f"/dev/mapper/{name}"):
        say(f"{path}: already open as {name}")
        return
    unlock(UnlockRequest(path, name, tries=opts.tries, tcti=opts.tcti, use_tpm=opts.use_tpm,
                         tpm_timeout=opts.tpm_timeout, ask_pin=not opts.defer_pin), context,
           metadata=header[1] if header else None)


def lock_within(connection: TpmConnection | None, events: list[bytes], tcti: str | None, seconds: float) -> bool:
    """lock() on the boot's connection (or one of its own), within `seconds` (a TPM that stops
    answering: the connection is then abandoned). Whether the lock was extended."""
    try:
        return within(seconds, connection, lambda: lock(connection.tpm() if connection is not None else None,
                                                         events, tcti), "lock")
    except NoTpmError as exc:
        say(f"the lock PCR could not be extended: {exc}")
        return False
