"""A guest = a kernel, one initramfs kind, a LUKS2 root image and a swtpm state, booted as scenarios need.

Enrolment happens inside a booted guest (the root's init runs `tpm2-unlocker enroll`), so the sealed
PCR values are the real measured-boot values of that image kind. Under OVMF's direct kernel boot the
initramfs changes PCR 4 as well as 9 (measured), so each initramfs kind is enrolled on its own.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pexpect

from .kernel import Kernel
from .machine import Boot, BootConfig, boot
from .rootfs import DONE_MARKER, ROOT_MARKER, RootImage

PASSPHRASE = b"correct horse battery"


@dataclass(frozen=True)
class ImageKind:
    """How one kind of initramfs names the disk and asks for the passphrase."""

    name: str
    initrd: Path
    prompt: str  # regex of the passphrase prompt on the console

    def cmdline(self, uuid: str) -> str:
        if self.name.startswith("mkinitcpio"):
            return f"cryptdevice=UUID={uuid}:root root=/dev/mapper/root"
        # systemd initrd: fail fast instead of waiting 90 s for a root that will not come
        return f"rd.luks.uuid={uuid} root=/dev/mapper/luks-{uuid} rd.emergency=poweroff " \
               "systemd.default_timeout_start_sec=30"


PROMPTS = {"mkinitcpio": r"Enter passphrase for /dev/vda: ", "mkinitcpio-bare": r"Enter passphrase for /dev/vda: ",
           "dracut": r"Please enter passphrase for disk",
           "dracut-shell": r"Enter passphrase for /"}


@dataclass
class BootResult:
    prompted: bool
    root_uptime: float | None
    log: str


@dataclass
class Guest:
    kernel: Kernel
    kind: ImageKind
    root: RootImage
    tpm_state: Path
    work: Path
    cpus: int = 1  # one emulated CPU unless a benchmark asks for more

    def clone(self, work: Path) -> Guest:
        """A copy of the disk and TPM state, so a scenario that changes them leaves others alone."""
        work.mkdir(parents=True, exist_ok=True)
        disk = work / "root.img"
        shutil.copy(self.root.path, disk)
        state = work / "tpm"
        if state.exists():
            shutil.rmtree(state)
        shutil.copytree(self.tpm_state, state)
        return Guest(self.kernel, self.kind, replace(self.root, path=disk), state, work, self.cpus)

    @contextmanager
    def boot(self, name: str, *, firmware: str = "4m", tpm: bool = True, extra: str = "") -> Iterator[Boot]:
        cfg = BootConfig(self.kernel, self.kind.initrd, self.root.path, self.kind.cmdline(self.root.uuid),
                         self.tpm_state if tpm else None, firmware=firmware, extra_cmdline=extra, cpus=self.cpus)
        with boot(cfg, self.work, name) as b:
            yield b

    def run_boot(self, name: str, *, firmware: str = "4m", tpm: bool = True, extra: str = "",
                 answers: list[bytes] | None = None, action_passphrase: bytes | None = None) -> BootResult:
        """Boot; type `answers` at successive passphrase prompts (none expected when None); wait for
        the root (or for the boot to fail once the answers are used up); return what happened."""
        prompted = False
        root_uptime = None
        answers = list(answers or [])
        with self.boot(name, firmware=firmware, tpm=tpm, extra=extra) as b:
            while True:
                i = b.expect([self.kind.prompt, ROOT_MARKER + r" uptime=([0-9.]+)", "TPM2U-INITRAMFS-FAILED",
                              r"Too many attempts|Failed to start \S*systemd-cr", pexpect.EOF], timeout=240)
                if i == 0:
                    prompted = True
                    if not answers:
                        break
                    b.type_line(answers.pop(0))
                    continue
                if i == 1:
                    root_uptime = float(b.console.match.group(1))
                    if action_passphrase is not None:
                        b.expect("TPM2U-PASSPHRASE-FOR-")
                        b.type_line(action_passphrase)
                    b.expect([DONE_MARKER], timeout=180)
                    b.wait_for_poweroff()
                break
        return BootResult(prompted, root_uptime, (self.work / f"{name}.console.log").read_bytes().decode(errors="replace"))

    def enroll(self, name: str = "enrol", store: str = "token", recovery_key: bool = False) -> BootResult:
        """First boot: passphrase at the initramfs, then `tpm2-unlocker enroll` in the root."""
        extra = f"tpm2u.action=enroll tpm2u.store={store}" + (" tpm2u.recovery=1" if recovery_key else "")
        result = self.run_boot(name, extra=extra, answers=[PASSPHRASE], action_passphrase=PASSPHRASE)
        if "TPM2U-ACTION-RC=0" not in result.log:
            raise AssertionError(f"enrolment in the guest failed; console log: {self.work / (name + '.console.log')}")
        return result
