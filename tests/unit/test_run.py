"""unlocker.lean.run: the one wrapper for children (os.posix_spawn, pipes read with poll)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from unlocker.lean.run import Started, run


def test_output_exit_code_and_input_are_carried() -> None:
    done = run(["sh", "-c", "cat; echo to-err >&2; exit 3"], input=b"through stdin")
    assert (done.returncode, done.stdout, done.stderr_text) == (3, b"through stdin", "to-err")


def test_without_input_stdin_is_empty() -> None:
    assert run(["cat"]).stdout == b""  # /dev/null: a program that reads stdin does not hang


def test_large_input_and_both_outputs_do_not_deadlock() -> None:
    """More than a pipe holds in each direction at once: written while both outputs are read."""
    data = os.urandom(1 << 20)
    done = run(["sh", "-c", "tee /dev/stderr"], input=bytearray(data), timeout=60)
    assert done.returncode == 0
    assert done.stdout == data and done.stderr == data


def test_a_secret_in_pass_fds_reaches_the_child_and_nothing_else_is_open() -> None:
    read_fd, write_fd = os.pipe()
    inherited = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(inherited, True)  # as an fd a hook's shell leaves open for us
    try:
        os.write(write_fd, b"key-bytes")
        os.close(write_fd)
        done = run(["sh", "-c", f"cat /proc/self/fd/{read_fd}"], pass_fds=(read_fd,))
        listed = run(["ls", "/proc/self/fd"], pass_fds=(read_fd,))
    finally:
        os.close(read_fd)
        os.close(inherited)
    assert done.stdout == b"key-bytes"
    open_fds = {int(fd) for fd in listed.stdout.split()}
    # 0-2, the passed pipe, and the one `ls` opened to list /proc/self/fd
    assert {0, 1, 2, read_fd} <= open_fds and len(open_fds) == 5
    assert inherited not in open_fds


def test_a_program_past_its_timeout_is_killed() -> None:
    done = run(["sh", "-c", "echo before; exec sleep 30"], timeout=0.5)
    assert done.returncode == -signal.SIGKILL
    assert done.stdout == b"before\n"


def test_a_watch_that_says_stop_kills_the_program_and_one_that_says_go_lets_it_finish() -> None:
    checks: list[float] = []

    def gone() -> bool:
        checks.append(time.monotonic())
        return len(checks) < 3  # what the program waits on is there twice, then gone

    started = time.monotonic()
    done = run(["sh", "-c", "echo before; exec sleep 30"], watch=(0.2, gone))
    assert done.returncode == -signal.SIGKILL and done.stdout == b"before\n"
    assert len(checks) == 3 and checks[0] - started >= 0.2 and time.monotonic() - started < 5
    done = run(["sh", "-c", "sleep 0.7; echo after"], watch=(0.1, lambda: True))
    assert done.returncode == 0 and done.stdout == b"after\n"


def test_a_missing_program_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run(["no-such-program-anywhere"])
    with pytest.raises(FileNotFoundError):
        run([str(tmp_path / "missing")])


def test_no_fd_leaks_across_runs() -> None:
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(20):
        run(["true"], input=b"x")
        run(["true"])
        with pytest.raises(FileNotFoundError):
            run(["no-such-program-anywhere"], input=b"x")
    assert set(os.listdir("/proc/self/fd")) == before


def test_children_get_sigpipe_back_and_a_clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/nonexistent.so")
    monkeypatch.setenv("_PYI_ARCHIVE_FILE", "/x")
    done = run(["sh", "-c", "env; grep SigIgn /proc/self/status"])
    text = done.stdout.decode()
    assert "LD_PRELOAD" not in text and "_PYI_" not in text and "LC_ALL=C" in text
    ignored = int(text.split("SigIgn:")[1].split()[0], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))  # Python ignores SIGPIPE; the child must not


def test_a_child_that_stops_reading_does_not_break_the_writer() -> None:
    done = run(["head", "-c", "1"], input=b"x" * (1 << 20))
    assert (done.returncode, done.stdout) == (0, b"x")


def test_started_program_gets_its_input_later_or_is_cancelled() -> None:
    started = Started(["cat"])
    assert started.finish(b"later").stdout == b"later"
    started.cancel()  # after finish: nothing to do
    waiting = Started(["cat"])
    waiting.cancel()
    assert waiting._child.returncode == -signal.SIGKILL


def test_check_raises_a_typed_error_with_the_programs_words() -> None:
    from unlocker.lean.run import RunError

    assert run(["sh", "-c", "exit 0"], check=True).returncode == 0
    with pytest.raises(RunError) as failed:
        run(["sh", "-c", "echo 'no such keyslot' >&2; exit 2"], check=True)
    assert failed.value.done.returncode == 2
    assert failed.value.done.stderr_text == "no such keyslot"
    assert run(["sh", "-c", "exit 2"]).returncode == 2  # without check, the caller reads the code


# reads one page (POLLOUT for us), writes 1 MiB to stdout (more than a pipe holds: it blocks until we read), reads the rest
_READ_WRITE_READ = ("import os, sys\nhead = os.read(0, 4096)\nsys.stdout.buffer.write(b'y' * (1 << 20))\n"
                    "sys.stdout.flush()\nrest = sys.stdin.buffer.read()\nsys.stderr.write(str(len(head) + len(rest)))\n")


def test_a_child_that_writes_before_it_reads_all_its_input_never_dead_locks() -> None:
    done = run([sys.executable, "-c", _READ_WRITE_READ], input=b"x" * (1 << 20), timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) == 1 << 20
    assert done.stderr == str(1 << 20).encode()


def test_the_timeout_fires_while_a_child_reads_nothing() -> None:
    """A child that never reads its input: our write must not block past the timeout."""
    started = time.monotonic()
    done = run([sys.executable, "-c", "import time; time.sleep(60)"], input=b"x" * (1 << 20), timeout=1)
    assert done.returncode == -9
    assert time.monotonic() - started < 10


def test_the_timeout_fires_after_a_child_closed_its_outputs() -> None:
    """A child that closed stdout and stderr but goes on running is still killed at the timeout."""
    started = time.monotonic()
    done = run(["sh", "-c", "exec >&- 2>&-; sleep 60"], timeout=1)
    assert done.returncode == -9
    assert time.monotonic() - started < 10
