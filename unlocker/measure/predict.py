"""The PCR values the next boot will have when new components replace the current ones.

From the current boot's event log: check that it replays to the TPM's PCR values (else nothing it
says can be trusted, and we refuse, naming the PCRs), replace the digests of the events the given
components make (events.roles says which), replay. What each component changes:
- a boot loader or a kernel (or UKI): its Authenticode digest in PCR 4, where the firmware measured
  the one it replaces;
- an initrd: its file digest in PCR 9 (Linux's EFI stub, "Linux initrd");
- a command line: UTF-16 with its NUL, in PCR 12 (systemd-boot) and PCR 9 (the stub's load options).
  Give it as the kernel will see it (/proc/cmdline): systemd-boot puts `initrd=PATH` words first.
The lock PCRs (options.LOCK_PCRS) are extended by our own initramfs once the disks are open, after
the log ends: their next-boot value, when the key is unsealed, is their replay (the reset value), and
the TPM's value now says nothing about the log. Off the boot path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from unlocker.errors import UsageError
from unlocker.measure import events as ev
from unlocker.measure.eventlog import SYSFS_EVENTLOG, Event, EventLog, EventLogError, default_path, not_replaying, read, replay
from unlocker.measure.pe import authenticode_digests
from unlocker.options import LOCK_PCRS
from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import PcrSelection

# Where a component's measurement can be, for the error when the log has none of it
_WHERE = {ev.KERNEL: (4,), ev.BOOT_LOADER: (4,), ev.INITRD: (9,), ev.CMDLINE: (9, 12)}
_READ_CHUNK = 1 << 20


@dataclass
class PcrPrediction:
    pcr: int
    current: bytes
    predicted: bytes
    replaced: list[str] = field(default_factory=list)  # the events whose digests the prediction replaced
    lock: bool = False  # a lock PCR: extended after the log in every boot, predicted at its reset value

    @property
    def changed(self) -> bool:
        return not self.lock and self.current != self.predicted


@dataclass
class Prediction:
    selection: PcrSelection
    eventlog: str
    pcrs: list[PcrPrediction]

    def values(self) -> dict[int, bytes]:
        return {p.pcr: p.predicted for p in self.pcrs}


def _file_digest(path: str, bank: str) -> bytes:
    h = hashlib.new(bank)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    return h.digest()


def cmdline_digest(cmdline: str, bank: str) -> bytes:
    """What systemd-boot and the EFI stub measure for a command line: UTF-16LE with its NUL."""
    return hashlib.new(bank, (cmdline + "\0").encode("utf-16-le")).digest()


def component_digests(bank: str, *, kernel: str | None = None, bootloader: str | None = None,
                      initrd: str | None = None, cmdline: str | None = None) -> dict[str, bytes]:
    """The digest each given component makes in `bank`, by role (events.KERNEL, ...)."""
    found: dict[str, bytes] = {}
    if kernel is not None:
        found[ev.KERNEL] = authenticode_digests(kernel, [bank])[bank]
    if bootloader is not None:
        found[ev.BOOT_LOADER] = authenticode_digests(bootloader, [bank])[bank]
    if initrd is not None:
        found[ev.INITRD] = _file_digest(initrd, bank)
    if cmdline is not None:
        if "\0" in cmdline:
            raise UsageError("--cmdline cannot hold a NUL character")
        found[ev.CMDLINE] = cmdline_digest(cmdline, bank)
    return found


def check_replays(log: EventLog, selection: PcrSelection, current: dict[int, bytes], source: str) -> None:
    """EventLogError naming the PCRs of `selection` (lock PCRs aside) whose TPM value the log does not replay to."""
    checked = {p: v for p, v in current.items() if p not in LOCK_PCRS}
    wrong = not_replaying(log, selection.bank, checked)
    if wrong:
        names = ", ".join(str(p) for p in wrong)
        plural = "s" if len(wrong) > 1 else ""
        raise EventLogError(f"the event log {source} does not replay to the TPM's PCR{plural} {names} "
                            f"({selection.bank} bank): it cannot be the record of this boot", pcrs=wrong,
                            hint="a tampered or stale log, or something extended the PCR after boot: "
                                 "predict nothing from it; re-seal after the next boot instead")


def predict(selection: PcrSelection, digests: dict[str, bytes], log: EventLog, current: dict[int, bytes],
            source: str = SYSFS_EVENTLOG) -> Prediction:
    """The prediction from a parsed log and the TPM's `current` values of `selection`."""
    check_replays(log, selection, current, source)
    named = ev.roles(log)
    present = set(named.values())
    for role in digests:
        if role not in present:
            wanted = [p for p in _WHERE[role] if p in selection.pcrs]
            if wanted:
                what = "no boot loader: the firmware started the kernel itself" if role == ev.BOOT_LOADER \
                    else f"no measurement of the {role}"
                raise UsageError(f"this boot's event log has {what}, so the {role}'s part of PCR "
                                 f"{', '.join(str(p) for p in wanted)} cannot be predicted")
    replaced: dict[int, list[str]] = {}

    def digest_of(event: Event) -> bytes:
        role = named.get(event.number)
        if role in digests:
            replaced.setdefault(event.pcr, []).append(ev.describe(event, role))
            return digests[role]
        return event.digests.get(selection.bank, b"")

    values = replay(log, selection.bank, selection.pcrs, digest_of)
    rows = [PcrPrediction(p, current[p], values[p], replaced.get(p, []), lock=p in LOCK_PCRS) for p in selection.pcrs]
    return Prediction(selection, source, rows)


def prediction(selection: PcrSelection, *, kernel: str | None = None, bootloader: str | None = None,
               initrd: str | None = None, cmdline: str | None = None, eventlog: str | None = None,
               tpm: Tpm | None = None) -> Prediction:
    """predict_pcrs with what the CLI shows: the current values and the events replaced, per PCR."""
    digests = component_digests(selection.bank, kernel=kernel, bootloader=bootloader, initrd=initrd, cmdline=cmdline)
    source = eventlog or default_path()  # $TPM2_UNLOCKER_EVENTLOG too, as read() takes it
    log = read(source)
    if tpm is None:
        from unlocker.tpm.tcti import resolve_tcti

        with Tpm(resolve_tcti(None)) as own:
            current = own.read_pcrs(selection)
    else:
        current = tpm.read_pcrs(selection)
    return predict(selection, digests, log, current, source)


def predict_pcrs(selection: PcrSelection, *, kernel: str | None = None, bootloader: str | None = None,
                 initrd: str | None = None, cmdline: str | None = None, eventlog: str | None = None,
                 tpm: Tpm | None = None) -> dict[int, bytes]:
    """The values every PCR of `selection` (its bank) will have on the next boot when the given
    files (EFI images for `kernel` and `bootloader`, the initrd image) and command line replace the
    current ones; PCRs no given component touches keep their current value, and a lock PCR its
    reset value (what a policy binds it to).

    `eventlog`: the current boot's log (default: the kernel's copy in securityfs); `tpm`: an open
    connection (default: one is opened and closed). Raises EventLogError (naming the PCRs) when the
    log does not replay to the TPM's values, UsageError when a file cannot be read or is no EFI image,
    or the log has no measurement of a given component in a PCR of `selection`."""
    return prediction(selection, kernel=kernel, bootloader=bootloader, initrd=initrd, cmdline=cmdline,
                      eventlog=eventlog, tpm=tpm).values()
