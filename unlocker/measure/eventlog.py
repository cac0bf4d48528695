"""The firmware's TCG event log: parse the crypto-agile format, replay it per bank.

TCG PC Client Platform Firmware Profile, section 10: the log starts with one SHA-1 format event
(TCG_PCClientPCREvent) carrying the Spec ID event (TCG_EfiSpecIdEvent, "Spec ID Event03"), which
declares the digest algorithms and their sizes; every later event is a TCG_PCR_EVENT2 with one digest
per algorithm. Little-endian throughout. Replaying extends each PCR from its reset value with the
events' digests of one bank, in order; EV_NO_ACTION events are not extended (one of them,
StartupLocality, sets PCR 0's reset value).

The log is input we did not write (a file anyone may hand to `predict --eventlog`, or a firmware's
bug): every malformation is one EventLogError naming where it is, never another exception.
Lean imports (the boot explains a policy failure from it): struct and our own modules only.
"""

from __future__ import annotations

import os
import struct

from unlocker import TYPE_CHECKING
from unlocker.errors import CorruptError
from unlocker.lean.record import record
from unlocker.tpm.policy import BANKS, PCR_COUNT

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

SYSFS_EVENTLOG = "/sys/kernel/security/tpm0/binary_bios_measurements"
# another log in its place (tests; a log saved from another boot): as TPM2_UNLOCKER_TCTI names another TPM
EVENTLOG_ENV = "TPM2_UNLOCKER_EVENTLOG"

EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004
EV_EVENT_TAG = 0x00000006
EV_IPL = 0x0000000D
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_BOOT = 0x80000002
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_GPT_EVENT = 0x80000006
EV_EFI_ACTION = 0x80000007
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0

# TCG PC Client PFP, table 9
EVENT_TYPES: dict[int, str] = {
    0x00000000: "EV_PREBOOT_CERT", 0x00000001: "EV_POST_CODE", 0x00000002: "EV_UNUSED",
    EV_NO_ACTION: "EV_NO_ACTION", EV_SEPARATOR: "EV_SEPARATOR", 0x00000005: "EV_ACTION",
    EV_EVENT_TAG: "EV_EVENT_TAG", 0x00000007: "EV_S_CRTM_CONTENTS", 0x00000008: "EV_S_CRTM_VERSION",
    0x00000009: "EV_CPU_MICROCODE", 0x0000000A: "EV_PLATFORM_CONFIG_FLAGS", 0x0000000B: "EV_TABLE_OF_DEVICES",
    0x0000000C: "EV_COMPACT_HASH", EV_IPL: "EV_IPL", 0x0000000E: "EV_IPL_PARTITION_DATA",
    0x0000000F: "EV_NONHOST_CODE", 0x00000010: "EV_NONHOST_CONFIG", 0x00000011: "EV_NONHOST_INFO",
    0x00000012: "EV_OMIT_BOOT_DEVICE_EVENTS",
    EV_EFI_VARIABLE_DRIVER_CONFIG: "EV_EFI_VARIABLE_DRIVER_CONFIG", EV_EFI_VARIABLE_BOOT: "EV_EFI_VARIABLE_BOOT",
    EV_EFI_BOOT_SERVICES_APPLICATION: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER", 0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    EV_EFI_GPT_EVENT: "EV_EFI_GPT_EVENT", EV_EFI_ACTION: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB", 0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2", 0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2", 0x80000010: "EV_EFI_HCRTM_EVENT",
    EV_EFI_VARIABLE_AUTHORITY: "EV_EFI_VARIABLE_AUTHORITY", 0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}

# TPM_ALG_ID -> our bank name (policy.BANKS), plus one a log may declare that we never seal to
ALGORITHMS: dict[int, str] = {**{alg: name for name, (alg, _) in BANKS.items()}, 0x0012: "sm3_256"}
SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
STARTUP_LOCALITY = b"StartupLocality\0"
# A real log is some kilobytes (tens with Secure Boot certificates); past these it is no firmware's.
MAX_LOG_SIZE = 4 << 20
MAX_ALGORITHMS = 8
MAX_DIGEST_SIZE = 64
# PCRs 17-22 reset to all ones (D-RTM's); the others to zeros, PCR 0 to the startup locality
_ONES_AT_RESET = range(17, 23)


class EventLogError(CorruptError):
    """The event log cannot be read, is malformed, or does not replay to the TPM's PCR values."""

    def __init__(self, message: str, pcrs: list[int] | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.pcrs = pcrs or []


@record(frozen=True)
class Event:
    """One measurement: `digests` maps a bank name to the digest extended into `pcr` there."""

    number: int  # position in the log; 0 is the Spec ID event
    pcr: int
    type: int
    digests: dict[str, bytes]
    data: bytes

    @property
    def type_name(self) -> str:
        return EVENT_TYPES.get(self.type, f"event type 0x{self.type:08x}")


@record(frozen=True)
class EventLog:
    banks: dict[str, int]  # bank name -> digest size, as the Spec ID event declares them
    events: list[Event]  # every event after the Spec ID event, in order (EV_NO_ACTION included)
    startup_locality: int = 0

    def measured(self, pcr: int | None = None) -> list[Event]:
        """The events extended into a PCR (into any, when `pcr` is None), in order."""
        return [e for e in self.events if e.type != EV_NO_ACTION and (pcr is None or e.pcr == pcr)]


class _Reader:
    """Little-endian fields from the log, each read checked against its end."""

    def __init__(self, data: bytes) -> None:
        self.data, self.offset, self.event = data, 0, 0

    def take(self, size: int, what: str) -> bytes:
        end = self.offset + size
        if size < 0 or end > len(self.data):
            raise EventLogError(f"the event log is cut short in event {self.event} ({what} at byte {self.offset})")
        chunk = self.data[self.offset:end]
        self.offset = end
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])


