"""Signed policies on swtpm: an enrolment with --signing-key unseals in PCR values its key approves
(sign-policy: a signature in the header, checked by the TPM through PolicyAuthorize) with no re-seal;
values nobody approved do not; a retired signature (the epoch counter advanced) does not, even put
back; a signature by another key or an altered one does not; the lock PCR and the PIN still hold."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from helpers import Swtpm, luks_json, our_tokens, run_cli
from helpers import enroll_or_fail as enroll

from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import PcrSelection

pytestmark = pytest.mark.tpm

SEL = "sha256:0,4,7"
KERNEL_A, KERNEL_B = "aa" * 32, "bb" * 32


def write_key(directory: Path, kind: str = "ecc") -> tuple[Path, Path]:
    """A private key and its public half, as PEM files (what `openssl genpkey` writes)."""
    key = ec.generate_private_key(ec.SECP256R1()) if kind == "ecc" else rsa.generate_private_key(65537, 2048)
    private, public = directory / f"{kind}.pem", directory / f"{kind}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def kernel_value(tpm: Swtpm, digest: str) -> str:
    """PCR 4 after a reset and the kernel's measurement `digest`, computed in Python."""
    with Tpm(tpm.tcti) as t:
        reset = t.read_pcrs(PcrSelection.parse("sha256:4"))[4]
    return hashlib.sha256(reset + bytes.fromhex(digest)).hexdigest()


def boot(tpm: Swtpm, kernel: str | None) -> None:
    tpm.reboot()
    if kernel is not None:
        tpm.extend(4, digest=kernel)


def unlock(disk: Path, tpm: Swtpm) -> tuple[int, str]:
    done = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
    return done.returncode, done.stderr.decode()


