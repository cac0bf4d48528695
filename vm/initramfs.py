"""Initramfs images built by our hooks: dracut (systemd or shell initrd) with dracut/90tpm2-unlocker,
and a busybox image built by our mkinitcpio install script through vm/minicpio (mkinitcpio's
add_* functions and run_hook contract), for machines where mkinitcpio itself is not packaged."""

from __future__ import annotations

import gzip
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .kernel import Kernel
from .source import CHECKOUT, DRACUT_MODULES
from .tools import HarnessError, run

REPO = Path(__file__).resolve().parent.parent
DRACUT_MODULE = CHECKOUT.dracut_module
MINICPIO = Path(__file__).resolve().parent / "minicpio"
# One explicit module list for every dracut image (with --no-hostonly alone dracut takes every module
# installed on the host); each variant adds only what its unlocker needs.
DRACUT_BASE_MODULES = "base systemd systemd-initrd systemd-udevd systemd-ask-password systemd-journald " \
                      "systemd-modules-load systemd-tmpfiles systemd-sysusers kernel-modules rootfs-block " \
                      "udev-rules dm crypt fs-lib terminfo shutdown"
DRACUT_SHELL_MODULES = "base bash kernel-modules rootfs-block udev-rules dm crypt fs-lib terminfo shutdown"
DRACUT_DRIVERS = "virtio_blk virtio_pci dm_crypt tpm_tis tpm_crb ext4"
# What our dracut module's install() puts in last, per initrd kind. dracut reports a module whose
# install() failed and still writes the image: without this check the failure would surface only as
# every boot falling back to the passphrase prompt.
DRACUT_HOOK = {True: "usr/lib/systemd/system/systemd-cryptsetup@.service.d/tpm2-unlocker.conf",
               False: "usr/lib/dracut/hooks/initqueue/settled/10-tpm2-unlocker-initqueue.sh"}


@dataclass(frozen=True)
class Initramfs:
    path: Path
    kind: str  # "dracut-systemd", "dracut-shell", "mkinitcpio-busybox", "mkinitcpio-busybox-bare"
    build_seconds: float

    @property
    def size_mb(self) -> float:
        return self.path.stat().st_size / 1e6


def _dracut_base_dir(work: Path, module: Path = DRACUT_MODULE, extra_module_dirs: tuple[Path, ...] = ()) -> Path:
    """dracut's base dir with our `module` added beside its own (the host's /usr/lib/dracut untouched).
    `module` may be the host's installed one: then it is linked like the others."""
    base = work / "dracut"
    if base.exists():
        shutil.rmtree(base)
    (base / "modules.d").mkdir(parents=True)
    for entry in Path("/usr/lib/dracut").iterdir():
        if entry.name != "modules.d":
            (base / entry.name).symlink_to(entry)
    given = [m for m in (module, *extra_module_dirs) if m.parent != DRACUT_MODULES]
    ours = {m.name for m in given}
    for host_module in DRACUT_MODULES.iterdir():
        # a copy installed on the host (a package, the README's manual install) is not what is tested
        # unless it is the module given: the module given takes its place
        if host_module.name not in ours:
            (base / "modules.d" / host_module.name).symlink_to(host_module)
    for m in given:
        shutil.copytree(m, base / "modules.d" / m.name)
    return base


def build_dracut(kernel: Kernel, binary: Path, out: Path, *, systemd: bool = True, with_ours: bool = True,
                 extra_modules: str = "", extra_module_dirs: tuple[Path, ...] = (),
                 include: tuple[tuple[Path, str], ...] = (), module: Path = DRACUT_MODULE) -> Initramfs:
    """`include`: (host file, path in the image) pairs, put in by dracut's --include; `module`: our
    dracut module (the checkout's, or the installed one: vm/source.py)."""
    work = out.parent / (out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    base = _dracut_base_dir(work, module, extra_module_dirs)
    empty_confdir = work / "conf.d"
    empty_confdir.mkdir(exist_ok=True)
    modules = DRACUT_BASE_MODULES if systemd else DRACUT_SHELL_MODULES
    if with_ours:
        modules += " tpm2-unlocker"
    if extra_modules:
        modules += " " + extra_modules
    includes = [arg for src, dest in include for arg in ("--include", str(src), dest)]
    started = time.monotonic()
    done = run(["dracut", "--force", "--no-hostonly", "--no-hostonly-cmdline", "--conf", "/dev/null",
                "--confdir", empty_confdir, "--kver", kernel.version, "--kmoddir", kernel.moddir, "-m", modules,
                "--omit", "plymouth", "--add-drivers", DRACUT_DRIVERS, "--compress", "gzip", "--no-early-microcode",
                *includes, out],
               env={"dracutbasedir": str(base), "TPM2_UNLOCKER_BINARY": str(binary)})
    seconds = time.monotonic() - started
    if with_ours and DRACUT_HOOK[systemd] not in image_files(out):
        said = [line for line in done.stderr.decode(errors="replace").splitlines()
                if "tpm2-unlocker" in line and "Executing:" not in line]
        raise HarnessError(f"dracut built {out} without {DRACUT_HOOK[systemd]}: our module's install() failed; "
                           "dracut said:\n" + "\n".join(said))
    return Initramfs(out, "dracut-systemd" if systemd else "dracut-shell", seconds)


def image_files(image: Path) -> set[str]:
    """The paths in a gzip-compressed cpio image."""
    listing = run(["cpio", "-it", "--quiet"], input=gzip.decompress(image.read_bytes())).stdout.decode()
    return set(listing.splitlines())


def build_mkinitcpio_busybox(kernel: Kernel, binary: Path, out: Path, *, udev: bool = True,
                             hooks: Path = CHECKOUT.mkinitcpio, plymouth: bool = False) -> Initramfs:
    """Our install script's build() run by minicpio's add_* functions into a busybox image, after the
    harness's udev hook (Arch's default HOOKS have udev; `udev=False` makes a bare image) and, with
    `plymouth`, its plymouth hook (Debian's plymouth, details on the serial console). `hooks`: the
    folder with install/ and hooks/ (the checkout's mkinitcpio/, or the installed /usr/lib/initcpio)."""
    started = time.monotonic()
    flavour = "plymouth" if plymouth else "udev" if udev else "bare"
    run(["bash", MINICPIO / "build.sh", kernel.version, kernel.moddir, hooks, out, flavour],
        env={"TPM2_UNLOCKER_BINARY": str(binary), "PATH": os.environ["PATH"] + ":/usr/sbin:/sbin"})
    return Initramfs(out, "mkinitcpio-busybox" + ("-plymouth" if plymouth else "" if udev else "-bare"),
                     time.monotonic() - started)
