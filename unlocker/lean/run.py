"""The one wrapper for child processes: clean environment, secrets only through stdin or pipes.

Children are started with os.posix_spawn and their pipes read with select.poll, not with the
subprocess module: its import (signal and its enums, selectors, locale and with it re, threading)
is start-up time the boot pays under emulation (docs/performance.md), for features we do not use.
What it did for us is done here: the program looked up in the children's PATH, only the pipes and
`pass_fds` open in the child, SIGPIPE back to its default there, input written while output is read.
"""

from __future__ import annotations

import os
import select
import sys
import time
from _signal import SIGKILL, SIGPIPE

from unlocker import TYPE_CHECKING
from unlocker.lean.record import record
from unlocker.log import trace

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from unlocker.secret import SecretBuffer

# Variables PyInstaller (or a caller) sets that must not reach a child: a frozen binary points
# LD_LIBRARY_PATH at its own folder, and cryptsetup would then load our bundled libcrypto.
# Its own `_PYI_*` (and older `_MEIPASS*`) variables would make a child that is a PyInstaller program
# too (the unpacked one `unpack` checks) take itself for part of this one.
_UNSAFE_ENV = ("LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONPATH", "PYTHONHOME")
_UNSAFE_PREFIXES = ("_PYI_", "_MEIPASS")


@record(frozen=True)
class Completed:
    """A finished program: its argv, exit code and captured output."""

    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode(errors="replace").strip()


class RunError(Exception):
    """A program that did not exit 0 where the caller asked for success (run(check=True))."""

    def __init__(self, done: Completed) -> None:
        super().__init__(f"{done.argv[0]} exited {done.returncode}: {done.stderr_text}")
        self.done = done


def child_env() -> dict[str, str]:
    """The environment for children: ours minus the loader variables of a frozen bundle."""
    env = {k: v for k, v in os.environ.items() if k not in _UNSAFE_ENV and not k.startswith(_UNSAFE_PREFIXES)}
    if getattr(sys, "frozen", False):
        orig = os.environ.get("LD_LIBRARY_PATH_ORIG")
        if orig:
            env["LD_LIBRARY_PATH"] = orig
    # an initramfs may set a PATH without the sbin directories cryptsetup lives in
    path = [p for p in env.get("PATH", "").split(":") if p]
    env["PATH"] = ":".join(path + [p for p in ("/usr/sbin", "/usr/bin", "/sbin", "/bin") if p not in path])
    env["LC_ALL"] = "C"
    return env


def which(program: str) -> str | None:
    """The program as a child would find it (in child_env's PATH): shutil.which without shutil, whose
    import is start-up time a boot pays under emulation."""
    return _lookup(program, child_env()["PATH"])


