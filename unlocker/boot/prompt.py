"""Passphrase fallback: ask on the terminal (or the console in an initramfs), never echo.

Returns None when nobody can answer (no terminal, end of input): the caller then reports why the
TPM path failed instead of a passphrase error.
"""

from __future__ import annotations

import os
import termios

from unlocker import initrd
from unlocker.lean.run import run, which
from unlocker.secret import Secret, SecretBuffer

MAX_PASSPHRASE = 512  # cryptsetup's interactive limit


def _open_terminal() -> int | None:
    """The controlling terminal; in an initramfs with none, the console."""
    paths = ["/dev/tty"] + (["/dev/console"] if initrd.in_initrd() else [])
    for path in paths:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        except OSError:
            continue
        if os.isatty(fd):
            return fd
        os.close(fd)
    return None


def _read_line(fd: int) -> Secret | None:
    """Read one line, a byte at a time (the terminal's line discipline), straight into one buffer:
    no str, no bytes, no copies left by a growing bytearray. Bytes past MAX_PASSPHRASE are read and
    dropped, as cryptsetup's own prompt does."""
    buffer = SecretBuffer(MAX_PASSPHRASE + 1)
    try:
        while True:
            if not buffer.read_from(fd, 1):
                return buffer.take() if len(buffer) else None
            if buffer.last() in (0x0A, 0x0D):
                buffer.drop_last()
                return buffer.take()
            if len(buffer) > MAX_PASSPHRASE:
                buffer.drop_last()
    finally:
        buffer.wipe()


def ask_on_terminal(message: str) -> Secret | None:
    fd = _open_terminal()
    if fd is None:
        return None
    try:
        try:
            old = termios.tcgetattr(fd)
        except termios.error:
            old = None
        if old is not None:
            new = termios.tcgetattr(fd)
            new[3] &= ~termios.ECHO
            new[3] |= termios.ICANON
            termios.tcsetattr(fd, termios.TCSAFLUSH, new)
        try:
            os.write(fd, message.encode())
            return _read_line(fd)
        finally:
            if old is not None:
                termios.tcsetattr(fd, termios.TCSAFLUSH, old)
            os.write(fd, b"\n")
    finally:
        os.close(fd)


def ask_with_agent(message: str) -> Secret | None:
    """systemd-ask-password, for a systemd initrd where plymouth or a console agent answers. Its
    answer is read straight into a secret buffer (run's stdout_into), never into a bytes."""
    program = which("systemd-ask-password")
    if program is None:
        return None
    answer = SecretBuffer(MAX_PASSPHRASE + 2)
    try:
        done = run([program, "--timeout=0", message], stdout_into=answer)
        if done.returncode != 0:
            return None
        while answer.last() == 0x0A:
            answer.drop_last()
        return answer.take()
    finally:
        answer.wipe()


def ask_passphrase(message: str) -> Secret | None:
    """Ask for a passphrase; None when nobody can answer."""
    answer = ask_on_terminal(message)
    if answer is None and os.environ.get("NOTIFY_SOCKET"):
        answer = ask_with_agent(message)
    return answer
