"""Threads for the boot path on `_thread`: `threading` (with functools and collections, which it
imports) is start-up time a boot pays under emulation (docs/performance.md), for the two things
we use: a function run in the background and a flag another thread waits for.
"""

from __future__ import annotations

import _thread

from unlocker import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable


class Signal:
    """A flag set once, that threads wait for (threading.Event without clear())."""

    def __init__(self) -> None:
        self._flag = False
        self._mutex = _thread.allocate_lock()
        self._gate = _thread.allocate_lock()
        self._gate.acquire()  # held until set(): waiters block on it

    def set(self) -> None:
        with self._mutex:
            if not self._flag:
                self._flag = True
                self._gate.release()

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until set (at most `timeout` seconds); whether it is set."""
        if self._flag:
            return True
        if self._gate.acquire(True, -1 if timeout is None else max(timeout, 0)):
            self._gate.release()  # the next waiter passes too
        return self._flag


class Background:
    """`target()` running in a thread of its own (daemon-like: nothing waits for it at exit)."""

    def __init__(self, target: Callable[[], object], name: str) -> None:
        self.name = name
        self._done = Signal()

        def run() -> None:
            try:
                target()
            finally:
                self._done.set()

        _thread.start_new_thread(run, ())

    def join(self, timeout: float | None = None) -> None:
        """Wait until `target` returned (or raised), at most `timeout` seconds."""
        self._done.wait(timeout)

    def is_alive(self) -> bool:
        return not self._done.is_set()
