"""The guest kernel: Debian's current linux-image package, downloaded and unpacked (never installed)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .tools import CACHE, HarnessError, run


@dataclass(frozen=True)
class Kernel:
    version: str
    root: Path  # the unpacked package: boot/vmlinuz-V, lib/modules/V

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def moddir(self) -> Path:
        return self.root / "lib" / "modules" / self.version


def current_package() -> str:
    out = run(["apt-cache", "depends", "linux-image-amd64"]).stdout.decode()
    m = re.search(r"Depends: (linux-image-[0-9][^\s]*-amd64)", out)
    if not m:
        raise HarnessError("apt-cache knows no linux-image-amd64 (run apt-get update)")
    return m.group(1)


def fetch_kernel(cache: Path = CACHE) -> Kernel:
    """Download (once) and unpack the kernel package; depmod its modules for the guest."""
    cache.mkdir(parents=True, exist_ok=True)
    package = current_package()
    version = package.removeprefix("linux-image-")
    root = cache / f"kernel-{version}"
    kernel = Kernel(version, root)
    if kernel.vmlinuz.exists() and (kernel.moddir / "modules.dep").exists():
        return kernel
    debs = list(cache.glob(f"{package}_*.deb"))
    if not debs:
        run(["apt-get", "download", package], cwd=cache)
        debs = list(cache.glob(f"{package}_*.deb"))
    root.mkdir(exist_ok=True)
    run(["dpkg-deb", "-x", debs[0], root])
    run(["depmod", "-b", root, version])
    return kernel
