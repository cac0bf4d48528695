"""Where we run: inside an initrd or not, and what the kernel command line says there.

Light on purpose (os only): the boot's warm-up asks before the rest of the program is imported.
"""

from __future__ import annotations

import os

# systemd's initrd marker; dracut, mkinitcpio and our hooks put it into every image we run in
MARKER = "/etc/initrd-release"
CMDLINE = "/proc/cmdline"


def in_initrd(marker: str = MARKER) -> bool:
    return os.path.exists(marker)


def kernel_words(path: str = CMDLINE) -> list[str]:
    """The kernel command line, split into words ([] when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace").split()  # any byte may be there
    except OSError:
        return []


def kernel_param(name: str, words: list[str] | None = None) -> str | None:
    """The value of the last `name=VALUE` on the kernel command line (the kernel's own rule), or None."""
    found = None
    for word in kernel_words() if words is None else words:
        key, equals, value = word.partition("=")
        if key == name and equals:
            found = value
    return found
