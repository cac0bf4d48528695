"""The events behind a changed PCR: enrol records what the firmware's log held; after an update `status`
and the boot's reason name the events that differ. The swtpm's PCRs are those of a VM boot (its log
replayed into them, tests/fixtures/eventlog), the log read from $TPM2_UNLOCKER_EVENTLOG."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import PASSPHRASE, Swtpm, enroll_or_fail, our_tokens, run_cli, unlock_with_prompt
from test_predict_replayed import FIXTURES, replay_into

pytestmark = pytest.mark.tpm

BEFORE = FIXTURES / "systemd-boot-ovmf4m.bin"
FIRMWARE_UPDATE = (FIXTURES / "systemd-boot-ovmf2m.bin", 0, "EV_EFI_PLATFORM_FIRMWARE_BLOB, EV_EFI_PLATFORM_FIRMWARE_BLOB")
# the same boot with another kernel digest: what a kernel update does to PCR 4
KERNEL_UPDATE = (FIXTURES / "systemd-boot-ovmf4m-tampered.bin", 4,
                 r"EV_EFI_BOOT_SERVICES_APPLICATION (kernel \tpm2u\6.1.0-57-amd64\linux)")


def boot_with(tpm: Swtpm, log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new boot of the machine whose firmware wrote `log`."""
    tpm.reboot()
    replay_into(tpm, log)
    monkeypatch.setenv("TPM2_UNLOCKER_EVENTLOG", str(log))


@pytest.mark.parametrize("after, pcr, named", [FIRMWARE_UPDATE, KERNEL_UPDATE], ids=["firmware", "kernel"])
def test_status_and_the_boots_reason_name_the_events_behind_the_changed_pcr(
        after: Path, pcr: int, named: str, tpm: Swtpm, disk: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    boot_with(tpm, BEFORE, monkeypatch)
    enroll_or_fail(disk, key_file, tpm, "--pcrs", "sha256:0,2,4,7")
    (token,) = our_tokens(disk).values()
    assert sorted(token["pcr_events"]) == ["0", "2", "4", "7"]
    assert token["pcr_events"]["4"][-1].startswith("80000003:")  # the kernel, last in PCR 4

    boot_with(tpm, after, monkeypatch)
    status = run_cli("status", str(disk), tpm=tpm)
    assert f"PCR {pcr} changed since enrolment: {named}".encode() in status.stdout, status.stdout.decode()
    doc = json.loads(run_cli("status", str(disk), "--json", tpm=tpm).stdout)
    assert doc["enrolments"][0]["changed_events"] == {str(pcr): named.split(", ")}
    reason = f"TPM unlock failed: PCR {pcr} changed since enrolment: {named} (sha256 bank)"
    assert unlock_with_prompt(disk, tpm.tcti, re.escape(reason), PASSPHRASE) == 0


def test_a_pcr_the_log_does_not_explain_is_not_recorded(tpm: Swtpm, disk: Path, key_file: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Enrolment on a machine whose log does not replay to PCR 4: PCR 4's events are not recorded
    (they would name the wrong events later); the others are."""
    boot_with(tpm, BEFORE, monkeypatch)
    monkeypatch.setenv("TPM2_UNLOCKER_EVENTLOG", str(KERNEL_UPDATE[0]))
    enroll_or_fail(disk, key_file, tpm, "--pcrs", "sha256:0,2,4,7")
    (token,) = our_tokens(disk).values()
    assert sorted(token["pcr_events"]) == ["0", "2", "7"]


def test_without_an_event_log_nothing_is_recorded_and_the_pcr_alone_is_named(
        tpm: Swtpm, disk: Path, key_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TPM2_UNLOCKER_EVENTLOG", str(tmp_path / "no-log"))
    enroll_or_fail(disk, key_file, tpm, "--pcrs", "sha256:0,7")
    (token,) = our_tokens(disk).values()
    assert "pcr_events" not in token
    tpm.extend(7)
    assert unlock_with_prompt(disk, tpm.tcti, r"TPM unlock failed: PCR 7 changed since enrolment \(sha256 bank\)",
                              PASSPHRASE) == 0
