"""Hostile tokens and headers: one clear line and a defined exit code, the passphrase still opens the
disk, status reports it and remove cleans it up; the boot's own header read never crashes on them."""

from __future__ import annotations

import re
import struct
import subprocess
import time
from pathlib import Path

import pexpect
import pytest
from helpers import (
    PASSPHRASE,
    Swtpm,
    add_keyslot,
    cli_env,
    luks_json,
    opens,
    our_tokens,
    replace_token,
    rewrite_header_json,
    run_cli,
    unlock_with_prompt,
    unlocker_command,
)
from helpers import enroll_or_fail as enroll

from unlocker.boot.devices import read_luks_header
from unlocker.boot.unlock import UnlockRequest, unlock
from unlocker.errors import CorruptError, UsageError

pytestmark = pytest.mark.tpm


@pytest.mark.parametrize(("field", "value", "message"), [
    ("policy_hash", "abc", "token field 'policy_hash' is not lower-case hex (an even number of digits)"),
    ("srk_name", "0" * 67, "token field 'srk_name' is not lower-case hex (an even number of digits)"),
    ("pcr_values", {"0": "1", "7": "11" * 32}, "token field 'pcr_values.0' is not lower-case hex"),
])
def test_an_odd_length_hex_field_says_so_falls_back_and_is_removable(
        field: str, value: object, message: str, disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--pcrs", "sha256:0,7")
    tid, token = next(iter(our_tokens(disk).items()))
    token[field] = value
    replace_token(disk, tid, token)
    # unlock: the reason, then the prompt; nobody answers: the corrupt token's own exit code
    assert unlock_with_prompt(disk, tpm.tcti, re.escape(message), None) == 5
    assert unlock_with_prompt(disk, tpm.tcti, re.escape(message), PASSPHRASE) == 0
    status = run_cli("status", str(disk), tpm=tpm)
    assert status.returncode == 0 and f"token {tid}: CORRUPT: {message}".encode() in status.stdout
    assert b"Traceback" not in status.stderr
    removed = run_cli("remove", str(disk), "--unlock-key-file", str(key_file), tpm=tpm)
    assert removed.returncode == 0, removed.stderr
    assert our_tokens(disk) == {}
    assert opens(disk, PASSPHRASE)


def _write_primary_json(image: Path, document: bytes) -> None:
    """Replace the primary header's JSON area as an attacker with the disk would (the boot reads it
    without cryptsetup's checksum; cryptsetup itself falls back to the secondary header)."""
    with open(image, "r+b") as f:
        head = f.read(4096)
        size = struct.unpack(">Q", head[8:16])[0]
        assert len(document) < size - 4096
        f.seek(4096)
        f.write(document + bytes(size - 4096 - len(document)))


@pytest.mark.parametrize(("tokens", "error", "message"), [
    ('{"x": {"type": "tpm2-unlocker"}}', CorruptError, "the LUKS2 header's tokens are malformed"),
    ('["not", "an", "object"]', CorruptError, "the LUKS2 header's tokens are malformed"),
    ('{"0": "a token that is no object"}', UsageError, "has no tpm2-unlocker enrolment"),
    ('{"0": [1, 2]}', UsageError, "has no tpm2-unlocker enrolment"),
])
def test_a_hostile_header_read_at_boot_is_one_line_and_its_code(
        tokens: str, error: type, message: str, disk: Path, key_file: Path, tpm: Swtpm,
        capfd: pytest.CaptureFixture[str]) -> None:
    enroll(disk, key_file, tpm)
    _write_primary_json(disk, f'{{"keyslots": {{}}, "tokens": {tokens}}}'.encode())
    found = read_luks_header(str(disk))
    assert found is not None and found[1] is not None
    with pytest.raises(error) as raised:
        unlock(UnlockRequest(str(disk), "unused", test=True, tries=0, tcti=tpm.tcti), metadata=found[1])
    assert message in capfd.readouterr().err + raised.value.message
    assert opens(disk, PASSPHRASE)  # cryptsetup reads the intact secondary header


def test_a_header_nested_too_deeply_is_luks_without_metadata(disk: Path) -> None:
    """The USB stick of the issue: its JSON nested past the recursion limit stopped the header scan."""
    depth = 200_000
    uuid = read_luks_header(str(disk))[0]  # type: ignore[index]
    with open(disk, "r+b") as f:  # a header area large enough for the document
        head = bytearray(f.read(4096))
        head[8:16] = struct.pack(">Q", 4096 + 2 * depth + 4096)
        f.seek(0)
        f.write(head)
        f.write(b"[" * depth + b"]" * depth + b"\0")
    assert read_luks_header(str(disk)) == (uuid, None)
    assert read_luks_header(str(disk), uuid="another") is None


HOSTILE_KDFS = {
    "argon2id": ({"type": "argon2id", "time": 2**32 - 1, "memory": 1048576, "cpus": 1},
                 "its argon2id cost (4294967295 passes over 1048576 KiB) is above 32 passes over 1 GiB"),
    "pbkdf2": ({"type": "pbkdf2", "hash": "sha256", "iterations": 2**32 - 1},
               "its PBKDF2 cost (4294967295 iterations) is above 100000000"),
}


def _costly_keyslot(disk: Path, kdf: dict) -> int:
    """A keyslot of the attacker's in a header they rewrote (both copies, checksums recomputed): its
    PBKDF cost at cryptsetup's largest, and preferred, so that cryptsetup tries it first."""
    add_keyslot(disk, b"the attacker's own")
    slot = max(int(s) for s in luks_json(disk)["keyslots"])

    def costly(doc: dict) -> None:
        keyslot = doc["keyslots"][str(slot)]
        keyslot["kdf"] = {**keyslot["kdf"], **kdf}
        keyslot["priority"] = "2"
    rewrite_header_json(disk, costly)
    # what cryptsetup itself does with such a header: the user's passphrase never gets past that keyslot
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file=-", str(disk)], input=PASSPHRASE,
                       capture_output=True, timeout=3)
    return slot