def sign(disk: Path, tpm: Swtpm, key: Path, *extra: str) -> str:
    done = run_cli("sign-policy", str(disk), "--key", str(key), *extra, tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    return done.stderr.decode()


def signatures(disk: Path) -> dict[str, dict]:
    return {k: v for k, v in luks_json(disk)["tokens"].items() if v["type"] == "tpm2-unlocker-signature"}


@pytest.mark.parametrize("kind", ["ecc", "rsa"])
def test_values_the_key_approves_unseal_with_no_reseal_and_others_do_not(disk: Path, key_file: Path, tpm: Swtpm,
                                                                         tmp_path: Path, kind: str) -> None:
    private, public = write_key(tmp_path, kind)
    done = enroll(disk, key_file, tpm, "--pcrs", SEL, "--signing-key", str(public))
    assert b"or values its signing key approves (sign-policy)" in done.stderr
    (doc,) = our_tokens(disk).values()
    # the reference binds the epoch counter and the PCRs: H("tpm2-unlocker" || its NV name || TPML_PCR_SELECTION)
    ref = hashlib.sha256(b"tpm2-unlocker" + bytes.fromhex(doc["signed"]["epoch_name"])
                         + PcrSelection.parse(SEL).marshal()).hexdigest()
    assert doc["signed"]["policy_ref"] == ref and len(doc["branch_policies"]) == 2
    before = json.dumps(doc, sort_keys=True)
    said = sign(disk, tpm, private, "--pcrs", f"sha256:0,4={kernel_value(tpm, KERNEL_A)},7")
    assert "approved the values of sha256:0,4,7 (signature token 1, epoch " in said
    assert json.dumps(next(iter(our_tokens(disk).values())), sort_keys=True) == before  # no re-seal
    boot(tpm, KERNEL_A)
    status = json.loads(run_cli("status", str(disk), "--json", tpm=tpm).stdout)["enrolments"][0]
    assert status["policy_satisfied"] is True  # by the signature: checked by the TPM, nothing unsealed
    code, said = unlock(disk, tpm)
    assert code == 0, said
    assert "re-sealed" not in said and json.dumps(next(iter(our_tokens(disk).values())), sort_keys=True) == before
    boot(tpm, KERNEL_B)  # nobody approved this kernel
    assert json.loads(run_cli("status", str(disk), "--json", tpm=tpm).stdout)["enrolments"][0]["policy_satisfied"] \
        is False
    code, said = unlock(disk, tpm)
    assert code == 3
    assert "PCR 4 changed since enrolment (sha256 bank), and no signed policy approves the values of now" in said
    assert "sign the new values ('tpm2-unlocker sign-policy')" in said


def test_the_values_of_now_and_predicted_ones_are_signed_by_default(disk: Path, key_file: Path, tpm: Swtpm,
                                                                   tmp_path: Path) -> None:
    private, public = write_key(tmp_path)
    enroll(disk, key_file, tpm, "--pcrs", SEL, "--signing-key", str(public))
    boot(tpm, KERNEL_A)
    assert unlock(disk, tpm)[0] == 3
    sign(disk, tpm, private)  # the booted system approves what it booted: the next such boot unlocks
    boot(tpm, KERNEL_A)
    assert unlock(disk, tpm)[0] == 0
    assert len(signatures(disk)) == 1


def test_a_retired_signature_does_not_unseal_even_put_back(disk: Path, key_file: Path, tpm: Swtpm,
                                                           tmp_path: Path) -> None:
    private, public = write_key(tmp_path)
    enroll(disk, key_file, tpm, "--pcrs", SEL, "--signing-key", str(public))
    sign(disk, tpm, private, "--pcrs", f"sha256:0,4={kernel_value(tpm, KERNEL_A)},7")
    (old,) = signatures(disk).values()
    said = sign(disk, tpm, private, "--pcrs", f"sha256:0,4={kernel_value(tpm, KERNEL_B)},7", "--retire-older")
    assert "older signatures are retired" in said
    assert [s["epoch"] for s in signatures(disk).values()] == [old["epoch"] + 1]  # the retired one is gone
    subprocess.run(["cryptsetup", "token", "import", "--json-file", "-", str(disk)], input=json.dumps(old).encode(),
                   check=True)  # an attacker replays it
    boot(tpm, KERNEL_A)
    code, said = unlock(disk, tpm)
    assert code == 3
    assert (f"the signed policy for these PCR values is retired (signed for epoch {old['epoch']}, the enrolment is "
            f"at epoch {old['epoch'] + 1})") in said
    assert said.count("\n") == 2
    boot(tpm, KERNEL_B)
    assert unlock(disk, tpm)[0] == 0


def test_a_signature_by_another_key_or_altered_is_refused(disk: Path, key_file: Path, tpm: Swtpm,
                                                          tmp_path: Path) -> None:
    private, public = write_key(tmp_path)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other, _ = write_key(other_dir)
    enroll(disk, key_file, tpm, "--pcrs", SEL, "--signing-key", str(public))
    done = run_cli("sign-policy", str(disk), "--key", str(other), tpm=tpm)
    assert done.returncode == 1 and f"{other} is not the signing key of token 0".encode() in done.stderr
    assert signatures(disk) == {}
    value_a = kernel_value(tpm, KERNEL_A)
    sign(disk, tpm, private, "--pcrs", f"sha256:0,4={value_a},7")
    ((tid, doc),) = signatures(disk).items()
    # the attacker's own kernel, with the approved policy and signature of another value left as they are
    forged = {**doc, "pcr_values": {**doc["pcr_values"], "4": kernel_value(tpm, KERNEL_B)}}
    subprocess.run(["cryptsetup", "token", "import", "--token-replace", "--token-id", tid, "--json-file", "-",
                    str(disk)], input=json.dumps(forged).encode(), check=True)
    boot(tpm, KERNEL_B)
    code, said = unlock(disk, tpm)
    assert code == 3 and "the TPM refused the signed policy for these PCR values" in said, said
    # and the signature left as it is over an altered digest
    forged_digest = bytearray(bytes.fromhex(doc["signed_digest"]))
    forged_digest[0] ^= 1
    altered = {**doc, "signed_digest": forged_digest.hex()}
    subprocess.run(["cryptsetup", "token", "import", "--token-replace", "--token-id", tid, "--json-file", "-",
                    str(disk)], input=json.dumps(altered).encode(), check=True)
    boot(tpm, KERNEL_A)
    code, said = unlock(disk, tpm)
    assert code == 3 and "the TPM refused the signed policy for these PCR values" in said, said


def test_a_signed_enrolment_still_binds_the_lock_and_the_pin(disk: Path, key_file: Path, tpm: Swtpm,
                                                             tmp_path: Path) -> None:
    import pexpect
    from helpers import cli_env, unlocker_command

    private, public = write_key(tmp_path)
    pin_file = tmp_path / "pin"
    pin_file.write_bytes(b"1357\n")
    enroll(disk, key_file, tpm, "--pcrs", SEL, "--signing-key", str(public), "--with-pin", "--pin-file", str(pin_file))
    sign(disk, tpm, private, "--pcrs", f"sha256:0,4={kernel_value(tpm, KERNEL_A)},7")
    boot(tpm, KERNEL_A)
    cmd = unlocker_command()
    child = pexpect.spawn(cmd[0], [*cmd[1:], "unlock", str(disk), "--test", "--tries", "0"], env=cli_env(tpm.tcti),
                          timeout=60)
    child.expect("Enter TPM PIN for ")
    child.sendline("1357")
    child.expect("unlocked with the TPM")
    child.expect(pexpect.EOF)
    child.close()
    assert run_cli("lock", tpm=tpm).returncode == 0
    code, said = unlock(disk, tpm)
    assert code == 3 and "the key is locked for this boot" in said, said


def test_reseal_and_prepare_update_keep_the_signing_key_and_remove_takes_the_epoch(disk: Path, key_file: Path,
                                                                                 tpm: Swtpm, tmp_path: Path) -> None:
    private, public = write_key(tmp_path)
    enroll(disk, key_file, tpm, "--pcrs", SEL, "--signing-key", str(public))
    epoch = next(iter(our_tokens(disk).values()))["signed"]["epoch"]
    assert run_cli("reseal", str(disk), tpm=tpm).returncode == 0
    assert next(iter(our_tokens(disk).values()))["signed"]["epoch"] == epoch
    sign(disk, tpm, private, "--pcrs", f"sha256:0,4={kernel_value(tpm, KERNEL_A)},7")
    boot(tpm, KERNEL_A)
    assert unlock(disk, tpm)[0] == 0
    assert tpm.tools("tpm2_nvreadpublic", epoch, check=False).returncode == 0
    assert run_cli("remove", str(disk), "--unlock-key-file", str(key_file), tpm=tpm).returncode == 0
    assert tpm.tools("tpm2_nvreadpublic", epoch, check=False).returncode != 0


def test_reseal_to_other_pcrs_binds_the_signing_key_to_them(disk: Path, key_file: Path, tpm: Swtpm,
                                                             tmp_path: Path) -> None:
    """A new --pcrs: the signed branch's reference binds the new selection; signatures for it unlock."""
    private, public = write_key(tmp_path)
    enroll(disk, key_file, tpm, "--pcrs", SEL, "--signing-key", str(public))
    done = run_cli("reseal", str(disk), "--pcrs", "sha256:0,4,7,9", tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    (doc,) = our_tokens(disk).values()
    assert doc["signed"]["pcrs"] == [0, 4, 7, 9]
    sign(disk, tpm, private, "--pcrs", f"sha256:0,4={kernel_value(tpm, KERNEL_A)},7,9")
    boot(tpm, KERNEL_A)
    assert unlock(disk, tpm)[0] == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--pcrs", "sha256:0,4=zz,7"], b"'4=zz' in --pcrs is not N=HEX"),
    (["--pcrs", "sha256:0,4=abcd,7"], b"the value given for PCR 4 has 2 bytes, sha256 has 32"),
    (["--pcrs", "sha1:0,4,7"], b"--pcrs names the sha1 bank, the enrolment binds sha256"),
    (["--pcrs", "sha256:0,15"], b"PCR 15 is the lock PCR: the enrolment binds it itself"),
    (["--kernel", "/x"], b"--kernel, --bootloader, --initrd and --cmdline go with --predict"),
    # the policy reference binds the enrolment's PCRs: a signature over fewer would approve more
    (["--pcrs", "sha256:0,4"], b"--pcrs must list the PCRs the enrolment binds, sha256:0,4,7"),
])
def test_sign_policy_refuses_bad_requests_in_one_line(args: list[str], message: bytes, disk: Path, key_file: Path,
                                                      tpm: Swtpm, tmp_path: Path) -> None:
    private, public = write_key(tmp_path)
    enroll(disk, key_file, tpm, "--pcrs", SEL, "--signing-key", str(public))
    done = run_cli("sign-policy", str(disk), "--key", str(private), *args, tpm=tpm)
    assert done.returncode == 1 and message in done.stderr and done.stderr.count(b"\n") == 1, done.stderr
    assert signatures(disk) == {}


def test_enroll_refuses_a_signing_key_it_cannot_use(disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    done = run_cli("enroll", str(disk), "--unlock-key-file", str(key_file), "--signing-key", str(bad), tpm=tpm)
    assert done.returncode == 1 and f"{bad} is not a PEM public key (RSA-2048 or ECC P-256)".encode() in done.stderr
    small = ec.generate_private_key(ec.SECP384R1()).public_key()
    bad.write_bytes(small.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    done = run_cli("enroll", str(disk), "--unlock-key-file", str(key_file), "--signing-key", str(bad), tpm=tpm)
    assert done.returncode == 1 and b"the signing key must be RSA-2048 or ECC P-256" in done.stderr
    assert our_tokens(disk) == {} and sorted(luks_json(disk)["keyslots"]) == ["0"]
    done = run_cli("sign-policy", str(disk), "--key", str(bad), tpm=tpm)
    assert done.returncode == 1
