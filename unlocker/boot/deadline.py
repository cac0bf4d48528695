"""A TPM step with a deadline: a TPM that stops answering (a hung chip, a paused emulator, something
in between holding the answer) costs at most so many seconds, then the prompt follows."""

from __future__ import annotations

import _thread

from unlocker import TYPE_CHECKING
from unlocker.errors import NoTpmError
from unlocker.lean.threads import Background
from unlocker.secret import Secret

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    from unlocker.boot.connection import TpmConnection

    T = TypeVar("T")


def _wipe_late(result: object) -> None:
    """A key that arrives after the caller gave up is wiped by the thread that got it."""
    for part in result if isinstance(result, tuple) else (result,):
        if isinstance(part, Secret):
            part.wipe()


def within(seconds: float, connection: TpmConnection | None, work: Callable[[], T], what: str = "work") -> T:
    """work() in a thread, its result or its exception. A TPM command cannot be interrupted: past
    `seconds` it is left to its thread, the connection (if any) abandoned, and NoTpmError raised."""
    outcome: dict[str, object] = {}
    decided = _thread.allocate_lock()

    def run() -> None:
        try:
            found: object = work()
        except BaseException as exc:  # handed to the caller below, whatever it is
            found = exc
        with decided:
            if "gave up" in outcome:
                if not isinstance(found, BaseException):
                    _wipe_late(found)
            else:
                outcome["found"] = found

    worker = Background(run, what)
    worker.join(seconds)
    with decided:
        if "found" not in outcome:
            outcome["gave up"] = True
            if connection is not None:
                connection.abandon()
            raise NoTpmError(f"the TPM did not answer within {seconds:g} s")
    found = outcome["found"]
    if isinstance(found, BaseException):
        raise found
    return found  # type: ignore[return-value]
