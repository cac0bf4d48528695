"""reseal with a predicted chain: sealed to PolicyOR(current chain, predicted chain), both boot and a
third does not; a later plain reseal drops the chains older than the one that booted and keeps those
still to come. The predicted values are made real by extending the PCRs in swtpm after a reset,
and computed in Python (predict_pcrs gives them at run time)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
from helpers import PASSPHRASE, Swtpm, luks_json, opens, our_tokens, run_cli
from helpers import enroll_or_fail as enroll

from unlocker.commands.reseal import ResealOptions, reseal
from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import PcrSelection

pytestmark = pytest.mark.tpm

SEL = PcrSelection.parse("sha256:0,4,7")
KERNEL_A, KERNEL_B = "aa" * 32, "bb" * 32


def after(tpm: Swtpm, pcr: int, digest: str) -> dict[int, bytes]:
    """The values of SEL after a reset and one extension of `pcr` with `digest`, computed in Python."""
    with Tpm(tpm.tcti) as t:
        values = t.read_pcrs(SEL)
    values[pcr] = hashlib.sha256(values[pcr] + bytes.fromhex(digest)).digest()
    return values


def unlocks(disk: Path, tpm: Swtpm) -> bool:
    return run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm).returncode == 0


def boot(tpm: Swtpm, kernel: str | None) -> None:
    """A reboot into the old chain (None) or one whose kernel measures `kernel` into PCR 4."""
    tpm.reboot()
    if kernel is not None:
        tpm.extend(4, digest=kernel)


def chains(disk: Path) -> int:
    (doc,) = our_tokens(disk).values()
    return 1 + len(doc.get("branches", []))


def test_a_key_resealed_to_a_predicted_chain_unseals_in_both_and_not_in_a_third(
        disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--pcrs", str(SEL))
    slots = sorted(luks_json(disk)["keyslots"])
    (token,) = reseal(ResealOptions(str(disk), None, None, tpm.tcti, predicted=(after(tpm, 4, KERNEL_A),)))
    assert len(token.more_branches) == 1 and chains(disk) == 2
    assert sorted(luks_json(disk)["keyslots"]) == slots, "the old key unsealed: its keyslot stays"
    assert unlocks(disk, tpm)
    boot(tpm, KERNEL_B)
    done = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
    assert done.returncode == 3
    assert b"PCR 4 changed since enrolment (sha256 bank; the closest of 2 sealed chains)" in done.stderr
    boot(tpm, KERNEL_A)
    assert unlocks(disk, tpm)


def test_a_plain_reseal_after_booting_the_predicted_chain_drops_the_older_one(
        disk: Path, key_file: Path, tpm: Swtpm) -> None:
    """The boot on the predicted chain drops the older one itself (tests/tpm/test_policy_or.py); a
    re-seal on the booted system, which has not unlocked through the boot, does the same."""
    enroll(disk, key_file, tpm, "--pcrs", str(SEL))
    reseal(ResealOptions(str(disk), None, None, tpm.tcti, predicted=(after(tpm, 4, KERNEL_A),)))
    boot(tpm, KERNEL_A)
    done = run_cli("reseal", str(disk), tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    assert b"re-sealed keyslot 1 to the current values of sha256:0,4,7 (LUKS2 token" in done.stderr
    assert chains(disk) == 1
    assert unlocks(disk, tpm)
    boot(tpm, None)  # the old chain is stale now
    assert not unlocks(disk, tpm)


def test_a_plain_reseal_on_the_old_chain_keeps_the_predicted_one_still_to_come(
        disk: Path, key_file: Path, tpm: Swtpm) -> None:
    """The machine booted the old chain again (the new kernel was not chosen yet): the predicted
    chain has not booted, so it is not stale."""
    enroll(disk, key_file, tpm, "--pcrs", str(SEL))
    reseal(ResealOptions(str(disk), None, None, tpm.tcti, predicted=(after(tpm, 4, KERNEL_A),)))
    boot(tpm, None)
    done = run_cli("reseal", str(disk), tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    assert b"and 1 further chain (PolicyOR)" in done.stderr and chains(disk) == 2
    boot(tpm, KERNEL_A)
    assert unlocks(disk, tpm)


def test_a_chain_nobody_predicted_leaves_only_the_current_one(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--pcrs", str(SEL))
    reseal(ResealOptions(str(disk), None, None, tpm.tcti, predicted=(after(tpm, 4, KERNEL_A),)))
    boot(tpm, KERNEL_B)
    done = run_cli("reseal", str(disk), "--unlock-key-file", str(key_file), tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    assert chains(disk) == 1 and unlocks(disk, tpm)


def test_reseal_with_a_prediction_while_locked_takes_the_passphrase_and_both_chains_boot(
        disk: Path, key_file: Path, tpm: Swtpm) -> None:
    """On a booted system the lock PCR is extended: the old key does not unseal, the passphrase
    makes a new keyslot, and the new key is sealed to both chains."""
    enroll(disk, key_file, tpm, "--pcrs", str(SEL))
    predicted = after(tpm, 4, KERNEL_A)
    assert run_cli("lock", tpm=tpm).returncode == 0
    (token,) = reseal(ResealOptions(str(disk), None, str(key_file), tpm.tcti, predicted=(predicted,)))
    assert token.keyslot == 2 and sorted(luks_json(disk)["keyslots"]) == ["0", "2"]
    boot(tpm, None)
    assert unlocks(disk, tpm)
    boot(tpm, KERNEL_A)
    assert unlocks(disk, tpm)
    assert opens(disk, PASSPHRASE, slot=0)


def test_predictions_past_eight_chains_drop_the_oldest(disk: Path, key_file: Path, tpm: Swtpm,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    enroll(disk, key_file, tpm, "--pcrs", str(SEL))
    kernels = [f"{i:02x}" * 32 for i in range(1, 10)]
    reseal(ResealOptions(str(disk), None, None, tpm.tcti, predicted=tuple(after(tpm, 4, k) for k in kernels)))
    assert "the 2 oldest predicted chain(s) are dropped" in capsys.readouterr().err
    assert chains(disk) == 8
    boot(tpm, kernels[1])
    assert not unlocks(disk, tpm)
    boot(tpm, kernels[-1])
    assert unlocks(disk, tpm)


def test_prediction_arguments_without_predict_are_refused(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    before = our_tokens(disk)
    done = run_cli("reseal", str(disk), "--kernel", "/boot/vmlinuz", tpm=tpm)
    assert done.returncode == 1
    assert done.stderr == b"tpm2-unlocker: --kernel, --bootloader, --initrd and --cmdline go with --predict\n"
    assert our_tokens(disk) == before


def test_a_prediction_that_fails_changes_nothing(disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    enroll(disk, key_file, tpm)
    before, slots = our_tokens(disk), luks_json(disk)["keyslots"]
    done = run_cli("reseal", str(disk), "--predict", "--kernel", str(tmp_path / "missing.efi"), tpm=tpm)
    assert done.returncode != 0 and done.stderr.count(b"\n") <= 2 and b"Traceback" not in done.stderr
    if importlib.util.find_spec("unlocker.measure") is None:
        assert b"this build cannot predict PCR values" in done.stderr and done.returncode == 1
    assert our_tokens(disk) == before and luks_json(disk)["keyslots"] == slots
