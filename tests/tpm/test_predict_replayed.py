"""`tpm2-unlocker predict` as users run it, against a swtpm whose PCRs a VM's event log was replayed into
(tests/fixtures/eventlog): the prediction, its refusals, one line and an exit code for each."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from helpers import Swtpm, run_cli

from unlocker.measure import eventlog

pytestmark = pytest.mark.tpm

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "eventlog"
SD_BOOT_LOG = FIXTURES / "systemd-boot-ovmf4m.bin"
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")


def replay_into(tpm: Swtpm, log_file: Path) -> None:
    """Extend the swtpm's PCRs with every event of the log, in order, in every bank."""
    log = eventlog.parse(log_file.read_bytes())
    specs = [f"{e.pcr}:" + ",".join(f"{bank}={d.hex()}" for bank, d in e.digests.items()) for e in log.measured()]
    tpm.tools("tpm2_pcrextend", *specs)


def vm_pcrs(log_file: Path) -> dict[str, dict[int, bytes]]:
    """The values the VM's TPM had in the boot that wrote the log (tests/fixtures/eventlog/*.pcrs.json)."""
    doc = json.loads(log_file.with_suffix(".pcrs.json").read_text())
    return {bank: {int(p): bytes.fromhex(v) for p, v in values.items()} for bank, values in doc.items()}


def pesign_hash(path: Path) -> bytes:
    out = subprocess.run(["pesign", "--hash", "--in", str(path)], capture_output=True, check=True, text=True).stdout
    return bytes.fromhex(out.split("hash:")[1].strip())


def test_predict_with_nothing_new_gives_the_pcrs_of_now(tpm: Swtpm) -> None:
    replay_into(tpm, SD_BOOT_LOG)
    vm = vm_pcrs(SD_BOOT_LOG)
    done = run_cli("predict", "--eventlog", str(SD_BOOT_LOG), "--json", tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    doc = json.loads(done.stdout)
    assert sorted(int(p) for p in doc["pcrs"]) == [0, 1, 2, 3, 4, 5, 6, 7, 9, 12]  # what the log measures
    for pcr, row in doc["pcrs"].items():
        assert row["predicted"] == row["current"] == vm["sha256"][int(pcr)].hex()
        assert not row["changed"]


def test_predict_a_new_boot_loader_names_what_it_replaces(tpm: Swtpm, tmp_path: Path) -> None:
    replay_into(tpm, SD_BOOT_LOG)
    new_loader = tmp_path / "BOOTX64.EFI"
    new_loader.write_bytes(SYSTEMD_BOOT.read_bytes() + b"\0" * 512)  # another build: other bytes
    done = run_cli("predict", "--eventlog", str(SD_BOOT_LOG), "--bootloader", str(new_loader),
                   "--pcrs", "sha256:4,7", "--json", tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    rows = json.loads(done.stdout)["pcrs"]
    log = eventlog.parse(SD_BOOT_LOG.read_bytes())
    pcr4 = [e.digests["sha256"] for e in log.measured(4)]
    expected = bytes(32)
    for digest in [*pcr4[:2], pesign_hash(new_loader), pcr4[3]]:
        expected = hashlib.sha256(expected + digest).digest()
    assert rows["4"]["predicted"] == expected.hex() and rows["4"]["changed"]
    assert rows["4"]["replaced"] == [r"EV_EFI_BOOT_SERVICES_APPLICATION (boot loader \EFI\BOOT\BOOTX64.EFI)"]
    assert not rows["7"]["changed"]
    human = run_cli("predict", "--eventlog", str(SD_BOOT_LOG), "--bootloader", str(new_loader), tpm=tpm)
    assert b"CHANGES" in human.stdout and expected.hex().encode() in human.stdout


def test_predict_refuses_a_log_that_does_not_replay_naming_the_pcr(tpm: Swtpm) -> None:
    replay_into(tpm, SD_BOOT_LOG)
    tampered = FIXTURES / "systemd-boot-ovmf4m-tampered.bin"
    done = run_cli("predict", "--eventlog", str(tampered), "--kernel", str(SYSTEMD_BOOT), tpm=tpm)
    assert done.returncode == 5
    lines = done.stderr.decode().splitlines()
    assert "does not replay to the TPM's PCR 4 (sha256 bank)" in lines[0] and "Traceback" not in done.stderr.decode()
    assert not done.stdout


def test_predict_refuses_when_the_tpm_is_not_in_the_logs_state(tpm: Swtpm) -> None:
    """The same log against a TPM that booted otherwise (nothing extended): every PCR the log measures is named."""
    done = run_cli("predict", "--eventlog", str(SD_BOOT_LOG), "--pcrs", "sha256:0,4,7", tpm=tpm)
    assert done.returncode == 5
    assert "does not replay to the TPM's PCRs 0, 4, 7 (sha256 bank)" in done.stderr.decode()


@pytest.mark.parametrize("args, code, message", [
    (["--eventlog", "/nonexistent/log"], 5, "cannot read the event log /nonexistent/log"),
    (["--kernel", "/etc/hostname"], 1, "/etc/hostname is not a PE/COFF image"),
    (["--initrd", "/nonexistent/initrd"], 1, "cannot read /nonexistent/initrd"),
    (["--pcrs", "sha256:99"], 1, "PCR 99 is out of range"),
])
def test_predict_bad_input_is_one_line_and_its_exit_code(args: list[str], code: int, message: str, tpm: Swtpm) -> None:
    replay_into(tpm, SD_BOOT_LOG)
    base = [] if "--eventlog" in args else ["--eventlog", str(SD_BOOT_LOG)]
    done = run_cli("predict", *base, *args, tpm=tpm)
    assert done.returncode == code, done.stderr.decode()
    assert message in done.stderr.decode().splitlines()[0] and "Traceback" not in done.stderr.decode()
