"""A guest = a kernel, one initramfs kind, a LUKS2 root image and a swtpm state, booted as scenarios need.

Enrolment happens inside a booted guest (the root's init runs `tpm2-unlocker enroll`), so the sealed
PCR values are the real measured-boot values of that image kind. Under OVMF's direct kernel boot the
initramfs changes PCR 4 as well as 9 (measured), so each initramfs kind is enrolled on its own.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pexpect

from .esp import Esp
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
           "dracut": r"Please enter passphrase for disk", "dracut-break": r"Please enter passphrase for disk",
           "dracut-shell": r"Enter passphrase for /"}


# the root init's own words (tpm2u.action=...): on the ESP of a guest booted through systemd-boot
ROOT_WORDS = tuple(f"tpm2u.{w}=" for w in ("action", "store", "pcrs", "recovery", "pin", "measure", "predict", "hook",
                                              "signing", "rw"))
ACTION_FILE = "/tpm2u-action"


def _initrd_words(extra: str) -> str:
    return " ".join(w for w in extra.split() if not w.startswith(ROOT_WORDS))


# the TPM PIN prompt at boot: our own on the busybox image's console; in a systemd initrd
# systemd-ask-password's console agent prints the message (after a decoration of its own)
PIN_PROMPT = r"Enter TPM PIN for "


@dataclass
class BootResult:
    prompted: bool  # a passphrase prompt was seen
    root_uptime: float | None
    log: str
    pin_prompts: int = 0  # how many TPM PIN prompts were seen


@dataclass
class Guest:
    kernel: Kernel
    kind: ImageKind
    root: RootImage
    tpm_state: Path
    work: Path
    cpus: int = 1  # one emulated CPU unless a benchmark asks for more
    # None: OVMF boots the kernel directly; else systemd-boot from this ESP (a real machine's chain)
    esp: Esp | None = None
    # more kernel parameters on every boot (a change of the command line, as an update may make)
    options: str = ""

    @property
    def loader(self) -> str:
        return "direct" if self.esp is None else "systemd-boot"

    def clone(self, work: Path) -> Guest:
        """A copy of the disk, TPM state and ESP, so a scenario that changes them leaves others alone."""
        work.mkdir(parents=True, exist_ok=True)
        disk = work / "root.img"
        shutil.copy(self.root.path, disk)
        state = work / "tpm"
        if state.exists():
            shutil.rmtree(state)
        shutil.copytree(self.tpm_state, state)
        esp = self.esp.copy(work / "esp.img") if self.esp is not None else None
        return Guest(self.kernel, self.kind, replace(self.root, path=disk), state, work, self.cpus, esp, self.options)

    def cmdline(self) -> str:
        return f"{self.kind.cmdline(self.root.uuid)} {self.options}".strip()

    def loader_cmdline(self, extra: str = "") -> str:
        """The command line the kernel gets (and systemd-boot and the kernel's stub measure) on a
        boot through systemd-boot with `extra` (its words for the root's init left out)."""
        assert self.esp is not None
        cfg = BootConfig(self.kernel, self.kind.initrd, self.root.path, self.cmdline(), None,
                         extra_cmdline=_initrd_words(extra))
        return self.esp.loader_cmdline(cfg.full_cmdline)

    @contextmanager
    def boot(self, name: str, *, firmware: str = "4m", tpm: bool = True, extra: str = "") -> Iterator[Boot]:
        if self.esp is not None:
            # the root init's words go on the ESP, not on the command line the loader measures
            root_words = " ".join(w for w in extra.split() if w.startswith(ROOT_WORDS))
            self.esp.put_text(root_words + "\n", ACTION_FILE, self.work)
            extra = _initrd_words(extra)
        cfg = BootConfig(self.kernel, self.kind.initrd, self.root.path, self.cmdline(),
                         self.tpm_state if tpm else None, firmware=firmware, extra_cmdline=extra, cpus=self.cpus,
                         loader=self.loader, esp=self.esp)
        with boot(cfg, self.work, name) as b:
            yield b

    def run_boot(self, name: str, *, firmware: str = "4m", tpm: bool = True, extra: str = "",
                 answers: list[bytes] | None = None, action_passphrase: bytes | None = None,
                 pins: list[bytes] | None = None, action_pin: bytes | None = None,
                 type_after: float = 0, root_prompts: list[tuple[str, bytes]] | None = None) -> BootResult:
        """Boot; type `answers` at successive passphrase prompts (each `type_after` seconds after its
        prompt showed) and `pins` at successive TPM PIN prompts (none of either expected when None);
        wait for the root (or for the boot to fail once the answers are used up); return what
        happened. `action_passphrase` (and `action_pin`) answer the root init's own questions for a
        tpm2u.action; `root_prompts` (pattern, answer) what is asked after it (a hook's re-seal asking
        for the passphrase on the console)."""
        prompted = False
        pin_prompts = 0
        root_uptime = None
        answers = list(answers or [])
        pins = list(pins or [])
        with self.boot(name, firmware=firmware, tpm=tpm, extra=extra) as b:
            while True:
                i = b.expect([self.kind.prompt, ROOT_MARKER + r" uptime=([0-9.]+)", "TPM2U-INITRAMFS-FAILED",
                              r"Too many attempts|Failed to start \S*systemd-cr", pexpect.EOF, PIN_PROMPT],
                             timeout=240)
                if i == 0:
                    prompted = True
                    if not answers:
                        break
                    time.sleep(type_after)
                    b.type_line(answers.pop(0))
                    continue
                if i == 5:
                    pin_prompts += 1
                    if not pins:
                        break
                    b.type_line(pins.pop(0))
                    continue
                if i == 1:
                    root_uptime = float(b.console.match.group(1))
                    if action_passphrase is not None:
                        b.expect("TPM2U-PASSPHRASE-FOR-")
                        b.type_line(action_passphrase)
                    if action_pin is not None:
                        b.expect("TPM2U-PIN-FOR-")
                        b.type_line(action_pin)
                    for pattern, answer in root_prompts or []:
                        b.expect(pattern, timeout=180)
                        b.type_line(answer)
                    b.expect([DONE_MARKER], timeout=180)
                    b.wait_for_poweroff()
                break
        return BootResult(prompted, root_uptime, (self.work / f"{name}.console.log").read_bytes().decode(errors="replace"),
                          pin_prompts)

    def enroll(self, name: str = "enrol", store: str = "token", recovery_key: bool = False,
               pin: bytes | None = None) -> BootResult:
        """First boot: passphrase at the initramfs, then `tpm2-unlocker enroll` in the root (with
        `pin`: `--with-pin`, the PIN typed at the root init and handed over on a file descriptor)."""
        extra = f"tpm2u.action=enroll tpm2u.store={store}" + (" tpm2u.recovery=1" if recovery_key else "") \
            + (" tpm2u.pin=1" if pin is not None else "")
        result = self.run_boot(name, extra=extra, answers=[PASSPHRASE], action_passphrase=PASSPHRASE, action_pin=pin)
        if "TPM2U-ACTION-RC=0" not in result.log:
            raise AssertionError(f"enrolment in the guest failed; console log: {self.work / (name + '.console.log')}")
        return result
