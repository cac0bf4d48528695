"""An EFI system partition on a GPT disk image, booted through systemd-boot as an installed system boots.

OVMF finds no boot entry of its own for the disk and starts the removable-media path
\\EFI\\BOOT\\BOOTX64.EFI: Debian's systemd-boot (systemd-boot-efi). It reads loader/loader.conf
(timeout 0: no menu) and boots the one Type #1 entry: the kernel, the initrd and the options line,
laid out as kernel-install lays them out ($BOOT/ENTRY-TOKEN/KVER/linux, initrd;
loader/entries/ENTRY-TOKEN-KVER.conf). Built on the host with sfdisk and mtools: nothing is mounted.

Why systemd-boot rather than GRUB: its measurements are few and fixed (the firmware measures the
loader and the kernel it starts into PCR 4 with their Authenticode digests; the loader measures the
options line, the kernel's EFI stub the initrd it is handed), where GRUB measures every command it
runs and every file it reads into PCR 8/9, so a prediction would have to replay grub.cfg; and
Debian ships it signed-off as a plain EFI binary that needs no grub-mkimage step to build an image.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .tools import run

SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
# Fixed GUIDs and volume id: two ESPs built from the same files measure the same (OVMF measures the
# boot disk's GPT header and entries into PCR 5).
DISK_GUID = "5D1B9E4E-3F4B-4E0C-9A51-7A2D1C0F7E11"
PART_GUID = "0B3C1B0A-7C55-4C0C-8E3A-3C4B2F1E9D22"
VOLUME_ID = "7E577E57"
ENTRY_TOKEN = "tpm2u"
SECTOR = 512
PART_START = 2048  # sectors: 1 MiB, as partitioning tools align


@dataclass(frozen=True)
class Esp:
    """A disk image holding one GPT partition, the ESP, with systemd-boot and one loader entry."""

    path: Path
    kernel_version: str

    @property
    def target(self) -> str:
        """mtools' name of the partition: the image at the partition's byte offset."""
        return f"{self.path}@@{PART_START * SECTOR}"

    @property
    def kernel_path(self) -> str:
        """The kernel's path inside the ESP (the entry's `linux`)."""
        return f"/{ENTRY_TOKEN}/{self.kernel_version}/linux"

    @property
    def initrd_path(self) -> str:
        return f"/{ENTRY_TOKEN}/{self.kernel_version}/initrd"

    @property
    def entry_path(self) -> str:
        return f"/loader/entries/{ENTRY_TOKEN}-{self.kernel_version}.conf"

    def put(self, source: Path, dest: str) -> None:
        """Copy a host file into the ESP at `dest` (replacing it)."""
        run(["mcopy", "-o", "-i", self.target, source, f"::{dest}"])

    def put_text(self, text: str, dest: str, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        tmp = work / (Path(dest).name + ".tmp")
        tmp.write_text(text)
        self.put(tmp, dest)
        tmp.unlink()

    def read(self, source: str) -> bytes:
        return run(["mtype", "-i", self.target, f"::{source}"]).stdout

    def write_entry(self, options: str, work: Path) -> None:
        """The Type #1 entry with this options line (the kernel command line the loader passes and measures)."""
        entry = (f"title tpm2-unlocker test {self.kernel_version}\nversion {self.kernel_version}\n"
                 f"linux {self.kernel_path}\ninitrd {self.initrd_path}\noptions {options}\n")
        self.put_text(entry, self.entry_path, work)

    def loader_cmdline(self, options: str) -> str:
        """The command line systemd-boot (v252) hands the kernel for the entry's options: an
        initrd= word per initrd line first (backslashes, as the firmware's paths)."""
        return f"initrd={self.initrd_path.replace('/', chr(92))} {options}"

    def install_kernel(self, vmlinuz: Path) -> None:
        self.put(vmlinuz, self.kernel_path)

    def install_initrd(self, initrd: Path) -> None:
        self.put(initrd, self.initrd_path)

    def install_loader(self, loader: Path) -> None:
        self.put(loader, "/EFI/BOOT/BOOTX64.EFI")

    def stage(self, name: str, source: Path | None = None, text: str | None = None, work: Path | None = None) -> str:
        """Put an update's new file (or text) in the ESP's /staged folder, where the guest's root finds
        it (at /efi/staged/NAME) to predict with; its path in the ESP."""
        if "staged" not in run(["mdir", "-b", "-i", self.target, "::/"]).stdout.decode():
            run(["mmd", "-i", self.target, "::/staged"])
        if source is not None:
            self.put(source, f"/staged/{name}")
        else:
            assert text is not None and work is not None
            self.put_text(text, f"/staged/{name}", work)
        return f"/staged/{name}"

    def copy(self, path: Path) -> Esp:
        """A copy of the image (a scenario that changes what it boots leaves the original alone)."""
        run(["cp", "--sparse=always", self.path, path])
        return Esp(path, self.kernel_version)


def build_esp(out: Path, kernel_version: str, vmlinuz: Path, initrd: Path, options: str,
              loader: Path = SYSTEMD_BOOT) -> Esp:
    """A GPT image with an ESP holding `loader` as the removable-media boot path and one entry.

    Room is left for a second kernel and initrd beside the first (an update writes the new files
    before the old ones go)."""
    payload = vmlinuz.stat().st_size + initrd.stat().st_size + loader.stat().st_size
    part_mib = max(64, (2 * payload) // (1 << 20) + 32)
    part_sectors = part_mib * (1 << 20) // SECTOR
    out.unlink(missing_ok=True)
    with open(out, "wb") as f:
        f.truncate((PART_START + part_sectors + 2048) * SECTOR)  # 1 MiB at the end for the backup GPT
    layout = (f"label: gpt\nlabel-id: {DISK_GUID}\n"
              f"start={PART_START}, size={part_sectors}, type={ESP_TYPE}, uuid={PART_GUID}, name=\"EFI System\"\n")
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", out], input=layout.encode())
    run(["mkfs.vfat", "-F", "32", "-n", "ESP", "-i", VOLUME_ID, "--offset", str(PART_START), out,
         str(part_sectors * SECTOR // 1024)])
    esp = Esp(out, kernel_version)
    for folder in ("/EFI", "/EFI/BOOT", "/loader", "/loader/entries", f"/{ENTRY_TOKEN}",
                   f"/{ENTRY_TOKEN}/{kernel_version}"):
        run(["mmd", "-i", esp.target, f"::{folder}"])
    work = out.parent
    esp.install_loader(loader)
    esp.put_text(f"default {ENTRY_TOKEN}-*\ntimeout 0\neditor no\n", "/loader/loader.conf", work)
    esp.install_kernel(vmlinuz)
    esp.install_initrd(initrd)
    esp.write_entry(options, work)
    return esp


def tools_present() -> bool:
    return all(shutil.which(t) for t in ("sfdisk", "mkfs.vfat", "mcopy", "mmd", "mtype", "mdir"))
