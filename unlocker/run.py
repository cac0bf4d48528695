"""The one wrapper for child processes: clean environment, secrets only through stdin or pipes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from .log import trace
from .record import record

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
    import is ~10 ms of a boot under emulation."""
    dirs = [""] if "/" in program else child_env()["PATH"].split(":")
    for directory in dirs:
        path = os.path.join(directory, program)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


class Started:
    """A program started with its stdin open, waiting for `finish(input)` (or `cancel()`).

    For a program whose start-up (exec, libraries, reading a header) can overlap our own work
    before its input exists: the boot starts `cryptsetup open` while the TPM unseals the key.
    """

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        trace("run (started, input to follow): " + " ".join(argv))
        self._proc = _popen(argv, subprocess.PIPE)
        self._done = False

    def finish(self, input: bytes | bytearray | memoryview, timeout: float | None = None) -> Completed:
        """Write `input` to its stdin, close it, and wait for the program to end."""
        self._done = True
        return _collect(self._proc, self.argv, input, timeout)

    def cancel(self) -> None:
        """Unless finished: kill it before it got any input (it is blocked reading stdin), reap it."""
        if self._done:
            return
        self._done = True
        self._proc.kill()
        self._proc.communicate()
        trace(f"run: {self.argv[0]} cancelled")


def _popen(argv: list[str], stdin: int, pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(),
                            pass_fds=tuple(pass_fds))


def _collect(proc: subprocess.Popen[bytes], argv: list[str], input: bytes | bytearray | memoryview | None,
             timeout: float | None) -> Completed:
    try:
        out, err = proc.communicate(input=input, timeout=timeout)  # type: ignore[arg-type]
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    trace(f"run: {argv[0]} exited {proc.returncode}")
    return Completed(argv, proc.returncode, out, err)


def run(
    argv: Sequence[str],
    *,
    input: bytes | bytearray | memoryview | None = None,
    pass_fds: Sequence[int] = (),
    timeout: float | None = None,
) -> Completed:
    """Run a program, capture its output, feed `input` on stdin.

    Secrets go through `input` or a pipe in `pass_fds`, never in argv. A missing program raises
    FileNotFoundError for the caller to turn into its own error.
    """
    argv = list(argv)
    trace("run: " + " ".join(argv))
    proc = _popen(argv, subprocess.PIPE if input is not None else subprocess.DEVNULL, pass_fds)
    return _collect(proc, argv, input, timeout)
