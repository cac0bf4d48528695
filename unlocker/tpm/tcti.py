"""Which TPM to talk to: --tcti, the environment, else the kernel's device node."""

from __future__ import annotations

import os

from unlocker.errors import NoTpmError
from unlocker.log import trace
from unlocker.tpm.node import ACPI_TPM2_TABLE, DEVICE_NODES, wait_for_node


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
    return f"device:{node}"
