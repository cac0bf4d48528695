"""One QEMU boot under TCG with OVMF (measured boot) and a swtpm, driven on the serial console."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pexpect

from .esp import Esp
from .kernel import Kernel
from .swtpm import GuestTpm

# Two OVMF builds: swapping them is a firmware update (PCR 0 changes; 2, 4, 7, 9 stay).
FIRMWARE = {
    "4m": ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    "2m": ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
}


@dataclass
class BootConfig:
    kernel: Kernel
    initrd: Path
    disk: Path
    cmdline: str
    tpm_state: Path | None  # None: no TPM device attached
    firmware: str = "4m"
    memory_mb: int = 1024
    cpus: int = 1
    extra_cmdline: str = ""
    # "direct": OVMF loads -kernel/-initrd itself (fast: the bench and most scenarios); "systemd-boot":
    # OVMF starts systemd-boot from `esp`, which boots the kernel and initrd laid out there (vm/esp.py)
    loader: str = "direct"
    esp: Esp | None = None

    @property
    def full_cmdline(self) -> str:
        return f"console=ttyS0 panic=-1 {self.cmdline} {self.extra_cmdline}".strip()


@dataclass
class Boot:
    """A running guest: `console` is the pexpect child on its serial console."""

    console: pexpect.spawn

    def expect(self, pattern: str | bytes | list, timeout: float = 120) -> int:
        return self.console.expect(pattern, timeout=timeout)

    def type_line(self, text: bytes) -> None:
        time.sleep(0.5)  # as a person would; also lets the prompt finish switching echo off
        self.console.send(text + b"\r")

    def wait_for_poweroff(self, timeout: float = 120) -> None:
        self.console.expect(pexpect.EOF, timeout=timeout)


def qemu_command(cfg: BootConfig, vars_copy: Path, tpm: GuestTpm | None) -> list[str]:
    code, _ = FIRMWARE[cfg.firmware]
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", str(cfg.memory_mb), "-smp", str(cfg.cpus),
            "-nographic", "-no-reboot", "-serial", "mon:stdio", "-nodefaults",
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
    if cfg.loader == "direct":
        argv += ["-kernel", str(cfg.kernel.vmlinuz), "-initrd", str(cfg.initrd), "-append", cfg.full_cmdline]
    if cfg.loader == "direct":
        argv += ["-drive", f"file={cfg.disk},if=virtio,format=raw"]
    elif cfg.loader == "systemd-boot":
        assert cfg.esp is not None, "a systemd-boot boot needs its ESP"
        # the root in the lower PCI slot stays /dev/vda in the guest (Linux probes in slot order); the
        # firmware boots the ESP's disk first
        argv += ["-drive", f"file={cfg.disk},if=none,id=root,format=raw",
                 "-device", "virtio-blk-pci,drive=root,addr=0x3",
                 "-drive", f"file={cfg.esp.path},if=none,id=esp,format=raw",
                 "-device", "virtio-blk-pci,drive=esp,addr=0x4,bootindex=0"]
    else:
        raise ValueError(f"unknown loader {cfg.loader}")
    if tpm is not None:
        argv += tpm.qemu_args()
    return argv


@contextmanager
def boot(cfg: BootConfig, work: Path, name: str) -> Iterator[Boot]:
    """Start the guest; yield it while its console is driven; always stop QEMU and swtpm."""
    work.mkdir(parents=True, exist_ok=True)
    _, vars_template = FIRMWARE[cfg.firmware]
    vars_copy = work / f"vars-{cfg.firmware}.fd"
    if not vars_copy.exists():
        shutil.copy(vars_template, vars_copy)
    if cfg.loader == "systemd-boot":
        assert cfg.esp is not None
        cfg.esp.write_entry(cfg.full_cmdline, work)  # this boot's command line, measured by the loader
    log_path = work / f"{name}.console.log"
    log = open(log_path, "wb")
    tpm = GuestTpm(cfg.tpm_state, work / "swtpm.sock") if cfg.tpm_state is not None else None
    try:
        if tpm is not None:
            tpm.__enter__()
        argv = qemu_command(cfg, vars_copy, tpm)
        # logfile_read: what the guest printed (logfile would also record what we type)
        child = pexpect.spawn(argv[0], argv[1:], timeout=240, echo=False)
        child.logfile_read = log
        try:
            yield Boot(child)
        finally:
            if child.isalive():
                child.terminate(force=True)
            child.close()
    finally:
        if tpm is not None:
            tpm.__exit__(None, None, None)
        log.close()
