"""Which copy of tpm2-unlocker the harness builds images from and boots: the checkout's, or the one a
package installed on this host. Chosen explicitly, never by what happens to be installed:

    TPM2_UNLOCKER_FROM=checkout   (default) the binary frozen from this tree, its dracut/ and mkinitcpio/
    TPM2_UNLOCKER_FROM=installed  /usr/bin/tpm2-unlocker, /usr/lib/dracut/modules.d/90tpm2-unlocker,
                                  /usr/lib/initcpio (install a package first: dpkg -i dist/tpm2-unlocker_*.deb)

With `checkout`, a copy installed on the host is ignored (the checkout's dracut module takes its
place among the host's modules). The demo, the bench and the test session say which copy they use.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .tools import HarnessError

REPO = Path(__file__).resolve().parent.parent
FROM_ENV = "TPM2_UNLOCKER_FROM"
DRACUT_MODULES = Path("/usr/lib/dracut/modules.d")


@dataclass(frozen=True)
class Source:
    name: str  # "checkout" or "installed"
    dracut_module: Path
    mkinitcpio: Path  # holds install/tpm2-unlocker and hooks/tpm2-unlocker
    binary: Path | None  # None: frozen from the checkout (python -m freeze.build)
    # the update hooks a guest's root runs as an installed system would (tpm2u.hook=, vm/rootfs.py)
    reseal_predict: Path
    kernel_postinst: Path
    initramfs_post_update: Path

    @property
    def installed(self) -> bool:
        return self.name == "installed"

    def files(self) -> list[Path]:
        return [*([self.binary] if self.binary else []), self.dracut_module / "module-setup.sh",
                self.mkinitcpio / "install" / "tpm2-unlocker", self.mkinitcpio / "hooks" / "tpm2-unlocker",
                self.reseal_predict, self.kernel_postinst, self.initramfs_post_update]

    def describe(self) -> str:
        if not self.installed:
            return f"tpm2-unlocker from the checkout {REPO} (binary frozen from it, its dracut/ and mkinitcpio/)"
        version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "tpm2-unlocker"], capture_output=True,
                                 text=True).stdout.strip() or "not from a Debian package"
        return (f"tpm2-unlocker installed on this host (package version {version}): {self.binary}, "
                f"{self.dracut_module}, {self.mkinitcpio}")


CHECKOUT = Source("checkout", REPO / "dracut" / "90tpm2-unlocker", REPO / "mkinitcpio", None,
                  REPO / "update-hooks" / "reseal-predict", REPO / "update-hooks" / "postinst.d" / "zz-tpm2-unlocker",
                  REPO / "update-hooks" / "post-update.d" / "tpm2-unlocker")
INSTALLED = Source("installed", DRACUT_MODULES / "90tpm2-unlocker", Path("/usr/lib/initcpio"),
                   Path("/usr/bin/tpm2-unlocker"), Path("/usr/lib/tpm2-unlocker/reseal-predict"),
                   Path("/etc/kernel/postinst.d/zz-tpm2-unlocker"), Path("/etc/initramfs/post-update.d/tpm2-unlocker"))


def chosen() -> Source:
    """The copy $TPM2_UNLOCKER_FROM names; HarnessError for another value, or for `installed` when a
    file of it is not there."""
    value = os.environ.get(FROM_ENV, "checkout")
    if value == "checkout":
        return CHECKOUT
    if value != "installed":
        raise HarnessError(f"{FROM_ENV} is 'checkout' or 'installed', not '{value}'")
    missing = [str(f) for f in INSTALLED.files() if not f.exists()]
    if missing:
        raise HarnessError(f"{FROM_ENV}=installed, but {', '.join(missing)} is not installed "
                           "(./run deb, then dpkg -i dist/tpm2-unlocker_*.deb)")
    return INSTALLED
