"""--predict: the boot components an update puts in place of the current ones, and the PCR values the
next boot will have with them (reseal --predict, sign-policy --predict)."""

from __future__ import annotations

from dataclasses import dataclass

from unlocker.errors import UsageError
from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import PcrSelection


@dataclass(frozen=True)
class Prediction:
    """What --predict replaces in the boot chain (unlocker.measure.predict.predict_pcrs's arguments)."""

    kernel: str | None = None
    bootloader: str | None = None
    initrd: str | None = None
    cmdline: str | None = None


def predict(tpm: Tpm, selection: PcrSelection, prediction: Prediction) -> dict[int, bytes]:
    """The values of `selection` the next boot will have (from the event log and the new components)."""
    try:
        from unlocker.measure.predict import predict_pcrs
    except ImportError:
        raise UsageError("this build cannot predict PCR values (it has no unlocker.measure); "
                         "re-seal after the update's first boot instead") from None
    return predict_pcrs(selection, kernel=prediction.kernel, bootloader=prediction.bootloader,
                        initrd=prediction.initrd, cmdline=prediction.cmdline, tpm=tpm)
