"""Updates of a machine that boots as installed systems do (OVMF -> systemd-boot -> kernel + initrd,
from an ESP): `predict`'s values against what the guest's TPM reads on the next boot, the events the
reason names, and re-sealing after an update nobody prepared.

A busybox image, three boots (the initrd's steps traced: tpm2_unlocker.debug is part of every boot's
command line, so measured alike):
1. enrol to sha256:0,2,4,7,9 (the passphrase typed), then `predict` with what the host staged on
   the ESP: another build of systemd-boot and of the kernel, the initrd with one more file, one more
   kernel parameter;
2. the update installed (the new files in the entry's place, the new options line): the policy fails,
   the reason names PCRs 4 and 9 and the events behind them; the passphrase boots; the root prints
   its event log and PCRs (as the kernel reads them) and re-seals;
3. unattended.

A dracut (systemd) image, three boots:
1. enrol;
2. a firmware update nobody prepared (another OVMF build): the reason names PCR 0 and the firmware
   volumes behind it, the passphrase boots; then a kernel package's install runs Debian's postinst.d
   hook, which re-seals with `reseal --predict` for its kernel and initramfs;
3. that kernel and initramfs boot with no prompt, at the PCR values predicted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from unlocker.measure import eventlog, events
from unlocker.measure.pe import authenticode_digests
from vm.esp import SYSTEMD_BOOT, build_esp
from vm.guest import PASSPHRASE, BootResult, Guest
from vm.images import Artifacts
from vm.measured import Measurement, measurement, predicted_values, prediction
from vm.rootfs import build_root_image
from vm.update import new_boot_loader, new_initrd, new_kernel

KIND = "mkinitcpio"
PCRS = "sha256:0,2,4,7,9"
DEBUG = "tpm2_unlocker.debug"
NEW_OPTION = "tpm2u.generation=2"
# what the prediction covers (the root asks for these); PCR 15 is the lock, extended after the log
PREDICTED = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 14)


@dataclass
class Staged:
    guest: Guest
    files: dict[str, Path]  # the update's new kernel, bootloader and initrd (host copies)
    cmdline: str  # the kernel command line of the boots after the update
    enrolment: BootResult
    before: Measurement
    predicted: dict[int, bytes]


@dataclass
class Updated:
    result: BootResult
    after: Measurement


@pytest.fixture(scope="module")
def staged(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Staged:
    """Boot 1: enrolment through systemd-boot, then the prediction of the staged update."""
    work = tmp_path_factory.mktemp("update")
    kernel, kind = artifacts.kernel, artifacts.kind(KIND)
    root = build_root_image(work, artifacts.binary, PASSPHRASE, kernel.moddir)
    esp = build_esp(work / "esp.img", kernel.version, kernel.vmlinuz, kind.initrd, "")
    guest = Guest(kernel, kind, root, work / "tpm", work / "boots", esp=esp, options=DEBUG)
    files = {"kernel": new_kernel(kernel.vmlinuz, work / "linux.new"),
             "bootloader": new_boot_loader(SYSTEMD_BOOT, work / "BOOTX64.EFI.new"),
             "initrd": new_initrd(kind.initrd, work / "initrd.new", work)}
    guest.options = f"{DEBUG} {NEW_OPTION}"
    cmdline = guest.loader_cmdline()
    guest.options = DEBUG
    esp.stage("linux", files["kernel"])
    esp.stage("BOOTX64.EFI", files["bootloader"])
    esp.stage("initrd", files["initrd"])
    esp.stage("cmdline", text=cmdline, work=work)
    result = guest.run_boot("enrol", extra=f"tpm2u.action=enroll tpm2u.pcrs={PCRS} tpm2u.measure=1 tpm2u.predict=1",
                            answers=[PASSPHRASE], action_passphrase=PASSPHRASE)
    assert "TPM2U-ACTION-RC=0" in result.log, f"enrolment failed: {guest.work / 'enrol.console.log'}"
    status, output = prediction(result.log)
    assert status == 0, output
    return Staged(guest, files, cmdline, result, measurement(result.log), predicted_values(output))


@pytest.fixture(scope="module")
def updated(staged: Staged) -> Updated:
    """Boot 2: the update installed as a package would (the entry's files replaced), no preparation."""
    guest = staged.guest
    assert guest.esp is not None
    guest.esp.install_kernel(staged.files["kernel"])
    guest.esp.install_loader(staged.files["bootloader"])
    guest.esp.install_initrd(staged.files["initrd"])
    guest.options = f"{DEBUG} {NEW_OPTION}"
    result = guest.run_boot("updated", extra="tpm2u.measure=1 tpm2u.action=reseal", answers=[PASSPHRASE],
                            action_passphrase=PASSPHRASE)
    assert result.root_uptime is not None, f"no root: {guest.work / 'updated.console.log'}"
    return Updated(result, measurement(result.log))


def test_systemd_boot_chain_measures_what_its_files_digest_to(staged: Staged, updated: Updated) -> None:
    """The live logs: the loader's and the kernel's events carry the Authenticode digests of the very
    files booted (every bank), the initrd's its file digest, the options line the one we wrote; and
    each log replays to the PCRs the guest's kernel read."""
    for boot, loader, kernel, initrd in ((staged.before, SYSTEMD_BOOT, staged.guest.kernel.vmlinuz,
                                          staged.guest.kind.initrd),
                                         (updated.after, staged.files["bootloader"], staged.files["kernel"],
                                          staged.files["initrd"])):
        log = eventlog.parse(boot.eventlog)
        by_role = {role: e for e in log.measured() if (role := events.roles(log).get(e.number))}
        banks = list(log.banks)
        assert by_role[events.BOOT_LOADER].digests == authenticode_digests(str(loader), banks)
        assert by_role[events.KERNEL].digests == authenticode_digests(str(kernel), banks)
        assert by_role[events.INITRD].digests["sha256"] == hashlib.sha256(initrd.read_bytes()).digest()
        for bank, values in boot.pcrs.items():
            assert eventlog.not_replaying(log, bank, values) == [10, 15], bank
    options = [e for e in eventlog.parse(updated.after.eventlog).measured(12)]
    assert options[0].data.decode("utf-16-le") == staged.cmdline + "\0"


def test_predicted_pcrs_equal_what_the_tpm_reads_on_the_updated_boot(staged: Staged, updated: Updated) -> None:
    now = updated.after.pcrs["sha256"]
    before = staged.before.pcrs["sha256"]
    assert {p: now[p] for p in PREDICTED} == {p: staged.predicted[p] for p in PREDICTED}
    # and the update did change what a prediction must get right
    assert {p for p in PREDICTED if now[p] != before[p]} == {4, 9, 12}


def test_unprepared_update_names_the_pcrs_and_the_events_behind_them_then_prompts(updated: Updated) -> None:
    assert updated.result.prompted
    assert "TPM unlock failed: PCRs 4, 9 changed since enrolment: " \
           r"PCR 4: EV_EFI_BOOT_SERVICES_APPLICATION (boot loader \EFI\BOOT\BOOTX64.EFI), " \
           r"EV_EFI_BOOT_SERVICES_APPLICATION (kernel \tpm2u" in updated.result.log
    assert "PCR 9: EV_EVENT_TAG (command line), EV_EVENT_TAG (initrd) (sha256 bank)" in updated.result.log


def test_reseal_after_the_update_makes_the_next_boot_unattended(staged: Staged, updated: Updated) -> None:
    assert "TPM2U-ACTION-RC=0" in updated.result.log and "re-sealed keyslot" in updated.result.log
    after = staged.guest.run_boot("after-reseal")
    assert not after.prompted, "after the re-seal the updated chain unlocks unattended"
    assert after.root_uptime is not None


@pytest.fixture(scope="module")
def dracut_through_systemd_boot(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Guest:
    work = tmp_path_factory.mktemp("update-dracut")
    kernel, kind = artifacts.kernel, artifacts.kind("dracut")
    root = build_root_image(work, artifacts.binary, PASSPHRASE, kernel.moddir)
    esp = build_esp(work / "esp.img", kernel.version, kernel.vmlinuz, kind.initrd, "")
    guest = Guest(kernel, kind, root, work / "tpm", work / "boots", esp=esp, options=DEBUG)
    # no machine key (the dracut image's root is writable, so enroll would make one): this scenario is
    # the re-seal with the passphrase (tests/vm/test_signed_update.py has the machine key's)
    result = guest.run_boot("enrol", extra=f"tpm2u.action=enroll tpm2u.pcrs={PCRS} tpm2u.signing=none",
                            answers=[PASSPHRASE], action_passphrase=PASSPHRASE)
    assert "TPM2U-ACTION-RC=0" in result.log, f"enrolment failed: {guest.work / 'enrol.console.log'}"
    return guest


@dataclass
class HookRun:
    guest: Guest
    result: BootResult
    files: dict[str, Path]  # the kernel package's new kernel and initramfs (host copies)
    predicted: dict[int, bytes]


@pytest.fixture(scope="module")
def firmware_update_then_kernel_hook(dracut_through_systemd_boot: Guest, tmp_path_factory: pytest.TempPathFactory) -> HookRun:
    """Boot 2: a firmware update nobody prepared (the passphrase typed); in the booted root a kernel
    package is installed: Debian's postinst.d hook re-seals for its kernel and initramfs (staged on
    the ESP as /boot would hold them), asking for the passphrase on the console."""
    guest = dracut_through_systemd_boot
    assert guest.esp is not None
    work = tmp_path_factory.mktemp("kernel-package")
    version = guest.kernel.version
    files = {"kernel": new_kernel(guest.kernel.vmlinuz, work / f"vmlinuz-{version}"),
             "initrd": new_initrd(guest.kind.initrd, work / f"initrd.img-{version}", work)}
    guest.esp.stage(f"vmlinuz-{version}", files["kernel"])
    guest.esp.stage(f"initrd.img-{version}", files["initrd"])
    result = guest.run_boot("firmware-update", firmware="2m", answers=[PASSPHRASE],
                            extra="tpm2u.hook=postinst tpm2u.predict=1",
                            root_prompts=[("Passphrase for /dev/vda: ", PASSPHRASE)])
    assert result.root_uptime is not None, f"no root: {guest.work / 'firmware-update.console.log'}"
    status, output = prediction(result.log)
    assert status == 0, output
    return HookRun(guest, result, files, predicted_values(output))


def test_firmware_update_in_a_systemd_initrd_names_pcr0s_firmware_volumes_then_prompts(
        firmware_update_then_kernel_hook: HookRun) -> None:
    result = firmware_update_then_kernel_hook.result
    assert result.prompted
    assert "TPM unlock failed: PCR 0 changed since enrolment: EV_EFI_PLATFORM_FIRMWARE_BLOB, " \
           "EV_EFI_PLATFORM_FIRMWARE_BLOB (sha256 bank)" in result.log


def test_the_kernel_packages_hook_reseals_for_its_kernel_and_initramfs(firmware_update_then_kernel_hook: HookRun) -> None:
    log = firmware_update_then_kernel_hook.result.log
    assert "TPM2U-HOOK-END rc=0" in log
    assert "could not re-seal" not in log
    assert "/dev/vda: re-sealed keyslot" in log


def test_kernel_update_with_the_post_hook_boots_with_no_prompt_at_the_predicted_pcrs(
        firmware_update_then_kernel_hook: HookRun) -> None:
    """Boot 3: the kernel package's files in the entry's place, the new firmware kept."""
    run = firmware_update_then_kernel_hook
    assert run.guest.esp is not None
    run.guest.esp.install_kernel(run.files["kernel"])
    run.guest.esp.install_initrd(run.files["initrd"])
    result = run.guest.run_boot("kernel-update", firmware="2m", extra="tpm2u.measure=1")
    assert not result.prompted, "the hook re-sealed for this kernel and initramfs: no passphrase"
    assert result.root_uptime is not None and "unlocked with the TPM" in result.log
    now = measurement(result.log).pcrs["sha256"]
    assert {p: now[p] for p in PREDICTED} == {p: run.predicted[p] for p in PREDICTED}
