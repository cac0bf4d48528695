"""prepare-update --firmware: a grace branch without the firmware's PCRs, held to one boot by the TPM
(the enrolment's NV counter and the TPM's reset count in its policy); that boot re-seals to the new
full values by itself and drops the grace. The firmware update is a different value of PCR 0 after
a reset, as OVMF builds give (the VM scenarios swap real ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pexpect
import pytest
from helpers import PASSPHRASE, Swtpm, cli_env, our_tokens, replace_token, run_cli, unlock_with_prompt, unlocker_command
from helpers import enroll_or_fail as enroll

from unlocker.commands.reseal import ResealOptions, reseal
from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import PcrSelection

pytestmark = pytest.mark.tpm

FIRMWARE_B, FIRMWARE_C, KERNEL = "b0" * 32, "c0" * 32, "4a" * 32


def boot(tpm: Swtpm, **measured: str) -> None:
    """A TPM reset, then the measurements of the boot chain that differ: pcr0=DIGEST, pcr4=..."""
    tpm.reboot()
    for name, digest in measured.items():
        tpm.extend(int(name[3:]), digest=digest)


def unlock(disk: Path, tpm: Swtpm) -> tuple[int, str]:
    done = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
    return done.returncode, done.stderr.decode()


def token(disk: Path) -> dict:
    (doc,) = our_tokens(disk).values()
    return doc


def counter_value(tpm: Swtpm, index: str) -> int:
    return int.from_bytes(tpm.tools("tpm2_nvread", index).stdout, "big")


def prepare(disk: Path, tpm: Swtpm, *extra: str) -> str:
    done = run_cli("prepare-update", "--firmware", str(disk), *extra, tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    assert b"ready for the firmware update: the next boot may change PCR 0, 2" in done.stderr
    return done.stderr.decode()


def test_the_grace_unseals_once_and_that_boot_reseals_to_the_new_firmware(disk: Path, key_file: Path,
                                                                          tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    prepare(disk, tpm)
    doc = token(disk)
    assert doc["grace"]["left_out"] == [0, 2] and len(doc["branch_policies"]) == 2
    counter = doc["counter"]
    assert counter == "0x01500030" and b"0x1500030" in tpm.tools("tpm2_getcap", "handles-nv-index").stdout
    public = tpm.tools("tpm2_nvreadpublic", counter).stdout.decode()
    assert "authwrite|nt=0x1|authread|no_da|written" in public  # nt=0x1: TPM_NT_COUNTER
    at_prepare = counter_value(tpm, counter)
    assert doc["grace"]["count"] == at_prepare
    boot(tpm, pcr0=FIRMWARE_B)  # the new firmware measures other code
    code, said = unlock(disk, tpm)
    assert code == 0, said
    assert "re-sealed to this boot's PCR values of sha256:0,2,4,7 (the firmware update's one-boot grace is spent)" \
        in said
    doc = token(disk)
    assert "grace" not in doc and "branches" not in doc and doc["counter"] == counter
    assert counter_value(tpm, counter) == at_prepare + 1
    boot(tpm, pcr0=FIRMWARE_B)  # bound to the new firmware's values now
    assert unlock(disk, tpm)[0] == 0
    boot(tpm, pcr0=FIRMWARE_C)  # a third firmware is not
    code, said = unlock(disk, tpm)
    assert code == 3 and "PCR 0 changed since enrolment" in said


def test_a_spent_grace_put_back_in_the_header_is_refused_by_the_tpm(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    """The one boot is the TPM's rule, not only ours: the old token (grace and all) written back
    into the header still names a counter value the TPM no longer has."""
    enroll(disk, key_file, tpm)
    prepare(disk, tpm)
    (spent,) = our_tokens(disk).values()
    boot(tpm, pcr0=FIRMWARE_B)
    assert unlock(disk, tpm)[0] == 0
    assert "grace" not in token(disk)
    ((tid, fresh),) = our_tokens(disk).items()
    assert fresh["keyslots"] == spent["keyslots"]  # the boot's re-seal kept the keyslot
    replace_token(disk, tid, spent)
    boot(tpm, pcr0=FIRMWARE_C)
    code, said = unlock(disk, tpm)
    assert code == 3, said
    assert "TPM unlock failed: the firmware update's one-boot grace was used already (NV counter" in said
    assert said.count("\n") == 2, said  # the reason and its hint, nothing else
    tpm.tools("tpm2_nvundefine", spent["counter"])  # someone removes the counter: no unseal either
    code, said = unlock(disk, tpm)
    assert code == 3 and "the firmware update's one-boot grace is refused (NV counter" in said, said


def test_a_counter_incremented_by_anyone_ends_the_grace_at_the_prompt(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    prepare(disk, tpm)
    counter = token(disk)["counter"]
    tpm.tools("tpm2_nvincrement", counter)  # anyone may: it only ends the grace
    boot(tpm, pcr0=FIRMWARE_B)
    status = unlock_with_prompt(disk, tpm.tcti, "the firmware update's one-boot grace was used already", PASSPHRASE)
    assert status == 0
    code, said = unlock(disk, tpm)
    assert code == 3 and said.count("\n") == 2 and "Traceback" not in said


def test_an_unused_grace_ends_after_its_boots(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    prepare(disk, tpm, "--boots", "1")
    tpm.reboot()  # the one boot it was given, spent on the old firmware
    boot(tpm, pcr0=FIRMWARE_B)
    code, said = unlock(disk, tpm)
    assert code == 3 and "the firmware update's grace has expired" in said


def test_the_grace_still_binds_the_rest_of_the_chain(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    prepare(disk, tpm)
    boot(tpm, pcr0=FIRMWARE_B, pcr4=KERNEL)
    code, said = unlock(disk, tpm)
    assert code == 3 and "PCRs 0, 4 changed since enrolment" in said
    assert "grace" in token(disk)  # nothing was used


def test_secure_boot_leaves_out_pcr_7_too_and_the_old_firmware_still_boots(disk: Path, key_file: Path,
                                                                          tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    prepare(disk, tpm, "--secure-boot")
    assert token(disk)["grace"]["left_out"] == [0, 2, 7]
    boot(tpm)  # the update did not happen yet: the full chain, the grace untouched
    code, said = unlock(disk, tpm)
    assert code == 0 and "re-sealed" not in said and "grace" in token(disk)
    boot(tpm, pcr0=FIRMWARE_B, pcr7=FIRMWARE_C)
    assert unlock(disk, tpm)[0] == 0
    assert "grace" not in token(disk)


def test_a_kernel_reseal_before_the_firmware_boot_keeps_the_grace(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    """The kernel's hook re-seals with a prediction after prepare-update: the grace stays, for the
    predicted chain too."""
    import hashlib

    enroll(disk, key_file, tpm)
    prepare(disk, tpm)
    selection = PcrSelection.parse("sha256:0,2,4,7")
    with Tpm(tpm.tcti) as t:
        predicted = t.read_pcrs(selection)
    predicted[4] = hashlib.sha256(predicted[4] + bytes.fromhex(KERNEL)).digest()
    reseal(ResealOptions(str(disk), None, None, tpm.tcti, predicted=(predicted,)))
    doc = token(disk)
    assert "grace" in doc and len(doc["branch_policies"]) == 4  # two chains, each with its grace
    boot(tpm, pcr0=FIRMWARE_B, pcr4=KERNEL)
    code, said = unlock(disk, tpm)
    assert code == 0 and "grace is spent" in said, said
    boot(tpm, pcr0=FIRMWARE_B, pcr4=KERNEL)
    assert unlock(disk, tpm)[0] == 0


def test_the_grace_boot_asks_the_pin_and_the_reseal_keeps_it(disk: Path, key_file: Path, tpm: Swtpm,
                                                             tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_bytes(b"2468\n")
    enroll(disk, key_file, tpm, "--with-pin", "--pin-file", str(pin_file))
    done = run_cli("prepare-update", "--firmware", str(disk), "--unlock-key-file", str(key_file),
                   "--pin-file", str(pin_file), tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    cmd = unlocker_command()
    for expected in ("grace is spent", "unlocked with the TPM"):
        boot(tpm, pcr0=FIRMWARE_B)
        child = pexpect.spawn(cmd[0], [*cmd[1:], "unlock", str(disk), "--test", "--tries", "0"],
                              env=cli_env(tpm.tcti), timeout=60)
        child.expect("Enter TPM PIN for ")
        child.sendline("2468")
        child.expect(expected)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    assert token(disk)["pin"] is True and "grace" not in token(disk)


@pytest.mark.parametrize(("enrolment", "extra", "message"), [
    (["--store", "nv"], [], b"prepare-update needs the token store (the boot re-seals it after the update), not a "
                            b"nv index 0x01500016"),
    (["--pcrs", "sha256:0,2"], [], b"the enrolment binds only the firmware's PCRs (sha256:0,2)"),
    (["--pcrs", "sha256:4,7"], [], b"the enrolment binds none of PCRs 0, 2: a firmware update changes nothing"),
    ([], ["--boots", "0"], b"--boots takes 1 to 16, not 0"),
])
def test_prepare_update_refuses_what_it_cannot_prepare(enrolment: list[str], extra: list[str], message: bytes,
                                                       disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, *enrolment)
    before = our_tokens(disk)
    done = run_cli("prepare-update", "--firmware", str(disk), *extra, tpm=tpm)
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert done.stderr.count(b"\n") <= 2
    assert our_tokens(disk) == before
    assert b"0x1500030" not in tpm.tools("tpm2_getcap", "handles-nv-index").stdout  # no counter left defined


def test_without_firmware_it_says_what_it_prepares(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    done = run_cli("prepare-update", str(disk), tpm=tpm)
    assert done.returncode == 1 and b"prepare-update needs --firmware" in done.stderr


def test_remove_takes_the_counter_too(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    prepare(disk, tpm)
    counter = token(disk)["counter"]
    assert tpm.tools("tpm2_nvreadpublic", counter, check=False).returncode == 0
    assert run_cli("remove", str(disk), "--unlock-key-file", str(key_file), tpm=tpm).returncode == 0
    assert tpm.tools("tpm2_nvreadpublic", counter, check=False).returncode != 0


def test_status_json_shows_the_grace(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    prepare(disk, tpm)
    boot(tpm, pcr0=FIRMWARE_B)
    entry = json.loads(run_cli("status", str(disk), "--json", tpm=tpm).stdout)["enrolments"][0]
    assert entry["policy_satisfied"] is True


def test_a_failed_reseal_at_boot_still_unlocks_and_the_grace_stays_for_the_next_boot(
        disk: Path, key_file: Path, tpm: Swtpm) -> None:
    """The boot's re-seal cannot write the header (every token id taken): the disk opens all the
    same, one line says so, the counter is not incremented and the next boot re-seals."""
    import subprocess

    enroll(disk, key_file, tpm)
    prepare(disk, tpm)
    counter = token(disk)["counter"]
    at_prepare = counter_value(tpm, counter)
    filler = json.dumps({"type": "filler", "keyslots": []}).encode()
    while subprocess.run(["cryptsetup", "token", "import", "--json-file", "-", str(disk)], input=filler,
                         capture_output=True).returncode == 0:
        pass
    boot(tpm, pcr0=FIRMWARE_B)
    code, said = unlock(disk, tpm)
    assert code == 0, said
    assert "could not re-seal to this boot's PCR values (CryptsetupError: " in said
    assert "its grace stays for the boots it was given, or run 'tpm2-unlocker reseal'" in said
    assert "grace" in token(disk) and counter_value(tpm, counter) == at_prepare
    for tid, doc in json.loads(subprocess.run(["cryptsetup", "luksDump", "--dump-json-metadata", str(disk)],
                                              capture_output=True, check=True).stdout)["tokens"].items():
        if doc["type"] == "filler":
            subprocess.run(["cryptsetup", "token", "remove", "--token-id", tid, str(disk)], check=True)
    boot(tpm, pcr0=FIRMWARE_B)
    code, said = unlock(disk, tpm)
    assert code == 0 and "grace is spent" in said, said
    assert counter_value(tpm, counter) == at_prepare + 1


def test_the_grace_branch_digest_computed_in_python_is_the_tpms_own(tpm: Swtpm) -> None:
    from unlocker.tpm.policy import EO_EQ, NvCheck, PolicyPlan, branch_digest

    with Tpm(tpm.tcti) as t:
        t.counter_define(0x01500031)
        name, count = t.nv_name(0x01500031), t.counter_read(0x01500031)
        selection = PcrSelection.parse("sha256:4,7,15")
        values = t.read_pcrs(selection)
        check = NvCheck(0x01500031, name, count.to_bytes(8, "big"), EO_EQ)
        plan = PolicyPlan(selection, values, nv_checks=(check,), reset_limit=t.reset_count() + 3, auth_value=True)
        assert t.trial_plan(plan) == branch_digest(plan)
        assert t.trial_plan(plan, current=True) == branch_digest(plan)  # the values are the ones read now
        other = PolicyPlan(selection, values, nv_checks=(check,), reset_limit=t.reset_count() + 4, auth_value=True)
        assert branch_digest(other) != branch_digest(plan)


def test_a_reseal_to_other_pcrs_keeps_what_is_left_of_the_grace(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    prepare(disk, tpm)
    assert run_cli("reseal", str(disk), "--pcrs", "sha256:2,4,7", tpm=tpm).returncode == 0
    assert token(disk)["grace"]["left_out"] == [2]
    assert run_cli("reseal", str(disk), "--pcrs", "sha256:4,7", tpm=tpm).returncode == 0
    assert "grace" not in token(disk)  # nothing of the firmware's is bound: no grace needed
    boot(tpm, pcr0=FIRMWARE_B)
    assert unlock(disk, tpm)[0] == 0
