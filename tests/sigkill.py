"""Killing the program from outside at a chosen step: a `cryptsetup` first in its PATH that SIGKILLs
its caller after the Nth call, and a TCP proxy in front of swtpm that SIGKILLs it once the TPM has
answered its Nth command (the answer never reaches it). Nothing in the program knows."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
from pathlib import Path

from helpers import Swtpm, cli_env, free_port_pair, unlocker_command


class KillingCryptsetup:
    """A `cryptsetup` wrapper: runs the real one, counts the calls in a file and, after the call
    numbered by the file `kill-at` (none when absent), SIGKILLs its parent: our program."""

    def __init__(self, work: Path) -> None:
        real = shutil.which("cryptsetup")
        assert real is not None
        self.bindir = work / "bin"
        self.bindir.mkdir(parents=True, exist_ok=True)
        self.count_file, self.kill_file = work / "calls", work / "kill-at"
        script = self.bindir / "cryptsetup"
        script.write_text(f"""#!/bin/sh
{real} "$@"
rc=$?
n=$(( $(cat {self.count_file} 2>/dev/null || echo 0) + 1 ))
echo $n > {self.count_file}
[ -e {self.kill_file} ] && [ "$(cat {self.kill_file})" = "$n" ] && kill -KILL $PPID
exit $rc
""")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)

    def arm(self, n: int | None) -> None:
        self.count_file.unlink(missing_ok=True)
        if n is None:
            self.kill_file.unlink(missing_ok=True)
        else:
            self.kill_file.write_text(str(n))

    @property
    def calls(self) -> int:
        return int(self.count_file.read_text()) if self.count_file.exists() else 0

    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.bindir}:{os.environ['PATH']}"}


def _read_message(sock: socket.socket) -> bytes | None:
    """One TPM command or response: a 10-byte header whose bytes 2-5 are the whole size."""
    data = b""
    while len(data) < 10:
        chunk = sock.recv(10 - len(data))
        if not chunk:
            return None
        data += chunk
    size = struct.unpack(">I", data[2:6])[0]
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class KillingTpmProxy:
    """swtpm's server and control ports behind ours. TPM commands on the server port are counted;
    once the TPM has answered command number `kill_at`, `victim` is SIGKILLed and the answer dropped.
    The control port (locality, power) is passed through."""

    def __init__(self, tpm: Swtpm) -> None:
        self.upstream = tpm.port
        self.port = free_port_pair()
        self.kill_at: int | None = None
        self.victim: int | None = None
        self.count = 0
        self.killed = False
        self._lock = threading.Lock()
        self._listeners = []
        for port, handler in ((self.port, self._serve_commands), (self.port + 1, self._pass_through)):
            listener = socket.create_server(("127.0.0.1", port))
            self._listeners.append(listener)
            threading.Thread(target=self._accept, args=(listener, handler, port - self.port), daemon=True).start()

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def arm(self, n: int | None) -> None:
        with self._lock:
            self.kill_at, self.count, self.killed, self.victim = n, 0, False, None

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()

    def _accept(self, listener: socket.socket, handler, offset: int) -> None:  # type: ignore[no-untyped-def]
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream + offset))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._run, args=(handler, client, upstream), daemon=True).start()

    @staticmethod
    def _run(handler, client: socket.socket, upstream: socket.socket) -> None:  # type: ignore[no-untyped-def]
        try:
            handler(client, upstream)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def _serve_commands(self, client: socket.socket, upstream: socket.socket) -> None:
        while True:
            command = _read_message(client)
            if command is None:
                return
            upstream.sendall(command)
            response = _read_message(upstream)
            if response is None:
                return
            with self._lock:
                self.count += 1
                kill = self.kill_at is not None and self.count == self.kill_at and self.victim is not None
                if kill:
                    os.kill(self.victim, signal.SIGKILL)  # type: ignore[arg-type]
                    self.killed = True
            if kill:
                return
            client.sendall(response)

    @staticmethod
    def _pass_through(client: socket.socket, upstream: socket.socket) -> None:
        ends = {client: upstream, upstream: client}
        while True:
            ready, _, _ = select.select(list(ends), [], [], 30)
            if not ready:
                return
            for sock in ready:
                data = sock.recv(65536)
                if not data:
                    return
                ends[sock].sendall(data)


def run_to_be_killed(args: list[str], *, tcti: str, env: dict[str, str] | None = None,
                     proxy: KillingTpmProxy | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """The CLI as users run it; the proxy (if any) learns its pid before it can send a command."""
    cmd = [*unlocker_command(), *args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_env(tcti, env))
    if proxy is not None:
        proxy.victim = proc.pid
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def flush_what_the_dead_left(tpm: Swtpm) -> None:
    """swtpm has no resource manager: a killed client's transient objects and sessions stay loaded
    (the kernel's /dev/tpmrm0 flushes them when the process dies)."""
    for kind in ("-t", "-l", "-s"):
        tpm.tools("tpm2_flushcontext", kind, check=False)
