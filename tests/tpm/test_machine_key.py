"""The machine key on swtpm: an enrolment whose signing key is the key at STATE_DIR/policy-key.pem is
approved by `reseal --predict` with signatures instead of a re-seal, so a kernel or initramfs update
on the booted system (lock PCR extended: nothing unseals) needs no passphrase. The current and the
predicted chains then unseal (the TPM checks the signature), older approvals are retired, and a
failure before the epoch moves leaves the old ones working. A machine key that is not the
enrolment's changes nothing. The key is made only where STATE_DIR is on dm-crypt (a fake sysfs here)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import Swtpm, cli_env, luks_json, our_tokens, run_cli, unlocker_command
from helpers import enroll_or_fail as enroll

from unlocker.commands import reseal as reseal_module
from unlocker.commands import sign_policy
from unlocker.commands.reseal import Approval, ResealOptions, reseal
from unlocker.errors import UsageError
from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import PcrSelection

pytestmark = pytest.mark.tpm

SEL = PcrSelection.parse("sha256:0,4,7")
KERNEL_A, KERNEL_B = "aa" * 32, "bb" * 32
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "eventlog"
SD_BOOT_LOG = FIXTURES / "systemd-boot-ovmf4m.bin"
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """STATE_DIR for this test (the CLI inherits it, and this process's calls read it)."""
    path = tmp_path / "state"
    monkeypatch.setenv("TPM2_UNLOCKER_STATE_DIR", str(path))
    return path


def place_machine_key(state: Path) -> Path:
    """A machine key written as the tool writes it; returns its public half's PEM (for --signing-key)."""
    state.mkdir(mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private = state / "policy-key.pem"
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public = state.parent / f"machine-{os.urandom(4).hex()}.pub.pem"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return public


def encrypted_sysfs(tmp_path: Path, on: Path) -> Path:
    """A sysfs where `on`'s filesystem is LVM on a dm-crypt mapping."""
    sysfs = tmp_path / "sys"
    crypt, lvm = sysfs / "devices/virtual/block/dm-0", sysfs / "devices/virtual/block/dm-1"
    for device, uuid in ((crypt, "CRYPT-LUKS2-00-root"), (lvm, "LVM-vg-root")):
        (device / "dm").mkdir(parents=True)
        (device / "slaves").mkdir()
        (device / "dm" / "uuid").write_text(uuid + "\n")
    (lvm / "slaves" / "dm-0").symlink_to("../../dm-0")
    (sysfs / "dev/block").mkdir(parents=True)
    st_dev = os.stat(on).st_dev
    (sysfs / "dev/block" / f"{os.major(st_dev)}:{os.minor(st_dev)}").symlink_to("../../devices/virtual/block/dm-1")
    return sysfs


@pytest.fixture
def encrypted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """STATE_DIR's filesystem seen on dm-crypt (a fake sysfs), as the machine key needs at each use."""
    sysfs = encrypted_sysfs(tmp_path, tmp_path)
    monkeypatch.setenv("TPM2_UNLOCKER_SYSFS", str(sysfs))
    return sysfs


def after(tpm: Swtpm, pcr: int, digest: str) -> dict[int, bytes]:
    """The values of SEL after a reset and one extension of `pcr` with `digest`, computed in Python."""
    with Tpm(tpm.tcti) as t:
        values = t.read_pcrs(SEL)
    values[pcr] = hashlib.sha256(values[pcr] + bytes.fromhex(digest)).digest()
    return values


def boot(tpm: Swtpm, kernel: str | None) -> None:
    tpm.reboot()
    if kernel is not None:
        tpm.extend(4, digest=kernel)


def unlock(disk: Path, tpm: Swtpm) -> tuple[int, str]:
    done = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
    return done.returncode, done.stderr.decode()


def signatures(disk: Path) -> dict[str, dict]:
    return {k: v for k, v in luks_json(disk)["tokens"].items() if v["type"] == "tpm2-unlocker-signature"}


@pytest.fixture
def no_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any passphrase asked fails the test."""
    def asked(*_: object) -> None:
        raise AssertionError("the passphrase was asked")

    monkeypatch.setattr(reseal_module, "existing_passphrase", asked)


def test_enroll_with_the_machine_key_refuses_plain_storage(disk: Path, key_file: Path, tpm: Swtpm,
                                                           state: Path) -> None:
    done = run_cli("enroll", str(disk), "--unlock-key-file", str(key_file), "--signing-key", "machine", tpm=tpm)
    assert done.returncode == 1 and done.stderr.count(b"\n") == 1, done.stderr
    assert f"--signing-key machine: {state} is not on encrypted storage (dm-crypt)".encode() in done.stderr
    assert our_tokens(disk) == {} and not state.exists()
    # not given: enrolled as before, with no signing key and no error
    done = enroll(disk, key_file, tpm, "--pcrs", str(SEL))
    assert "signed" not in next(iter(our_tokens(disk).values())) and b"machine key" not in done.stderr
    assert not state.exists()


@pytest.mark.parametrize("given", [None, "machine"])
def test_on_encrypted_storage_the_machine_key_is_made_and_taken(disk: Path, key_file: Path, tpm: Swtpm, state: Path,
                                                                tmp_path: Path, given: str | None) -> None:
    sysfs = encrypted_sysfs(tmp_path, tmp_path)
    args = ["--signing-key", given] if given else []
    done = run_cli("enroll", str(disk), "--unlock-key-file", str(key_file), "--pcrs", str(SEL), *args, tpm=tpm,
                   env={"TPM2_UNLOCKER_SYSFS": str(sysfs)})
    assert done.returncode == 0, done.stderr.decode()
    key = state / "policy-key.pem"
    assert (f"kernel and initramfs updates will be approved by the machine key at {key}, no passphrase"
            .encode()) in done.stderr
    assert b"BEGIN" not in done.stderr + done.stdout  # the key is never shown
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(state.stat().st_mode) == 0o700
    assert "signed" in next(iter(our_tokens(disk).values()))
    said = run_cli("status", str(disk), tpm=tpm).stdout.decode()
    assert f"signed policies by this machine's key ({key})" in said
    assert json.loads(run_cli("status", str(disk), "--json", tpm=tpm).stdout)["enrolments"][0]["signing_key"] == \
        "machine"


def test_enroll_opts_out_with_none(disk: Path, key_file: Path, tpm: Swtpm, state: Path, tmp_path: Path) -> None:
    sysfs = encrypted_sysfs(tmp_path, tmp_path)
    done = run_cli("enroll", str(disk), "--unlock-key-file", str(key_file), "--signing-key", "none", tpm=tpm,
                   env={"TPM2_UNLOCKER_SYSFS": str(sysfs)})
    assert done.returncode == 0, done.stderr.decode()
    assert "signed" not in next(iter(our_tokens(disk).values())) and not state.exists()


def test_reseal_predict_approves_with_the_machine_key_with_no_passphrase(
        disk: Path, key_file: Path, tpm: Swtpm, state: Path, tmp_path: Path, no_passphrase: None,
        encrypted: Path) -> None:
    public = place_machine_key(state)
    enroll(disk, key_file, tpm, "--pcrs", str(SEL), "--signing-key", str(public))
    (before,) = our_tokens(disk).values()
    slots = sorted(luks_json(disk)["keyslots"])
    # an approval of earlier (kernel B, since removed): retired by the next approval
    kernel_b = after(tpm, 4, KERNEL_B)[4].hex()
    assert run_cli("sign-policy", str(disk), "--key", str(state / "policy-key.pem"), "--pcrs",
                   f"sha256:0,4={kernel_b},7", tpm=tpm).returncode == 0
    (old,) = signatures(disk).values()
    assert run_cli("lock", tpm=tpm).returncode == 0  # the booted system: nothing unseals
    (done,) = reseal(ResealOptions(str(disk), None, None, tpm.tcti, predicted=(after(tpm, 4, KERNEL_A),)))
    assert isinstance(done, Approval) and len(done.signatures) == 2
    assert {s.epoch for s in done.signatures} == {old["epoch"] + 1}
    assert list(our_tokens(disk).values()) == [before]  # no re-seal
    assert sorted(luks_json(disk)["keyslots"]) == slots
    assert sorted(signatures(disk)) == sorted(str(s.token_id) for s in done.signatures)  # the old one went
    boot(tpm, None)  # the chain booted when the update was approved
    code, said = unlock(disk, tpm)
    assert code == 0, said
    boot(tpm, KERNEL_A)  # the predicted one: the TPM checks the signature
    code, said = unlock(disk, tpm)
    assert code == 0, said
    subprocess.run(["cryptsetup", "token", "import", "--json-file", "-", str(disk)], input=json.dumps(old).encode(),
                   check=True)  # the earlier approval put back
    boot(tpm, KERNEL_B)
    code, said = unlock(disk, tpm)
    assert code == 3 and "the signed policy for these PCR values is retired" in said, said


def test_a_failure_before_the_epoch_moves_leaves_the_old_approvals(
        disk: Path, key_file: Path, tpm: Swtpm, state: Path, monkeypatch: pytest.MonkeyPatch,
        no_passphrase: None, encrypted: Path) -> None:
    public = place_machine_key(state)
    enroll(disk, key_file, tpm, "--pcrs", str(SEL), "--signing-key", str(public))
    kernel_b = after(tpm, 4, KERNEL_B)[4].hex()
    assert run_cli("sign-policy", str(disk), "--key", str(state / "policy-key.pem"), "--pcrs",
                   f"sha256:0,4={kernel_b},7", tpm=tpm).returncode == 0
    old = signatures(disk)
    real, made = sign_policy.approve, []

    def second_fails(*args: object) -> object:
        if made:
            raise UsageError("the TPM went away")
        made.append(real(*args))  # type: ignore[arg-type]
        return made[-1]

    monkeypatch.setattr(sign_policy, "approve", second_fails)
    with pytest.raises(UsageError, match="the TPM went away"):
        reseal(ResealOptions(str(disk), None, None, tpm.tcti, predicted=(after(tpm, 4, KERNEL_A),)))
    assert made and signatures(disk) == old  # the first new signature was taken out again
    boot(tpm, KERNEL_B)
    code, said = unlock(disk, tpm)
    assert code == 0, said  # the epoch did not move: the old approval works


@pytest.mark.skipif(not SYSTEMD_BOOT.exists(), reason="systemd-boot-efi is not installed")
def test_the_hooks_command_approves_with_stdin_closed(disk: Path, key_file: Path, tpm: Swtpm, state: Path,
                                                       tmp_path: Path, encrypted: Path) -> None:
    """`reseal DEVICE --predict` as update-hooks/reseal-predict runs it (stdin /dev/null, no key
    file), on a swtpm holding a real boot's event log, after the lock."""
    from test_predict_replayed import replay_into

    replay_into(tpm, SD_BOOT_LOG)
    public = place_machine_key(state)
    enroll(disk, key_file, tpm, "--pcrs", str(SEL), "--signing-key", str(public))
    assert run_cli("lock", tpm=tpm).returncode == 0
    loader = tmp_path / "BOOTX64.EFI"
    loader.write_bytes(SYSTEMD_BOOT.read_bytes() + b"\0" * 512)
    with open(os.devnull, "rb") as devnull:
        done = subprocess.run([*unlocker_command(), "reseal", str(disk), "--predict", "--bootloader", str(loader)],
                              stdin=devnull, capture_output=True, timeout=60,
                              env=cli_env(tpm.tcti, {"TPM2_UNLOCKER_EVENTLOG": str(SD_BOOT_LOG)}))
    assert done.returncode == 0, done.stderr.decode()
    said = done.stderr.decode()
    assert said.count("\n") == 1 and re.fullmatch(
        f"tpm2-unlocker: {re.escape(str(disk))}: approved the current chain and the next boot's with the machine key, "
        r"no re-seal \(token 0: signature tokens 1, 2, epoch \d+\); older approvals are retired\n", said), said
    assert len(signatures(disk)) == 2
    boot(tpm, None)
    replay_into(tpm, SD_BOOT_LOG)
    code, said = unlock(disk, tpm)
    assert code == 0, said


def test_a_machine_key_not_the_enrolments_changes_nothing(disk: Path, key_file: Path, tpm: Swtpm, state: Path,
                                                           tmp_path: Path) -> None:
    from test_predict_replayed import replay_into

    replay_into(tpm, SD_BOOT_LOG)
    other = tmp_path / "other"
    other.mkdir()
    public = place_machine_key(other)  # the enrolment's key, kept elsewhere
    enroll(disk, key_file, tpm, "--pcrs", str(SEL), "--signing-key", str(public))
    place_machine_key(state)  # this machine's key: another one
    assert run_cli("lock", tpm=tpm).returncode == 0
    before, slots = our_tokens(disk), luks_json(disk)["keyslots"]
    args = ("reseal", str(disk), "--predict")
    env = {"TPM2_UNLOCKER_EVENTLOG": str(SD_BOOT_LOG)}
    mismatched = run_cli(*args, tpm=tpm, env=env)
    said = mismatched.stderr.decode()
    assert f"the machine key {state / 'policy-key.pem'} is not the signing key of token 0: re-sealing instead" in said
    assert "Traceback" not in said and mismatched.returncode != 0
    assert "the old TPM key does not unseal" in said  # it went on to what reseal always did
    assert our_tokens(disk) == before and luks_json(disk)["keyslots"] == slots and signatures(disk) == {}
    (state / "policy-key.pem").unlink()
    today = run_cli(*args, tpm=tpm, env=env)  # no machine key: what reseal always did
    assert today.returncode == mismatched.returncode
    assert today.stderr.decode().splitlines()[-1] == said.splitlines()[-1]
    assert our_tokens(disk) == before and signatures(disk) == {}
    said = run_cli("status", str(disk), tpm=tpm).stdout.decode()
    assert "signed policies by a key not on this machine (sign-policy --key)" in said


def test_a_machine_key_no_longer_on_encrypted_storage_approves_nothing(
        disk: Path, key_file: Path, tpm: Swtpm, state: Path, no_passphrase: None) -> None:
    """Checked at each use: a key moved or copied to plain storage is anyone's who holds that disk."""
    public = place_machine_key(state)
    enroll(disk, key_file, tpm, "--pcrs", str(SEL), "--signing-key", str(public))
    before = signatures(disk)
    tpm.extend(15, digest="15" * 32)
    with pytest.raises(UsageError, match="is no longer on encrypted storage: nothing approved"):
        reseal(ResealOptions(str(disk), None, None, tpm.tcti, predicted=(after(tpm, 4, KERNEL_A),)))
    assert signatures(disk) == before


def test_enroll_on_a_root_it_cannot_write_enrols_without_a_machine_key(disk: Path, key_file: Path, tpm: Swtpm,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """STATE_DIR on dm-crypt but not writable (the root mounted read-only): the default enrolment says
    why there is no machine key and enrols without one; `--signing-key machine` refuses in one line."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    state = blocker / "tpm2-unlocker"
    monkeypatch.setenv("TPM2_UNLOCKER_STATE_DIR", str(state))
    env = {"TPM2_UNLOCKER_SYSFS": str(encrypted_sysfs(tmp_path, tmp_path))}
    done = run_cli("enroll", str(disk), "--unlock-key-file", str(key_file), "--pcrs", str(SEL), "--signing-key",
                   "machine", tpm=tpm, env=env)
    assert done.returncode == 1 and done.stderr.count(b"\n") == 1, done.stderr
    assert f"cannot write the machine key in {state}: Not a directory".encode() in done.stderr
    assert our_tokens(disk) == {}
    done = run_cli("enroll", str(disk), "--unlock-key-file", str(key_file), "--pcrs", str(SEL), tpm=tpm, env=env)
    assert done.returncode == 0, done.stderr.decode()
    assert f"no machine key (cannot write the machine key in {state}: Not a directory): enrolling without a " \
           "signing key".encode() in done.stderr
    assert "signed" not in next(iter(our_tokens(disk).values()))
