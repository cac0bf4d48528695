"""Build, once per run, what every boot shares: the frozen binary, the kernel, one initramfs per kind."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .guest import PROMPTS, ImageKind
from .initramfs import Initramfs, build_dracut, build_mkinitcpio_busybox
from .kernel import Kernel, fetch_kernel
from .source import Source, chosen
from .tools import run

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Artifacts:
    kernel: Kernel
    binary: Path
    images: dict[str, Initramfs]
    source: Source
    work: Path

    def kind(self, name: str) -> ImageKind:
        """The image of that kind, built now if the run has not built it yet."""
        if name not in self.images:
            self.images[name] = build_image(self.kernel, self.binary, self.source, self.work, name)
        return ImageKind(name, self.images[name].path, PROMPTS[name])


def build_binary(out: Path) -> Path:
    run([sys.executable, "-m", "freeze.build", "--out", out], cwd=REPO)
    return out / "tpm2-unlocker"


def source_binary(source: Source, work: Path) -> Path:
    """The binary of `source`: the installed one, or one frozen from the checkout into `work`."""
    return source.binary if source.binary is not None else build_binary(work / "dist")


def build_image(kernel: Kernel, binary: Path, source: Source, work: Path, kind: str) -> Initramfs:
    out = work / f"initramfs-{kind}.img"
    if kind in ("dracut", "dracut-shell"):
        return build_dracut(kernel, binary, out, systemd=(kind == "dracut"), module=source.dracut_module)
    if kind == "dracut-break":
        # dracut-systemd implements rd.break= (its break points start dracut-emergency.service); an
        # image of its own, so that the other dracut boots (and the benchmark's) stay as they were
        return build_dracut(kernel, binary, out, systemd=True, extra_modules="dracut-systemd",
                            module=source.dracut_module)
    if kind in ("mkinitcpio", "mkinitcpio-bare"):
        return build_mkinitcpio_busybox(kernel, binary, out, udev=(kind == "mkinitcpio"), hooks=source.mkinitcpio)
    raise ValueError(f"unknown image kind {kind}")


def build_artifacts(work: Path, kinds: tuple[str, ...] = ("dracut", "mkinitcpio"), source: Source | None = None) -> Artifacts:
    """The binary, the kernel and an image of each of `kinds`, from `source` (default: the copy
    $TPM2_UNLOCKER_FROM names, vm/source.py); Artifacts.kind builds any other kind on first use."""
    source = source or chosen()
    work.mkdir(parents=True, exist_ok=True)
    binary = source_binary(source, work)
    kernel = fetch_kernel()
    images = {kind: build_image(kernel, binary, source, work, kind) for kind in kinds}
    return Artifacts(kernel, binary, images, source, work)
