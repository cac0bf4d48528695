"""The header is anyone's to write (an evil maid with the powered-off disk, a USB stick; no TPM secret,
no signing key). Attacks a second reader found on what commands took from it as if proven, each
now refused (commands/claims.py, boot/refresh.py, store.destroy, pending's clean-up, log.say):
- a chain or a signing key written into the header, carried over by the user's next `reseal`;
- a PCR selection written into the header, taken by the firmware grace's re-seal at boot;
- `sign-policy --retire-older` advancing a counter the header names instead of the enrolment's;
- `remove` undefining any NV index the header names; a stick's pending marker naming another
  disk's NV index, removed by `reseal STICK` with no passphrase;
- terminal escapes in a header field reaching the boot console before the prompt."""

from __future__ import annotations

import binascii
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from helpers import Swtpm, our_tokens, replace_token, run_cli
from helpers import enroll_or_fail as enroll

pytestmark = pytest.mark.tpm

FIRMWARE_B, FIRMWARE_C, FIRMWARE_D = "b0" * 32, "c0" * 32, "d0" * 32
EVIL_KERNEL = "ee" * 32  # the Authenticode digest of the attacker's boot loader or kernel
LOCK_PCR = 15


def boot(tpm: Swtpm, **measured: str) -> None:
    """A TPM reset, then the measurements that differ from a plain swtpm boot (pcr0=DIGEST...)."""
    tpm.reboot()
    for name, digest in measured.items():
        tpm.extend(int(name[3:]), digest=digest)


def booted(tpm: Swtpm, **measured: str) -> None:
    """A boot through our initramfs, as far as the booted system: the lock PCR is extended."""
    boot(tpm, **measured)
    tpm.extend(LOCK_PCR, digest="15" * 32)


def unlock(disk: Path, tpm: Swtpm) -> tuple[int, str]:
    done = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
    return done.returncode, done.stderr.decode()


def the_token(disk: Path) -> tuple[str, dict]:
    ((tid, doc),) = our_tokens(disk).items()
    return tid, doc


def extended(digest: str) -> str:
    return hashlib.sha256(bytes(32) + bytes.fromhex(digest)).hexdigest()


