"""unlocker.lean.threads: a function in the background and a flag to wait for, on _thread."""

from __future__ import annotations

import sys
import time

import pytest

from unlocker.lean.threads import Background, Signal


def test_a_signal_wakes_every_waiter_once_set() -> None:
    signal = Signal()
    assert not signal.is_set()
    assert signal.wait(0.05) is False
    woken: list[int] = []
    waiters = [Background(lambda i=i: woken.append(i) if signal.wait(10) else None, f"waiter {i}") for i in range(3)]
    time.sleep(0.05)
    assert woken == []
    signal.set()
    signal.set()  # a second set is harmless
    for waiter in waiters:
        waiter.join(10)
    assert sorted(woken) == [0, 1, 2]
    assert signal.wait() is True and signal.wait(0) is True


def test_a_negative_timeout_does_not_wait_forever() -> None:
    assert Signal().wait(-1) is False


def test_background_runs_the_target_and_join_waits_for_it() -> None:
    started, release = Signal(), Signal()
    results: list[str] = []

    def target() -> None:
        started.set()
        release.wait(10)
        results.append("done")

    job = Background(target, "job")
    assert job.name == "job"
    assert started.wait(10)
    assert job.is_alive()
    job.join(0.05)  # times out: still running
    assert job.is_alive() and results == []
    release.set()
    job.join(10)
    assert not job.is_alive() and results == ["done"]


def test_a_target_that_raises_ends_its_thread_and_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """As an unhandled exception in any thread: reported through sys.unraisablehook, not lost."""
    reported: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: reported.append(info.exc_value))

    def target() -> None:
        raise RuntimeError("boom")

    job = Background(target, "failing")
    job.join(10)
    assert not job.is_alive()
    deadline = time.monotonic() + 10  # reported after the thread's last line, which join waits for
    while not reported and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [str(e) for e in reported] == ["boom"]
