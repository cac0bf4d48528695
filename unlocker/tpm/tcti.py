"""Which TPM to talk to: --tcti, the environment, else the kernel's device node."""

from __future__ import annotations

import os

from unlocker.errors import NoTpmError
from unlocker.log import trace
from unlocker.tpm.node import ACPI_TPM2_TABLE, DEVICE_NODES, wait_for_node

# the kernel says which TPM family a chip is (a 1.2 chip has /dev/tpm0 but speaks another protocol)
SYSFS_TPM = "/sys/class/tpm"


def check_tpm_version(node: str, sysfs: str = SYSFS_TPM) -> None:
    """NoTpmError naming the version when the kernel says the chip behind `node` is no TPM 2.0
    (tpm2-tss would only fail with a transport error on it)."""
    name = os.path.basename(node).replace("tpmrm", "tpm")
    try:
        with open(os.path.join(sysfs, name, "tpm_version_major")) as f:
            major = f.read(16).strip()
    except OSError:
        return  # kernels before 5.5 have no such file; a 2.0 chip then answers as one
    if major != "2":
        version = "1.2" if major == "1" else f"version {major!r}"
        raise NoTpmError(f"TPM {version} is not supported: {node} is not a TPM 2.0 (tpm2-unlocker needs a "
                         "TPM 2.0; the firmware setup may offer to switch the chip to 2.0)")


def resolve_tcti(explicit: str | None, wait: float = 0) -> str:
    """--tcti, else TPM2_UNLOCKER_TCTI, else TPM2TOOLS_TCTI, else the kernel's resource manager.

    With `wait`, give a TPM the firmware announces that many seconds to get its device node.
    """
    for value in (explicit, os.environ.get("TPM2_UNLOCKER_TCTI"), os.environ.get("TPM2TOOLS_TCTI")):
        if value:
            return value
    node = wait_for_node(DEVICE_NODES, wait, ACPI_TPM2_TABLE,
                         on_wait=lambda: trace("the firmware has a TPM 2.0; waiting for its device node"))
    if node is None:
        raise NoTpmError("no TPM found (no /dev/tpmrm0 or /dev/tpm0; set --tcti for a simulator)")
    check_tpm_version(node)
    return f"device:{node}"