def test_reseal_refuses_a_chain_the_attacker_wrote_into_the_header(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    """reseal keeps the chains sealed after the current one: one the attacker added (their kernel's
    values, a junk digest so that it parses) is not the sealed key's, and the re-seal refuses."""
    enroll(disk, key_file, tpm)
    tid, doc = the_token(disk)
    evil = {**doc["pcr_values"], "4": extended(EVIL_KERNEL)}
    # the attacker's edit: one more chain (their kernel), one more (junk) digest so that it parses
    doc["branches"] = [{"pcrs": doc["pcrs"], "pcr_values": evil}]
    doc["branch_policies"] = [doc["policy_hash"], "ab" * 32]
    replace_token(disk, tid, doc)

    # the user's next boot prompts (the TPM refuses the list); booted with the passphrase, the user
    # does what the hint says: reseal
    boot(tpm)
    code, said = unlock(disk, tpm)
    assert code != 0, said
    booted(tpm)
    before = our_tokens(disk)
    done = run_cli("reseal", str(disk), "--unlock-key-file", str(key_file), tpm=tpm)
    assert done.returncode == 5, done.stderr.decode()
    assert f"token {tid} describes another policy than its sealed key carries" in done.stderr.decode()
    assert our_tokens(disk) == before, "nothing was re-sealed"
    boot(tpm, pcr4=EVIL_KERNEL)  # the attacker's kernel
    code, said = unlock(disk, tpm)
    assert code != 0, said


def test_the_grace_boot_does_not_reseal_to_a_selection_the_attacker_wrote(disk: Path, key_file: Path,
                                                                         tpm: Swtpm) -> None:
    """The grace unseal proves the grace branch, not the token's selection: an attacker who swaps the
    firmware PCRs 0,2 for PCR 23 (left out instead) would have the boot re-seal to sha256:4,7,23 for
    good. The boot re-seals only a token whose description digests to its policy, and spends the
    grace all the same: a later firmware prompts."""
    enroll(disk, key_file, tpm)
    done = run_cli("prepare-update", "--firmware", str(disk), tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    tid, doc = the_token(disk)
    assert doc["pcrs"] == [0, 2, 4, 7] and doc["grace"]["left_out"] == [0, 2]
    doc["pcrs"] = [4, 7, 23]
    doc["pcr_values"] = {"4": doc["pcr_values"]["4"], "7": doc["pcr_values"]["7"], "23": "ff" * 32}
    doc["grace"]["left_out"] = [23]
    doc.pop("pcr_events", None)
    replace_token(disk, tid, doc)

    boot(tpm, pcr0=FIRMWARE_B)  # the user's firmware update: the grace unseals, the boot does not re-seal
    code, said = unlock(disk, tpm)
    assert code == 0, said
    assert "its token describes another policy than its sealed key carries (was the header edited?): not " \
           "re-sealed at boot; the firmware update's one-boot grace is spent" in said, said
    assert "re-sealed to this boot's PCR values" not in said

    boot(tpm, pcr0=FIRMWARE_C, pcr2=FIRMWARE_D)  # a third firmware: PCRs 0 and 2 still bound
    code, said = unlock(disk, tpm)
    assert code == 3, said


def test_a_header_field_puts_no_terminal_escapes_on_the_boot_console(disk: Path, tpm: Swtpm) -> None:
    """The token parser quotes attacker strings (pcr_bank, unknown field names) into the line the
    boot says just before the passphrase prompt: control characters are shown as '?', so no escape
    sequence clears the screen or draws a prompt of its own."""
    fake = "\x1b[2J\x1b[HAll disks are unlocked. Enter your passphrase to continue:"
    token = {"type": "tpm2-unlocker", "keyslots": ["0"], "version": 1, "store": "token", "pcr_bank": fake}
    replace_token(disk, "3", token)
    code, said = unlock(disk, tpm)
    assert code == 5
    assert "\x1b" not in said and "?[2J?[HAll disks are unlocked" in said, said
    token = {"type": "tpm2-unlocker", "keyslots": ["0"], "version": 1, "store": "token", "\x1b]2;owned\x07": 1}
    replace_token(disk, "3", token)
    code, said = unlock(disk, tpm)
    assert code == 5 and "\x1b" not in said and "\x07" not in said and "?]2;owned?" in said, said


def test_sign_policy_refuses_an_epoch_counter_the_header_names(disk: Path, key_file: Path, tpm: Swtpm,
                                                               tmp_path: Path) -> None:
    """What a signature approves ends in PolicyNV(the epoch counter <= E); the sealed PolicyAuthorize
    binds which counter through its reference, H("tpm2-unlocker" || the counter's name). An attacker
    who rewrites signed.epoch/epoch_name to another counter before the admin's `sign-policy
    --retire-older` (so that it advances the wrong one, and the signature it meant to retire, a
    vulnerable kernel's, still unseals) gets a refusal; the admin's run on the real header retires it."""
    from test_signed_policy import KERNEL_A, KERNEL_B, SEL, kernel_value, signatures, write_key

    from unlocker.tpm.client import Tpm

    private, public = write_key(tmp_path)
    enroll(disk, key_file, tpm, "--pcrs", SEL, "--signing-key", str(public))
    done = run_cli("sign-policy", str(disk), "--key", str(private), "--pcrs",
                   f"sha256:0,4={kernel_value(tpm, KERNEL_A)},7", tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    (old,) = signatures(disk).values()  # kernel A: approved once, to be retired later; the attacker keeps a copy

    other = "0x01500050"
    tpm.tools("tpm2_nvdefine", other, "-C", "o", "-s", "8", "-a", "nt=0x1|authread|authwrite|no_da")
    tpm.tools("tpm2_nvincrement", other)
    with Tpm(tpm.tcti) as t:
        other_name = t.nv_name(int(other, 16)).hex()
        other_count = t.counter_read(int(other, 16))  # a new counter starts at the TPM's highest count
    tid, doc = the_token(disk)
    real = doc["signed"]["epoch"], doc["signed"]["epoch_name"]
    doc["signed"]["epoch"], doc["signed"]["epoch_name"] = other, other_name
    replace_token(disk, tid, doc)

    # the admin approves kernel B and retires every older signature (kernel A's): refused
    retire = ("sign-policy", str(disk), "--key", str(private), "--pcrs", f"sha256:0,4={kernel_value(tpm, KERNEL_B)},7",
              "--retire-older")
    done = run_cli(*retire, tpm=tpm)
    assert done.returncode == 5, done.stderr.decode()
    assert "its epoch counter or signed PCRs are not the ones its policy binds" in done.stderr.decode()
    with Tpm(tpm.tcti) as t:
        assert t.counter_read(int(other, 16)) == other_count, "the other counter did not move"
    # on the real header the run retires kernel A's signature, even put back afterwards
    doc["signed"]["epoch"], doc["signed"]["epoch_name"] = real
    replace_token(disk, tid, doc)
    done = run_cli(*retire, tpm=tpm)
    assert done.returncode == 0 and "older signatures are retired" in done.stderr.decode(), done.stderr.decode()
    subprocess.run(["cryptsetup", "token", "import", "--json-file", "-", str(disk)], input=json.dumps(old).encode(),
                   check=True)
    boot(tpm, pcr4=KERNEL_A)
    code, said = unlock(disk, tpm)
    assert code == 3 and "retired" in said, said


def test_remove_leaves_an_nv_index_the_header_names_that_is_not_the_enrolments(disk: Path, key_file: Path,
                                                                               tpm: Swtpm) -> None:
    """A header that names another tool's NV index as its store: `remove` removes the token and its
    keyslot, and leaves the index (not our attributes, not the token's policy), saying so."""
    other = "0x01500060"  # another tool's secret, or another disk's sealed key
    tpm.tools("tpm2_nvdefine", other, "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite|authread|authwrite")
    enroll(disk, key_file, tpm)
    tid, doc = the_token(disk)
    for field in ("tpm2_public", "tpm2_private"):
        doc.pop(field)
    doc["store"], doc["nv_index"] = "nv", other
    replace_token(disk, tid, doc)
    done = run_cli("remove", str(disk), "--unlock-key-file", str(key_file), tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    assert "NV index 0x01500060 stays: it is not this enrolment's sealed key" in done.stderr.decode()
    listed = tpm.tools("tpm2_getcap", "handles-nv-index").stdout.decode()
    assert "0x1500060" in listed, listed
    assert our_tokens(disk) == {}


def test_a_usb_sticks_pending_marker_does_not_make_reseal_undefine_another_disks_key(
        disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    """A stick with a pending marker naming the real disk's NV index: `reseal STICK` with no
    passphrase leaves the index (only a run given the stick's own passphrase removes what its
    markers name; the update hooks re-seal only disks open on the system)."""
    from helpers import make_luks_image

    enroll(disk, key_file, tpm, "--store", "nv")
    _, doc = the_token(disk)
    index = doc["nv_index"]
    boot(tpm)
    assert unlock(disk, tpm)[0] == 0

    stick = make_luks_image(tmp_path / "stick.img", passphrase=b"the attacker's")
    marker = {"type": "tpm2-unlocker-pending", "keyslots": [], "verb": "reseal", "committed": False,
              "new": {"store": "nv", "nv_index": index},
              "old": {"store": "token", "token": "0", "keyslot": "0"}}
    subprocess.run(["cryptsetup", "token", "import", "--json-file", "-", str(stick)],
                   input=json.dumps(marker).encode(), check=True)
    done = run_cli("reseal", str(stick), "--predict", tpm=tpm, input=b"")
    said = done.stderr.decode()
    assert f"removed NV index {index}" not in said and "stays until a run given this disk's passphrase" in said, said
    boot(tpm)
    code, said = unlock(disk, tpm)
    assert code == 0, said  # the real disk's TPM enrolment still unlocks


def test_reseal_refuses_a_signing_key_the_attacker_wrote_into_the_header(disk: Path, key_file: Path, tpm: Swtpm,
                                                                         tmp_path: Path) -> None:
    """A `signed` object with the attacker's own public key (its epoch the enrolment's grace counter),
    one more junk digest so that it parses: the user's `reseal` after the prompt would have given the
    new key a PolicyAuthorize branch for the attacker's key. It refuses: the sealed policy has none."""
    from test_signed_policy import kernel_value, write_key

    from unlocker.tpm.signing import key_name

    enroll(disk, key_file, tpm)  # no signing key: the owner never approved one
    assert run_cli("prepare-update", "--firmware", str(disk), tpm=tpm).returncode == 0
    tid, doc = the_token(disk)
    attacker_dir = tmp_path / "attacker"
    attacker_dir.mkdir()
    attacker_private, attacker_public = write_key(attacker_dir)
    from unlocker.commands.keys import PrivateKey

    public = PrivateKey(str(attacker_private)).public
    doc["signed"] = {"key": binascii.b2a_base64(public, newline=False).decode(), "key_name": key_name(public).hex(),
                     "policy_ref": "", "pcrs": [0, 2, 4, 7], "epoch": doc["counter"],
                     "epoch_name": doc["grace"]["counter_name"]}
    chains = len(doc["branch_policies"]) - 1  # [chain, grace]
    doc["branch_policies"] = [*doc["branch_policies"][:chains], "ab" * 32, *doc["branch_policies"][chains:]]
    replace_token(disk, tid, doc)

    boot(tpm)  # the TPM refuses the list: a prompt; the user re-seals once booted, as the hint says
    assert unlock(disk, tpm)[0] != 0
    booted(tpm)
    before = our_tokens(disk)
    done = run_cli("reseal", str(disk), "--unlock-key-file", str(key_file), tpm=tpm)
    assert done.returncode == 5, done.stderr.decode()
    assert "describes another policy than its sealed key carries" in done.stderr.decode()
    assert our_tokens(disk) == before
    # the attacker's signature for their kernel opens nothing
    done = run_cli("sign-policy", str(disk), "--key", str(attacker_private), "--pcrs",
                   f"sha256:0,2,4={kernel_value(tpm, EVIL_KERNEL)},7", tpm=tpm)
    assert done.returncode != 0, done.stderr.decode()
    boot(tpm, pcr4=EVIL_KERNEL)
    code, said = unlock(disk, tpm)
    assert code != 0, said


def test_remove_of_one_disk_leaves_another_disks_nv_key_and_epoch(disk: Path, key_file: Path, tpm: Swtpm,
                                                                  tmp_path: Path) -> None:
    """Disk A's header edited to name disk B's NV index, B's policy digest and B's epoch counter (all
    public): the admin's `remove A` takes A's token and keyslot, and leaves B's key and counter."""
    from helpers import make_luks_image
    from test_signed_policy import write_key

    other = make_luks_image(tmp_path / "b.img")
    enroll(other, key_file, tpm, "--store", "nv", "--signing-key", str(write_key(tmp_path)[1]))
    ((_, b),) = our_tokens(other).items()
    enroll(disk, key_file, tpm)
    tid, a = the_token(disk)
    for field in ("tpm2_public", "tpm2_private"):
        a.pop(field)
    a["store"], a["nv_index"], a["policy_hash"] = "nv", b["nv_index"], b["policy_hash"]
    a["counter"] = b["signed"]["epoch"]
    replace_token(disk, tid, a)
    done = run_cli("remove", str(disk), "--unlock-key-file", str(key_file), tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    said = done.stderr.decode()
    assert f"NV index {b['nv_index']} stays: it is not this enrolment's sealed key" in said, said
    assert f"NV counter {b['signed']['epoch']} stays: nothing binds it to this enrolment's sealed key" in said
    listed = tpm.tools("tpm2_getcap", "handles-nv-index").stdout.decode()
    assert all(hex(int(i, 16)) in listed for i in (b["nv_index"], b["signed"]["epoch"])), listed
    assert our_tokens(disk) == {}
    boot(tpm)
    assert run_cli("unlock", str(other), "--test", "--tries", "0", tpm=tpm).returncode == 0


def test_a_junk_signing_key_in_the_header_gives_one_line_and_remove_still_works(disk: Path, key_file: Path,
                                                                                tpm: Swtpm, tmp_path: Path) -> None:
    """`signed.key` is in no digest: three zero bytes in its place are refused in one line (no
    traceback), and `remove`, which the hint names, still takes the enrolment out."""
    from test_signed_policy import write_key

    enroll(disk, key_file, tpm, "--signing-key", str(write_key(tmp_path)[1]))
    tid, doc = the_token(disk)
    doc["signed"]["key"] = binascii.b2a_base64(bytes(3), newline=False).decode()
    replace_token(disk, tid, doc)
    done = run_cli("reseal", str(disk), "--unlock-key-file", str(key_file), tpm=tpm)
    assert done.returncode == 5, done.stderr.decode()
    assert "its signing key is not the one its policy names" in done.stderr.decode()
    assert b"Traceback" not in done.stderr and b"internal error" not in done.stderr
    done = run_cli("remove", str(disk), "--unlock-key-file", str(key_file), tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    assert our_tokens(disk) == {}


def test_status_shows_no_terminal_escapes_from_the_header(disk: Path, tpm: Swtpm) -> None:
    token = {"type": "tpm2-unlocker", "keyslots": ["0"], "version": 1, "store": "\x1b]52;c;b3duZWQ=\x07",
             "pcr_bank": "sha256"}
    replace_token(disk, "3", token)
    done = run_cli("status", str(disk), tpm=tpm)
    out = done.stdout.decode() + done.stderr.decode()
    assert "\x1b" not in out and "\x07" not in out, out
    assert "?]52;c;b3duZWQ=?" in out, out
