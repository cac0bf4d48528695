"""Hostile tokens and headers: one clear line and a defined exit code, the passphrase still opens the
disk, status reports it and remove cleans it up; the boot's own header read never crashes on them."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from helpers import PASSPHRASE, Swtpm, opens, our_tokens, replace_token, run_cli, unlock_with_prompt
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
