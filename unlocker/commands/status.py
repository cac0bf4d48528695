"""status: the TPM's facts and, per enrolment, whether the current PCR values satisfy its policy.

The check computes the PolicyPCR digest in Python from the PCR values read now and compares it with
the digest recorded at sealing: no unseal, no DA exposure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from unlocker.branch import closest_chain, closest_changes, holds
from unlocker.commands import machine_key
from unlocker.commands.others import OtherEnrolment, describe_other, other_enrolments
from unlocker.commands.pending import leftovers
from unlocker.commands.recovery import recovery_slots
from unlocker.errors import CorruptError, UnlockerError
from unlocker.luks import LuksDevice
from unlocker.measure.events import explain
from unlocker.signature import Signature, signatures_in
from unlocker.token import Token
from unlocker.tpm.client import Tpm
from unlocker.tpm.tcti import resolve_tcti


@dataclass
class PcrRow:
    """One PCR of an enrolment: the value it was sealed to and the value now."""

    pcr: int
    enrolled: str
    current: str
    changed: bool
    lock: bool = False  # the lock PCR: sealed to its reset value, extended in every booted system


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
    pin: bool = False  # the TPM asks for a PIN too
    pcr_table: list[PcrRow] = field(default_factory=list)
    reseal_would: str = ""
    chains: int = 1  # the boot chains the key is sealed to (PolicyOR over them when more than one)
    # a signed enrolment's key: "machine" (this machine's key, STATE_DIR/policy-key.pem: reseal --predict
    # approves updates with it), "other" (a key kept elsewhere: sign-policy --key); "" without one
    signing_key: str = ""
    # per changed PCR (as a string, for JSON), the events of this boot's log that differ from enrolment's
    changed_events: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Status:
    tpm_present: bool
    tpm_error: str = ""
    manufacturer: str = ""
    banks: list[str] = field(default_factory=list)
    lockout_counter: int = 0
    max_tries: int = 0
    in_lockout: bool = False
    lockout_interval: int = 0
    device: str | None = None
    enrolments: list[EnrolmentStatus] = field(default_factory=list)
    recovery_keyslots: list[int] = field(default_factory=list)
    other_enrolments: list[OtherEnrolment] = field(default_factory=list)
    # what interrupted runs left (commands/pending.py): kind, token_id, keyslot, what
    leftovers: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _enrolment(tpm: Tpm | None, tid: int, token: Token | CorruptError,
               signatures: list[Signature] | None = None) -> EnrolmentStatus:
    if isinstance(token, CorruptError):
        return EnrolmentStatus(token_id=tid, valid=False, error=str(token))
    entry = EnrolmentStatus(token_id=tid, valid=True, store=token.store, location=token.describe_store(),
                            keyslot=token.keyslot, pcrs=str(token.selection), keyslot_owned=token.keyslot_owned)
    entry.lock_pcr, entry.pin = token.lock_pcr, token.pin
    if token.signed is not None:
        entry.signing_key = "machine" if machine_key.matches(token.signed.key_name) else "other"
    if tpm is not None:
        current = tpm.read_pcrs(token.read_selection())
        now_lock = current.get(token.lock_pcr, b"") if token.lock_pcr is not None else b""
        if token.lock_pcr is not None:
            # the lock is extended in every booted system: the question is whether the next boot,
            # where it starts from its reset value again, unseals
            entry.locked = current[token.lock_pcr] != token.expected_values()[token.lock_pcr]
            current[token.lock_pcr] = token.expected_values()[token.lock_pcr]
        # with several sealed chains (reseal --predict), the one closest to now
        entry.chains = len(token.pcr_branches())
        entry.pcr_table = [PcrRow(p, v.hex(), current[p].hex(), current[p] != v)
                           for p, v in sorted(closest_chain(token, current).pcr_values.items())]
        if token.lock_pcr is not None:
            entry.pcr_table.append(PcrRow(token.lock_pcr, token.expected_values()[token.lock_pcr].hex(),
                                          now_lock.hex(), now_lock != token.expected_values()[token.lock_pcr],
                                          lock=True))
        entry.policy_satisfied = holds(token, current)
        if not entry.policy_satisfied and token.signed is not None:  # or a signature approves the values of now
            from unlocker.commands.sign_policy import approved_now

            entry.policy_satisfied = approved_now(tpm, token, current, signatures or [])
        entry.changed_pcrs = closest_changes(token, current)
        entry.changed_events = {str(p): e for p, e in
                                explain(token.pcr_events, token.selection.bank, entry.changed_pcrs).items()}
        entry.reseal_would = _reseal_would(token, entry)
    return entry


def _reseal_would(token: Token, entry: EnrolmentStatus) -> str:
    """What `reseal` would do for this enrolment, now."""
    if not entry.changed_pcrs:
        action = f"seal to the same values of {token.selection} again (nothing changed)"
    else:
        changed = ", ".join(str(p) for p in entry.changed_pcrs)
        action = f"seal to the current values of {token.selection} (PCR {changed} taking their new values)"
    if entry.locked or token.pin:
        why = "the key is locked for this boot" if entry.locked else "the old key needs its PIN"
        return f"{action}; {why}, so it asks for the passphrase and puts the key in a new keyslot"
    return f"{action}, with the key it unseals now" if entry.policy_satisfied else \
        f"{action}; the old key does not unseal, so it asks for the passphrase and puts a new key in a new keyslot"


def status(device_path: str | None, tcti: str | None) -> Status:
    result = Status(tpm_present=False, device=device_path)
    tpm: Tpm | None = None
    try:
        tpm = Tpm(resolve_tcti(tcti))
        info = tpm.info()
        result.tpm_present = True
        result.manufacturer, result.banks = info.manufacturer, info.banks
        result.lockout_counter, result.max_tries, result.in_lockout = info.lockout_counter, info.max_tries, info.in_lockout
        result.lockout_interval = info.lockout_interval
    except UnlockerError as exc:
        result.tpm_error = str(exc)
        tpm = None
    try:
        if device_path is not None:
            device = LuksDevice(device_path)
            device.metadata()
            signatures = signatures_in(device.raw_tokens())
            result.enrolments = [_enrolment(tpm, tid, t, signatures) for tid, t in device.our_tokens()]
            result.recovery_keyslots = [slot for _, slot in recovery_slots(device)]
            result.other_enrolments = other_enrolments(device, tpm)
            result.leftovers = [left.to_json() for left in leftovers(device, tpm)]
    finally:
        if tpm is not None:
            tpm.close()
    return result


def _table(e: EnrolmentStatus) -> list[str]:
    """The enrolment's PCRs for people: enrolled against current value (digests cut to 16 digits)."""
    if not e.pcr_table:
        return []
    lines = [f"    {'PCR':>3}  {'enrolled':<18}{'current':<18}"]
    for row in e.pcr_table:
        if row.lock:
            state = "lock PCR: extended (this boot is locked)" if row.changed else "lock PCR: at its reset value"
        else:
            state = "CHANGED" if row.changed else "same"
        lines.append(f"    {row.pcr:>3}  {row.enrolled[:16]:<18}{row.current[:16]:<18}{state}")
    for pcr, changed in e.changed_events.items():
        what = ", ".join(changed) or "no event of the log differs from those recorded (extended after the boot?)"
        lines.append(f"    PCR {pcr} changed since enrolment: {what}")
    if e.reseal_would:
        lines.append(f"    reseal would {e.reseal_would}")
    return lines


