"""reseal, remove, status and adopt: the installed-system verbs, end to end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import (
    PASSPHRASE,
    SEED_SECRET,
    Swtpm,
    add_keyslot,
    luks_json,
    opens,
    our_tokens,
    run_cli,
    seal_the_archwiki_way,
    tpm2_tools_unseal,
)
from helpers import enroll_or_fail as enroll

pytestmark = pytest.mark.tpm


def unlocks_unattended(disk: Path, tpm: Swtpm) -> bool:
    return run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm).returncode == 0



# --- reseal ---------------------------------------------------------------------------------------

def test_reseal_after_pcr_change_replaces_the_key_and_next_unlock_is_unattended(
        disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    tpm.extend(7)
    assert not unlocks_unattended(disk, tpm)
    done = run_cli("reseal", str(disk), "--unlock-key-file", str(key_file), tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    assert b"old TPM key does not unseal" in done.stderr
    assert unlocks_unattended(disk, tpm)
    assert sorted(luks_json(disk)["keyslots"]) == ["0", "2"], "old TPM keyslot removed, new one added"
    assert len(our_tokens(disk)) == 1
    assert opens(disk, PASSPHRASE, slot=0)


def test_reseal_to_new_pcrs_keeps_the_keyslot_when_the_old_key_unseals(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    done = run_cli("reseal", str(disk), "--pcrs", "sha256:7,14", tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    (token,) = our_tokens(disk).values()
    assert token["pcrs"] == [7, 14] and token["keyslots"] == ["1"]
    assert sorted(luks_json(disk)["keyslots"]) == ["0", "1"]
    assert unlocks_unattended(disk, tpm)


def test_reseal_nv_store_moves_to_a_new_index_and_removes_the_old(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--store", "nv")
    tpm.extend(7)
    done = run_cli("reseal", str(disk), "--unlock-key-file", str(key_file), tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    (token,) = our_tokens(disk).values()
    assert token["nv_index"] == "0x01500017"
    assert tpm.tools("tpm2_nvreadpublic", "0x1500016", check=False).returncode != 0
    assert unlocks_unattended(disk, tpm)
    tpm.tools("tpm2_nvundefine", "0x1500017")


def test_reseal_file_store_rewrites_the_blob(disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    enroll(disk, key_file, tpm, "--store", f"file={blob}")
    tpm.extend(4)
    assert run_cli("reseal", str(disk), "--unlock-key-file", str(key_file), tpm=tpm).returncode == 0
    # the new pair beside the old one, the old one removed once the new enrolment was proven
    assert sorted(p.name for p in blob.iterdir()) == ["key.2.priv", "key.2.pub"]
    (token,) = our_tokens(disk).values()
    assert token["blob_name"] == "key.2"
    assert unlocks_unattended(disk, tpm)


def test_reseal_without_passphrase_when_needed_changes_nothing(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    tpm.extend(7)
    before = luks_json(disk)
    done = run_cli("reseal", str(disk), tpm=tpm)
    assert done.returncode == 1
    assert b"no terminal to ask for the passphrase" in done.stderr
    assert luks_json(disk) == before


# --- remove ---------------------------------------------------------------------------------------

def test_remove_takes_out_keyslot_token_and_nv_index(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--store", "nv")
    done = run_cli("remove", str(disk), "--unlock-key-file", str(key_file), tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    assert our_tokens(disk) == {}
    assert list(luks_json(disk)["keyslots"]) == ["0"]
    assert tpm.tools("tpm2_nvreadpublic", "0x1500016", check=False).returncode != 0
    assert opens(disk, PASSPHRASE)


def test_remove_with_wrong_passphrase_changes_nothing(disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    enroll(disk, key_file, tpm)
    before = luks_json(disk)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"nope")
    done = run_cli("remove", str(disk), "--unlock-key-file", str(wrong), tpm=tpm)
    assert done.returncode == 6
    assert luks_json(disk) == before


def test_remove_refuses_to_remove_the_last_keyslot_that_is_not_ours(
        disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    enroll(disk, key_file, tpm, "--store", f"file={blob}")
    key = tpm2_tools_unseal(tpm, blob, "sha256:0,2,4,7,15", tmp_path / "ctx")
    subprocess.run(["cryptsetup", "luksKillSlot", "--key-file=-", str(disk), "0"], input=key, check=True)
    before = luks_json(disk)
    done = run_cli("remove", str(disk), "--unlock-key-file", str(key_file), tpm=tpm)
    assert done.returncode == 1
    assert b"no other keyslot would be left" in done.stderr
    assert luks_json(disk) == before


# --- status ---------------------------------------------------------------------------------------

def test_status_json_reports_the_mismatching_pcr(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--pcrs", "sha256:0,4,7")
    before = json.loads(run_cli("status", str(disk), "--json", tpm=tpm).stdout)
    assert before["tpm_present"] is True and "sha256" in before["banks"]
    (entry,) = before["enrolments"]
    assert entry["policy_satisfied"] is True and entry["changed_pcrs"] == []
    assert entry["keyslot"] == 1 and entry["store"] == "token" and entry["pcrs"] == "sha256:0,4,7"
    tpm.extend(4)
    after = json.loads(run_cli("status", str(disk), "--json", tpm=tpm).stdout)
    (entry,) = after["enrolments"]
    assert entry["policy_satisfied"] is False and entry["changed_pcrs"] == [4]
    text = run_cli("status", str(disk), tpm=tpm).stdout.decode()
    assert "POLICY NOT SATISFIED (changed PCRs: 4)" in text


def test_status_shows_a_table_of_enrolled_against_current_pcrs(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--pcrs", "sha256:0,7")
    tpm.extend(7)
    rows = {int(line.split()[0]): line for line in run_cli("status", str(disk), tpm=tpm).stdout.decode().splitlines()
            if line.startswith("    ") and line.split()[0].isdigit()}
    assert sorted(rows) == [0, 7, 15]
    assert rows[0].endswith("same") and rows[7].endswith("CHANGED")
    enrolled, current = rows[7].split()[1:3]
    assert enrolled == "0" * 16 and current != enrolled  # swtpm's PCR 7 starts at zeros, then was extended
    assert rows[15].endswith("lock PCR: at its reset value")
    text = run_cli("status", str(disk), tpm=tpm).stdout.decode()
    assert "reseal would seal to the current values of sha256:0,7 (PCR 7 taking their new values); the old key " \
           "does not unseal, so it asks for the passphrase" in text
    (entry,) = json.loads(run_cli("status", str(disk), "--json", tpm=tpm).stdout)["enrolments"]
    assert [(r["pcr"], r["changed"], r["lock"]) for r in entry["pcr_table"]] == [(0, False, False), (7, True, False),
                                                                                (15, False, True)]


def test_status_without_tpm_says_so(disk: Path) -> None:
    done = run_cli("status", str(disk), "--json", "--tcti", "swtpm:host=127.0.0.1,port=1")
    assert done.returncode == 0
    result = json.loads(done.stdout)
    assert result["tpm_present"] is False and "cannot reach the TPM" in result["tpm_error"]


# --- adopt: the seed's ArchWiki tpm2-tools recipes ---------------------------------------------------

def test_adopt_blob_made_by_the_archwiki_commands(disk: Path, tpm: Swtpm, tmp_path: Path) -> None:
    add_keyslot(disk, SEED_SECRET)
    pub, priv = seal_the_archwiki_way(tpm, tmp_path, "sha256:0,2,3,7")
    done = run_cli("adopt", str(disk), "--blob", str(pub), str(priv), "--pcrs", "sha256:0,2,3,7", tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    (token,) = our_tokens(disk).values()
    assert token["keyslots"] == ["1"] and token["keyslot_owned"] is False and token["store"] == "token"
    assert unlocks_unattended(disk, tpm)
    # remove takes the token only: the keyslot holds the user's own secret
    assert run_cli("remove", str(disk), "--unlock-key-file", str(tmp_path / "k"), tpm=tpm).returncode == 1
    (tmp_path / "k").write_bytes(PASSPHRASE)
    assert run_cli("remove", str(disk), "--unlock-key-file", str(tmp_path / "k"), tpm=tpm).returncode == 0
    assert sorted(luks_json(disk)["keyslots"]) == ["0", "1"]
    assert opens(disk, SEED_SECRET, slot=1)


def test_adopt_nv_index_made_by_the_archwiki_commands(disk: Path, tpm: Swtpm, tmp_path: Path) -> None:
    add_keyslot(disk, SEED_SECRET)
    pol = tmp_path / "pcr.pol"
    tpm.tools("tpm2_createpolicy", "--policy-pcr", "--pcr-list=sha256:0,2,3,7", f"--policy={pol}")
    tpm.tools("tpm2_nvdefine", "--size", "10", "--attributes=policyread|authwrite", f"--policy={pol}", "0x2000A")
    tpm.tools("tpm2_nvwrite", "--input=-", "0x2000A", input=SEED_SECRET)
    try:
        done = run_cli("adopt", str(disk), "--nv", "0x2000A", "--pcrs", "sha256:0,2,3,7", tpm=tpm)
        assert done.returncode == 0, done.stderr.decode()
        assert b"DA-protected" in done.stderr
        assert b"NV index 0x0102000a can be overwritten without the PCR policy (authwrite)" in done.stderr
        assert b"can be read without the PCR policy" not in done.stderr  # policyread only
        (token,) = our_tokens(disk).values()
        assert token["store"] == "nv" and token["nv_index"] == "0x0102000a" and token["keyslots"] == ["1"]
        assert unlocks_unattended(disk, tpm)
        # reseal moves the key to a noDA index of ours and drops the DA-protected one
        done = run_cli("reseal", str(disk), tpm=tpm)
        assert done.returncode == 0, done.stderr.decode()
        (token,) = our_tokens(disk).values()
        assert token["nv_index"] == "0x0102000b" and token["keyslots"] == ["1"]
        moved = tpm.tools("tpm2_nvreadpublic", "0x102000b").stdout.decode()
        assert "no_da" in moved and "writelocked" in moved and "authwrite" not in moved
        assert tpm.tools("tpm2_nvreadpublic", "0x102000a", check=False).returncode != 0
        assert unlocks_unattended(disk, tpm)
        # once the PCRs changed, an adopted key (the user's own secret) is not replaced silently
        tpm.extend(3)
        done = run_cli("reseal", str(disk), tpm=tpm)
        assert done.returncode == 1 and b"adopted key no longer unseals" in done.stderr
    finally:
        for index in ("0x102000a", "0x102000b"):
            tpm.tools("tpm2_nvundefine", index, check=False)


def test_adopt_with_wrong_pcrs_says_so(disk: Path, tpm: Swtpm, tmp_path: Path) -> None:
    add_keyslot(disk, SEED_SECRET)
    pub, priv = seal_the_archwiki_way(tpm, tmp_path, "sha256:0,2,3,7")
    done = run_cli("adopt", str(disk), "--blob", str(pub), str(priv), "--pcrs", "sha256:0,7", tpm=tpm)
    assert done.returncode == 3
    assert our_tokens(disk) == {}


def test_adopt_of_unknown_nv_index_exits_5(disk: Path, tpm: Swtpm) -> None:
    done = run_cli("adopt", str(disk), "--nv", "0x1800001", "--pcrs", "sha256:7", tpm=tpm)
    assert done.returncode == 5
    assert b"does not exist" in done.stderr
