"""One-line user messages on stderr; stdout stays for results (status, --json)."""

from __future__ import annotations

import sys

PREFIX = "tpm2-unlocker: "


def say(message: str) -> None:
    print(PREFIX + message, file=sys.stderr, flush=True)


def hint(message: str) -> None:
    print("  hint: " + message, file=sys.stderr, flush=True)