@pytest.mark.parametrize("kind", sorted(HOSTILE_KDFS))
def test_a_keyslot_with_a_huge_pbkdf_cost_is_skipped_and_the_passphrase_opens(kind: str, disk: Path, key_file: Path,
                                                                            tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--pcrs", "sha256:7")
    kdf, why = HOSTILE_KDFS[kind]
    slot = _costly_keyslot(disk, kdf)
    tpm.extend(7)
    started = time.monotonic()
    cmd = unlocker_command()
    child = pexpect.spawn(cmd[0], [*cmd[1:], "unlock", str(disk), "--test"], env=cli_env(tpm.tcti), timeout=30)
    child.expect("PCR 7 changed since enrolment")
    child.expect("Enter passphrase for ")
    child.sendline(b"a typo")
    child.expect(re.escape(f"{disk}: not trying keyslot {slot}: {why}"))
    child.expect(re.escape("wrong passphrase (1 of 3)"))
    child.expect("Enter passphrase for ")
    child.sendline(PASSPHRASE)
    child.expect("unlocked with the passphrase")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert time.monotonic() - started < 30


def test_reseal_refuses_a_keyslot_cryptsetup_would_stall_on_and_remove_goes_round_it(disk: Path, key_file: Path,
                                                                                    tpm: Swtpm) -> None:
    """cryptsetup's luksAddKey tries the passphrase on every keyslot ("prefer" first) and luksKillSlot
    on every other one by number, with no time limit: the verbs say so instead of stalling."""
    enroll(disk, key_file, tpm, "--pcrs", "sha256:7")
    slot = _costly_keyslot(disk, HOSTILE_KDFS["argon2id"][0])
    tpm.extend(7)  # reseal then needs the passphrase for a new keyslot (luksAddKey)
    before = luks_json(disk)
    started = time.monotonic()
    resealed = run_cli("reseal", str(disk), "--unlock-key-file", str(key_file), tpm=tpm, timeout=60)
    assert resealed.returncode == 7, resealed.stderr.decode()
    assert (f"{disk}: adding a keyslot is not tried: cryptsetup would first try the passphrase on keyslot {slot}, "
            "whose PBKDF cost is beyond the bounds").encode() in resealed.stderr
    assert f"hint: remove it (cryptsetup luksKillSlot {disk} {slot})".encode() in resealed.stderr
    assert luks_json(disk) == before
    # luksKillSlot tries slot 0, the passphrase's, before the costly one: remove goes ahead
    removed = run_cli("remove", str(disk), "--unlock-key-file", str(key_file), tpm=tpm, timeout=60)
    assert removed.returncode == 0, removed.stderr.decode()
    assert our_tokens(disk) == {} and opens(disk, PASSPHRASE, slot=0)
    assert str(slot) in luks_json(disk)["keyslots"], "the attacker's keyslot is not ours to remove"
    assert time.monotonic() - started < 30
