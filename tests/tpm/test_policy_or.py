"""PolicyOR enrolments on swtpm: every branch's digest computed in Python is the TPM's own (trial
sessions), the key unseals in each sealed chain and not in another, a branch may bind fewer PCRs,
every branch binds the lock PCR (and the PIN), and a token whose branches lie only makes the TPM
say no."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from helpers import PASSPHRASE, Swtpm, our_tokens, replace_token, run_cli

from unlocker.commands.enroll import prove, seal_into_token
from unlocker.commands.undo import Undo
from unlocker.luks import LuksDevice
from unlocker.pin import auth_value
from unlocker.secret import Secret
from unlocker.store import StoreSpec
from unlocker.token import PcrBranch, Token
from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import PcrSelection, PolicyPlan, branch_digest, policy_or

pytestmark = pytest.mark.tpm

SEL = PcrSelection.parse("sha256:0,4,7")
KERNEL_A, KERNEL_B = "aa" * 32, "bb" * 32


def extended(value: bytes, digest: str) -> bytes:
    """What TPM2_PCR_Extend makes of `value`: the chain's value computed in Python."""
    return hashlib.sha256(value + bytes.fromhex(digest)).digest()


def at_reset(tpm: Swtpm, selection: PcrSelection = SEL) -> dict[int, bytes]:
    with Tpm(tpm.tcti) as t:
        return t.read_pcrs(selection)


def enroll_chains(disk: Path, tpm: Swtpm, chains: list[PcrBranch], *, selection: PcrSelection = SEL,
                  store: str = "token", pin: bytes | None = None) -> Token:
    """Enrol `disk` to the current values of `selection` and to each of `chains`, proven as enroll
    proves (reseal --predict makes the same with the predicted chain)."""
    with Tpm(tpm.tcti) as t, Secret.random(32) as key:
        device = LuksDevice(str(disk))
        slot = device.free_keyslot()
        device.add_key(PASSPHRASE, key, slot)
        auth = auth_value(Secret(bytearray(pin))) if pin is not None else None
        with Undo("test enrolment") as undo:
            token = seal_into_token(t, device, key, slot, selection, StoreSpec.parse(store), undo, lock_pcr=15,
                                    auth=auth, more_branches=chains)
            prove(t, device, token, key, auth)
        return token


def unlock(disk: Path, tpm: Swtpm) -> tuple[int, str]:
    done = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
    return done.returncode, done.stderr.decode()


def test_branch_digests_computed_in_python_are_the_tpms_own(tpm: Swtpm) -> None:
    values = {p: bytes([p]) * 32 for p in range(24)}
    lock = PcrSelection.parse("sha256:15")
    plans = [
        PolicyPlan(PcrSelection.parse("sha256:0,2,4,7,15"), {**values, 15: bytes(32)}),
        PolicyPlan(PcrSelection.parse("sha256:4,15"), {4: values[4], 15: bytes(32)}, auth_value=True),
        PolicyPlan(PcrSelection.parse("sha256:0,1,2,3,4,5,6,7,8,9,10,11,12,13,14"), values),
        PolicyPlan(PcrSelection.parse("sha1:7,9"), {7: b"\x07" * 20, 9: b"\x09" * 20}, lock=lock),
    ]
    with Tpm(tpm.tcti) as t:
        digests = [t.trial_plan(plan) for plan in plans]
        assert digests == [branch_digest(plan) for plan in plans]
        assert len(set(digests)) == len(plans)
        for count in (2, 8):
            listed = tuple((digests * 2)[:count])
            assert t.trial_plan(PolicyPlan(plans[0].selection, plans[0].values, or_digests=listed)) == \
                policy_or(list(listed))


def test_a_key_sealed_to_two_chains_unseals_in_either_and_not_in_a_third(disk: Path, tpm: Swtpm) -> None:
    reset = at_reset(tpm)
    predicted = {**reset, 4: extended(reset[4], KERNEL_A)}
    token = enroll_chains(disk, tpm, [PcrBranch(SEL, predicted)])
    (doc,) = our_tokens(disk).values()
    assert len(doc["branch_policies"]) == 2 and doc["policy_hash"] == token.policy_hash.hex()
    code, said = unlock(disk, tpm)
    assert code == 0 and "re-sealed" not in said  # the chain as it is now: the enrolment stays as it is
    tpm.reboot()
    tpm.extend(4, digest=KERNEL_B)  # a chain nobody sealed to
    code, said = unlock(disk, tpm)
    assert code == 3
    assert "TPM unlock failed: PCR 4 changed since enrolment (sha256 bank; the closest of 2 sealed chains)" in said
    status = json.loads(run_cli("status", str(disk), "--json", tpm=tpm).stdout)["enrolments"][0]
    assert status["policy_satisfied"] is False and status["changed_pcrs"] == [4]
    tpm.reboot()
    tpm.extend(4, digest=KERNEL_A)  # the predicted chain, made real
    status = json.loads(run_cli("status", str(disk), "--json", tpm=tpm).stdout)["enrolments"][0]
    assert status["policy_satisfied"] is True and status["chains"] == 2
    text = run_cli("status", str(disk), tpm=tpm).stdout.decode()
    assert "PCRs sha256:0,4,7 (2 sealed chains): current PCR values satisfy the policy" in text
    assert "CHANGED" not in text  # the table is the chain the PCRs are on
    code, said = unlock(disk, tpm)
    # the boot on the newer chain drops the older one by itself (boot/refresh.py)
    assert code == 0 and "re-sealed to the chain this boot is on (the older chains are dropped)" in said, said
    assert "branches" not in next(iter(our_tokens(disk).values()))
    tpm.reboot()
    assert unlock(disk, tpm)[0] == 3  # the old chain is stale now
    tpm.reboot()
    tpm.extend(4, digest=KERNEL_A)
    assert unlock(disk, tpm)[0] == 0


