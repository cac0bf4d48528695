"""predict: the PCR values of the next boot with a new boot loader, kernel, initrd or command line.

The work is unlocker.measure.predict (which `reseal --predict` calls too); here the command's
options, its default selection (every PCR the log measures) and what it prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unlocker.measure.eventlog import SYSFS_EVENTLOG, read
from unlocker.measure.predict import Prediction, component_digests
from unlocker.measure.predict import predict as predict_from
from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import PcrSelection
from unlocker.tpm.tcti import resolve_tcti

DEFAULT_BANK = "sha256"


@dataclass(frozen=True)
class PredictOptions:
    selection: PcrSelection | None  # None: every PCR the event log measures, sha256 bank
    kernel: str | None = None
    bootloader: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    eventlog: str | None = None
    tcti: str | None = None


@dataclass
class PredictResult:
    prediction: Prediction
    components: dict[str, str]  # what was given: kernel, bootloader, initrd, cmdline

    def to_json(self) -> dict[str, Any]:
        p = self.prediction
        return {
            "bank": p.selection.bank,
            "eventlog": p.eventlog,
            "components": self.components,
            "pcrs": {str(row.pcr): {"current": row.current.hex(), "predicted": row.predicted.hex(),
                                    "changed": row.changed, "replaced": row.replaced, "lock": row.lock}
                     for row in p.pcrs},
        }


def predict(opts: PredictOptions) -> PredictResult:
    source = opts.eventlog or SYSFS_EVENTLOG
    log = read(source)
    selection = opts.selection
    if selection is None:
        measured = sorted({e.pcr for e in log.measured()})
        selection = PcrSelection(DEFAULT_BANK, tuple(measured))
    digests = component_digests(selection.bank, kernel=opts.kernel, bootloader=opts.bootloader, initrd=opts.initrd,
                                cmdline=opts.cmdline)
    with Tpm(resolve_tcti(opts.tcti)) as tpm:
        current = tpm.read_pcrs(selection)
    components = {name: value for name, value in (("kernel", opts.kernel), ("bootloader", opts.bootloader),
                                                  ("initrd", opts.initrd), ("cmdline", opts.cmdline))
                  if value is not None}
    return PredictResult(predict_from(selection, digests, log, current, source), components)


def render(result: PredictResult) -> str:
    p = result.prediction
    given = ", ".join(result.components) or "nothing new (the current boot replayed)"
    lines = [f"{p.selection.bank} PCR values of the next boot with {given} (event log {p.eventlog}, which "
             "replays to the TPM's values):"]
    for row in p.pcrs:
        if row.lock:
            state = "lock PCR: its reset value when the key is unsealed"
        elif row.changed:
            state = f"CHANGES (now {row.current.hex()[:16]}...): " + ", ".join(row.replaced)
        else:
            state = "same"
        lines.append(f"  {row.pcr:>2}  {row.predicted.hex()}  {state}")
    return "\n".join(lines)
