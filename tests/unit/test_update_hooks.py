"""The generators' hooks that re-seal for a new kernel or initramfs: the command line each runs, run by
the real generators where this Debian has them (kernel-install, run-parts for postinst.d and
post-update.d; mkinitcpio's post-hook contract by its documented arguments), and that no error of
ours ever fails an image build.

The program is a stub that records its arguments; the disks are real LUKS2 images (one with our
token, one without) that `blkid` (a stub: they are files, not block devices) names and the real
`cryptsetup luksDump` reads."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import make_luks_image

REPO = Path(__file__).resolve().parents[2]
RESEAL_PREDICT = REPO / "update-hooks" / "reseal-predict"
POSTINST = REPO / "update-hooks" / "postinst.d" / "zz-tpm2-unlocker"
POST_UPDATE = REPO / "update-hooks" / "post-update.d" / "tpm2-unlocker"
MKINITCPIO_POST = REPO / "mkinitcpio" / "post" / "tpm2-unlocker"
KERNEL_INSTALL_PLUGIN = REPO / "kernel-install" / "90-tpm2-unlocker.install"
LOADERENTRY = Path("/usr/lib/kernel/install.d/90-loaderentry.install")


class Machine:
    """A stub program, a stub blkid and bootctl on PATH, two disks, and the hooks' library folder."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.lib = tmp / "lib"
        self.lib.mkdir()
        shutil.copy(RESEAL_PREDICT, self.lib / "reseal-predict")
        self.log = tmp / "calls.log"
        self.enrolled = make_luks_image(tmp / "enrolled.img")
        subprocess.run(["cryptsetup", "token", "import", "--json-file", "-", str(self.enrolled)], check=True,
                       input=b'{"type":"tpm2-unlocker","keyslots":[]}')
        self.other = make_luks_image(tmp / "other.img")  # LUKS2, not ours
        self.devices = tmp / "devices"  # what the stub blkid lists
        self.devices.write_text(f"{self.enrolled}\n{self.other}\n")
        self._script("blkid", f'[ "$*" = "-t TYPE=crypto_LUKS -o device" ] || exit 2\ncat {self.devices}\n')
        # the enrolled disk open as "root": dm's uuid as cryptsetup sets it, in a sysfs of our own
        self.sys = tmp / "sys"
        uuid = subprocess.run(["cryptsetup", "luksUUID", str(self.enrolled)], capture_output=True, text=True,
                              check=True).stdout.strip()
        (self.sys / "block" / "dm-0" / "dm").mkdir(parents=True)
        (self.sys / "block" / "dm-0" / "dm" / "uuid").write_text(f"CRYPT-LUKS2-{uuid.replace('-', '')}-root\n")
        self._script("bootctl", 'exit "${BOOTCTL_RC:-1}"\n')
        self._script("tpm2-unlocker", 'printf "%s\\n" "$*" >>"$LOG"\n[ -n "${SAY:-}" ] && echo "$SAY" >&2\n'
                                      'exit "${RC:-0}"\n')

    def plug_in(self, name: str) -> Path:
        """Another disk with a token of ours, not open here (a USB stick)."""
        stick = make_luks_image(self.tmp / name)
        subprocess.run(["cryptsetup", "token", "import", "--json-file", "-", str(stick)], check=True,
                       input=b'{"type":"tpm2-unlocker","keyslots":[]}')
        with self.devices.open("a") as f:
            f.write(f"{stick}\n")
        return stick

    def _script(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": f"{self.bin}:/usr/sbin:/usr/bin:/sbin:/bin", "LOG": str(self.log),
                "TPM2_UNLOCKER_LIBDIR": str(self.lib), "TPM2_UNLOCKER_SYSFS": str(self.sys), **extra}

    def run(self, argv: list[str | Path], **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=self.env(**extra),
                              timeout=60, stdin=subprocess.DEVNULL)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


