"""One-line user messages on stderr; stdout stays for results (status, --json).

`--debug` (or `tpm2_unlocker.debug` on the kernel command line, in the initrd) adds a trace line per
step, stamped with the system uptime so it lines up with the kernel's and systemd's console lines.
"""

from __future__ import annotations

import sys
import time

from unlocker import initrd

PREFIX = "tpm2-unlocker: "
# no `logging`: with the traceback module it pulls in, it cost more at start-up than this whole file
_debug = False


# Control characters (C0, DEL, C1) shown as '?': messages quote header fields, device names and
# file contents, which are anyone's to write, and at boot they reach the console just before the
# prompt, where an escape sequence could clear the screen and draw a reason or prompt of its own.
_PRINTABLE = {c: "?" for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(text: str) -> str:
    return text.translate(_PRINTABLE)


def printable_lines(text: str) -> str:
    """printable() for each line of a report (status): its line breaks stay."""
    return "\n".join(printable(line) for line in text.split("\n"))


def say(message: str) -> None:
    print(PREFIX + printable(message), file=sys.stderr, flush=True)


def hint(message: str) -> None:
    """What to do about the line said before; prefixed too, as at boot it shares the console."""
    print(PREFIX + "hint: " + printable(message), file=sys.stderr, flush=True)


def debug_on_cmdline(marker: str = initrd.MARKER) -> bool:
    """`tpm2_unlocker.debug` on the kernel command line turns on --debug, in the initrd only."""
    return initrd.in_initrd(marker) and "tpm2_unlocker.debug" in initrd.kernel_words()


def set_debug(debug: bool) -> None:
    global _debug
    _debug = debug


def trace(message: str) -> None:
    if _debug:
        print(f"{PREFIX}[{time.clock_gettime(time.CLOCK_BOOTTIME):9.3f}] {message}", file=sys.stderr, flush=True)
