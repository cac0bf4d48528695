"""Which events are behind the PCRs that changed since enrolment, for the line the boot says when the
policy fails. Read only then: the log is parsed on the way to the passphrase prompt, never on a boot
that unseals. Lean imports (the boot path's rule)."""

from __future__ import annotations

import os

from unlocker import initrd
from unlocker.log import trace
from unlocker.measure.eventlog import SYSFS_EVENTLOG, default_path
from unlocker.measure.events import explain
from unlocker.token import Token

SECURITYFS = "/sys/kernel/security"


def _mount_securityfs() -> None:
    """A busybox initramfs mounts no securityfs (systemd's does): mount it, as the kernel's log lives there."""
    if os.path.exists(os.path.dirname(SYSFS_EVENTLOG)) or not initrd.in_initrd():
        return
    from unlocker.lean.run import run

    try:
        run(["mount", "-t", "securityfs", "securityfs", SECURITYFS], timeout=5)
    except OSError:
        pass


def changed_events(token: Token, changed: list[int]) -> dict[int, list[str]]:
    """{PCR: the events that differ from the enrolment's record} for the changed PCRs it recorded."""
    if not any(p in token.pcr_events for p in changed):
        return {}
    trace("event log: reading it to name the events behind the changed PCRs")
    if default_path() == SYSFS_EVENTLOG:
        _mount_securityfs()
    found = explain(token.pcr_events, token.selection.bank, changed)
    trace(f"event log: {sum(len(e) for e in found.values())} changed event(s) in PCRs {sorted(found)}")
    return found
