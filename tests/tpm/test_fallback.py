"""When the TPM says no: one clear line, then the passphrase prompt; defined exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pexpect
import pytest
from helpers import (
    PASSPHRASE,
    Swtpm,
    cli_env,
    free_port_pair,
    luks_json,
    opens,
    our_tokens,
    replace_token,
    run_cli,
    unlock_with_prompt,
    unlocker_command,
)
from helpers import enroll_or_fail as enroll

pytestmark = pytest.mark.tpm


def spawn_unlock(disk: Path, tcti: str, *extra: str) -> pexpect.spawn:
    cmd = unlocker_command()
    return pexpect.spawn(cmd[0], [*cmd[1:], "unlock", str(disk), "--test", *extra], env=cli_env(tcti), timeout=60)


def test_unlock_falls_back_to_passphrase_when_pcr7_changed(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    tpm.extend(7)
    child = spawn_unlock(disk, tpm.tcti)
    child.expect("PCR 7 changed since enrolment")
    child.expect("Enter passphrase for ")
    child.sendline(PASSPHRASE)
    child.expect("unlocked with the passphrase")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_pcr_change_without_anyone_to_answer_exits_3(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    tpm.extend(7)
    done = run_cli("unlock", str(disk), "--test", tpm=tpm)
    assert done.returncode == 3
    assert b"PCR 7 changed since enrolment" in done.stderr
    assert b"Traceback" not in done.stderr


def test_tpm_only_failure_says_why_once_and_nothing_more(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    """--tries 0 (the initrd unit's first run): the reason and its hint, exit 3, no echo lines after."""
    enroll(disk, key_file, tpm)
    tpm.extend(7)
    done = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
    assert done.returncode == 3
    lines = done.stderr.decode().splitlines()
    assert lines == [f"tpm2-unlocker: {disk}: TPM unlock failed: PCR 7 changed since enrolment (sha256 bank)",
                     "tpm2-unlocker: hint: after an intended update, run 'tpm2-unlocker reseal' once booted"]


def test_no_tpm_goes_straight_to_the_passphrase(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    """--no-tpm (the busybox hook's second run): no TPM line, the prompt, the passphrase opens."""
    enroll(disk, key_file, tpm)
    child = spawn_unlock(disk, tpm.tcti, "--no-tpm")
    index = child.expect(["TPM unlock", "Enter passphrase for "])
    assert index == 1, "--no-tpm must not try the TPM"
    child.sendline(PASSPHRASE)
    child.expect("unlocked with the passphrase")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    refused = run_cli("unlock", str(disk), "--test", "--no-tpm", "--tries", "0", tpm=tpm)
    assert refused.returncode == 1 and b"--no-tpm with --tries 0" in refused.stderr


def test_wrong_passphrase_three_times_exits_6_and_disk_unchanged(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    tpm.extend(7)
    before = luks_json(disk)
    child = spawn_unlock(disk, tpm.tcti, "--tries", "3")
    child.expect("PCR 7 changed")
    for attempt in (1, 2, 3):
        child.expect("Enter passphrase for ")
        child.sendline(b"not it %d" % attempt)
        child.expect(f"wrong passphrase \\({attempt} of 3\\)")
    child.expect("no passphrase opened the disk after 3 tries")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 6
    assert luks_json(disk) == before
    assert opens(disk, PASSPHRASE)


def test_no_tpm_reachable_falls_back_and_exits_2_without_passphrase(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    nowhere = f"swtpm:host=127.0.0.1,port={free_port_pair()}"
    assert unlock_with_prompt(disk, nowhere, "cannot reach the TPM", None) == 2
    # and with a passphrase it opens
    child = spawn_unlock(disk, nowhere)
    child.expect("Enter passphrase for ")
    child.sendline(PASSPHRASE)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_no_tpm_device_at_all_exits_2(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    env = {"TPM2_UNLOCKER_TCTI": "", "TPM2TOOLS_TCTI": ""}
    done = run_cli("unlock", str(disk), "--test", env=env)
    assert done.returncode == 2
    assert b"no TPM found" in done.stderr or b"cannot reach the TPM" in done.stderr


def test_corrupt_token_json_says_so_and_falls_back(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    tid, token = next(iter(our_tokens(disk).items()))
    token["policy_hash"] = "zz"  # not hex
    replace_token(disk, tid, token)
    assert unlock_with_prompt(disk, tpm.tcti, "token field 'policy_hash' is not lower-case hex", None) == 5
    status = json.loads(run_cli("status", str(disk), "--json", tpm=tpm).stdout)
    assert status["enrolments"][0]["valid"] is False


@pytest.mark.parametrize("damage", ["bad-json-types", "unknown-field", "two-keyslots"])
def test_hostile_tokens_are_rejected_with_exit_5(damage: str, disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    tid, token = next(iter(our_tokens(disk).items()))
    if damage == "bad-json-types":
        token["pcrs"] = ["0", "7"]
    elif damage == "unknown-field":
        token["exec"] = "/bin/sh"
    else:
        token["keyslots"] = ["0", "1"]
    replace_token(disk, tid, token)
    done = run_cli("unlock", str(disk), "--test", tpm=tpm)
    assert done.returncode == 5, done.stderr
    assert b"token" in done.stderr and b"Traceback" not in done.stderr


def test_truncated_blob_says_so_and_falls_back(disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    enroll(disk, key_file, tpm, "--store", f"file={blob}")
    data = (blob / "key.priv").read_bytes()
    (blob / "key.priv").write_bytes(data[: len(data) // 2])
    assert unlock_with_prompt(disk, tpm.tcti, "the sealed object is truncated or malformed", PASSPHRASE) == 0
    done = run_cli("unlock", str(disk), "--test", tpm=tpm)
    assert done.returncode == 5


def test_tampered_blob_fails_integrity_with_exit_5(disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    enroll(disk, key_file, tpm, "--store", f"file={blob}")
    data = bytearray((blob / "key.priv").read_bytes())
    data[-3] ^= 0xFF
    (blob / "key.priv").write_bytes(bytes(data))
    done = run_cli("unlock", str(disk), "--test", tpm=tpm)
    assert done.returncode == 5
    assert b"damaged or not ours" in done.stderr


def test_missing_nv_index_says_so_and_falls_back(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--store", "nv")
    tpm.tools("tpm2_nvundefine", "0x1500016")
    assert unlock_with_prompt(disk, tpm.tcti, "NV index 0x01500016 does not exist", None) == 5


def test_other_tpm_is_refused(disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    """A token sealed on one TPM, presented to another (a swapped or cleared TPM): exit 2."""
    from helpers import Swtpm as Tpm
    enroll(disk, key_file, tpm)
    other = Tpm(tmp_path / "other-state")
    other.start()
    try:
        done = run_cli("unlock", str(disk), "--test", tpm=other)
    finally:
        other.stop()
    assert done.returncode == 2
    assert b"storage root key is not the one the key was sealed under" in done.stderr