def _lookup(program: str, path: str) -> str | None:
    for directory in [""] if "/" in program else path.split(":"):
        candidate = os.path.join(directory, program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


class Started:
    """A program started with its stdin open, waiting for `finish(input)` (or `cancel()`).

    For a program whose start-up (exec, libraries, reading a header) can overlap our own work
    before its input exists: the boot starts `cryptsetup open` while the TPM unseals the key.
    """

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        trace("run (started, input to follow): " + " ".join(argv))
        self._child = _Child(argv, with_stdin=True)
        self._done = False

    def finish(self, input: bytes | bytearray | memoryview, timeout: float | None = None) -> Completed:
        """Write `input` to its stdin, close it, and wait for the program to end."""
        self._done = True
        return self._child.collect(input, timeout)

    def cancel(self) -> None:
        """Unless finished: kill it before it got any input (it is blocked reading stdin), reap it."""
        if self._done:
            return
        self._done = True
        self._child.kill()
        self._child.collect(None, None)
        trace(f"run: {self.argv[0]} cancelled")


class _Child:
    """A spawned program and our ends of its pipes (stdin: a pipe or /dev/null)."""

    def __init__(self, argv: list[str], with_stdin: bool, pass_fds: Sequence[int] = ()) -> None:
        self.argv = argv
        self.returncode: int | None = None  # once reaped: the exit code, or -N for signal N
        env = child_env()
        path = _lookup(argv[0], env["PATH"])
        if path is None:
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        ours: list[int] = []  # every fd we opened, closed on the way out whatever happens
        try:
            if with_stdin:
                stdin, self.stdin = os.pipe()
                ours += [stdin, self.stdin]
            else:
                stdin, self.stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), -1
                ours.append(stdin)
            self.stdout, stdout = os.pipe()
            self.stderr, stderr = os.pipe()
            ours += [self.stdout, stdout, self.stderr, stderr]
            # the fds we open are close-on-exec (PEP 446), those we inherited are closed here; dup2
            # onto 0-2, and onto itself (which clears the flag) for pass_fds, leaves exactly these
            actions: list[tuple[int, ...]] = [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inherited_fds(pass_fds)]
            actions += [(os.POSIX_SPAWN_DUP2, stdin, 0), (os.POSIX_SPAWN_DUP2, stdout, 1), (os.POSIX_SPAWN_DUP2, stderr, 2)]
            actions += [(os.POSIX_SPAWN_DUP2, fd, fd) for fd in pass_fds]
            self.pid = os.posix_spawn(path, argv, env, file_actions=actions, setsigdef=(SIGPIPE,))
        except BaseException:
            for fd in ours:
                os.close(fd)
            raise
        for fd in (stdin, stdout, stderr):  # the child's ends
            os.close(fd)

    def kill(self) -> None:
        try:
            os.kill(self.pid, SIGKILL)
        except ProcessLookupError:
            pass  # ended already (a zombie until collect() reaps it)

    def collect(self, input: bytes | bytearray | memoryview | None, timeout: float | None,
                stdout_into: SecretBuffer | None = None, stdout_limit: int | None = None,
                watch: tuple[float, Callable[[], bool]] | None = None) -> Completed:
        """Feed `input`, read stdout and stderr to their end, reap it; at `timeout` seconds it is
        killed, wherever it is (reading, writing, or running with its pipes closed), and so it is
        when `watch`'s check, called every `watch[0]` seconds, says False."""
        out, err = bytearray(), bytearray()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._exchange(memoryview(input or b"").cast("B"), out, err, deadline, stdout_into, stdout_limit, watch)
        finally:
            for fd in (self.stdin, self.stdout, self.stderr):
                if fd >= 0:
                    os.close(fd)
            self.stdin = self.stdout = self.stderr = -1
            self.returncode = self._reap(deadline)
        trace(f"run: {self.argv[0]} exited {self.returncode}")
        return Completed(self.argv, self.returncode, bytes(out), bytes(err))

    def _reap(self, deadline: float | None) -> int:
        """Its exit code; killed first if it is still running at `deadline`."""
        if deadline is not None and not self._ends_by(deadline):
            self.kill()
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])

    def _ends_by(self, deadline: float) -> bool:
        """Whether it exits by `deadline` (it is not reaped here): a pidfd polled, which wakes the
        moment it does (the boot hands cryptsetup its key and waits for it here); else a look every 10 ms."""
        try:
            fd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            fd = -1
        if fd >= 0:
            try:
                waiter = select.poll()
                waiter.register(fd, select.POLLIN)
                return bool(waiter.poll(max(0, int((deadline - time.monotonic()) * 1000))))
            finally:
                os.close(fd)
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True  # exited; left to be reaped
            time.sleep(0.01)
        return False

    def _exchange(self, pending: memoryview, out: bytearray, err: bytearray, deadline: float | None,
                  stdout_into: SecretBuffer | None = None, stdout_limit: int | None = None,
                  watch: tuple[float, Callable[[], bool]] | None = None) -> None:
        """Write `pending` to its stdin while reading its outputs, until both outputs end (and the
        input is written), `deadline`, or `watch`'s check says False. Our end of stdin does not
        block: poll is the one wait, so a child that writes before it has read all its input never
        dead-locks against us."""
        next_check = None if watch is None else time.monotonic() + watch[0]
        sinks = {self.stdout: out, self.stderr: err}
        poller = select.poll()
        for fd in sinks:
            poller.register(fd, select.POLLIN)
        if self.stdin >= 0:
            if len(pending):
                os.set_blocking(self.stdin, False)
                poller.register(self.stdin, select.POLLOUT)
            else:
                os.close(self.stdin)
                self.stdin = -1
        while sinks or self.stdin >= 0:
            wait_ms = None
            if deadline is not None:
                wait_ms = max(0, int((deadline - time.monotonic()) * 1000))
                if wait_ms == 0:
                    self.kill()  # what it wrote so far is kept; _reap collects its exit code
                    return
            if watch is not None and next_check is not None:
                if time.monotonic() >= next_check:
                    if not watch[1]():
                        self.kill()  # what it waits on is gone: as at the deadline
                        return
                    next_check = time.monotonic() + watch[0]
                check_ms = max(0, int((next_check - time.monotonic()) * 1000))
                wait_ms = check_ms if wait_ms is None else min(wait_ms, check_ms)
            for fd, event in poller.poll(wait_ms):
                if fd == self.stdin:
                    try:
                        pending = pending[os.write(fd, pending[:65536]):]
                    except BlockingIOError:
                        continue  # the pipe filled between poll and write: poll again
                    except BrokenPipeError:
                        pending = pending[:0]  # it exited without reading all: its exit code says why
                    if not len(pending):
                        poller.unregister(fd)
                        os.close(fd)
                        self.stdin = -1
                elif event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    if fd == self.stdout and stdout_into is not None:
                        more = stdout_into.read_from(fd, 4096) > 0  # a secret: in place, no bytes
                        if stdout_limit is not None and len(stdout_into) > stdout_limit:
                            self.kill()  # a secret cannot be this long: what it says is no answer
                            more = False
                    else:
                        chunk = os.read(fd, 65536)
                        sinks[fd] += chunk
                        more = bool(chunk)
                    if not more:
                        poller.unregister(fd)
                        del sinks[fd]


