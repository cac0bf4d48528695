"""One-line user messages on stderr; stdout stays for results (status, --json).

`--debug` (or `tpm2_unlocker.debug` on the kernel command line, in the initrd) adds a trace line per
step, stamped with the system uptime so it lines up with the kernel's and systemd's console lines.
"""

from __future__ import annotations

import logging
import sys
import time

PREFIX = "tpm2-unlocker: "
log = logging.getLogger("tpm2-unlocker")


def say(message: str) -> None:
    print(PREFIX + message, file=sys.stderr, flush=True)


def hint(message: str) -> None:
    print("  hint: " + message, file=sys.stderr, flush=True)


class _UptimeFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PREFIX}[{time.clock_gettime(time.CLOCK_BOOTTIME):9.3f}] {record.getMessage()}"


def setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_UptimeFormatter())
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.WARNING)
    log.propagate = False


def trace(message: str) -> None:
    log.debug(message)
