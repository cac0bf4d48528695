"""The recovery key: shown once, opens the disk at the prompt when the TPM cannot, and stays when
the TPM enrolment is removed unless asked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import PASSPHRASE, Swtpm, luks_json, opens, our_tokens, run_cli, unlock_with_prompt
from helpers import enroll_or_fail as enroll

pytestmark = pytest.mark.tpm

KEY = re.compile(rb"^    ((?:[cbdefghijklnrtuv]{8}-){7}[cbdefghijklnrtuv]{8})$", re.M)


def recovery_tokens(disk: Path) -> list[dict]:
    return [t for t in luks_json(disk).get("tokens", {}).values() if t.get("type") == "tpm2-unlocker-recovery"]


def test_enrol_with_a_recovery_key_shows_it_once_and_it_opens_the_disk(disk: Path, key_file: Path,
                                                                       tpm: Swtpm) -> None:
    done = run_cli("enroll", str(disk), "--unlock-key-file", str(key_file), "--recovery-key", tpm=tpm)
    assert done.returncode == 0, done.stderr
    [key] = KEY.findall(done.stdout)
    assert b"it is shown only this once" in done.stdout
    assert "█".encode() in done.stdout  # the QR code (qrencode is installed by ./run setup)
    assert key not in done.stderr
    [token] = recovery_tokens(disk)
    assert opens(disk, key, slot=int(token["keyslots"][0]))
    assert len(our_tokens(disk)) == 1 and opens(disk, PASSPHRASE, slot=0)
    status = run_cli("status", str(disk), tpm=tpm)
    assert f"recovery key in keyslot {token['keyslots'][0]}".encode() in status.stdout


@pytest.mark.parametrize("typing", ["as shown", "without dashes", "in capitals"])
def test_the_tpm_fails_the_recovery_key_typed_opens(typing: str, disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--pcrs", "sha256:7")
    done = run_cli("recovery-key", str(disk), "--unlock-key-file", str(key_file))
    assert done.returncode == 0, done.stderr
    [key] = KEY.findall(done.stdout)
    typed = {"as shown": key, "without dashes": key.replace(b"-", b""), "in capitals": key.upper()}[typing]
    tpm.extend(7)
    assert unlock_with_prompt(disk, tpm.tcti, "PCR 7 changed since enrolment", typed) == 0


def test_remove_keeps_the_recovery_key_unless_asked(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    [key] = KEY.findall(run_cli("recovery-key", str(disk), "--unlock-key-file", str(key_file)).stdout)
    assert run_cli("remove", str(disk), "--unlock-key-file", str(key_file), tpm=tpm).returncode == 0
    assert our_tokens(disk) == {} and len(recovery_tokens(disk)) == 1 and opens(disk, key)
    # the recovery key itself may not authorise its own removal: another keyslot must stay
    refused = run_cli("remove", str(disk), "--recovery-key", "--unlock-key-file", "-", input=key)
    assert refused.returncode == 1, refused.stderr
    assert recovery_tokens(disk) and opens(disk, key)
    removed = run_cli("remove", str(disk), "--recovery-key", "--unlock-key-file", str(key_file))
    assert removed.returncode == 0, removed.stderr
    assert recovery_tokens(disk) == [] and not opens(disk, key) and opens(disk, PASSPHRASE)


def test_a_second_recovery_key_is_refused_and_changes_nothing(disk: Path, key_file: Path) -> None:
    assert run_cli("recovery-key", str(disk), "--unlock-key-file", str(key_file)).returncode == 0
    before = luks_json(disk)
    done = run_cli("recovery-key", str(disk), "--unlock-key-file", str(key_file))
    assert done.returncode == 1
    assert b"has a recovery key already (remove --recovery-key first)" in done.stderr
    assert luks_json(disk) == before


def test_remove_refuses_when_the_secret_given_opens_only_what_is_removed(disk: Path, key_file: Path,
                                                                        tpm: Swtpm) -> None:
    """A second token claiming the passphrase's keyslot (the header is anyone's to write), and the
    user authenticating with that passphrase: it would open nothing that stays; nothing is removed."""
    from helpers import replace_token

    enroll(disk, key_file, tpm)
    [key] = KEY.findall(run_cli("recovery-key", str(disk), "--unlock-key-file", str(key_file)).stdout)
    (tid, token), = our_tokens(disk).items()
    claim = dict(token, keyslots=["0"])
    replace_token(disk, "9", claim)
    before = luks_json(disk)
    assert opens(disk, key)
    done = run_cli("remove", str(disk), "--unlock-key-file", str(key_file), tpm=tpm)
    assert done.returncode == 1
    assert b"the passphrase given opens only keyslots being removed" in done.stderr
    assert luks_json(disk) == before and opens(disk, PASSPHRASE)


def test_remove_keeps_the_recovery_keyslot_a_hostile_token_claims(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    """Our token edited to name the recovery key's keyslot: remove (without --recovery-key) keeps it."""
    from helpers import replace_token

    enroll(disk, key_file, tpm)
    [key] = KEY.findall(run_cli("recovery-key", str(disk), "--unlock-key-file", str(key_file)).stdout)
    [recovery] = recovery_tokens(disk)
    [slot] = recovery["keyslots"]
    (tid, token), = our_tokens(disk).items()
    replace_token(disk, tid, {**token, "keyslots": [slot]})
    done = run_cli("remove", str(disk), "--unlock-key-file", str(key_file), tpm=tpm)
    assert done.returncode == 0, done.stderr
    assert f"keyslot {slot} stays: token".encode() in done.stderr
    assert opens(disk, key, slot=int(slot)) and len(recovery_tokens(disk)) == 1