def test_reseal_predict_reseals_every_enrolled_disk_open_here_and_no_other(machine: Machine) -> None:
    stick = machine.plug_in("stick.img")
    done = machine.run([RESEAL_PREDICT, "kernel 6.1", "--kernel", "/boot/k", "--initrd", "/boot/i"])
    assert done.returncode == 0
    assert machine.calls() == [f"reseal {machine.enrolled} --predict --kernel /boot/k --initrd /boot/i"]
    # a disk with our token that is not open here (a USB stick: anyone's header) is only named
    assert done.stderr == f"tpm2-unlocker: {stick}: not open on this system: not re-sealed for the new " \
                          "kernel 6.1 (a disk plugged in is not trusted)\n"


def test_a_disk_named_through_a_link_is_found_under_its_mapping(machine: Machine) -> None:
    """blkid may name a device by a link (/dev/mapper/vg-lv for LUKS on LVM) that slaves/ calls by the
    kernel's name (dm-3): the hook compares the kernel's names."""
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", str(machine.enrolled)], capture_output=True,
                          text=True)
    if loop.returncode != 0:
        pytest.skip(f"no loop device here ({loop.stderr.strip()})")
    device = loop.stdout.strip()
    try:
        (machine.sys / "block" / "dm-0" / "slaves" / Path(device).name).mkdir(parents=True)
        link = machine.tmp / "vg-root"
        link.symlink_to(device)
        machine.devices.write_text(f"{link}\n")
        done = machine.run([RESEAL_PREDICT, "kernel 6.1", "--kernel", "/boot/k"])
        assert done.returncode == 0 and machine.calls() == [f"reseal {link} --predict --kernel /boot/k"], done.stderr
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def test_a_disk_with_the_uuid_of_an_open_one_but_not_under_it_is_not_resealed(machine: Machine) -> None:
    """A block device (a stick carrying a copy of the open disk's header, UUID and all) that is not the
    device under the mapping: not re-sealed."""
    (machine.sys / "block" / "dm-0" / "slaves" / "vda").mkdir(parents=True)
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", str(machine.enrolled)], capture_output=True,
                          text=True)
    if loop.returncode != 0:
        pytest.skip(f"no loop device here ({loop.stderr.strip()})")
    device = loop.stdout.strip()
    try:
        machine.devices.write_text(f"{device}\n")
        done = machine.run([RESEAL_PREDICT, "kernel 6.1", "--kernel", "/boot/k"])
        assert done.returncode == 0 and machine.calls() == []
        assert f"{device}: not open on this system" in done.stderr
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def test_a_failed_reseal_warns_with_the_reason_says_what_the_next_boot_does_and_never_fails(machine: Machine) -> None:
    done = machine.run([RESEAL_PREDICT, "kernel 6.1", "--kernel", "/boot/k"], RC="3",
                       SAY="tpm2-unlocker: the old key does not unseal (PCR 15 changed since enrolment)")
    assert done.returncode == 0
    lines = done.stderr.splitlines()
    assert lines == [
        f"tpm2-unlocker: {machine.enrolled}: could not re-seal for the new kernel 6.1 (tpm2-unlocker: the old key "
        "does not unseal (PCR 15 changed since enrolment)); the image is built all the same",
        f"tpm2-unlocker: {machine.enrolled}: the next boot asks for its passphrase once; then run "
        f"'tpm2-unlocker reseal {machine.enrolled}' in that boot",
    ]


def test_without_the_program_installed_the_hooks_do_nothing(machine: Machine) -> None:
    done = machine.run([RESEAL_PREDICT, "kernel 6.1", "--kernel", "/boot/k"], TPM2_UNLOCKER="/nonexistent/tpm2-unlocker")
    assert done.returncode == 0 and done.stderr == "" and machine.calls() == []


def test_a_program_that_crashes_or_hangs_up_does_not_fail_the_build(machine: Machine) -> None:
    machine._script("tpm2-unlocker", 'kill -9 $$\n')
    done = machine.run([RESEAL_PREDICT, "initramfs", "--initrd", "/boot/i"])
    assert done.returncode == 0
    assert "(no reason given)" in done.stderr


