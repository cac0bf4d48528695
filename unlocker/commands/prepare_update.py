"""prepare-update --firmware: before a firmware update, add a grace branch for the next boot.

Firmware measurements cannot be predicted. Like BitLocker's suspend, the enrolment gets, beside its
chains, one branch per chain without the firmware's PCRs (0 and 2; 7 too with --secure-boot) that
still binds the rest and the lock PCR. The TPM holds it to one boot: the branch's policy asserts
the enrolment's NV counter (TPM_NT_COUNTER) at its value now, which the boot that uses it increments
(anyone who increments it only ends the grace: a prompt, never an unlock), and the TPM's resetCount
at most --boots more than now (an unused grace ends by itself). That boot's initramfs re-seals to
the new full values by itself and drops the grace (boot/refresh.py).

It is a re-seal (reseal.py): on a booted system the lock PCR is extended, so the passphrase is asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from unlocker.commands.reseal import GraceRequest, ResealOptions, reseal
from unlocker.errors import UsageError
from unlocker.token import Token

FIRMWARE_PCRS = (0, 2)  # platform firmware code and option ROMs (UEFI's measurements)
SECURE_BOOT_PCR = 7  # Secure Boot policy: db/dbx updates change it too
DEFAULT_BOOTS = 3  # the firmware's own update reboot(s) count as TPM resets too


@dataclass(frozen=True)
class PrepareOptions:
    device: str | None
    firmware: bool
    secure_boot: bool
    boots: int
    unlock_key_file: str | None
    tcti: str | None
    pin_file: str | None = None


def devices_to_prepare(device: str | None) -> list[str]:
    """DEVICE, else every LUKS2 device with a tpm2-unlocker token."""
    if device is not None:
        return [device]
    from unlocker.boot.devices import scan

    found = [target.source for target in scan()]
    if not found:
        raise UsageError("no LUKS2 device with a tpm2-unlocker enrolment found (name the DEVICE)")
    return found


def prepare_update(opts: PrepareOptions) -> list[tuple[str, Token]]:
    if not opts.firmware:
        raise UsageError("prepare-update needs --firmware (the update it prepares for; kernel and boot loader "
                         "updates are predicted: 'reseal --predict')")
    if not 1 <= opts.boots <= 16:
        raise UsageError(f"--boots takes 1 to 16, not {opts.boots}")
    left_out = (*FIRMWARE_PCRS, SECURE_BOOT_PCR) if opts.secure_boot else FIRMWARE_PCRS
    done: list[tuple[str, Token]] = []
    for path in devices_to_prepare(opts.device):
        with_pin = True if opts.pin_file is not None else None
        for token in reseal(ResealOptions(path, None, opts.unlock_key_file, opts.tcti, with_pin=with_pin,
                                          pin_file=opts.pin_file, grace=GraceRequest(left_out, opts.boots))):
            assert isinstance(token, Token)  # a grace is sealed, never approved by the machine key
            done.append((path, token))
    return done
