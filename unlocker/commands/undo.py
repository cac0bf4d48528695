"""Undo: the steps a command took, run in reverse when it fails, so a failed run leaves the disk
(and the TPM) as it found them. Every command that adds before it removes uses one."""

from __future__ import annotations

from collections.abc import Callable

from unlocker.log import say


class Undo:
    """A stack of undo steps; `with Undo("enrolment") as undo:` runs them in reverse if the block fails."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._steps: list[tuple[str, Callable[[], object]]] = []
        self.failed = False  # a step could not be undone (a pending marker then stays, for the next run)

    def push(self, what: str, step: Callable[[], object]) -> None:
        self._steps.append((what, step))

    def __enter__(self) -> Undo:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None:  # any failure, a bug or Ctrl-C included, leaves the disk as it was
            say(f"{self._what} failed, undoing what was added: {exc or type(exc).__name__}")
            self._run()
        self._steps.clear()

    def _run(self) -> None:
        while self._steps:
            what, step = self._steps.pop()
            try:
                step()
            except Exception as exc:  # keep undoing; say what could not be undone
                self.failed = True
                say(f"could not undo: {what} ({exc})")
