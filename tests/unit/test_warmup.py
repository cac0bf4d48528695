"""The boot warm-up is a head start only: whatever fails in it is traced, never raised."""

from __future__ import annotations

import pytest

from unlocker import warmup


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(warmup, "trace", lines.append)
    monkeypatch.setattr(warmup, "which", lambda _: None)  # no modprobe: nothing runs on this host
    return lines


def _socket_raising(exc: Exception):  # type: ignore[no-untyped-def]
    def make(*_: object) -> object:
        raise exc
    return make


def test_no_af_alg_is_traced_not_raised(traced: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmup.socket, "socket", _socket_raising(OSError(97, "Address family not supported")))
    warmup._warm_up("xts(aes)")
    assert traced == ["warm-up: xts(aes) via AF_ALG not available (Address family not supported)",
                      "warm-up: done without the cipher"]


def test_an_unexpected_error_stops_the_warm_up_quietly(traced: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmup.socket, "socket", _socket_raising(RuntimeError("boom")))
    warmup._warm_up("xts(aes)")
    assert traced == ["warm-up: stopped (RuntimeError: boom)"]


def test_start_runs_in_a_daemon_thread(traced: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmup.socket, "socket", _socket_raising(OSError(97, "Address family not supported")))
    thread = warmup.start()
    assert thread.daemon
    thread.join(10)
    assert not thread.is_alive() and traced