def test_remove_given_the_recovery_key_keeps_the_passphrase_keyslot_a_hostile_token_claims(
        tmp_path: Path, key_file: Path, tpm: Swtpm) -> None:
    """Our token edited to name the passphrase's keyslot, and remove authenticated with the recovery
    key (the passphrase forgotten): the recovery key cannot tell that keyslot by trying it, the PBKDF
    can (luksFormat's argon2id is never the mark of a key we added). The passphrase still opens."""
    from helpers import CHEAP_ARGON2ID, make_luks_image, replace_token

    disk = make_luks_image(tmp_path / "disk.img", pbkdf=CHEAP_ARGON2ID)
    enroll(disk, key_file, tpm)
    [key] = KEY.findall(run_cli("recovery-key", str(disk), "--unlock-key-file", str(key_file)).stdout)
    (tid, token), = our_tokens(disk).items()
    replace_token(disk, tid, {**token, "keyslots": ["0"]})
    done = run_cli("remove", str(disk), "--unlock-key-file", "-", input=key, tpm=tpm)
    assert done.returncode == 0, done.stderr
    assert b"keyslot 0 stays: it is not a keyslot tpm2-unlocker made (its PBKDF is not the one we give our keys)" \
        in done.stderr
    assert our_tokens(disk) == {} and opens(disk, PASSPHRASE, slot=0) and opens(disk, key)


def test_remove_given_the_recovery_key_removes_the_tpm_keyslot(tmp_path: Path, key_file: Path, tpm: Swtpm) -> None:
    from helpers import CHEAP_ARGON2ID, make_luks_image

    disk = make_luks_image(tmp_path / "disk.img", pbkdf=CHEAP_ARGON2ID)
    enroll(disk, key_file, tpm)
    [key] = KEY.findall(run_cli("recovery-key", str(disk), "--unlock-key-file", str(key_file)).stdout)
    (_, token), = our_tokens(disk).items()
    [tpm_slot] = token["keyslots"]
    done = run_cli("remove", str(disk), "--unlock-key-file", "-", input=key, tpm=tpm)
    assert done.returncode == 0, done.stderr
    assert our_tokens(disk) == {} and tpm_slot not in luks_json(disk)["keyslots"]
    assert opens(disk, PASSPHRASE, slot=0) and opens(disk, key)
