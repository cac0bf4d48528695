"""Build, once per run, what every boot shares: the frozen binary, the kernel, one initramfs per kind."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .guest import PROMPTS, ImageKind
from .initramfs import Initramfs, build_dracut, build_mkinitcpio_busybox
from .kernel import Kernel, fetch_kernel
from .tools import run

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Artifacts:
    kernel: Kernel
    binary: Path
    images: dict[str, Initramfs]

    def kind(self, name: str) -> ImageKind:
        return ImageKind(name, self.images[name].path, PROMPTS[name])


def build_binary(out: Path) -> Path:
    run([sys.executable, "-m", "freeze.build", "--out", out], cwd=REPO)
    return out / "tpm2-unlocker"


def build_artifacts(work: Path, kinds: tuple[str, ...] = ("dracut", "mkinitcpio")) -> Artifacts:
    work.mkdir(parents=True, exist_ok=True)
    binary = build_binary(work / "dist")
    kernel = fetch_kernel()
    images: dict[str, Initramfs] = {}
    for kind in kinds:
        out = work / f"initramfs-{kind}.img"
        if kind == "dracut":
            images[kind] = build_dracut(kernel, binary, out, systemd=True)
        elif kind == "dracut-shell":
            images[kind] = build_dracut(kernel, binary, out, systemd=False)
        elif kind in ("mkinitcpio", "mkinitcpio-bare"):
            images[kind] = build_mkinitcpio_busybox(kernel, binary, out, udev=(kind == "mkinitcpio"))
        else:
            raise ValueError(f"unknown image kind {kind}")
    return Artifacts(kernel, binary, images)