def _inherited_fds(keep: Sequence[int]) -> list[int]:
    """Inheritable fds above 2 not in `keep`: what our parent (a hook's shell) left open for us, and
    subprocess's close_fds would close in a child."""
    try:
        listed = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return []
    found = []
    for fd in listed:
        if fd > 2 and fd not in keep:
            try:
                if os.get_inheritable(fd):
                    found.append(fd)
            except OSError:
                pass  # the listing's own fd, closed by now
    return found


def run(
    argv: Sequence[str],
    *,
    input: bytes | bytearray | memoryview | None = None,
    pass_fds: Sequence[int] = (),
    timeout: float | None = None,
    check: bool = False,
    stdout_into: SecretBuffer | None = None,
    stdout_limit: int | None = None,
    watch: tuple[float, Callable[[], bool]] | None = None,
) -> Completed:
    """Run a program, capture its output, feed `input` on stdin.

    Secrets go through `input` or a pipe in `pass_fds`, never in argv. A missing program raises
    FileNotFoundError for the caller to turn into its own error. At `timeout` seconds the program
    is killed (its exit code is then -9). With `check`, an exit code other than 0 raises RunError.
    With `stdout_into`, what the program prints is a secret: read into that buffer, not kept in
    Completed.stdout; past `stdout_limit` bytes the program is killed. With `watch` (seconds, check),
    check() is called that often while the program runs, and the program killed when it says False
    (what it waits on is gone: the program would wait for ever).
    """
    argv = list(argv)
    trace("run: " + " ".join(argv))
    done = _Child(argv, input is not None, pass_fds).collect(input, timeout, stdout_into, stdout_limit, watch)
    if check and done.returncode != 0:
        raise RunError(done)
    return done