def test_a_branch_may_bind_fewer_pcrs_than_another(disk: Path, tpm: Swtpm) -> None:
    reset = at_reset(tpm)
    only_kernel = PcrBranch(PcrSelection.parse("sha256:4"), {4: extended(reset[4], KERNEL_A)})
    enroll_chains(disk, tpm, [only_kernel])
    tpm.extend(0, digest=KERNEL_B)  # without the kernel's measurement neither branch holds
    code, said = unlock(disk, tpm)
    # one PCR off each chain: the older one is named
    assert code == 3 and "PCR 0 changed since enrolment (sha256 bank; the closest of 2 sealed chains)" in said
    tpm.reboot()
    tpm.extend(0, digest=KERNEL_B)  # a PCR the short branch leaves out changes
    tpm.extend(4, digest=KERNEL_A)
    assert unlock(disk, tpm)[0] == 0
    assert next(iter(our_tokens(disk).values()))["pcrs"] == [4]  # the short chain booted: the older one went


def test_eight_chains_each_unseal(disk: Path, tpm: Swtpm) -> None:
    reset = at_reset(tpm)
    kernels = [f"{i:02x}" * 32 for i in range(1, 8)]
    enroll_chains(disk, tpm, [PcrBranch(SEL, {**reset, 4: extended(reset[4], k)}) for k in kernels])
    assert len(next(iter(our_tokens(disk).values()))["branch_policies"]) == 8
    for kernel in (kernels[0], kernels[-1]):
        tpm.reboot()
        tpm.extend(4, digest=kernel)
        assert unlock(disk, tpm)[0] == 0


def test_every_branch_binds_the_lock_pcr(disk: Path, tpm: Swtpm) -> None:
    reset = at_reset(tpm)
    enroll_chains(disk, tpm, [PcrBranch(SEL, {**reset, 4: extended(reset[4], KERNEL_A)})])
    tpm.extend(4, digest=KERNEL_A)
    assert run_cli("lock", tpm=tpm).returncode == 0
    code, said = unlock(disk, tpm)
    assert code == 3 and "the key is locked for this boot (lock PCR 15 was extended" in said


@pytest.mark.parametrize("store", ["nv", "token"])
def test_every_branch_asks_for_the_pin(disk: Path, tpm: Swtpm, tmp_path: Path, store: str) -> None:
    import pexpect
    from helpers import cli_env, unlocker_command

    reset = at_reset(tpm)
    enroll_chains(disk, tpm, [PcrBranch(SEL, {**reset, 4: extended(reset[4], KERNEL_A)})], pin=b"1234",
                  store=store)
    (doc,) = our_tokens(disk).values()
    assert doc["pin"] is True and doc["store"] == store
    tpm.extend(4, digest=KERNEL_A)
    cmd = unlocker_command()
    for pin, expected in ((b"9999", "wrong TPM PIN"), (b"1234", "unlocked with the TPM")):
        child = pexpect.spawn(cmd[0], [*cmd[1:], "unlock", str(disk), "--test", "--tries", "0"],
                              env=cli_env(tpm.tcti), timeout=60)
        child.expect("Enter TPM PIN for ")
        child.sendline(pin)
        child.expect(expected)
        child.close()
    tpm.clear_lockout()


def test_branches_that_lie_only_make_the_tpm_refuse(disk: Path, tpm: Swtpm) -> None:
    """An attacker who writes the header can add a chain of their own to the token, or change the
    digests PolicyOR lists: the sealed object's policy is the TPM's, so the unseal fails, in one line."""
    reset = at_reset(tpm)
    enroll_chains(disk, tpm, [PcrBranch(SEL, {**reset, 4: extended(reset[4], KERNEL_A)})])
    ((tid, doc),) = our_tokens(disk).items()
    tpm.extend(4, digest=KERNEL_B)
    forged = json.loads(json.dumps(doc))
    forged["branches"][0]["pcr_values"]["4"] = extended(reset[4], KERNEL_B).hex()  # "my chain too"
    replace_token(disk, tid, forged)
    code, said = unlock(disk, tpm)
    assert code == 3 and said.count("\n") <= 2, said
    assert "TPM unlock failed: the TPM refused the PCR policy although the PCR values match the enrolment" in said
    forged["branch_policies"][1] = hashlib.sha256(b"mine").hexdigest()
    replace_token(disk, tid, forged)
    code, said = unlock(disk, tpm)
    assert code == 3 and "TPM unlock failed: " in said and "Traceback" not in said
