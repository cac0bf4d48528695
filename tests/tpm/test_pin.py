"""TPM + PIN: the key is sealed to PolicyPCR + PolicyAuthValue and is DA-protected (the TPM's
lockout guards the PIN); a wrong PIN says how many tries the TPM leaves; at lockout the passphrase
follows at once; reseal adds or drops the PIN; status shows it."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pexpect
import pytest
from helpers import PASSPHRASE, Swtpm, cli_env, luks_json, opens, our_tokens, replace_token, run_cli, unlocker_command
from helpers import enroll_or_fail as enroll

from unlocker.tpm import tss
from unlocker.tpm.tss import lib

pytestmark = pytest.mark.tpm

PIN = b"2468-pin"
RECOVERY_KEY = re.compile(rb"^    ((?:[cbdefghijklnrtuv]{8}-){7}[cbdefghijklnrtuv]{8})$", re.M)


@pytest.fixture
def pin_file(tmp_path: Path) -> Path:
    path = tmp_path / "pin"
    path.write_bytes(PIN + b"\n")  # one trailing newline is dropped, as typed at a prompt
    return path


def unlock_typing(disk: Path, tpm: Swtpm, pins: list[bytes], *, then: list[str],
                  passphrase: bytes | None = None) -> tuple[int, str]:
    """`unlock DISK --test` on a terminal: type each of `pins` at a PIN prompt, expect each of
    `then` (regexes) after them, type `passphrase` at the passphrase prompt if given. The exit
    status and everything the terminal showed."""
    cmd = unlocker_command()
    child = pexpect.spawn(cmd[0], [*cmd[1:], "unlock", str(disk), "--test"], env=cli_env(tpm.tcti), timeout=60)
    for pin in pins:
        child.expect(f"Enter TPM PIN for {disk}: ")
        child.sendline(pin)
    for pattern in then:
        child.expect(pattern)
    if passphrase is not None:
        child.expect("Enter passphrase for ")
        child.sendline(passphrase)
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus, child.before.decode(errors="replace") if child.before else ""


def test_a_pin_enrolment_is_da_protected_and_unlocks_with_the_pin(disk: Path, key_file: Path, pin_file: Path,
                                                                  tpm: Swtpm) -> None:
    done = enroll(disk, key_file, tpm, "--with-pin", "--pin-file", str(pin_file))
    assert b"and a PIN" in done.stderr
    (token,) = our_tokens(disk).values()
    assert token["pin"] is True
    public, _ = tss.unmarshal("TPM2B_PUBLIC", base64.b64decode(token["tpm2_public"]))
    attributes = public.publicArea.objectAttributes
    assert not attributes & lib.TPMA_OBJECT_NODA  # the lockout is the PIN's guard
    assert not attributes & lib.TPMA_OBJECT_USERWITHAUTH  # only the policy session authorises
    assert b"with a TPM PIN" in run_cli("status", str(disk), tpm=tpm).stdout
    # without a PIN nothing unseals: no terminal to ask on, and the one line says so
    no_pin = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
    assert no_pin.returncode == 10, no_pin.stderr
    assert b"TPM unlock failed: no TPM PIN given" in no_pin.stderr
    rc, _ = unlock_typing(disk, tpm, [PIN], then=["unlocked with the TPM \\(test only\\)"])
    assert rc == 0


def test_a_wrong_pin_says_the_tries_left_then_the_right_one_unlocks(disk: Path, key_file: Path, pin_file: Path,
                                                                    tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--with-pin", "--pin-file", str(pin_file))
    rc, _ = unlock_typing(disk, tpm, [b"1111", PIN],
                          then=["unlocked with the TPM \\(test only\\)"])
    assert rc == 0
    status = run_cli("status", str(disk), "--json", tpm=tpm)
    assert b'"lockout_counter": 1' in status.stdout  # the wrong PIN counted, as it must


def test_wrong_pins_until_lockout_then_the_passphrase(disk: Path, key_file: Path, pin_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--with-pin", "--pin-file", str(pin_file))
    cmd = unlocker_command()
    child = pexpect.spawn(cmd[0], [*cmd[1:], "unlock", str(disk), "--test"], env=cli_env(tpm.tcti), timeout=60)
    child.expect("Enter TPM PIN for ")
    child.sendline(b"1111")
    child.expect("wrong TPM PIN \\(2 tries left before the TPM locks out\\)")
    child.expect("Enter TPM PIN for ")
    child.sendline(b"2222")
    child.expect("wrong TPM PIN \\(1 try left before the TPM locks out\\)")
    child.expect("Enter TPM PIN for ")
    child.sendline(b"3333")
    child.expect("TPM unlock failed: the TPM is locked out \\([0-9]+ s\\)")
    child.expect("Enter passphrase for ")
    child.sendline(PASSPHRASE)
    child.expect("unlocked with the passphrase")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    # locked out: the next unlock asks no PIN at all, says why, and the passphrase opens
    rc, _ = unlock_typing(disk, tpm, [], then=["the TPM is locked out \\([0-9]+ s\\)"], passphrase=PASSPHRASE)
    assert rc == 0
    assert b"IN LOCKOUT" in run_cli("status", str(disk), tpm=tpm).stdout


def test_changed_pcrs_ask_no_pin(disk: Path, key_file: Path, pin_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--pcrs", "sha256:7", "--with-pin", "--pin-file", str(pin_file))
    tpm.extend(7)
    rc, shown = unlock_typing(disk, tpm, [], then=["PCR 7 changed since enrolment"], passphrase=PASSPHRASE)
    assert rc == 0 and "Enter TPM PIN" not in shown
    status = run_cli("status", str(disk), "--json", tpm=tpm)
    assert b'"lockout_counter": 0' in status.stdout  # no PIN was tried


def test_nv_store_with_a_pin(disk: Path, key_file: Path, pin_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--store", "nv", "--with-pin", "--pin-file", str(pin_file))
    info = tpm.tools("tpm2_nvreadpublic", "0x1500016").stdout
    assert b"noda" not in info  # DA-protected, as the sealed object is
    rc, _ = unlock_typing(disk, tpm, [b"0000", PIN], then=["unlocked with the TPM \\(test only\\)"])
    assert rc == 0


def test_reseal_drops_and_adds_the_pin(disk: Path, key_file: Path, pin_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--with-pin", "--pin-file", str(pin_file))
    dropped = run_cli("reseal", str(disk), "--without-pin", "--unlock-key-file", str(key_file), tpm=tpm)
    assert dropped.returncode == 0, dropped.stderr
    (token,) = our_tokens(disk).values()
    assert token["pin"] is False
    plain = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
    assert plain.returncode == 0, plain.stderr
    added = run_cli("reseal", str(disk), "--pin-file", str(pin_file), "--unlock-key-file", str(key_file), tpm=tpm)
    assert added.returncode == 0, added.stderr
    assert b"and a PIN" in added.stderr
    (token,) = our_tokens(disk).values()
    assert token["pin"] is True
    rc, _ = unlock_typing(disk, tpm, [PIN], then=["unlocked with the TPM \\(test only\\)"])
    assert rc == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--pin-file", "-", "--unlock-key-file", "-"], b"would both read stdin"),
    (["--pin-file", "/nonexistent/pin"], b"cannot read the PIN from /nonexistent/pin"),
])
def test_bad_pin_arguments_change_nothing(args: list[str], message: bytes, disk: Path, key_file: Path,
                                          tpm: Swtpm) -> None:
    extra = args if "--unlock-key-file" in args else [*args, "--unlock-key-file", str(key_file)]
    done = run_cli("enroll", str(disk), "--with-pin", *extra, tpm=tpm, input=PASSPHRASE)
    assert done.returncode == 1, done.stderr
    assert message in done.stderr
    assert our_tokens(disk) == {}


def test_an_empty_pin_is_refused(disk: Path, key_file: Path, tmp_path: Path, tpm: Swtpm) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    done = run_cli("enroll", str(disk), "--with-pin", "--pin-file", str(empty), "--unlock-key-file", str(key_file),
                   tpm=tpm)
    assert done.returncode == 1 and b"the TPM PIN must have 1 to 256 bytes, not 0" in done.stderr
    assert our_tokens(disk) == {}


@pytest.mark.parametrize("content", [b"1234\n5678\n", b"12\r34", b"12\x0034"], ids=["two-lines", "cr", "nul"])
def test_a_pin_no_boot_prompt_can_take_is_refused(content: bytes, disk: Path, key_file: Path, tmp_path: Path,
                                                  tpm: Swtpm) -> None:
    """A line break ends the answer at every boot prompt (the console's line, plymouth's and the
    agents' one line) and a NUL ends plymouth's and the agents' C string: such a PIN could never be
    given at boot, and each try would count towards the TPM's lockout. enroll refuses it."""
    pin = tmp_path / "pin"
    pin.write_bytes(content)
    done = run_cli("enroll", str(disk), "--with-pin", "--pin-file", str(pin), "--unlock-key-file", str(key_file),
                   tpm=tpm)
    assert done.returncode == 1, done.stderr
    assert b"the TPM PIN cannot hold a line break or a NUL byte" in done.stderr
    assert our_tokens(disk) == {}


# --- a second reader's findings: the header is the attacker's to write ------------------------------

def test_a_header_edited_to_drop_the_pin_does_not_make_reseal_drop_it(disk: Path, key_file: Path, pin_file: Path,
                                                                      tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--with-pin", "--pin-file", str(pin_file))
    (tid, token), = our_tokens(disk).items()
    replace_token(disk, tid, {**token, "pin": False})
    # the token no longer describes the sealed key's policy (PolicyAuthValue is in it): nothing is
    # carried over from such a header, with or without a PIN given (commands/claims.py)
    for pin in ((), ("--pin-file", str(pin_file))):
        done = run_cli("reseal", str(disk), "--unlock-key-file", str(key_file), *pin, tpm=tpm)
        assert done.returncode == 5, done.stderr
        assert f"token {tid} describes another policy than its sealed key carries".encode() in done.stderr
        (after,) = our_tokens(disk).values()
        assert after == {**token, "pin": False}  # nothing changed


def test_a_copied_second_pin_enrolment_is_never_tried(disk: Path, key_file: Path, pin_file: Path,
                                                      tpm: Swtpm) -> None:
    """An old PIN enrolment put back beside the current one would take the right PIN as wrong until
    the TPM locks out: with more than one, no PIN is asked and the passphrase follows."""
    enroll(disk, key_file, tpm, "--with-pin", "--pin-file", str(pin_file))
    (_, token), = our_tokens(disk).items()
    subprocess.run(["cryptsetup", "token", "import", "--token-id", "7", "--json-file", "-", str(disk)],
                   input=json.dumps(token).encode(), check=True)
    rc, shown = unlock_typing(disk, tpm, [], then=["several enrolments with a PIN \\(tokens 0, 7\\)"],
                              passphrase=PASSPHRASE)
    assert rc == 0 and "Enter TPM PIN" not in shown
    assert b'"lockout_counter": 0' in run_cli("status", str(disk), "--json", tpm=tpm).stdout


def test_reseal_never_kills_a_keyslot_another_token_names(disk: Path, key_file: Path, pin_file: Path,
                                                          tpm: Swtpm) -> None:
    """The token's keyslot edited to the recovery key's: the re-seal (which, for a key with a PIN,
    always makes a new keyslot) keeps that slot, and the recovery key still opens the disk."""
    done = enroll(disk, key_file, tpm, "--with-pin", "--pin-file", str(pin_file), "--recovery-key")
    [key] = RECOVERY_KEY.findall(done.stdout)
    recovery = [t for t in luks_json(disk)["tokens"].values() if t["type"] == "tpm2-unlocker-recovery"]
    [recovery_slot] = recovery[0]["keyslots"]
    (tid, token), = our_tokens(disk).items()
    replace_token(disk, tid, {**token, "keyslots": [recovery_slot]})
    resealed = run_cli("reseal", str(disk), "--unlock-key-file", str(key_file), "--pin-file", str(pin_file), tpm=tpm)
    assert resealed.returncode == 0, resealed.stderr
    assert f"keyslot {recovery_slot}, which the old token named, stays: token".encode() in resealed.stderr
    assert opens(disk, key, slot=int(recovery_slot)) and opens(disk, PASSPHRASE, slot=0)


def test_an_agent_that_never_stops_talking_is_no_answer(disk: Path, key_file: Path, pin_file: Path, tpm: Swtpm,
                                                        tmp_path: Path) -> None:
    """systemd-ask-password's answer is capped: an endless one kills it, no PIN is tried."""
    enroll(disk, key_file, tpm, "--with-pin", "--pin-file", str(pin_file))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    agent = bindir / "systemd-ask-password"
    agent.write_text("#!/bin/sh\nexec yes 1234\n")
    agent.chmod(0o755)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "NOTIFY_SOCKET": "/run/nonexistent"}
    started = time.monotonic()
    done = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm, env=env, timeout=30)
    assert time.monotonic() - started < 20
    assert done.returncode == 10 and b"no TPM PIN given" in done.stderr, done.stderr
    assert b'"lockout_counter": 0' in run_cli("status", str(disk), "--json", tpm=tpm).stdout
