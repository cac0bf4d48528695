"""What each event of the log is (the boot loader, the kernel, the initrd, the command line...), the
compact record of a PCR's events that an enrolment keeps, and what differs from it now.

Read from this VM's own logs (tests/fixtures/eventlog/README.md): OVMF measures the application it
starts from a boot option and every image that application starts with LoadImage into PCR 4
(EV_EFI_BOOT_SERVICES_APPLICATION, the Authenticode digest): systemd-boot, then the kernel. systemd-boot
v252 measures the options line it hands the kernel into PCR 12 (EV_IPL, UTF-16 with its NUL).
Linux's EFI stub (6.1) measures the same load options and the initrd it is handed into PCR 9
(EV_EVENT_TAG "LOADED_IMAGE::LoadOptions", "Linux initrd").
Lean imports: the boot names the changed events from here when the policy fails.
"""

from __future__ import annotations

import struct

from unlocker.measure.eventlog import (
    EV_EFI_ACTION,
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_EFI_VARIABLE_AUTHORITY,
    EV_EFI_VARIABLE_BOOT,
    EV_EFI_VARIABLE_DRIVER_CONFIG,
    EV_EVENT_TAG,
    EV_IPL,
    Event,
    EventLog,
    EventLogError,
    read,
)

KERNEL, BOOT_LOADER, INITRD, CMDLINE = "kernel", "boot loader", "initrd", "command line"
# Linux's EFI stub tags (drivers/firmware/efi/libstub/efi-stub-helper.c)
LINUX_INITRD_TAG = 0x8F3B22EC
LOAD_OPTIONS_TAG = 0x8F3B22ED
_TAGS = {LINUX_INITRD_TAG: INITRD, LOAD_OPTIONS_TAG: CMDLINE}
SD_BOOT_CMDLINE_PCR = 12  # systemd-boot's options line (TPM_PCR_INDEX_KERNEL_PARAMETERS)

# The record an enrolment keeps per PCR: "TTTTTTTT:DDDDDDDD", the event type and the first bytes of
# its digest in the sealed bank, in log order. Enough to tell which event changed; it proves nothing
# (the TPM's policy does), so a short prefix keeps the token small.
RECORD_DIGEST_BYTES = 4
MAX_RECORDED_EVENTS = 64  # per PCR; a PCR with more is not recorded (then only the PCR is named)
_SHOWN = 3  # events named per PCR in one line


def roles(log: EventLog) -> dict[int, str]:
    """Event number -> the component it measures, for the events a prediction replaces."""
    found: dict[int, str] = {}
    apps = [e for e in log.measured(4) if e.type == EV_EFI_BOOT_SERVICES_APPLICATION]
    if apps:
        found[apps[-1].number] = KERNEL  # the last image started: the kernel (or a UKI)
        if len(apps) > 1:
            found[apps[0].number] = BOOT_LOADER  # the first: what the firmware's boot option started
    for event in log.measured():
        if event.type == EV_EVENT_TAG and len(event.data) >= 8:
            tag = struct.unpack_from("<I", event.data)[0]
            if tag in _TAGS:
                found[event.number] = _TAGS[tag]
        elif event.type == EV_IPL and event.pcr == SD_BOOT_CMDLINE_PCR:
            found[event.number] = CMDLINE
    return found


def _utf16(data: bytes) -> str:
    return data.decode("utf-16-le", errors="replace").split("\0", 1)[0]


def _file_path(device_path: bytes) -> str:
    """The media file path nodes of a UEFI device path (type 4, subtype 4), joined."""
    parts, offset = [], 0
    while offset + 4 <= len(device_path):
        kind, subtype, length = device_path[offset], device_path[offset + 1], struct.unpack_from("<H", device_path,
                                                                                                  offset + 2)[0]
        if length < 4 or kind == 0x7F:
            break
        if kind == 4 and subtype == 4:
            parts.append(_utf16(device_path[offset + 4:offset + length]))
        offset += length
    return "".join(parts)


def detail(event: Event) -> str:
    """A few words from the event's data: the file an image came from, a variable's name, an action."""
    data = event.data
    if event.type == EV_EFI_BOOT_SERVICES_APPLICATION and len(data) >= 32:
        path_length = struct.unpack_from("<Q", data, 24)[0]
        return _file_path(data[32:32 + min(path_length, len(data) - 32)])
    if event.type in (EV_EFI_VARIABLE_DRIVER_CONFIG, EV_EFI_VARIABLE_BOOT, EV_EFI_VARIABLE_AUTHORITY) \
            and len(data) >= 32:
        name_length = struct.unpack_from("<Q", data, 16)[0]
        return _utf16(data[32:32 + min(name_length, 64) * 2])
    if event.type == EV_EFI_ACTION:
        return data[:60].decode("ascii", errors="replace")
    return ""


def _printable(text: str) -> str:
    """What the log says goes to the console at the prompt: no control characters (an escape sequence
    in a file name could redraw the screen around the passphrase prompt)."""
    return "".join(c if c.isprintable() else "?" for c in text)


def describe(event: Event, role: str | None = None) -> str:
    """EV_EFI_BOOT_SERVICES_APPLICATION (kernel \\tpm2u\\6.1.0-57-amd64\\linux), for people."""
    words = " ".join(w for w in (role or "", _printable(detail(event))) if w)
    return f"{event.type_name} ({words})" if words else event.type_name


def record(log: EventLog, bank: str, pcrs: tuple[int, ...]) -> dict[int, list[str]]:
    """The compact record of each PCR's events (PCRs with more than MAX_RECORDED_EVENTS are left out)."""
    found: dict[int, list[str]] = {}
    for pcr in pcrs:
        events = log.measured(pcr)
        if len(events) <= MAX_RECORDED_EVENTS:
            found[pcr] = [_entry(e, bank) for e in events]
    return found


def _entry(event: Event, bank: str) -> str:
    return f"{event.type:08x}:{event.digests.get(bank, b'').hex()[:2 * RECORD_DIGEST_BYTES]:0<8}"


def changed_events(recorded: list[str], log: EventLog, pcr: int, bank: str) -> list[str]:
    """The events of `pcr` now that differ from the enrolment's record, described (in log order).
    Compared position by position; events added or gone at the end are named as such."""
    now = log.measured(pcr)
    named = roles(log)
    said: list[str] = []
    for i in range(max(len(now), len(recorded))):
        if i >= len(now):
            said.append(f"{len(recorded) - len(now)} event(s) fewer")
            break
        entry = _entry(now[i], bank)
        if i >= len(recorded):
            said.append("new " + describe(now[i], named.get(now[i].number)))
        elif entry != recorded[i]:
            said.append(describe(now[i], named.get(now[i].number)))
    if len(said) > _SHOWN:
        said = [*said[:_SHOWN], f"{len(said) - _SHOWN} more"]
    return said


def explain(recorded: dict[int, list[str]], bank: str, pcrs: list[int], path: str | None = None) -> dict[int, list[str]]:
    """For each of `pcrs` that `recorded` (a token's pcr_events) holds, the events of the current log
    that differ from it, described. Empty when the log cannot be read: the PCRs alone are then named."""
    wanted = [p for p in pcrs if p in recorded]
    if not wanted:
        return {}
    try:
        log = read(path)
        return {p: changed_events(recorded[p], log, p, bank) for p in wanted}
    except EventLogError:
        return {}