def test_debian_postinst_hook_run_by_run_parts_passes_the_kernel_and_its_initramfs(machine: Machine) -> None:
    hooks = machine.tmp / "postinst.d"
    hooks.mkdir()
    shutil.copy(POSTINST, hooks / POSTINST.name)
    boot = machine.tmp / "boot"
    boot.mkdir()
    (boot / "initrd.img-6.1.0-99-amd64").write_bytes(b"initrd")
    # as linux-image's postinst runs them (run-parts --arg=VERSION --arg=IMAGE)
    done = machine.run(["run-parts", "--exit-on-error", "--arg=6.1.0-99-amd64", f"--arg={boot}/vmlinuz-6.1.0-99-amd64",
                        hooks], TPM2_UNLOCKER_BOOTDIR=str(boot))
    assert done.returncode == 0, done.stderr
    assert machine.calls() == [f"reseal {machine.enrolled} --predict --kernel {boot}/vmlinuz-6.1.0-99-amd64 "
                               f"--initrd {boot}/initrd.img-6.1.0-99-amd64"]
    (boot / "initrd.img-6.1.0-99-amd64").unlink()  # no initramfs (yet): the kernel alone
    machine.log.unlink()
    machine.run(["run-parts", "--arg=6.1.0-99-amd64", f"--arg={boot}/vmlinuz-6.1.0-99-amd64", hooks],
                TPM2_UNLOCKER_BOOTDIR=str(boot))
    assert machine.calls() == [f"reseal {machine.enrolled} --predict --kernel {boot}/vmlinuz-6.1.0-99-amd64"]


def test_debian_post_update_hook_run_by_run_parts_passes_the_new_initramfs_and_its_kernel(machine: Machine) -> None:
    hooks = machine.tmp / "post-update.d"
    hooks.mkdir()
    shutil.copy(POST_UPDATE, hooks / POST_UPDATE.name)
    boot = machine.tmp / "boot"
    boot.mkdir()
    (boot / "vmlinuz-6.1.0-99-amd64").write_bytes(b"kernel")
    # as update-initramfs runs them (run-parts --arg=VERSION --arg=INITRD)
    done = machine.run(["run-parts", "--exit-on-error", "--arg=6.1.0-99-amd64", f"--arg={boot}/initrd.img-6.1.0-99-amd64",
                        hooks], TPM2_UNLOCKER_BOOTDIR=str(boot))
    assert done.returncode == 0, done.stderr
    assert machine.calls() == [f"reseal {machine.enrolled} --predict --kernel {boot}/vmlinuz-6.1.0-99-amd64 "
                               f"--initrd {boot}/initrd.img-6.1.0-99-amd64"]


@pytest.mark.parametrize("args, env, expected", [
    (["/boot/vmlinuz-linux", "/boot/initramfs-linux.img"], {}, "--kernel /boot/vmlinuz-linux --initrd /boot/initramfs-linux.img"),
    (["", "/boot/initramfs-linux.img"], {}, "--initrd /boot/initramfs-linux.img"),  # -k none: no kernel found
    (["/tmp/build/vmlinuz", "/boot/initramfs-linux.img"], {"KERNELDESTINATION": "/boot/vmlinuz-linux"},
     "--kernel /boot/vmlinuz-linux --initrd /boot/initramfs-linux.img"),  # the one booted
    (["/boot/vmlinuz-linux", "/boot/initramfs-linux.img", "/efi/EFI/Linux/arch-linux.efi"], {},
     "--kernel /efi/EFI/Linux/arch-linux.efi"),  # a UKI: the firmware measures it, the initramfs is inside
])
def test_mkinitcpio_post_hook_passes_what_the_firmware_will_measure(args: list[str], env: dict[str, str], expected: str,
                                                                      machine: Machine, tmp_path: Path) -> None:
    files = {"/boot/vmlinuz-linux", "/tmp/build/vmlinuz"}
    real = {a: tmp_path / a.strip("/").replace("/", "_") for a in files | {env.get("KERNELDESTINATION", "")} if a}
    for path in real.values():
        path.write_bytes(b"kernel")
    mapped = [str(real.get(a, a)) if a in real else a for a in args]
    extra = {k: str(real.get(v, v)) for k, v in env.items()}
    done = machine.run([MKINITCPIO_POST, *mapped], KERNELVERSION="6.9.1-arch1-1", **extra)
    assert done.returncode == 0, done.stderr
    for original, path in real.items():
        expected = expected.replace(original, str(path))
    assert machine.calls() == [f"reseal {machine.enrolled} --predict {expected}"]


