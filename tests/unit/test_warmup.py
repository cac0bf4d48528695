"""The boot warm-up is a head start only: whatever fails in it is traced, never raised; and
`cryptsetup open` never runs before its modprobe of dm-crypt is done."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from unlocker.boot import warmup
from unlocker.lean.threads import Signal


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts as a new process would: no warm-up started yet."""
    monkeypatch.setattr(warmup, "_started", [])
    monkeypatch.setattr(warmup, "_dm_tried", Signal())
    yield


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(warmup, "trace", lines.append)
    monkeypatch.setattr(warmup, "_load_dm_crypt", lambda: lines.append("modprobe dm_crypt"))  # nothing loads here
    return lines


def _socket_raising(exc: Exception):  # type: ignore[no-untyped-def]
    def make(*_: object) -> object:
        raise exc
    return make


def test_no_af_alg_is_traced_not_raised(traced: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmup._socket, "socket", _socket_raising(OSError(97, "Address family not supported")))
    warmup._best_effort(warmup._cipher_step("xts(aes)"))()
    assert traced == ["warm-up: xts(aes) via AF_ALG not available (Address family not supported)",
                      "warm-up: done without the cipher"]


def test_an_unexpected_error_stops_the_warm_up_quietly(traced: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmup._socket, "socket", _socket_raising(RuntimeError("boom")))
    warmup._best_effort(warmup._cipher_step("xts(aes)"))()
    assert traced == ["warm-up: stopped (RuntimeError: boom)"]


def test_start_runs_its_threads_once_per_run(traced: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmup._socket, "socket", _socket_raising(OSError(97, "Address family not supported")))
    threads = warmup.start()
    assert [t.name for t in threads] == ["warm-up: dm-crypt", "warm-up: entropy"]
    assert warmup.start() is threads, "a second start (unlock_at_boot after the frozen entry) starts nothing"
    for thread in threads:
        thread.join(10)
    assert not any(t.is_alive() for t in threads)
    deadline = time.monotonic() + 10  # the cipher's is a bare thread: nothing to join
    while "warm-up: done without the cipher" not in traced and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "warm-up: done without the cipher" in traced and "modprobe dm_crypt" in traced


def test_open_waits_for_the_modprobe_of_dm_crypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a fast TPM the key is there before modprobe is done; cryptsetup without device-mapper
    fails ("Cannot initialize device-mapper"), so the open waits for it."""
    done: list[str] = []
    release = threading.Event()

    def slow_modprobe() -> None:
        release.wait(10)
        done.append("dm_crypt")

    monkeypatch.setattr(warmup, "_load_dm_crypt", slow_modprobe)
    monkeypatch.setattr(warmup, "_instantiate_cipher", lambda cipher: True)
    monkeypatch.setattr(warmup, "_seed_entropy", lambda: None)
    warmup.start()
    waiter = threading.Thread(target=warmup.wait_for_dm_crypt)
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive(), "wait_for_dm_crypt returned before modprobe finished"
    release.set()
    waiter.join(10)
    assert not waiter.is_alive() and done == ["dm_crypt"]


def test_open_does_not_wait_when_no_warm_up_was_started() -> None:
    started = time.monotonic()
    warmup.wait_for_dm_crypt(timeout=5)
    assert time.monotonic() - started < 1


def test_a_failed_modprobe_still_lets_the_open_go_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing() -> None:
        raise OSError(2, "No such file or directory")

    monkeypatch.setattr(warmup, "_load_dm_crypt", failing)
    monkeypatch.setattr(warmup, "_seed_entropy", lambda: None)
    monkeypatch.setattr(warmup, "trace", lambda _: None)
    warmup.start()
    started = time.monotonic()
    warmup.wait_for_dm_crypt(timeout=5)
    assert time.monotonic() - started < 4


@pytest.mark.parametrize(("argv", "in_initrd", "starts"), [
    (["unlock", "--tries", "0"], True, True),
    (["unlock", "--tries", "0"], False, False),  # the installed system: `unlock --test` loads nothing
    (["status"], True, False),
    ([], True, False),
])
def test_the_frozen_entry_starts_it_only_for_unlock_in_the_initrd(
        argv: list[str], in_initrd: bool, starts: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmup, "start", lambda: warmup._started.append(threading.Thread()))
    marker = tmp_path / "initrd-release"
    if in_initrd:
        marker.touch()
    warmup.start_early(argv, marker=str(marker))
    assert bool(warmup._started) is starts


def test_a_seeded_random_pool_is_left_alone_and_nothing_said(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []
    monkeypatch.setattr(warmup, "trace", lines.append)
    assert warmup.entropy.pool_seeded(), "this host's kernel pool is seeded long after boot"
    warmup._seed_entropy(tpm_wait=0)
    assert lines == []  # said only when it had to do something


def test_without_a_tpm_to_seed_it_the_warm_up_waits_for_the_kernel_and_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen as from early in a boot without a CPU RNG: the pool not seeded, no TPM device. The
    fallback is the blocking read of /dev/random (on this host it returns at once)."""
    lines: list[str] = []
    monkeypatch.setattr(warmup, "trace", lines.append)
    monkeypatch.setattr(warmup.entropy, "pool_seeded", lambda: False)
    monkeypatch.setattr(warmup.entropy, "TPM_DEVICE", str(tmp_path / "tpmrm0"))
    monkeypatch.setattr(warmup.entropy, "ACPI_TPM2_TABLE", str(tmp_path / "TPM2"))
    warmup._seed_entropy(tpm_wait=0)
    assert lines == [f"warm-up: the random pool not seeded from the TPM (no {tmp_path / 'tpmrm0'}); waiting for the kernel",
                     "warm-up: the kernel's random pool is seeded"]


def test_dm_crypt_already_loaded_is_not_modprobed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The busybox hook's early modprobe loads dm_crypt: the warm-up then runs no second modprobe;
    a module still coming (or none) gets one."""
    import unlocker.lean.run

    ran: list[list[str]] = []
    monkeypatch.setattr(unlocker.lean.run, "which", lambda name: f"/sbin/{name}")
    monkeypatch.setattr(unlocker.lean.run, "run", lambda argv, **_: ran.append(list(argv)))
    state = tmp_path / "dm_crypt" / "initstate"
    state.parent.mkdir()
    state.write_text("live\n")
    warmup._load_dm_crypt(str(tmp_path))
    assert ran == []
    state.write_text("coming\n")
    warmup._load_dm_crypt(str(tmp_path))
    assert ran == [["/sbin/modprobe", "-q", "-a", "dm_crypt"]]
    state.unlink()
    warmup._load_dm_crypt(str(tmp_path))
    assert len(ran) == 2
