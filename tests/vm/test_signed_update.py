"""Signed policies across a kernel update, through systemd-boot (a busybox image).

An admin's key, three boots:

1. enrol to sha256:0,2,4,7,9 with an admin's public key (--signing-key; the passphrase typed), then
   `predict` the PCRs of a boot with the update the host staged on the ESP (a new kernel and initrd);
2. off the machine, the admin approves those values: `sign-policy --pcrs N=HEX,...` with the private
   key, run on the host against the disk image and the guest's TPM state (as a distribution or an
   admin would, with no passphrase and no re-seal); the update installed: no prompt, at the PCR
   values predicted and approved;
3. another kernel nobody approved: the reason names PCRs 4 and 9 (the events behind them) and that no
   signature approves them; the passphrase is asked.

The machine's own key (the root on dm-crypt and writable, as installed: `enroll` makes it), three boots:
1. enrol; then a kernel package's install runs Debian's postinst.d hook, whose `reseal --predict`
   approves the current and the new chain with the machine key: no passphrase asked, none given;
2. the new kernel and initrd boot with no prompt, at the PCR values predicted; then the initramfs is
   rebuilt (update-initramfs's post-update.d hook approves it, no passphrase);
3. the rebuilt initramfs (PCR 9) boots with no prompt, at the PCR values predicted.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vm.esp import build_esp
from vm.guest import PASSPHRASE, BootResult, Guest
from vm.images import Artifacts
from vm.measured import measurement, predicted_values, prediction
from vm.rootfs import build_root_image
from vm.swtpm import Swtpm
from vm.update import new_initrd, new_kernel

KIND = "mkinitcpio"
PCRS = "sha256:0,2,4,7,9"
BOUND = (0, 2, 4, 7, 9)
DEBUG = "tpm2_unlocker.debug"


@dataclass
class Approved:
    guest: Guest
    enrolment: BootResult
    files: dict[str, Path]  # the update's kernel and initrd (host copies)
    predicted: dict[int, bytes]
    signing: subprocess.CompletedProcess[str]


def _admin_key(work: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = work / "admin.pem", work / "admin.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def approved(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Approved:
    """Boot 1 (enrol + predict), then the admin's signature for the predicted values (host)."""
    work = tmp_path_factory.mktemp("signed-update")
    kernel, kind = artifacts.kernel, artifacts.kind(KIND)
    root = build_root_image(work, artifacts.binary, PASSPHRASE, kernel.moddir)
    esp = build_esp(work / "esp.img", kernel.version, kernel.vmlinuz, kind.initrd, "")
    guest = Guest(kernel, kind, root, work / "tpm", work / "boots", esp=esp, options=DEBUG)
    private, public = _admin_key(work)
    esp.stage("signing.pub.pem", public)
    files = {"kernel": new_kernel(kernel.vmlinuz, work / "linux.new"),
             "initrd": new_initrd(kind.initrd, work / "initrd.new", work)}
    esp.stage("linux", files["kernel"])
    esp.stage("initrd", files["initrd"])
    words = f"tpm2u.action=enroll tpm2u.pcrs={PCRS} tpm2u.signing=1 tpm2u.measure=1 tpm2u.predict=1"
    enrolment = guest.run_boot("enrol", extra=words, answers=[PASSPHRASE], action_passphrase=PASSPHRASE)
    assert "TPM2U-ACTION-RC=0" in enrolment.log, f"enrolment failed: {guest.work / 'enrol.console.log'}"
    status, output = prediction(enrolment.log)
    assert status == 0, output
    predicted = predicted_values(output)
    values = ",".join(f"{p}={predicted[p].hex()}" for p in BOUND)
    with Swtpm(guest.tpm_state) as tpm:  # the guest's TPM, the guest powered off
        signing = subprocess.run([str(artifacts.binary), "sign-policy", str(root.path), "--key", str(private),
                                  "--pcrs", f"sha256:{values}", "--tcti", tpm.tcti],
                                 capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return Approved(guest, enrolment, files, predicted, signing)


def test_the_admin_signs_the_predicted_values_off_the_machine(approved: Approved) -> None:
    assert approved.signing.returncode == 0, approved.signing.stderr
    assert "approved the values of sha256:0,2,4,7,9" in approved.signing.stdout + approved.signing.stderr


@pytest.fixture(scope="module")
def updated(approved: Approved) -> BootResult:
    """Boot 2: the approved kernel and initrd in the entry's place."""
    guest = approved.guest
    assert guest.esp is not None
    guest.esp.install_kernel(approved.files["kernel"])
    guest.esp.install_initrd(approved.files["initrd"])
    return guest.run_boot("approved", extra="tpm2u.measure=1")


def test_an_approved_kernel_and_initrd_boot_with_no_prompt_at_the_approved_values(approved: Approved,
                                                                                 updated: BootResult) -> None:
    assert approved.signing.returncode == 0, approved.signing.stderr
    assert not updated.prompted, f"the signature approves this chain: {approved.guest.work / 'approved.console.log'}"
    assert updated.root_uptime is not None and "unlocked with the TPM" in updated.log
    now = measurement(updated.log).pcrs["sha256"]
    before = measurement(approved.enrolment.log).pcrs["sha256"]
    assert {p: now[p] for p in BOUND} == {p: approved.predicted[p] for p in BOUND}
    assert {p for p in BOUND if now[p] != before[p]} == {4, 9}, "the update changed what the enrolment sealed"


def test_a_kernel_nobody_approved_names_its_pcrs_and_asks_for_the_passphrase(approved: Approved, updated: BootResult,
                                                                         tmp_path: Path) -> None:
    """Boot 3: yet another build of the kernel, which nobody signed."""
    guest = approved.guest
    assert guest.esp is not None
    guest.esp.install_kernel(new_kernel(guest.kernel.vmlinuz, tmp_path / "linux.unapproved", generation=3))
    result = guest.run_boot("unapproved", answers=[PASSPHRASE])
    assert result.prompted, "no signature approves this kernel: the passphrase is asked"
    # changed since enrolment: the kernel (4) and the initrd the approved update brought (9)
    assert "TPM unlock failed: PCRs 4, 9 changed since enrolment: PCR 4: EV_EFI_BOOT_SERVICES_APPLICATION " \
           "(kernel" in result.log
    assert "and no signed policy approves the values of now" in result.log
    assert result.root_uptime is not None, "the passphrase still opens the disk"


@dataclass
class Unattended:
    guest: Guest
    install: BootResult  # enrolment, then the kernel package's install
    files: dict[str, Path]
    predicted: dict[int, bytes]


@pytest.fixture(scope="module")
def unattended(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Unattended:
    work = tmp_path_factory.mktemp("machine-key")
    kernel, kind = artifacts.kernel, artifacts.kind(KIND)
    root = build_root_image(work, artifacts.binary, PASSPHRASE, kernel.moddir)
    esp = build_esp(work / "esp.img", kernel.version, kernel.vmlinuz, kind.initrd, "")
    guest = Guest(kernel, kind, root, work / "tpm", work / "boots", esp=esp, options=DEBUG)
    files = {"kernel": new_kernel(kernel.vmlinuz, work / f"vmlinuz-{kernel.version}"),
             "initrd": new_initrd(kind.initrd, work / f"initrd.img-{kernel.version}", work)}
    esp.stage(f"vmlinuz-{kernel.version}", files["kernel"])
    esp.stage(f"initrd.img-{kernel.version}", files["initrd"])
    # no root_prompts: a passphrase asked by the hook's re-seal would never be answered (the boot
    # would time out waiting for the root's end)
    install = guest.run_boot("enrol-and-install", answers=[PASSPHRASE], action_passphrase=PASSPHRASE,
                             extra=f"tpm2u.rw=1 tpm2u.action=enroll tpm2u.pcrs={PCRS} tpm2u.hook=postinst "
                                   "tpm2u.predict=1")
    assert "TPM2U-ACTION-RC=0" in install.log, f"enrolment failed: {guest.work / 'enrol-and-install.console.log'}"
    status, output = prediction(install.log)
    assert status == 0, output
    return Unattended(guest, install, files, predicted_values(output))


def test_enroll_makes_the_machine_key_on_the_encrypted_root(unattended: Unattended) -> None:
    assert "kernel and initramfs updates will be approved by the machine key at " \
           "/var/lib/tpm2-unlocker/policy-key.pem" in unattended.install.log


def test_the_kernel_packages_hook_approves_the_update_with_the_machine_key_and_no_passphrase(
        unattended: Unattended) -> None:
    log = unattended.install.log
    assert "TPM2U-HOOK-END rc=0" in log
    assert "/dev/vda: approved the current chain and the next boot's with the machine key, no re-seal" in log
    assert "Passphrase for /dev/vda" not in log and "could not re-seal" not in log


@dataclass
class Rebuilt:
    updated: BootResult  # boot 2: the new kernel; then an initramfs rebuild's post-update hook
    initrd: Path
    predicted: dict[int, bytes]


@pytest.fixture(scope="module")
def rebuilt(unattended: Unattended) -> Rebuilt:
    """Boot 2: the kernel package's files in the entry's place; in the booted root the initramfs is
    rebuilt (update-initramfs: its post-update.d hook, only the initrd new, PCR 9)."""
    guest = unattended.guest
    assert guest.esp is not None
    guest.esp.install_kernel(unattended.files["kernel"])
    guest.esp.install_initrd(unattended.files["initrd"])
    version = guest.kernel.version
    initrd = new_initrd(unattended.files["initrd"], guest.work.parent / "initrd.rebuilt", guest.work.parent)
    guest.esp.stage(f"initrd.img-{version}", initrd)
    updated = guest.run_boot("updated", extra="tpm2u.measure=1 tpm2u.hook=post-update tpm2u.predict=1")
    status, output = prediction(updated.log)
    assert status == 0, output
    return Rebuilt(updated, initrd, predicted_values(output))


def test_the_updated_kernel_boots_with_no_prompt_at_the_predicted_pcrs(unattended: Unattended,
                                                                       rebuilt: Rebuilt) -> None:
    result = rebuilt.updated
    assert not result.prompted, f"the machine key approved this chain: {unattended.guest.work / 'updated.console.log'}"
    assert result.root_uptime is not None and "unlocked with the TPM" in result.log
    assert "unsealed (signed branch)" in result.log
    now = measurement(result.log).pcrs["sha256"]
    assert {p: now[p] for p in BOUND} == {p: unattended.predicted[p] for p in BOUND}


def test_an_initramfs_rebuild_is_approved_by_its_post_update_hook_and_boots_with_no_prompt(
        unattended: Unattended, rebuilt: Rebuilt) -> None:
    """Boot 3: the rebuilt initramfs (PCR 9 bound) in the entry's place."""
    log = rebuilt.updated.log
    assert "TPM2U-HOOK-END rc=0" in log
    assert "/dev/vda: approved the current chain and the next boot's with the machine key, no re-seal" in log
    guest = unattended.guest
    assert guest.esp is not None
    guest.esp.install_initrd(rebuilt.initrd)
    result = guest.run_boot("rebuilt", extra="tpm2u.measure=1")
    assert not result.prompted, f"the hook approved the rebuilt initramfs: {guest.work / 'rebuilt.console.log'}"
    assert result.root_uptime is not None and "unlocked with the TPM" in result.log
    now = measurement(result.log).pcrs["sha256"]
    before = measurement(rebuilt.updated.log).pcrs["sha256"]
    assert now[9] != before[9], "the rebuild changed PCR 9"
    assert {p: now[p] for p in BOUND} == {p: rebuilt.predicted[p] for p in BOUND}
