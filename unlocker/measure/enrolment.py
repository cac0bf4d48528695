"""What an enrolment records of the boot it seals to: per PCR, the events the firmware's log holds
(events.record), so that a later boot and `status` can name the events behind a changed PCR.
Off the boot path."""

from __future__ import annotations

from unlocker.measure import events
from unlocker.measure.eventlog import EventLogError, read, replay
from unlocker.options import LOCK_PCRS
from unlocker.tpm.policy import PcrSelection


def events_at_sealing(selection: PcrSelection, values: dict[int, bytes], path: str | None = None) -> dict[int, list[str]]:
    """The record of each PCR of `selection` whose TPM value (`values`) the log replays to; nothing for
    a PCR it does not (the log would not explain it), nothing at all when there is no readable log."""
    try:
        log = read(path)
        replayed = replay(log, selection.bank, selection.pcrs)
    except EventLogError:
        return {}
    explained = tuple(p for p in selection.pcrs if p not in LOCK_PCRS and replayed[p] == values.get(p))
    return events.record(log, selection.bank, explained)
