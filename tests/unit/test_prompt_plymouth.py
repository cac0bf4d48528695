"""Who asks in a busybox initramfs: plymouth when plymouthd runs there (its client's ping answers),
else our prompt on the console. The plymouth client here is a script that plays plymouth's
command-line contract (--ping's exit code; ask-for-password prints the answer) and a plymouthd that
hangs (its clients then wait for ever); the real plymouth asks in a boot in
tests/vm/test_boot_plymouth.py."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from unlocker.boot import prompt
from unlocker.secret import Secret

FAKE_PLYMOUTH = """#!/bin/sh
echo "$*" >> "$PLYMOUTH_LOG"
case "$1" in
    --ping)
        [ -e "$PLYMOUTH_LOG.dead" ] && exit 1
        # a hung plymouthd accepts the connection and never answers: the client waits with it
        [ -e "$PLYMOUTH_LOG.hung" ] && exec sleep 60
        exit "$PING_RC" ;;
    ask-for-password)
        # plymouthd gone while asking (it crashed, or something ran 'plymouth quit'): the client
        # says "unexpectedly disconnected" and exits 2; no daemon answers a ping after that
        [ -n "$DIE_ON_ASK" ] && { touch "$PLYMOUTH_LOG.dead"; exit 2; }
        # plymouthd took the request, then hangs: the client waits for ever
        [ -n "$HANG_ON_ASK" ] && { echo $$ > "$PLYMOUTH_LOG.ask-pid"; touch "$PLYMOUTH_LOG.hung"; exec sleep 60; }
        # the user takes a while to type: plymouthd answers its pings meanwhile
        [ -n "$TYPING_TAKES" ] && sleep "$TYPING_TAKES"
        printf '%s\\n' "$ANSWER"; exit "$ASK_RC" ;;
esac
exit 1
"""


@pytest.fixture
def plymouth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A plymouth client on PATH, in an initrd, and a console prompt that records being used."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "plymouth").write_text(FAKE_PLYMOUTH)
    (bindir / "plymouth").chmod(0o755)
    log = tmp_path / "plymouth.log"
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    monkeypatch.setenv("PLYMOUTH_LOG", str(log))
    monkeypatch.setenv("PING_RC", "0")
    monkeypatch.setenv("ASK_RC", "0")
    monkeypatch.setenv("ANSWER", "correct horse battery")
    monkeypatch.setattr(prompt.initrd, "in_initrd", lambda *a: True)
    monkeypatch.setattr(prompt, "systemd_initrd", lambda: False)
    monkeypatch.setattr(prompt, "ask_on_terminal", lambda message: Secret(bytearray(b"from the console")))
    return log


def test_plymouth_asks_when_plymouthd_runs(plymouth: Path) -> None:
    answer = prompt.ask_passphrase("Enter passphrase for /dev/vda: ")
    assert answer is not None and answer.data == bytearray(b"correct horse battery")
    assert plymouth.read_text().splitlines() == ["--ping", "ask-for-password --prompt=Enter passphrase for /dev/vda"]


def test_the_console_asks_when_plymouthd_does_not_run(plymouth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PING_RC", "1")
    answer = prompt.ask_passphrase("Enter passphrase for /dev/vda: ")
    assert answer is not None and answer.data == bytearray(b"from the console")
    assert plymouth.read_text().splitlines() == ["--ping"]


def test_the_installed_system_never_asks_plymouth(plymouth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prompt.initrd, "in_initrd", lambda *a: False)
    answer = prompt.ask_passphrase("Passphrase for /dev/vda: ")
    assert answer is not None and answer.data == bytearray(b"from the console")
    assert not plymouth.exists()


def test_no_answer_from_plymouth_is_no_passphrase(plymouth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASK_RC", "1")  # plymouth quit, or Escape
    assert prompt.ask_passphrase("Enter passphrase for /dev/vda: ") is None


def test_a_plymouthd_that_dies_while_asking_leaves_the_prompt_to_the_console(plymouth: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody holds the console once plymouthd is gone: ours asks, rather than the boot going on with
    the disk closed and no prompt at all."""
    monkeypatch.setenv("DIE_ON_ASK", "1")
    answer = prompt.ask_passphrase("Enter passphrase for /dev/vda: ")
    assert answer is not None and answer.data == bytearray(b"from the console")
    assert plymouth.read_text().splitlines() == ["--ping", "ask-for-password --prompt=Enter passphrase for /dev/vda",
                                                 "--ping"]


