"""The TPM's device nodes, and the wait for one that a booting kernel has not made yet.

Light on purpose (os and time only): the boot's warm-up uses it before the rest of the program is
imported.
"""

from __future__ import annotations

import os
import time

from unlocker import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

# The firmware's ACPI table for a TPM 2.0: when present, a missing /dev/tpmrm0 only means its driver
# has not loaded yet (udev's coldplug, or the hook's modprobe, is still running beside us at boot).
ACPI_TPM2_TABLE = "/sys/firmware/acpi/tables/TPM2"
DEVICE_NODES = ("/dev/tpmrm0", "/dev/tpm0")


def wait_for_node(nodes: Sequence[str], wait: float = 0, firmware_table: str = ACPI_TPM2_TABLE,
                  on_wait: Callable[[], None] | None = None, poll: float = 0.05) -> str | None:
    """The first of `nodes` that exists. While the firmware announces a TPM 2.0, up to `wait`
    seconds for one to appear (`on_wait` is called once when that wait begins); else None."""
    deadline = time.monotonic() + wait
    waiting = False
    while True:
        for node in nodes:
            if os.path.exists(node):
                return node
        if time.monotonic() >= deadline or not os.path.exists(firmware_table):
            return None
        if not waiting and on_wait is not None:
            on_wait()
        waiting = True
        time.sleep(poll)
