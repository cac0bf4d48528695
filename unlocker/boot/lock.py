"""The lock PCR: once the boot's disks are open (or given up on), the PCR every enrolment binds to
its reset value is extended, so that nothing that runs later in this boot (a break shell, the
booted system, an attacker's root reached with their own passphrase) can unseal the keys again.

Extended with TPM2_PCR_Event, which hashes the event in every active bank (a policy over a bank
left out would stay unlocked), naming each volume as systemd names its own measurements
(cryptsetup:NAME:UUID), so the event log says what was opened. The run that locks leaves a marker
in /run; the `lock` verb (the systemd unit before initrd-switch-root, the hooks' late steps) only
extends when no run did.
"""

from __future__ import annotations

import os

from unlocker import initrd
from unlocker.errors import UnlockerError
from unlocker.log import say, trace
from unlocker.options import LOCK_PCRS

MARKER = "/run/tpm2-unlocker/locked"
LOCK_EVENT = b"tpm2-unlocker:lock"
# one event per volume the boot handled; a boot with more (hostile sticks) measures the first ones
MAX_EVENTS = 16


def volume_event(name: str, uuid: str) -> bytes:
    return f"tpm2-unlocker:{name}:{uuid}".encode(errors="replace")


def locked(marker: str = MARKER) -> bool:
    """A run of this boot extended the lock PCR (the marker lives in the initrd's /run only)."""
    return initrd.in_initrd() and os.path.exists(marker)


def lock(tpm: object | None, events: list[bytes], tcti: str | None = None, marker: str = MARKER) -> bool:
    """Extend each of LOCK_PCRS with `events` (the lock event when none): never a PCR a header
    names (a header is the attacker's to write).
    `tpm`: the boot's open Tpm, else one is opened for this. True when done; a TPM that cannot be
    reached is said (there is then nothing to unseal either)."""
    from unlocker.tpm.client import Tpm
    from unlocker.tpm.tcti import resolve_tcti

    own = None
    try:
        if tpm is None:
            own = tpm = Tpm(resolve_tcti(tcti))
        assert isinstance(tpm, Tpm)
        for pcr in LOCK_PCRS:
            for event in events[:MAX_EVENTS] or [LOCK_EVENT]:
                tpm.pcr_event(pcr, event)
            trace(f"lock PCR {pcr} extended")
    except UnlockerError as exc:
        say(f"the lock PCR could not be extended ({exc})")
        return False
    finally:
        if own is not None:
            own.close()
    if not initrd.in_initrd():
        return True  # the marker is the initrd's: on the installed system, `lock` always extends
    try:
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as f:
            f.write(" ".join(str(p) for p in LOCK_PCRS) + "\n")
    except OSError:
        pass  # the marker only spares the late `lock` its run
    return True