def test_kernel_install_plugin_passes_the_entrys_files_and_systemd_boots_command_line(machine: Machine) -> None:
    """The real kernel-install (systemd 252) with its loader-entry plugin, then ours, on an ESP folder
    in the BLS layout (as systemd-boot installs it)."""
    esp, conf = machine.tmp / "esp", machine.tmp / "conf"
    (esp / "tpm2u").mkdir(parents=True)
    (esp / "loader" / "entries").mkdir(parents=True)
    conf.mkdir()
    (conf / "entry-token").write_text("tpm2u\n")
    (conf / "cmdline").write_text("root=/dev/mapper/root  rd.luks.uuid=1234 quiet\n")
    kernel, initrd = machine.tmp / "vmlinuz-6.1.0-99-amd64", machine.tmp / "initrd.img-6.1.0-99-amd64"
    kernel.write_bytes(b"kernel")
    initrd.write_bytes(b"initrd")
    plugin = machine.tmp / "plugins" / KERNEL_INSTALL_PLUGIN.name
    plugin.parent.mkdir()
    shutil.copy(KERNEL_INSTALL_PLUGIN, plugin)
    env = {"BOOT_ROOT": str(esp), "KERNEL_INSTALL_CONF_ROOT": str(conf), "MACHINE_ID": "0" * 31 + "1",
           "KERNEL_INSTALL_PLUGINS": f"{LOADERENTRY} {plugin}", "BOOTCTL_RC": "0"}
    done = machine.run(["kernel-install", "add", "6.1.0-99-amd64", kernel, initrd], **env)
    assert done.returncode == 0, done.stdout + done.stderr
    entry_dir = esp / "tpm2u" / "6.1.0-99-amd64"
    assert (entry_dir / "linux").read_bytes() == b"kernel"  # 90-loaderentry copied them: those are measured
    loader_path = str(entry_dir / initrd.name).replace("/", "\\")
    assert machine.calls() == [f"reseal {machine.enrolled} --predict --kernel {entry_dir}/linux "
                               f"--initrd {entry_dir}/{initrd.name} --cmdline initrd={loader_path} "
                               "root=/dev/mapper/root rd.luks.uuid=1234 quiet"]
    # with another boot loader than systemd-boot its command line is not systemd-boot's to predict
    machine.log.unlink()
    machine.run(["kernel-install", "add", "6.1.0-99-amd64", kernel, initrd], **{**env, "BOOTCTL_RC": "1"})
    assert machine.calls() == [f"reseal {machine.enrolled} --predict --kernel {entry_dir}/linux "
                               f"--initrd {entry_dir}/{initrd.name}"]
    # removal re-seals nothing
    machine.log.unlink()
    assert machine.run(["kernel-install", "remove", "6.1.0-99-amd64"], **env).returncode == 0
    assert machine.calls() == []


def test_hooks_are_posix_shell(machine: Machine) -> None:
    for hook in (RESEAL_PREDICT, POSTINST, POST_UPDATE, MKINITCPIO_POST, KERNEL_INSTALL_PLUGIN):
        assert hook.read_text().startswith("#!/bin/sh\n") and os.access(hook, os.X_OK)
        for shell in ("dash", "busybox sh" if shutil.which("busybox") else "dash"):
            done = subprocess.run([*shell.split(), "-n", str(hook)], capture_output=True, text=True)
            assert done.returncode == 0, f"{hook} under {shell}: {done.stderr}"
