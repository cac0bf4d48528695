"""The lock PCR: bound to its reset value at enrolment; once extended (the initramfs does it on
every path), nothing unseals in this boot; the next boot unseals again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from helpers import PASSPHRASE, Swtpm, opens, our_tokens, run_cli
from helpers import enroll_or_fail as enroll

pytestmark = pytest.mark.tpm

LOCKED = b"the key is locked for this boot (lock PCR 15 was extended once the disks were opened)"


def pcr(tpm: Swtpm, bank: str, index: int) -> bytes:
    out = tpm.tools("tpm2_pcrread", f"{bank}:{index}").stdout.decode()
    return bytes.fromhex(out.split("0x")[-1].strip())


def test_enrolments_bind_the_lock_pcr_and_lock_makes_them_refuse(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    [token] = our_tokens(disk).values()
    assert token["lock_pcr"] == 15 and token["pcrs"] == [0, 2, 4, 7]
    assert run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm).returncode == 0
    done = run_cli("lock", tpm=tpm)
    assert done.returncode == 0 and b"the lock PCR is extended" in done.stderr
    # TPM2_PCR_Event: the event hashed into every bank, sha256 as the log will replay it
    assert pcr(tpm, "sha256", 15) == hashlib.sha256(bytes(32) + hashlib.sha256(b"tpm2-unlocker:lock").digest()).digest()
    assert pcr(tpm, "sha1", 15) != bytes(20)
    done = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
    assert done.returncode == 3 and LOCKED in done.stderr
    entry = json.loads(run_cli("status", str(disk), "--json", tpm=tpm).stdout)["enrolments"][0]
    assert entry["locked"] is True and entry["policy_satisfied"] is True  # the next boot unseals
    assert b"lock PCR 15 extended (locked until the next boot)" in run_cli("status", str(disk), tpm=tpm).stdout
    tpm.reboot()
    assert run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm).returncode == 0
    assert opens(disk, PASSPHRASE)


def test_without_a_lock_pcr_the_lock_changes_nothing_for_it(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--lock-pcr", "none")
    assert "lock_pcr" not in next(iter(our_tokens(disk).values()))
    assert run_cli("lock", tpm=tpm).returncode == 0
    assert run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm).returncode == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--pcrs", "sha256:7,15"], b"PCR 15 is the lock PCR: leave it out of --pcrs, or choose another --lock-pcr"),
    # 16 and 23 reset at locality 0, 17-22 start at all ones, 0-14 are measured by others
    (["--lock-pcr", "16"], b"--lock-pcr takes 15 (a PCR that nothing else measures and that cannot be reset) "
                           b"or 'none', not '16'"),
    (["--lock-pcr", "7"], b"--lock-pcr takes 15"),
])
def test_a_lock_pcr_that_cannot_be_is_refused(args: list[str], message: bytes, disk: Path, key_file: Path,
                                              tpm: Swtpm) -> None:
    done = run_cli("enroll", str(disk), "--unlock-key-file", str(key_file), *args, tpm=tpm)
    assert done.returncode == 1 and message in done.stderr
    assert our_tokens(disk) == {}


def test_enrol_and_reseal_while_locked_prove_the_enrolment_and_the_next_boot_unseals(
        disk: Path, key_file: Path, tpm: Swtpm) -> None:
    """On a booted system the lock is extended: the proof is each link but the unseal itself."""
    assert run_cli("lock", tpm=tpm).returncode == 0
    enroll(disk, key_file, tpm, "--pcrs", "sha256:7")
    tpm.extend(7)
    done = run_cli("reseal", str(disk), "--unlock-key-file", str(key_file), tpm=tpm)
    assert done.returncode == 0, done.stderr
    assert b"re-sealed keyslot" in done.stderr
    tpm.reboot()
    tpm.extend(7)  # the updated boot chain, as it will measure again
    assert run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm).returncode == 0


def test_a_proof_without_unseal_still_catches_a_token_that_lies(disk: Path, key_file: Path, tpm: Swtpm,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The structural proof is a real check: an object sealed to another policy is refused."""
    from unlocker.commands import enroll as enroll_module
    from unlocker.errors import CorruptError
    from unlocker.luks import LuksDevice
    from unlocker.secret import Secret
    from unlocker.token import parse_token
    from unlocker.tpm.client import Tpm

    enroll(disk, key_file, tpm, "--pcrs", "sha256:7")
    assert run_cli("lock", tpm=tpm).returncode == 0
    tid, doc = next(iter(our_tokens(disk).items()))
    token = parse_token(doc, int(tid))
    token.policy_hash = bytes(32)  # what the object was not sealed to
    with Tpm(tpm.tcti) as t, Secret(bytearray(32)) as key, pytest.raises(CorruptError, match="another policy"):
        enroll_module.prove(t, LuksDevice(str(disk)), token, key)