def _spec_id(reader: _Reader) -> dict[int, int]:
    """The first event: the SHA-1 format header carrying TCG_EfiSpecIdEvent. Its algorithms and sizes."""
    pcr, kind = reader.u32("PCR index"), reader.u32("event type")
    reader.take(20, "SHA-1 digest")
    data = reader.take(reader.u32("event size"), "event data")
    if kind != EV_NO_ACTION or pcr != 0 or data[:16] != SPEC_ID_SIGNATURE:
        raise EventLogError("the event log is not a TCG crypto-agile log (its first event is no 'Spec ID Event03')")
    spec = _Reader(data)
    spec.take(16 + 4 + 4, "Spec ID header")  # signature, platformClass, version and errata, uintnSize
    count = spec.u32("number of algorithms")
    if not 1 <= count <= MAX_ALGORITHMS:
        raise EventLogError(f"the event log's Spec ID event declares {count} digest algorithms")
    sizes: dict[int, int] = {}
    for _ in range(count):
        alg, size = spec.u16("algorithm"), spec.u16("digest size")
        known = next((s for name, (a, s) in BANKS.items() if a == alg), None)
        if alg in sizes or not 1 <= size <= MAX_DIGEST_SIZE or (known is not None and size != known):
            raise EventLogError(f"the event log's Spec ID event declares algorithm 0x{alg:04x} with {size}-byte digests")
        sizes[alg] = size
    spec.take(spec.u8("vendor info size"), "vendor info")
    return sizes


def _bank_name(alg: int) -> str:
    return ALGORITHMS.get(alg, f"alg-0x{alg:04x}")


def parse(data: bytes) -> EventLog:
    """Parse a crypto-agile event log (the bytes of binary_bios_measurements). Raises EventLogError."""
    if len(data) > MAX_LOG_SIZE:
        raise EventLogError(f"the event log has {len(data)} bytes, more than any firmware writes ({MAX_LOG_SIZE})")
    reader = _Reader(data)
    sizes = _spec_id(reader)
    events: list[Event] = []
    locality = 0
    while reader.offset < len(data):
        reader.event = number = len(events) + 1
        pcr, kind = reader.u32("PCR index"), reader.u32("event type")
        if pcr >= PCR_COUNT:
            raise EventLogError(f"event {number} of the event log names PCR {pcr}")
        count = reader.u32("digest count")
        if count > len(sizes):
            raise EventLogError(f"event {number} of the event log has {count} digests; the log declares {len(sizes)} "
                                "algorithms")
        digests: dict[str, bytes] = {}
        for _ in range(count):
            alg = reader.u16("algorithm")
            if alg not in sizes or _bank_name(alg) in digests:
                raise EventLogError(f"event {number} of the event log has a digest of algorithm 0x{alg:04x}, undeclared "
                                    "or repeated")
            digests[_bank_name(alg)] = reader.take(sizes[alg], "digest")
        event_data = reader.take(reader.u32("event size"), "event data")
        if kind == EV_NO_ACTION and event_data[:16] == STARTUP_LOCALITY and len(event_data) == 17:
            locality = event_data[16]
        events.append(Event(number, pcr, kind, digests, event_data))
    if locality not in (0, 3, 4):
        raise EventLogError(f"the event log's StartupLocality event names locality {locality}")
    return EventLog({_bank_name(alg): size for alg, size in sizes.items()}, events, locality)


def default_path() -> str:
    return os.environ.get(EVENTLOG_ENV) or SYSFS_EVENTLOG


def read(path: str | None = None) -> EventLog:
    """Read and parse the log at `path` (default: $TPM2_UNLOCKER_EVENTLOG, else the kernel's copy of
    the firmware's)."""
    path = path or default_path()
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LOG_SIZE + 1)
    except OSError as exc:
        hint = "mount securityfs (mount -t securityfs securityfs /sys/kernel/security)" \
            if path == SYSFS_EVENTLOG else None
        raise EventLogError(f"cannot read the event log {path}: {exc.strerror or exc}", hint=hint) from None
    return parse(data)


def reset_value(pcr: int, size: int, locality: int = 0) -> bytes:
    if pcr in _ONES_AT_RESET:
        return b"\xff" * size
    if pcr == 0:
        return bytes(size - 1) + bytes([locality])
    return bytes(size)


def replay(log: EventLog, bank: str, pcrs: Iterable[int],
           digest_of: Callable[[Event], bytes] | None = None) -> dict[int, bytes]:
    """The values `pcrs` of `bank` have after the log's events, extended from their reset values.
    `digest_of(event)` may give the digest to extend instead of the logged one (a prediction)."""
    import hashlib  # off the boot path: the boot never replays

    if bank not in log.banks or bank not in BANKS:
        raise EventLogError(f"the event log has no {bank} bank (it has {', '.join(log.banks)})")
    size = log.banks[bank]
    wanted = set(pcrs)
    values = {p: reset_value(p, size, log.startup_locality) for p in wanted}
    for event in log.measured():
        if event.pcr not in wanted:
            continue
        digest = digest_of(event) if digest_of is not None else event.digests.get(bank)
        if digest is None or len(digest) != size:
            raise EventLogError(f"event {event.number} of the event log ({event.type_name}, PCR {event.pcr}) has no "
                                f"{bank} digest", pcrs=[event.pcr])
        values[event.pcr] = hashlib.new(bank, values[event.pcr] + digest).digest()
    return values


def not_replaying(log: EventLog, bank: str, tpm_values: dict[int, bytes]) -> list[int]:
    """The PCRs among `tpm_values` whose value the log does not replay to."""
    replayed = replay(log, bank, tpm_values)
    return sorted(p for p, v in tpm_values.items() if replayed[p] != v)
