"""The event log parser and replay against logs and PCR values taken from the VM (tests/fixtures/eventlog),
what each event is, and hostile logs: every malformation is one EventLogError, never another exception."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from unlocker.errors import EXIT_CORRUPT
from unlocker.measure import eventlog, events
from unlocker.measure.eventlog import EventLogError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "eventlog"
LOGS = ["systemd-boot-ovmf4m", "systemd-boot-ovmf2m", "direct-ovmf4m", "direct-ovmf2m"]
# not the firmware's: IMA's PCR 10, and the lock PCR our initramfs extended
NOT_IN_THE_LOG = {10, 15}


def load(name: str) -> tuple[eventlog.EventLog, dict[str, dict[int, bytes]]]:
    log = eventlog.parse((FIXTURES / f"{name}.bin").read_bytes())
    doc = json.loads((FIXTURES / f"{name}.pcrs.json").read_text())
    return log, {bank: {int(p): bytes.fromhex(v) for p, v in values.items()} for bank, values in doc.items()}


@pytest.mark.parametrize("name", LOGS)
def test_every_bank_of_the_vms_log_replays_to_the_pcrs_its_tpm_read(name: str) -> None:
    log, tpm = load(name)
    assert set(log.banks) == {"sha1", "sha256", "sha384", "sha512"} == set(tpm)
    for bank, values in tpm.items():
        assert eventlog.not_replaying(log, bank, values) == sorted(NOT_IN_THE_LOG), bank
    # the check can fail: the reset values are not what the TPM holds
    assert eventlog.not_replaying(eventlog.EventLog(log.banks, []), "sha256", tpm["sha256"])


def test_a_firmware_update_changes_only_the_firmware_volumes_in_pcr0() -> None:
    old, old_tpm = load("systemd-boot-ovmf4m")
    new, new_tpm = load("systemd-boot-ovmf2m")
    changed = {p for p in range(24) if p not in NOT_IN_THE_LOG and old_tpm["sha256"][p] != new_tpm["sha256"][p]}
    assert changed == {0}
    record = events.record(old, "sha256", (0, 2, 4, 7))
    assert events.changed_events(record[0], new, 0, "sha256") == ["EV_EFI_PLATFORM_FIRMWARE_BLOB"] * 2
    assert all(not events.changed_events(record[p], new, p, "sha256") for p in (2, 4, 7))


def test_systemd_boot_chain_measures_loader_kernel_options_and_initrd() -> None:
    log, _ = load("systemd-boot-ovmf4m")
    named = {events.describe(e, role) for e in log.events if (role := events.roles(log).get(e.number))}
    assert named == {
        r"EV_EFI_BOOT_SERVICES_APPLICATION (boot loader \EFI\BOOT\BOOTX64.EFI)",
        r"EV_EFI_BOOT_SERVICES_APPLICATION (kernel \tpm2u\6.1.0-57-amd64\linux)",
        "EV_IPL (command line)", "EV_EVENT_TAG (command line)", "EV_EVENT_TAG (initrd)",
    }
    options = [e for e in log.measured() if events.roles(log).get(e.number) == events.CMDLINE]
    assert [e.pcr for e in options] == [12, 9]
    assert options[0].digests == options[1].digests  # systemd-boot and the stub measure the same bytes
    text = options[0].data.decode("utf-16-le")
    assert text.startswith("initrd=\\tpm2u\\6.1.0-57-amd64\\initrd console=ttyS0 ") and text.endswith("\0")


def test_direct_boot_has_no_boot_loader_and_the_kernel_before_the_separator() -> None:
    log, _ = load("direct-ovmf4m")
    roles = events.roles(log)
    assert sorted(roles.values()) == [events.CMDLINE, events.INITRD, events.KERNEL]
    pcr4 = [e.type_name for e in log.measured(4)]
    assert pcr4 == ["EV_EFI_BOOT_SERVICES_APPLICATION", "EV_EFI_ACTION", "EV_SEPARATOR"]


def test_tampered_log_parses_but_its_sha256_bank_does_not_replay_to_pcr4() -> None:
    log, tpm = load("systemd-boot-ovmf4m")
    tampered = eventlog.parse((FIXTURES / "systemd-boot-ovmf4m-tampered.bin").read_bytes())
    assert eventlog.not_replaying(tampered, "sha256", tpm["sha256"]) == sorted({4} | NOT_IN_THE_LOG)
    assert eventlog.not_replaying(tampered, "sha1", tpm["sha1"]) == sorted(NOT_IN_THE_LOG)


def test_record_is_compact_and_names_the_event_that_changed() -> None:
    log, _ = load("systemd-boot-ovmf4m")
    tampered = eventlog.parse((FIXTURES / "systemd-boot-ovmf4m-tampered.bin").read_bytes())
    record = events.record(log, "sha256", (4, 9))
    assert record[4][-1] == "80000003:" + log.measured(4)[-1].digests["sha256"][:4].hex()
    assert len(json.dumps(record)) < 300
    assert events.changed_events(record[4], tampered, 4, "sha256") == \
        [r"EV_EFI_BOOT_SERVICES_APPLICATION (kernel \tpm2u\6.1.0-57-amd64\linux)"]
    assert events.changed_events(record[9], tampered, 9, "sha256") == []
    shorter = record[4][:-1]
    assert events.changed_events(shorter, log, 4, "sha256") == \
        [r"new EV_EFI_BOOT_SERVICES_APPLICATION (kernel \tpm2u\6.1.0-57-amd64\linux)"]
    assert events.changed_events([*record[4], "80000003:00000000"], log, 4, "sha256") == ["1 event(s) fewer"]


def test_startup_locality_sets_pcr0s_reset_value() -> None:
    data = bytearray((FIXTURES / "direct-ovmf4m.bin").read_bytes())
    log = eventlog.parse(bytes(data))
    spec_end = _spec_id_end(bytes(data))
    locality = struct.pack("<III", 0, eventlog.EV_NO_ACTION, 4) + b"".join(
        struct.pack("<H", alg) + bytes(size) for alg, size in ((4, 20), (0xB, 32), (0xC, 48), (0xD, 64))) \
        + struct.pack("<I", 17) + eventlog.STARTUP_LOCALITY + b"\x03"
    with_locality = eventlog.parse(bytes(data[:spec_end]) + locality + bytes(data[spec_end:]))
    assert with_locality.startup_locality == 3
    assert eventlog.replay(with_locality, "sha256", [0]) != eventlog.replay(log, "sha256", [0])
    assert eventlog.reset_value(0, 32, 3) == bytes(31) + b"\x03"
    assert eventlog.reset_value(17, 20) == b"\xff" * 20


def _spec_id_end(data: bytes) -> int:
    return 32 + struct.unpack_from("<I", data, 28)[0]


def _valid() -> bytes:
    return (FIXTURES / "systemd-boot-ovmf4m.bin").read_bytes()


def test_every_truncation_of_a_log_is_one_clear_error() -> None:
    data = _valid()
    for cut in range(len(data)):
        try:
            eventlog.parse(data[:cut])
        except EventLogError as exc:
            assert "\n" not in exc.message and exc.exit_code == EXIT_CORRUPT
        # a cut exactly between two events is a shorter, valid log


def test_every_single_byte_change_is_parsed_or_refused_with_our_error() -> None:
    data = _valid()
    for i in range(0, len(data), 3):  # every third byte: each field of each event gets hit
        changed = bytearray(data)
        changed[i] ^= 0xA5
        try:
            log = eventlog.parse(bytes(changed))
        except EventLogError:
            continue
        if "sha256" in log.banks:
            eventlog.replay(log, "sha256", range(24))


@pytest.mark.parametrize("patch, message", [
    (lambda d: b"\0" * 16 + d[16:], "not a TCG crypto-agile log"),
    (lambda d: d[:32] + b"Spec ID Event00\0" + d[48:], "not a TCG crypto-agile log"),
    (lambda d: d[:56] + struct.pack("<I", 9) + d[60:], "declares 9 digest algorithms"),
    (lambda d: d[:62] + struct.pack("<H", 33) + d[64:], "algorithm 0x0004 with 33-byte digests"),
    (lambda d: d[:_spec_id_end(d)] + struct.pack("<I", 24) + d[_spec_id_end(d) + 4:], "event 1 of the event log names PCR 24"),
    (lambda d: d[:_spec_id_end(d) + 8] + struct.pack("<I", 5) + d[_spec_id_end(d) + 12:], "has 5 digests"),
    (lambda d: d[:_spec_id_end(d) + 12] + struct.pack("<H", 0x12) + d[_spec_id_end(d) + 14:], "algorithm 0x0012"),
    (lambda d: d + b"\0\0\0", "cut short in event 30"),
    (lambda d: d + b"\0" * (eventlog.MAX_LOG_SIZE), "more than any firmware writes"),
])
def test_hostile_log_gives_one_line_naming_the_problem(patch, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EventLogError, match=message) as caught:
        eventlog.parse(patch(_valid()))
    assert "\n" not in caught.value.message


def test_a_log_that_cannot_be_read_says_where_and_how_to_mount_securityfs(tmp_path: Path) -> None:
    with pytest.raises(EventLogError, match="cannot read the event log .*nothing"):
        eventlog.read(str(tmp_path / "nothing"))
    with pytest.raises(EventLogError) as caught:
        eventlog.read("/nonexistent/" + eventlog.SYSFS_EVENTLOG)
    assert caught.value.hint is None


def test_replay_of_a_bank_the_log_lacks_is_refused() -> None:
    log, _ = load("direct-ovmf4m")
    stripped = eventlog.EventLog({"sha1": 20}, log.events)
    with pytest.raises(EventLogError, match="no sha256 bank"):
        eventlog.replay(stripped, "sha256", [0])


def test_a_log_that_cannot_be_read_or_parsed_names_no_events_and_raises_nothing(tmp_path: Path) -> None:
    """The boot's reason then names the PCRs alone (what explain returns is all the boot adds)."""
    log, _ = load("systemd-boot-ovmf4m")
    record = events.record(log, "sha256", (0, 4))
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(_valid()[:100])
    assert events.explain(record, "sha256", [4], str(corrupt)) == {}
    assert events.explain(record, "sha256", [4], str(tmp_path / "missing")) == {}
    tampered = str(FIXTURES / "systemd-boot-ovmf4m-tampered.bin")
    assert events.explain(record, "sha256", [4], tampered) == \
        {4: [r"EV_EFI_BOOT_SERVICES_APPLICATION (kernel \tpm2u\6.1.0-57-amd64\linux)"]}
    assert events.explain(record, "sha256", [7], tampered) == {}  # not recorded: nothing to say


def test_what_an_event_says_reaches_the_console_without_control_characters() -> None:
    log, _ = load("systemd-boot-ovmf4m")
    action = next(e for e in log.measured(4) if e.type == eventlog.EV_EFI_ACTION)
    escaped = eventlog.Event(action.number, 4, action.type, action.digests, b"\x1b[2J\x1b[Hfake prompt\r\n")
    assert events.describe(escaped) == "EV_EFI_ACTION (?[2J?[Hfake prompt??)"
