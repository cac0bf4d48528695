"""Passphrase fallback: ask on the terminal (or the console in an initramfs), never echo; through
plymouth when its daemon runs in the initramfs (it owns the console then), through systemd's agents in
a systemd initrd.

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
# plymouthd is pinged this often while it asks, and a ping not answered within PING_TIMEOUT means it is
# gone or hung: a plymouthd that took the request and hangs would otherwise hold the boot for ever
PING_EVERY = 5.0
PING_TIMEOUT = 5.0


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


def ask_with_agent(message: str, timeout: float = 0) -> Secret | None:
    """systemd-ask-password, for a systemd initrd where plymouth or a console agent answers (within
    `timeout` seconds; 0: no limit). Its answer is read straight into a secret buffer (run's
    stdout_into), never into a bytes."""
    program = which("systemd-ask-password")
    if program is None:
        return None
    answer = SecretBuffer(MAX_PASSPHRASE + 2)
    try:
        # bounded twice: the agent's own timeout, and ours a little later (an agent that never
        # answers); an answer longer than any passphrase kills it and counts as none
        limit = None if timeout <= 0 else timeout + 5
        done = run([program, f"--timeout={int(timeout)}", "--", message], stdout_into=answer, timeout=limit,
                   stdout_limit=MAX_PASSPHRASE + 2)
        if done.returncode != 0 or len(answer) > MAX_PASSPHRASE + 1:
            return None
        while answer.last() == 0x0A:
            answer.drop_last()
        return answer.take()
    finally:
        answer.wipe()


def plymouth_client() -> str | None:
    """The plymouth client, when plymouthd runs in this initrd (it answers a ping): a splash that
    owns the console, which a second reader would fight for the keys. None otherwise."""
    if not initrd.in_initrd():
        return None
    program = which("plymouth")
    if program is None:
        return None
    return program if _plymouthd_answers(program) else None


def _plymouthd_answers(program: str) -> bool:
    """plymouthd answers a ping within PING_TIMEOUT (a hung one never does: its ping is killed)."""
    try:
        return run([program, "--ping"], timeout=PING_TIMEOUT).returncode == 0
    except OSError:
        return False


def ask_with_plymouth(program: str, message: str, timeout: float = 0) -> tuple[Secret | None, bool]:
    """`plymouth ask-for-password`: plymouth asks (on its splash, or its text or details screen on a
    serial console) and prints the answer, read straight from the pipe into a secret buffer, never
    into a bytes or argv. The answer is None when plymouth gave no answer (it quit, or Escape), after
    `timeout` seconds (0: no limit), or when plymouthd stopped answering its pings while it asked
    (gone or hung: the ask is killed); the second value is False in that last case."""
    answer = SecretBuffer(MAX_PASSPHRASE + 2)
    answering = True

    def still_answering() -> bool:
        nonlocal answering
        answering = _plymouthd_answers(program)
        return answering

    try:
        try:
            done = run([program, "ask-for-password", f"--prompt={message.rstrip(': ')}"], stdout_into=answer,
                       timeout=None if timeout <= 0 else timeout, stdout_limit=MAX_PASSPHRASE + 2,
                       watch=(PING_EVERY, still_answering))
        except OSError:
            return None, True
        if not answering:  # killed, whatever it had printed so far (its exit code may be 0 if it just ended)
            return None, False
        if done.returncode != 0 or len(answer) > MAX_PASSPHRASE + 1:
            return None, True
        while answer.last() == 0x0A:
            answer.drop_last()
        return answer.take(), True
    finally:
        answer.wipe()


def systemd_initrd() -> bool:
    """An initrd whose PID 1 is systemd: its agents (console, plymouth) own the console there."""
    return initrd.in_initrd() and os.path.isdir("/run/systemd/system")


def ask_secret(message: str, agent_timeout: float = 0) -> Secret | None:
    """Ask for a passphrase or PIN: through systemd's agents in a systemd initrd (a second reader
    of the console would take keys from theirs), through plymouth where plymouthd runs (a busybox
    initramfs with a splash), else on the terminal; None when nobody can answer."""
    if systemd_initrd():
        return ask_with_agent(message, agent_timeout)
    plymouth = plymouth_client()
    if plymouth is not None:
        answer, answering = ask_with_plymouth(plymouth, message, agent_timeout)
        # plymouthd gone while it asked (it crashed, or something ran 'plymouth quit') or hung (its
        # pings went unanswered): nobody holds the console now, so ours asks; while it still runs it
        # may read the keys, and nobody else asks
        if answer is not None or (answering and plymouth_client() is not None):
            return answer
    answer = ask_on_terminal(message)
    if answer is None and os.environ.get("NOTIFY_SOCKET"):
        answer = ask_with_agent(message, agent_timeout)
    return answer


def ask_passphrase(message: str) -> Secret | None:
    """Ask for a passphrase; None when nobody can answer."""
    return ask_secret(message)
