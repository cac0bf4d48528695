"""adopt --from systemd|clevis: real systemd-cryptenroll (Debian 12's 252) and `clevis luks bind ... tpm2`
enrolments on LUKS2 images against swtpm, taken over with no passphrase typed, then unlocked by ours
with no prompt; the other tool's enrolment stays and still works, or goes with --replace; changed
PCRs, a PIN, hostile tokens; status lists what it sees."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pexpect
import pytest
from helpers import (
    CLEVIS_CONFIG,
    PASSPHRASE,
    Swtpm,
    clevis_bind,
    cli_env,
    luks_json,
    opens,
    our_tokens,
    replace_token,
    run_cli,
    systemd_enroll,
    unlocker_command,
)

pytestmark = pytest.mark.tpm

PIN = b"2468-pin"


@pytest.fixture(autouse=True)
def _other_tools() -> None:
    for tool in ("systemd-cryptenroll", "clevis"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (./run setup installs systemd and clevis-luks, clevis-tpm2)")


# --- the other tools, as their users run them -----------------------------------------------------------------

def clevis_pass(disk: Path, tpm: Swtpm, slot: int) -> bytes:
    """What `clevis luks pass` gives for `slot` (Clevis's own unseal and JWE decryption)."""
    done = subprocess.run(["clevis", "luks", "pass", "-d", str(disk), "-s", str(slot)],
                          env=dict(os.environ, TPM2TOOLS_TCTI=tpm.tcti), capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def systemd_secret_by_tpm2_tools(tpm: Swtpm, token: dict, work: Path, tcti: str | None = None,
                                 env: dict[str, str] | None = None) -> bytes:
    """systemd's sealed secret, unsealed by tpm2-tools alone (no code of ours): split tpm2-blob into
    its TPM2B_PRIVATE and TPM2B_PUBLIC, load them under `tpm2_createprimary -C o -G ecc` (systemd 252's
    primary) and unseal with its PCR policy."""
    work.mkdir(exist_ok=True)
    blob = base64.b64decode(token["tpm2-blob"])
    end = 2 + int.from_bytes(blob[:2], "big")
    (work / "priv").write_bytes(blob[:end])
    (work / "pub").write_bytes(blob[end:])
    tpm.tools("tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", str(work / "p.ctx"))
    tpm.tools("tpm2_load", "-C", str(work / "p.ctx"), "-u", str(work / "pub"), "-r", str(work / "priv"),
              "-c", str(work / "k.ctx"))
    tpm.tools("tpm2_flushcontext", "-t")
    pcrs = ",".join(str(p) for p in token["tpm2-pcrs"])
    done = subprocess.run(["tpm2_unseal", "-c", str(work / "k.ctx"), "-p", f"pcr:{token['tpm2-pcr-bank']}:{pcrs}"],
                          env=dict(os.environ, TPM2TOOLS_TCTI=tcti or tpm.tcti, **(env or {})), capture_output=True)
    tpm.tools("tpm2_flushcontext", "-t")
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


# --- ours ---------------------------------------------------------------------------------------------------------

def on_a_terminal(*args: str, tpm: Swtpm, answers: list[tuple[str, bytes]] = (), tcti: str | None = None,
                  env: dict[str, str] | None = None) -> tuple[int, str]:
    """The CLI on a real terminal (pexpect): a prompt not in `answers` would hang it until the timeout
    fails the test, so a run that ends proves no other prompt was shown. Its exit status and output."""
    cmd = unlocker_command()
    child = pexpect.spawn(cmd[0], [*cmd[1:], *args], env=cli_env(tcti or tpm.tcti, env), timeout=60)
    for prompt, answer in answers:
        child.expect(prompt)
        child.sendline(answer)
    child.expect(pexpect.EOF)
    child.close()
    output = child.before.decode(errors="replace") if child.before else ""
    for prompt in ("passphrase for", "Passphrase for", "PIN"):
        if not any(prompt in p for p, _ in answers):
            assert prompt not in output, output
    return child.exitstatus, output


def adopt(disk: Path, tpm: Swtpm, *args: str, answers: list[tuple[str, bytes]] = ()) -> str:
    status, output = on_a_terminal("adopt", str(disk), *args, tpm=tpm, answers=answers)
    assert status == 0, output
    assert "adopted" in output and "besides ours, keyslot" in output and "the passphrase still opens" not in output, output
    return output


def unlocks_with_no_prompt(disk: Path, tpm: Swtpm) -> None:
    status, output = on_a_terminal("unlock", str(disk), "--test", tpm=tpm)
    assert status == 0 and "unlocked with the TPM (test only)" in output, output


def image_digest(disk: Path) -> str:
    """The whole image, header and keyslots included: "changes nothing" is byte for byte."""
    return hashlib.sha256(disk.read_bytes()).hexdigest()


def one_line_and_code(done: subprocess.CompletedProcess, code: int, *words: bytes) -> None:
    """A refusal: its exit code, its words, and only lines of ours (a message and its hint), no traceback."""
    text = done.stderr
    assert done.returncode == code, text.decode()
    assert b"Traceback" not in text and b"internal error" not in text, text.decode()
    assert all(line.startswith(b"tpm2-unlocker") or line.startswith(b"  ") for line in text.splitlines()), text.decode()
    assert text.splitlines()[0].startswith(b"tpm2-unlocker: "), text.decode()
    for word in words:
        assert word in text, text.decode()


# --- systemd-tpm2 -------------------------------------------------------------------------------------------------

def test_a_systemd_tpm2_enrolment_is_adopted_with_no_passphrase_and_keeps_working_beside_ours(
        disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    theirs = systemd_enroll(disk, key_file, tpm)
    secret = systemd_secret_by_tpm2_tools(tpm, theirs, tmp_path / "before")
    assert len(secret) == 32 and opens(disk, base64.b64encode(secret), slot=1)  # systemd's own scheme, checked
    output = adopt(disk, tpm, "--from", "systemd")
    assert "systemd-cryptenroll's token 0 and keyslot 1 stay" in output, output
    assert "besides ours, keyslots 0 (no token: a passphrase or key file) and 1 (systemd-tpm2 token 0) open the " \
           "disk" in " ".join(output.split()), output
    (ours,) = our_tokens(disk).values()
    assert ours["keyslots"] == ["2"] and ours["keyslot_owned"] is True and ours["lock_pcr"] == 15
    assert ours["pcr_bank"] == "sha256" and ours["pcrs"] == [0, 7]  # the PCRs systemd's was bound to
    assert not opens(disk, base64.b64encode(secret), slot=2)  # ours is a key of its own
    unlocks_with_no_prompt(disk, tpm)
    # systemd's token and keyslot are as they were, and its sealed secret still opens its keyslot
    assert [t for t in luks_json(disk)["tokens"].values() if t["type"] == "systemd-tpm2"] == [theirs]
    assert systemd_secret_by_tpm2_tools(tpm, theirs, tmp_path / "after") == secret
    assert opens(disk, base64.b64encode(secret), slot=1)
    assert opens(disk, PASSPHRASE, slot=0)


def test_adopt_from_systemd_with_replace_removes_its_token_and_keyslot_after_ours_works(
        disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    theirs = systemd_enroll(disk, key_file, tpm)
    secret = systemd_secret_by_tpm2_tools(tpm, theirs, tmp_path / "ctx")
    # what the checks below look for is there before
    assert "1" in luks_json(disk)["keyslots"] and opens(disk, base64.b64encode(secret))
    assert any(t["type"] == "systemd-tpm2" for t in luks_json(disk)["tokens"].values())
    output = adopt(disk, tpm, "--from", "systemd", "--replace")
    assert "removed systemd-cryptenroll's token 0 and keyslot 1; besides ours, keyslot 0 (no token: a passphrase or " \
           "key file) opens the disk" in " ".join(output.split()), output
    meta = luks_json(disk)
    assert not any(t["type"] == "systemd-tpm2" for t in meta["tokens"].values())
    assert "1" not in meta["keyslots"] and not opens(disk, base64.b64encode(secret))
    assert sorted(meta["keyslots"]) == ["0", "2"]
    unlocks_with_no_prompt(disk, tpm)
    assert opens(disk, PASSPHRASE, slot=0)


def test_a_replace_that_fails_half_way_leaves_ours_working_and_says_so(
        disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    """cryptsetup refuses to kill systemd's keyslot: ours, already proven, stays and unlocks; systemd's
    token and keyslot stay too; the line says both, with cryptsetup's exit code (7)."""
    theirs = systemd_enroll(disk, key_file, tpm)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "cryptsetup"
    wrapper.write_text(f'#!/bin/sh\ncase "$1" in luksKillSlot) echo "refused by the test" >&2; exit 1 ;; esac\n'
                       f'exec {shutil.which("cryptsetup")} "$@"\n')
    wrapper.chmod(0o755)
    done = run_cli("adopt", str(disk), "--from", "systemd", "--replace", tpm=tpm,
                   env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    one_line_and_code(done, 7, b"ours is enrolled and proven (keyslot 2, token 1), but removing systemd-cryptenroll's "
                      b"token 0 and keyslot 1 failed", b"refused by the test")
    assert [t for t in luks_json(disk)["tokens"].values() if t["type"] == "systemd-tpm2"] == [theirs]
    assert "1" in luks_json(disk)["keyslots"]
    unlocks_with_no_prompt(disk, tpm)


# what another program does to the header while adopt runs, and the words of adopt's refusal
MEANWHILE = {
    # systemd's keyslot 1 killed (cryptsetup drops it from the token) and a new passphrase put in slot 1
    "token-changed": ("kill 1; add 1", b"token 0 changed since adopt read the header"),
    # the same, and systemd's token put back as it was: it names the new passphrase's slot
    "token-as-it-was": ("kill 1; add 1; put back", b"keyslot 1 no longer opens with the secret token 0 holds"),
    # the passphrase's keyslot 0 killed: systemd's would be the disk's last besides ours
    "passphrase-killed": ("kill 0", b"besides ours it is now the only keyslot that opens the disk"),
    # the same, and an unbound keyslot (it opens nothing) put in slot 0
    "passphrase-unbound": ("kill 0; add unbound 0", b"besides ours it is now the only keyslot that opens the disk"),
}


@pytest.mark.parametrize("case", list(MEANWHILE))
def test_replace_never_kills_a_keyslot_rewritten_while_adopt_ran(
        disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path, case: str) -> None:
    """Between adopt's first read of the header and --replace's kill, another program (an admin's
    cryptsetup in another terminal, during the PIN prompt or the proof) rewrote it: the kill is
    refused, every keyslot but the one killed meanwhile still opens, and ours, proven, stays (exit 5
    or 1, both said)."""
    theirs = systemd_enroll(disk, key_file, tpm)
    secret = systemd_secret_by_tpm2_tools(tpm, theirs, tmp_path / "ctx")
    (tmp_path / "theirs.json").write_text(json.dumps(theirs))
    new_passphrase = tmp_path / "new-passphrase"
    new_passphrase.write_bytes(b"the admin's new passphrase")
    real = shutil.which("cryptsetup")
    steps, words = MEANWHILE[case]
    script = {
        "kill 1": f"{real} luksKillSlot --key-file {key_file} {disk} 1",
        "add 1": f"{real} luksAddKey --key-file {key_file} --new-key-slot 1 --pbkdf pbkdf2 "
                 f"--pbkdf-force-iterations 1000 {disk} {new_passphrase}",
        "put back": f"{real} token import --token-replace --token-id 0 --json-file {tmp_path}/theirs.json {disk}",
        "kill 0": f"{real} luksKillSlot --batch-mode {disk} 0",
        "add unbound 0": f"{real} luksAddKey --unbound --key-size 256 --key-slot 0 --pbkdf pbkdf2 "
                         f"--pbkdf-force-iterations 1000 {disk} {new_passphrase}",
    }
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "cryptsetup"
    # after our token is written (the second token import, after the pending marker: the last header
    # write before the proof), once: the other program's turn
    wrapper.write_text(f"""#!/bin/sh
{real} "$@"; rc=$?
if [ "$1 $2" = "token import" ]; then echo >> {tmp_path}/imports; fi
if [ "$1 $2" = "token import" ] && [ "$(wc -l < {tmp_path}/imports)" = 2 ] && [ ! -e {tmp_path}/done ]; then
    touch {tmp_path}/done
    {chr(10).join(script[step] for step in steps.split("; "))}
fi
exit $rc
""")
    wrapper.chmod(0o755)
    done = run_cli("adopt", str(disk), "--from", "systemd", "--replace", tpm=tpm,
                   env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    assert (tmp_path / "done").exists()  # the other program did run, after our token was written
    if case == "token-as-it-was":  # as the test set it up: systemd's token as adopt read it, naming slot 1
        assert [t for t in luks_json(disk)["tokens"].values() if t["type"] == "systemd-tpm2"] == [theirs]
    refused = case.startswith("passphrase-")
    one_line_and_code(done, 1 if refused else 5,
                      b"ours is enrolled and proven (keyslot 2, token 1)", b"keyslot 1 stays", words)
    if refused:
        assert opens(disk, base64.b64encode(secret), slot=1)
    else:
        assert opens(disk, new_passphrase.read_bytes(), slot=1) and opens(disk, PASSPHRASE, slot=0)
    unlocks_with_no_prompt(disk, tpm)


def test_changed_pcrs_make_adopt_from_systemd_refuse_naming_them_and_change_nothing(
        disk: Path, key_file: Path, tpm: Swtpm) -> None:
    systemd_enroll(disk, key_file, tpm, pcrs="0+7")
    tpm.extend(7)
    before = image_digest(disk)
    done = run_cli("adopt", str(disk), "--from", "systemd", "--replace", tpm=tpm)
    one_line_and_code(done, 3, b"the PCRs changed since systemd-cryptenroll enrolled", b"sha256:0,7",
                      b"PCRs 0, 7 differ", b"nothing was changed")
    assert image_digest(disk) == before


def test_a_systemd_enrolment_with_a_pin_is_adopted_with_its_pin_and_keeps_it(
        disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    theirs = systemd_enroll(disk, key_file, tpm, pcrs="7", pin=PIN)
    assert theirs["tpm2-pin"] is True
    # asked once on the terminal
    adopt(disk, tpm, "--from", "systemd", answers=[("TPM PIN of the systemd-tpm2 enrolment of ", PIN)])
    (ours,) = our_tokens(disk).values()
    assert ours["pin"] is True and ours["pcrs"] == [7]
    no_pin = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
    assert no_pin.returncode == 10, no_pin.stderr  # ours asks for the PIN too
    status, output = on_a_terminal("unlock", str(disk), "--test", tpm=tpm, answers=[(f"Enter TPM PIN for {disk}: ", PIN)])
    assert status == 0 and "unlocked with the TPM" in output, output


def test_a_systemd_pin_from_a_file_adopts_and_a_wrong_one_is_one_line_exit_6_and_changes_nothing(
        disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    systemd_enroll(disk, key_file, tpm, pcrs="7", pin=PIN)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"1357\n")
    before = image_digest(disk)
    done = run_cli("adopt", str(disk), "--from", "systemd", "--pin-file", str(wrong), tpm=tpm)
    one_line_and_code(done, 6, b"wrong TPM PIN")
    assert image_digest(disk) == before
    right = tmp_path / "right"
    right.write_bytes(PIN + b"\n")
    done = run_cli("adopt", str(disk), "--from", "systemd", "--pin-file", str(right), "--replace", tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    assert b"and its PIN" in done.stderr
    assert not any(t["type"] == "systemd-tpm2" for t in luks_json(disk)["tokens"].values())


def test_a_systemd_token_whose_pin_flag_was_edited_away_is_corrupt_not_a_pcr_change(
        disk: Path, key_file: Path, tpm: Swtpm) -> None:
    theirs = systemd_enroll(disk, key_file, tpm, pcrs="7", pin=PIN)
    subprocess.run(["cryptsetup", "--disable-external-tokens", "token", "import", "--token-replace", "--token-id", "0",
                    "--json-file", "-", str(disk)], input=json.dumps({**theirs, "tpm2-pin": False}).encode(), check=True)
    before = image_digest(disk)
    done = run_cli("adopt", str(disk), "--from", "systemd", tpm=tpm)  # no PIN asked: nothing would use it
    one_line_and_code(done, 5, b"says tpm2-pin is false, but its sealed object's policy says otherwise")
    assert image_digest(disk) == before


def test_replace_is_refused_when_the_other_tools_keyslot_is_the_only_other_one(
        disk: Path, key_file: Path, tpm: Swtpm) -> None:
    systemd_enroll(disk, key_file, tpm)
    # the user had systemd-cryptenroll wipe the passphrase: keyslot 1 (systemd's) is the disk's only one
    subprocess.run(["systemd-cryptenroll", f"--unlock-key-file={key_file}", "--wipe-slot=0", str(disk)], check=True,
                   capture_output=True)
    assert list(luks_json(disk)["keyslots"]) == ["1"]
    before = image_digest(disk)
    done = run_cli("adopt", str(disk), "--from", "systemd", "--replace", tpm=tpm)
    one_line_and_code(done, 1, b"refusing --replace", b"no passphrase would open the disk")
    assert image_digest(disk) == before


def test_replace_is_refused_when_besides_the_other_tools_keyslot_only_an_unbound_one_is_left(
        disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    """An unbound keyslot (luksAddKey --unbound) holds a key that opens nothing: it is no keyslot that
    would be left to open the disk, and --replace is refused with the header unchanged."""
    theirs = systemd_enroll(disk, key_file, tpm)
    unbound = tmp_path / "unbound"
    unbound.write_bytes(b"an unbound keyslot's passphrase")
    subprocess.run(["cryptsetup", "luksAddKey", "--unbound", "--key-size", "256", "--key-slot", "2", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", str(disk), str(unbound)], check=True, capture_output=True)
    subprocess.run(["cryptsetup", "luksKillSlot", "--batch-mode", str(disk), "0"], check=True, capture_output=True)
    meta = luks_json(disk)
    assert sorted(meta["keyslots"]) == ["1", "2"]
    assert [d["segments"] for d in meta["digests"].values() if d["keyslots"] == ["2"]] == [[]]  # unbound, as made
    before = image_digest(disk)
    done = run_cli("adopt", str(disk), "--from", "systemd", "--replace", tpm=tpm)
    one_line_and_code(done, 1, b"refusing --replace", b"keyslot 1 is the only keyslot that opens", b"no passphrase would "
                      b"open the disk")
    assert image_digest(disk) == before
    assert opens(disk, base64.b64encode(systemd_secret_by_tpm2_tools(tpm, theirs, tmp_path / "ctx")), slot=1)


def test_replace_names_the_keyslots_left_when_no_passphrase_is_among_them(
        disk: Path, key_file: Path, tpm: Swtpm) -> None:
    """The passphrase was wiped and a systemd recovery key enrolled: after --replace only the recovery
    key's keyslot opens the disk besides ours, and the line names it (with its token), not a passphrase."""
    systemd_enroll(disk, key_file, tpm)
    key_file.chmod(0o600)
    recovery = subprocess.run(["systemd-cryptenroll", "--recovery-key", f"--unlock-key-file={key_file}", str(disk)],
                              capture_output=True, check=True, timeout=60).stdout.strip()
    subprocess.run(["systemd-cryptenroll", f"--unlock-key-file={key_file}", "--wipe-slot=0", str(disk)], check=True,
                   capture_output=True)
    meta = luks_json(disk)
    assert sorted(meta["keyslots"]) == ["1", "2"] and meta["tokens"]["1"] == {"type": "systemd-recovery", "keyslots": ["2"]}
    status, output = on_a_terminal("adopt", str(disk), "--from", "systemd", "--replace", tpm=tpm)
    assert status == 0, output
    line = " ".join(output.split())
    assert "removed systemd-cryptenroll's token 0 and keyslot 1; besides ours, keyslot 2 (systemd-recovery token 1) " \
           "opens the disk" in line, output
    assert "passphrase" not in line, output
    assert sorted(luks_json(disk)["keyslots"]) == ["0", "2"]
    assert opens(disk, recovery, slot=2) and not opens(disk, PASSPHRASE)
    unlocks_with_no_prompt(disk, tpm)


def test_a_reencryption_keyslot_is_no_keyslot_that_opens_the_disk(disk: Path, key_file: Path) -> None:
    """`cryptsetup reencrypt --init-only` adds a keyslot for the new volume key and one of type
    reencrypt (its progress, no key): only the two that hold a key count as opening the disk."""
    from unlocker.luks import LuksDevice

    subprocess.run(["cryptsetup", "reencrypt", "--init-only", "--batch-mode", f"--key-file={key_file}", "--pbkdf",
                    "pbkdf2", "--pbkdf-force-iterations", "1000", str(disk)], check=True, capture_output=True)
    meta = luks_json(disk)
    assert {k: v["type"] for k, v in meta["keyslots"].items()} == {"0": "luks2", "1": "luks2", "2": "reencrypt"}
    device = LuksDevice(str(disk))
    assert device.keyslots() == [0, 1, 2]
    assert device.opening_keyslots() == [0, 1]


def _primary_public(tpm: Swtpm, work: Path, *args: str) -> str:
    """base64 of the TPM2B_PUBLIC of `tpm2_createprimary -C o ARGS`: what a newer systemd's tpm2_srk holds."""
    work.mkdir(exist_ok=True)
    tpm.tools("tpm2_createprimary", "-C", "o", *args, "-c", str(work / "p.ctx"), "-o", str(work / "p.pub"), "-f", "tss")
    tpm.tools("tpm2_flushcontext", "-t")
    return base64.b64encode((work / "p.pub").read_bytes()).decode()


def test_a_token_naming_its_storage_key_in_tpm2_srk_is_unsealed_under_that_key_and_no_other(
        disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    """systemd 254 and later record their storage key (tpm2_srk): adopt selects the key of that name,
    and refuses a TPM that has none such (exit 2) with the image unchanged."""
    theirs = systemd_enroll(disk, key_file, tpm)
    # another key's public area: no key of this TPM has its name
    replace_token(disk, "0", {**theirs, "tpm2_srk": _primary_public(tpm, tmp_path / "rsa", "-G", "rsa")})
    before = image_digest(disk)
    done = run_cli("adopt", str(disk), "--from", "systemd", tpm=tpm)
    one_line_and_code(done, 2, b"TPM identity changed")
    assert image_digest(disk) == before
    # the key systemd 252 sealed under, by its public area
    replace_token(disk, "0", {**theirs, "tpm2_srk": _primary_public(tpm, tmp_path / "ecc", "-G", "ecc")})
    adopt(disk, tpm, "--from", "systemd")
    unlocks_with_no_prompt(disk, tpm)


def test_the_other_tools_secret_never_crosses_the_bus_in_clear_nor_reaches_argv(
        disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    """A pcap of adopt's TPM traffic holds neither systemd's sealed secret nor our new key; tpm2-tools'
    unsalted unseal of the same blob shows the secret (so the capture would see it); no cryptsetup run
    gets the secret, its base64 (the passphrase) or our key in argv or environment."""
    theirs = systemd_enroll(disk, key_file, tpm, pcrs="7")
    contrast = tmp_path / "contrast.pcap"
    secret = systemd_secret_by_tpm2_tools(tpm, theirs, tmp_path / "ctx", tcti=f"pcap:{tpm.tcti}",
                                          env={"TCTI_PCAP_FILE": str(contrast)})
    assert secret in contrast.read_bytes(), "the contrast capture must show the secret (else this test proves nothing)"
    log = tmp_path / "argv.log"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "cryptsetup"
    wrapper.write_text(f"#!/bin/sh\n{{ tr '\\0' ' ' </proc/$$/cmdline; echo; tr '\\0' ' ' </proc/$$/environ; echo; }} "
                       f">>{log}\nexec {shutil.which('cryptsetup')} \"$@\"\n")
    wrapper.chmod(0o755)
    capture = tmp_path / "adopt.pcap"
    done = run_cli("adopt", str(disk), "--from", "systemd", "--tcti", f"pcap:{tpm.tcti}",
                   env={"TCTI_PCAP_FILE": str(capture), "PATH": f"{bindir}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr.decode()
    key = systemd_secret_by_ours(disk, tpm, tmp_path / "ours")
    traffic, recorded = capture.read_bytes(), log.read_bytes()
    assert len(traffic) > 1000 and b"luksAddKey" in recorded and b"--test-passphrase" in recorded
    for value in (secret, base64.b64encode(secret), key):
        assert value not in traffic and value not in recorded
        assert value.hex().encode() not in recorded


def systemd_secret_by_ours(disk: Path, tpm: Swtpm, work: Path) -> bytes:
    """Our new key, read back through tpm2-tools from our token (under our noDA SRK; with the lock PCR)."""
    from vm.swtpm import SRK_ATTRS

    (token,) = our_tokens(disk).values()
    work.mkdir()
    (work / "pub").write_bytes(base64.b64decode(token["tpm2_public"]))
    (work / "priv").write_bytes(base64.b64decode(token["tpm2_private"]))
    tpm.tools("tpm2_createprimary", "-C", "o", "-G", "ecc", f"--attributes={SRK_ATTRS}", "-c", str(work / "p.ctx"))
    tpm.tools("tpm2_load", "-C", str(work / "p.ctx"), "-u", str(work / "pub"), "-r", str(work / "priv"),
              "-c", str(work / "k.ctx"))
    tpm.tools("tpm2_flushcontext", "-t")
    pcrs = ",".join(str(p) for p in [*token["pcrs"], token["lock_pcr"]])
    key = tpm.tools("tpm2_unseal", "-c", str(work / "k.ctx"), "-p", f"pcr:sha256:{pcrs}").stdout
    tpm.tools("tpm2_flushcontext", "-t")
    assert len(key) == 32 and opens(disk, key, slot=int(token["keyslots"][0]))
    return key


# --- Clevis -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, ours", [
    (CLEVIS_CONFIG, [0, 7]),
    ('{"key":"rsa","pcr_bank":"sha256","pcr_ids":"7"}', [7]),  # an RSA primary (as systemd's on a TPM without ECC)
    ('{"pcr_ids":"7"}', [7]),  # Clevis's default bank: sha1
    ("{}", [0, 2, 4, 7]),  # bound to no PCRs: ours takes the default PCRs
], ids=["sha256-ecc", "rsa", "sha1-bank", "no-pcrs"])
def test_a_clevis_tpm2_pin_is_adopted_with_no_passphrase_and_clevis_still_unlocks_its_keyslot(
        config: str, ours: list[int], disk: Path, tpm: Swtpm) -> None:
    theirs = clevis_bind(disk, tpm, config)
    passphrase = clevis_pass(disk, tpm, 1)
    assert opens(disk, passphrase, slot=1)
    output = adopt(disk, tpm, "--from", "clevis")
    assert "Clevis's token 0 and keyslot 1 stay" in output, output
    (token,) = our_tokens(disk).values()
    assert token["keyslots"] == ["2"] and token["pcrs"] == ours
    assert token["pcr_bank"] == ("sha1" if config == '{"pcr_ids":"7"}' else "sha256")
    unlocks_with_no_prompt(disk, tpm)
    assert [t for t in luks_json(disk)["tokens"].values() if t["type"] == "clevis"] == [theirs]
    assert clevis_pass(disk, tpm, 1) == passphrase and opens(disk, passphrase, slot=1)
    assert opens(disk, PASSPHRASE, slot=0)


def test_adopt_from_clevis_with_replace_removes_its_token_and_keyslot(disk: Path, tpm: Swtpm) -> None:
    clevis_bind(disk, tpm)
    passphrase = clevis_pass(disk, tpm, 1)
    listed = subprocess.run(["clevis", "luks", "list", "-d", str(disk)], capture_output=True, text=True)
    assert listed.stdout.startswith("1: tpm2 "), listed.stdout  # the check below sees a binding when there is one
    output = adopt(disk, tpm, "--from", "clevis", "--replace")
    assert "removed Clevis's token 0 and keyslot 1" in output, output
    listed = subprocess.run(["clevis", "luks", "list", "-d", str(disk)], capture_output=True, text=True)
    assert listed.stdout == "", listed.stdout
    assert not any(t["type"] == "clevis" for t in luks_json(disk)["tokens"].values())
    assert "1" not in luks_json(disk)["keyslots"] and not opens(disk, passphrase)
    unlocks_with_no_prompt(disk, tpm)
    assert opens(disk, PASSPHRASE, slot=0)


def test_changed_pcrs_make_adopt_from_clevis_refuse_naming_them_and_change_nothing(disk: Path, tpm: Swtpm) -> None:
    clevis_bind(disk, tpm)
    tpm.extend(0)
    before = image_digest(disk)
    done = run_cli("adopt", str(disk), "--from", "clevis", tpm=tpm)
    one_line_and_code(done, 3, b"the PCRs changed since Clevis enrolled", b"sha256:0,7", b"PCRs 0, 7 differ",
                      b"nothing was changed")
    assert image_digest(disk) == before


def test_clevis_puts_its_jwk_on_the_bus_in_clear_and_adopt_does_not(disk: Path, tpm: Swtpm, tmp_path: Path) -> None:
    """Clevis's own unseal (tpm2_unseal, no session) shows the JWK in a capture of the TPM traffic;
    adopt's, over a session salted with the same primary, shows neither the JWK's key nor the passphrase."""
    import re

    clevis_bind(disk, tpm)
    contrast = tmp_path / "clevis.pcap"
    done = subprocess.run(["clevis", "luks", "pass", "-d", str(disk), "-s", "1"], capture_output=True,
                          env=dict(os.environ, TPM2TOOLS_TCTI=f"pcap:{tpm.tcti}", TCTI_PCAP_FILE=str(contrast)))
    assert done.returncode == 0, done.stderr.decode()
    passphrase = done.stdout
    found = re.search(rb'"k":"([A-Za-z0-9_-]{43})"', contrast.read_bytes())
    assert found, "the contrast capture must show the JWK (else this test proves nothing)"
    capture = tmp_path / "adopt.pcap"
    done = run_cli("adopt", str(disk), "--from", "clevis", "--tcti", f"pcap:{tpm.tcti}",
                   env={"TCTI_PCAP_FILE": str(capture)})
    assert done.returncode == 0, done.stderr.decode()
    traffic = capture.read_bytes()
    assert len(traffic) > 1000
    assert found.group(1) not in traffic and base64.urlsafe_b64decode(found.group(1) + b"=") not in traffic
    assert passphrase not in traffic


def test_a_clevis_jwe_whose_tag_does_not_verify_is_refused_after_the_unseal_and_changes_nothing(
        disk: Path, tpm: Swtpm) -> None:
    theirs = clevis_bind(disk, tpm)
    tag = bytearray(base64.urlsafe_b64decode(theirs["jwe"]["tag"] + "=="))
    tag[0] ^= 1
    theirs["jwe"]["tag"] = base64.urlsafe_b64encode(bytes(tag)).rstrip(b"=").decode()
    replace_token(disk, "0", theirs)
    before = image_digest(disk)
    done = run_cli("adopt", str(disk), "--from", "clevis", tpm=tpm)
    one_line_and_code(done, 5, b"does not decrypt with the key the TPM unsealed")
    assert image_digest(disk) == before


# --- what adopt cannot take, and hostile tokens ------------------------------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _clevis_token(header: dict | bytes, **jwe: str) -> dict:
    protected = header if isinstance(header, bytes) else json.dumps(header).encode()
    fields = {"ciphertext": _b64url(b"x" * 40), "encrypted_key": "", "iv": _b64url(bytes(12)),
              "protected": _b64url(protected), "tag": _b64url(bytes(16)), **jwe}
    return {"type": "clevis", "keyslots": ["0"], "jwe": fields}


def _tpm2_header(**tpm2: str) -> dict:
    fields = {"hash": "sha256", "key": "ecc", "jwk_pub": _b64url(b"\x00\x04abcd"), "jwk_priv": _b64url(b"\x00\x02ab"),
              "pcr_bank": "sha256", "pcr_ids": "7", **tpm2}
    return {"alg": "dir", "enc": "A256GCM", "clevis": {"pin": "tpm2", "tpm2": fields}}


def _systemd_token(**fields: object) -> dict:
    token = {"type": "systemd-tpm2", "keyslots": ["0"], "tpm2-blob": base64.b64encode(bytes(60)).decode(),
             "tpm2-pcrs": [7], "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc", "tpm2-policy-hash": "00" * 32,
             "tpm2-pin": False}
    token.update(fields)
    return token


HOSTILE = {
    "systemd-blob-not-base64": ("systemd", _systemd_token(**{"tpm2-blob": "!!not base64!!"}), 5, b"is not base64"),
    "systemd-blob-no-tpm2b-pair": ("systemd", _systemd_token(), 5, b"is not a TPM2B_PRIVATE and a TPM2B_PUBLIC"),
    "systemd-blob-huge": ("systemd", _systemd_token(**{"tpm2-blob": "A" * 200_000}), 5, b"impossibly large"),
    "systemd-pcrs-not-a-list": ("systemd", _systemd_token(**{"tpm2-pcrs": "7"}), 5, b"not a list of PCRs"),
    "systemd-policy-hash-not-hex": ("systemd", _systemd_token(**{"tpm2-policy-hash": "zz" * 32}), 5, b"is not hex"),
    "systemd-two-keyslots": ("systemd", _systemd_token(keyslots=["0", "0"]), 5, b"exactly one keyslot"),
    "systemd-signed-policy": ("systemd", _systemd_token(tpm2_pubkey_pcrs=[11], tpm2_pubkey="AAAA"), 1,
                              b"signed PCR policy"),
    "clevis-header-not-base64url": ("clevis", _clevis_token({}, protected="**"), 5, b"is not base64url"),
    "clevis-header-not-json": ("clevis", _clevis_token(b"{not json"), 5, b"protected header is not JSON"),
    "clevis-header-deep": ("clevis", _clevis_token(b"[" * 5000), 5, b"protected header is not JSON"),
    "clevis-jwk-pub-not-base64url": ("clevis", _clevis_token(_tpm2_header(jwk_pub="a+b/")), 5, b"is not base64url"),
    "clevis-ciphertext-huge": ("clevis", _clevis_token(_tpm2_header(), ciphertext="A" * 200_000), 5, b"impossibly large"),
    "clevis-tang": ("clevis", _clevis_token({"alg": "ECDH-ES", "enc": "A256GCM",
                                             "clevis": {"pin": "tang", "tang": {"url": "http://tang"}}}), 1,
                    b"a Tang server, not a TPM"),
    "clevis-sss": ("clevis", _clevis_token({"alg": "dir", "enc": "A256GCM", "clevis": {"pin": "sss", "sss": {}}}), 1,
                   b"secret sharing"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_or_unadoptable_token_is_one_line_with_its_code_and_changes_nothing(
        name: str, tpm: Swtpm, tmp_path: Path) -> None:
    tool, token, code, words = HOSTILE[name]
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"")
    os.truncate(disk, 24 * 1024 * 1024)
    # room in the header for the huge ones: cryptsetup itself caps the JSON area at 4 MiB
    subprocess.run(["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--luks2-metadata-size", "512k", "--key-file=-", str(disk)],
                   input=PASSPHRASE, check=True, capture_output=True)
    # written as an attacker would, past cryptsetup's token plugins (systemd's checks its own tokens)
    subprocess.run(["cryptsetup", "--disable-external-tokens", "token", "import", "--json-file", "-", str(disk)],
                   input=json.dumps(token).encode(), check=True)
    before = image_digest(disk)
    done = run_cli("adopt", str(disk), "--from", tool, "--replace", tpm=tpm)
    one_line_and_code(done, code, words)
    assert image_digest(disk) == before
    shown = run_cli("status", str(disk), "--json", tpm=tpm)  # status shows it, and why adopt cannot take it
    assert shown.returncode == 0, shown.stderr.decode()
    (entry,) = json.loads(shown.stdout)["other_enrolments"]
    assert entry["adopt_from"] is None and words.decode() in entry["why_not"]


def test_adopt_from_without_such_an_enrolment_or_with_ours_already_there_says_so(
        disk: Path, key_file: Path, tpm: Swtpm) -> None:
    done = run_cli("adopt", str(disk), "--from", "clevis", tpm=tpm)
    one_line_and_code(done, 1, f"{disk} has no clevis enrolment to adopt".encode())
    systemd_enroll(disk, key_file, tpm)
    adopt(disk, tpm, "--from", "systemd")
    done = run_cli("adopt", str(disk), "--from", "systemd", tpm=tpm)
    one_line_and_code(done, 1, b"is already enrolled")
    for args, words in ((["--from", "tang"], b"--from takes systemd or clevis"),
                        (["--replace"], b"--replace and --pin-file go with --from"),
                        (["--from", "systemd", "--nv", "0x1500016"], b"without --blob or --nv")):
        one_line_and_code(run_cli("adopt", str(disk), *args, tpm=tpm), 1, words)


# --- status -------------------------------------------------------------------------------------------------------

def test_status_lists_other_tools_enrolments_and_whether_adopt_can_take_them(
        disk: Path, key_file: Path, tpm: Swtpm) -> None:
    systemd_enroll(disk, key_file, tpm, pcrs="7")
    clevis_bind(disk, tpm)
    recovery = subprocess.run(["systemd-cryptenroll", f"--unlock-key-file={key_file}", "--recovery-key", str(disk)],
                              capture_output=True)
    assert recovery.returncode == 0, recovery.stderr.decode()
    fido2 = {"type": "systemd-fido2", "keyslots": ["0"], "fido2-credential": "AAAA", "fido2-salt": "AAAA",
             "fido2-rp": "io.systemd.cryptsetup", "fido2-clientPin-required": False}
    subprocess.run(["cryptsetup", "token", "import", "--json-file", "-", str(disk)], input=json.dumps(fido2).encode(),
                   check=True)
    tang = _clevis_token({"alg": "ECDH-ES", "enc": "A256GCM", "clevis": {"pin": "tang", "tang": {"url": "http://t"}}})
    subprocess.run(["cryptsetup", "token", "import", "--json-file", "-", str(disk)], input=json.dumps(tang).encode(),
                   check=True)
    shown = run_cli("status", str(disk), "--json", tpm=tpm)
    assert shown.returncode == 0, shown.stderr.decode()
    entries = {e["type"] + "/" + e["pin_type"]: e for e in json.loads(shown.stdout)["other_enrolments"]}
    assert set(entries) == {"systemd-tpm2/", "clevis/tpm2", "systemd-recovery/", "systemd-fido2/", "clevis/tang"}
    assert entries["systemd-tpm2/"]["adopt_from"] == "systemd" and entries["systemd-tpm2/"]["pcrs"] == "sha256:7"
    assert entries["systemd-tpm2/"]["policy_satisfied"] is True
    assert entries["clevis/tpm2"]["adopt_from"] == "clevis" and entries["clevis/tpm2"]["pcrs"] == "sha256:0,7"
    assert entries["systemd-fido2/"]["adopt_from"] is None and "not a TPM" in entries["systemd-fido2/"]["why_not"]
    assert entries["clevis/tang"]["adopt_from"] is None and "not a TPM" in entries["clevis/tang"]["why_not"]
    assert entries["systemd-recovery/"]["adopt_from"] is None
    text = run_cli("status", str(disk), tpm=tpm).stdout.decode()
    assert "systemd-tpm2, keyslot 1, PCRs sha256:7, current PCR values satisfy its policy; 'adopt --from systemd' can " \
           "take it" in text, text
    assert "clevis (tpm2 pin), keyslot 2, PCRs sha256:0,7" in text and "'adopt --from clevis' can take it" in text, text
    assert "systemd-fido2, keyslot 0; adopt cannot take it: a FIDO2 security key, not a TPM" in text, text
    assert "clevis (tang pin), keyslot 0; adopt cannot take it: clevis token 4 is bound with the tang pin" in text, text
    tpm.extend(7)
    text = run_cli("status", str(disk), tpm=tpm).stdout.decode()
    assert "POLICY NOT SATISFIED; 'adopt --from systemd' can take it once its PCRs hold again" in text, text