def test_no_answer_while_plymouthd_still_runs_never_starts_a_second_prompt(plymouth: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """plymouthd still answers a ping (its ask was given up, or it gave no answer): it may still read
    the keys, so the console is not asked beside it."""
    monkeypatch.setenv("ASK_RC", "1")
    assert prompt.ask_passphrase("Enter passphrase for /dev/vda: ") is None
    assert plymouth.read_text().splitlines() == ["--ping", "ask-for-password --prompt=Enter passphrase for /dev/vda",
                                                 "--ping"]


def test_an_answer_longer_than_any_passphrase_is_no_answer(plymouth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANSWER", "x" * (prompt.MAX_PASSPHRASE + 10))
    assert prompt.ask_passphrase("Enter passphrase for /dev/vda: ") is None
    monkeypatch.setenv("ANSWER", "x" * prompt.MAX_PASSPHRASE)
    answer = prompt.ask_passphrase("Enter passphrase for /dev/vda: ")
    assert answer is not None and len(answer) == prompt.MAX_PASSPHRASE


def _asked_within(seconds: float, message: str) -> Secret | None:
    """ask_passphrase in a thread: a prompt that never returns fails the test instead of hanging it."""
    answers: list[Secret | None] = []
    thread = threading.Thread(target=lambda: answers.append(prompt.ask_passphrase(message)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no prompt within {seconds} s: the boot would wait here"
    return answers[0]


def test_a_plymouthd_that_hangs_while_asking_leaves_the_prompt_to_the_console_in_bounded_time(
        plymouth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """plymouthd took the request and hangs: its ping goes unanswered, the ask is killed and ours asks
    on the console (within a ping's interval and timeout), rather than the boot waiting for ever."""
    monkeypatch.setattr(prompt, "PING_EVERY", 0.3, raising=False)
    monkeypatch.setattr(prompt, "PING_TIMEOUT", 0.5, raising=False)
    monkeypatch.setenv("HANG_ON_ASK", "1")
    started = time.monotonic()
    answer = _asked_within(10, "Enter passphrase for /dev/vda: ")
    assert answer is not None and answer.data == bytearray(b"from the console")
    assert time.monotonic() - started < 5
    # one ping before asking, one while it asked (unanswered): no third ping, the console asks at once
    assert plymouth.read_text().splitlines() == ["--ping", "ask-for-password --prompt=Enter passphrase for /dev/vda",
                                                 "--ping"]
    with pytest.raises(ProcessLookupError):  # the hung ask was killed and reaped, not left behind
        os.kill(int(Path(f"{plymouth}.ask-pid").read_text()), 0)


def test_a_plymouthd_that_answers_its_pings_keeps_asking_however_long_the_user_takes(
        plymouth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prompt, "PING_EVERY", 0.2, raising=False)
    monkeypatch.setattr(prompt, "PING_TIMEOUT", 2, raising=False)
    monkeypatch.setenv("TYPING_TAKES", "1.5")
    answer = _asked_within(20, "Enter passphrase for /dev/vda: ")
    assert answer is not None and answer.data == bytearray(b"correct horse battery")
    asked = plymouth.read_text().splitlines()
    assert asked[:2] == ["--ping", "ask-for-password --prompt=Enter passphrase for /dev/vda"]
    assert len(asked) >= 5 and set(asked[2:]) == {"--ping"}  # pinged while the user typed, and answered