def render(result: Status) -> str:
    lines = []
    if result.tpm_present:
        lockout = f" (IN LOCKOUT: one more try every {result.lockout_interval} s)" if result.in_lockout else ""
        lines.append(f"TPM: present, manufacturer {result.manufacturer}, PCR banks {', '.join(result.banks)}")
        lines.append(f"Lockout counter: {result.lockout_counter} of {result.max_tries}{lockout}")
    else:
        lines.append(f"TPM: not usable ({result.tpm_error})")
    if result.device is not None:
        if not result.enrolments and not result.leftovers:
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
            if e.pin:
                owner += " with a TPM PIN"
            if e.lock_pcr is not None:
                state += f"; lock PCR {e.lock_pcr}" + (" extended (locked until the next boot)" if e.locked else "")
            chains = f" ({e.chains} sealed chains)" if e.chains > 1 else ""
            if e.signing_key == "machine":
                chains += f", signed policies by this machine's key ({machine_key.key_path()})"
            elif e.signing_key == "other":
                chains += ", signed policies by a key not on this machine (sign-policy --key)"
            lines.append(f"{result.device}: token {e.token_id}: keyslot {e.keyslot}{owner}, {e.location}, "
                         f"PCRs {e.pcrs}{chains}: {state}")
            lines.extend(_table(e))
        for slot in result.recovery_keyslots:
            lines.append(f"{result.device}: recovery key in keyslot {slot}")
        lines.extend(f"{result.device}: {describe_other(o)}" for o in result.other_enrolments)
        for left in result.leftovers:
            lines.append(f"{result.device}: LEFTOVER: {left['what']}")
    return "\n".join(lines)
