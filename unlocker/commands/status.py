"""status: the TPM's facts and, per enrolment, whether the current PCR values satisfy its policy.

The check computes the PolicyPCR digest in Python from the PCR values read now and compares it with
the digest recorded at sealing: no unseal, no DA exposure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from unlocker.commands.recovery import recovery_slots
from unlocker.errors import CorruptError, UnlockerError
from unlocker.luks import LuksDevice
from unlocker.token import Token
from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import changed_pcrs, sealing_policy
from unlocker.tpm.tcti import resolve_tcti


@dataclass
class EnrolmentStatus:
    token_id: int
    valid: bool
    error: str = ""
    store: str = ""
    location: str = ""
    keyslot: int = -1
    pcrs: str = ""
    policy_satisfied: bool | None = None
    changed_pcrs: list[int] = field(default_factory=list)
    keyslot_owned: bool = True
    lock_pcr: int | None = None
    locked: bool = False  # the lock PCR is extended now: this boot cannot unseal


@dataclass
class Status:
    tpm_present: bool
    tpm_error: str = ""
    manufacturer: str = ""
    banks: list[str] = field(default_factory=list)
    lockout_counter: int = 0
    max_tries: int = 0
    in_lockout: bool = False
    device: str | None = None
    enrolments: list[EnrolmentStatus] = field(default_factory=list)
    recovery_keyslots: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _enrolment(tpm: Tpm | None, tid: int, token: Token | CorruptError) -> EnrolmentStatus:
    if isinstance(token, CorruptError):
        return EnrolmentStatus(token_id=tid, valid=False, error=str(token))
    entry = EnrolmentStatus(token_id=tid, valid=True, store=token.store, location=token.describe_store(),
                            keyslot=token.keyslot, pcrs=str(token.selection), keyslot_owned=token.keyslot_owned)
    entry.lock_pcr = token.lock_pcr
    if tpm is not None:
        current = tpm.read_pcrs(token.policy_selection())
        if token.lock_pcr is not None:
            # the lock is extended in every booted system: the question is whether the next boot,
            # where it starts from its reset value again, unseals
            entry.locked = current[token.lock_pcr] != token.expected_values()[token.lock_pcr]
            current[token.lock_pcr] = token.expected_values()[token.lock_pcr]
        entry.policy_satisfied = sealing_policy(token.policy_selection(), current, token.pin) == token.policy_hash
        entry.changed_pcrs = changed_pcrs(token.pcr_values, current)
    return entry


def status(device_path: str | None, tcti: str | None) -> Status:
    result = Status(tpm_present=False, device=device_path)
    tpm: Tpm | None = None
    try:
        tpm = Tpm(resolve_tcti(tcti))
        info = tpm.info()
        result.tpm_present = True
        result.manufacturer, result.banks = info.manufacturer, info.banks
        result.lockout_counter, result.max_tries, result.in_lockout = info.lockout_counter, info.max_tries, info.in_lockout
    except UnlockerError as exc:
        result.tpm_error = str(exc)
        tpm = None
    try:
        if device_path is not None:
            device = LuksDevice(device_path)
            device.metadata()
            result.enrolments = [_enrolment(tpm, tid, t) for tid, t in device.our_tokens()]
            result.recovery_keyslots = [slot for _, slot in recovery_slots(device)]
    finally:
        if tpm is not None:
            tpm.close()
    return result


def render(result: Status) -> str:
    lines = []
    if result.tpm_present:
        lockout = " (IN LOCKOUT)" if result.in_lockout else ""
        lines.append(f"TPM: present, manufacturer {result.manufacturer}, PCR banks {', '.join(result.banks)}")
        lines.append(f"Lockout counter: {result.lockout_counter} of {result.max_tries}{lockout}")
    else:
        lines.append(f"TPM: not usable ({result.tpm_error})")
    if result.device is not None:
        if not result.enrolments:
            lines.append(f"{result.device}: no tpm2-unlocker enrolment")
        for e in result.enrolments:
            if not e.valid:
                lines.append(f"{result.device}: token {e.token_id}: CORRUPT: {e.error}")
                continue
            if e.policy_satisfied is None:
                state = "unknown (no TPM)"
            elif e.policy_satisfied:
                state = "current PCR values satisfy the policy"
            else:
                changed = ", ".join(str(p) for p in e.changed_pcrs) or "none recorded"
                state = f"POLICY NOT SATISFIED (changed PCRs: {changed}); run 'tpm2-unlocker reseal'"
            owner = "" if e.keyslot_owned else " (adopted: the keyslot is yours)"
            if e.lock_pcr is not None:
                state += f"; lock PCR {e.lock_pcr}" + (" extended (locked until the next boot)" if e.locked else "")
            lines.append(f"{result.device}: token {e.token_id}: keyslot {e.keyslot}{owner}, {e.location}, "
                         f"PCRs {e.pcrs}: {state}")
        for slot in result.recovery_keyslots:
            lines.append(f"{result.device}: recovery key in keyslot {slot}")
    return "\n".join(lines)
