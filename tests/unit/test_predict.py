"""Prediction from the VM's event logs (tests/fixtures/eventlog): which PCRs a new boot loader, kernel,
initrd or command line changes, and the refusals (a log that does not replay, a component the log never measured)."""

from __future__ import annotations

import hashlib

import pytest
from test_eventlog import FIXTURES, load

from unlocker.errors import EXIT_CORRUPT, UsageError
from unlocker.measure import eventlog, events
from unlocker.measure.eventlog import EventLogError
from unlocker.measure.predict import cmdline_digest, predict
from unlocker.tpm.policy import PcrSelection

ALL = PcrSelection.parse("sha256:0,1,2,3,4,5,6,7,8,9,12,14")
NEW = hashlib.sha256(b"new").digest()


def extend(value: bytes, *digests: bytes) -> bytes:
    for d in digests:
        value = hashlib.sha256(value + d).digest()
    return value


def current(name: str, selection: PcrSelection = ALL) -> tuple[eventlog.EventLog, dict[int, bytes]]:
    log, tpm = load(name)
    return log, {p: tpm[selection.bank][p] for p in selection.pcrs}


def test_nothing_new_predicts_the_values_of_now() -> None:
    log, now = current("systemd-boot-ovmf4m")
    result = predict(ALL, {}, log, now)
    assert result.values() == now and not any(row.changed for row in result.pcrs)


def test_the_same_command_line_predicts_the_same_values() -> None:
    log, now = current("systemd-boot-ovmf4m")
    ipl = next(e for e in log.measured(12))
    same = ipl.data.decode("utf-16-le").rstrip("\0")
    assert cmdline_digest(same, "sha256") == ipl.digests["sha256"]
    assert predict(ALL, {events.CMDLINE: cmdline_digest(same, "sha256")}, log, now).values() == now


def test_a_new_kernel_changes_pcr4_only_with_its_digest_in_the_kernels_place() -> None:
    log, now = current("systemd-boot-ovmf4m")
    result = predict(ALL, {events.KERNEL: NEW}, log, now)
    changed = {row.pcr: row for row in result.pcrs if row.changed}
    assert set(changed) == {4}
    pcr4 = [e.digests["sha256"] for e in log.measured(4)]
    assert changed[4].predicted == extend(bytes(32), *pcr4[:-1], NEW)
    assert changed[4].replaced == [r"EV_EFI_BOOT_SERVICES_APPLICATION (kernel \tpm2u\6.1.0-57-amd64\linux)"]


def test_a_new_boot_loader_replaces_the_first_application_of_pcr4() -> None:
    log, now = current("systemd-boot-ovmf4m")
    result = predict(ALL, {events.BOOT_LOADER: NEW}, log, now)
    pcr4 = [e.digests["sha256"] for e in log.measured(4)]
    assert result.values()[4] == extend(bytes(32), *pcr4[:2], NEW, pcr4[3])
    assert {row.pcr for row in result.pcrs if row.changed} == {4}


def test_a_new_initrd_changes_pcr9_and_a_new_command_line_pcrs_9_and_12() -> None:
    log, now = current("systemd-boot-ovmf4m")
    assert {r.pcr for r in predict(ALL, {events.INITRD: NEW}, log, now).pcrs if r.changed} == {9}
    result = predict(ALL, {events.CMDLINE: cmdline_digest("console=ttyS0 quiet", "sha256")}, log, now)
    assert {r.pcr for r in result.pcrs if r.changed} == {9, 12}
    assert result.values()[12] == extend(bytes(32), cmdline_digest("console=ttyS0 quiet", "sha256"))


def test_the_direct_boot_has_no_boot_loader_to_replace() -> None:
    log, now = current("direct-ovmf4m")
    with pytest.raises(UsageError, match="no boot loader: the firmware started the kernel itself.*PCR 4"):
        predict(ALL, {events.BOOT_LOADER: NEW}, log, now)
    without_4 = PcrSelection.parse("sha256:0,7")
    assert predict(without_4, {events.BOOT_LOADER: NEW}, log, {p: now[p] for p in (0, 7)}).values() == \
        {p: now[p] for p in (0, 7)}


def test_an_initrd_the_log_never_measured_is_refused_for_pcr9() -> None:
    log, now = current("systemd-boot-ovmf4m")
    no_tags = eventlog.EventLog(log.banks, [e for e in log.events if e.type != eventlog.EV_EVENT_TAG])
    sel = PcrSelection.parse("sha256:4,9")
    values = {4: now[4], 9: bytes(32)}
    with pytest.raises(UsageError, match="no measurement of the initrd.*PCR 9"):
        predict(sel, {events.INITRD: NEW}, no_tags, values)


def test_a_log_that_does_not_replay_is_refused_naming_the_pcr() -> None:
    log, now = current("systemd-boot-ovmf4m")
    tampered = eventlog.parse((FIXTURES / "systemd-boot-ovmf4m-tampered.bin").read_bytes())
    with pytest.raises(EventLogError, match=r"does not replay to the TPM's PCR 4 \(sha256 bank\)") as caught:
        predict(ALL, {events.KERNEL: NEW}, tampered, now)
    assert caught.value.pcrs == [4] and caught.value.exit_code == EXIT_CORRUPT


def test_the_lock_pcr_is_predicted_at_its_reset_value_whatever_the_tpm_holds_now() -> None:
    log, tpm = load("systemd-boot-ovmf4m")
    sel = PcrSelection.parse("sha256:4,15")
    assert tpm["sha256"][15] != bytes(32)  # extended by our initramfs in the captured boot
    result = predict(sel, {}, log, {4: tpm["sha256"][4], 15: tpm["sha256"][15]})
    assert result.values() == {4: tpm["sha256"][4], 15: bytes(32)}
    assert [row.lock for row in result.pcrs] == [False, True] and not any(r.changed for r in result.pcrs)
