"""swtpm, as the host tests use it (TCP server) and as QEMU uses it (unix control socket)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# Our SRK's attributes for `tpm2_createprimary -G ecc --attributes`: tpm2-tools' default ECC primary
# plus noda (the unlocker's "tcg" template), so the host's interop tests and the benchmark's tpm2-tools
# chain load our sealed objects under the same parent.
SRK_ATTRS = "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda"


def free_port_pair() -> int:
    """A port P such that P and P+1 are both free on loopback."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 65000:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def _wait(check, what: str, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise RuntimeError(f"swtpm did not start ({what})")


@dataclass
class Swtpm:
    """swtpm as a TCP server with its own state directory, stopped through its control channel."""

    state_dir: Path
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port_pair()
        self.proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir}",
             "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
             "--flags", "not-need-init,startup-clear"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False
        _wait(listening, f"port {self.port}")

    def stop(self) -> None:
        """Orderly: TPM2_Shutdown via the control channel, as a clean power-off."""
        if self.proc is None:
            return
        subprocess.run(["swtpm_ioctl", "--tcp", f"127.0.0.1:{self.port + 1}", "-s"],
                       capture_output=True, timeout=10, check=False)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def power_cut(self) -> None:
        """Kill swtpm with no TPM2_Shutdown, as a sudden power loss."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def reboot(self) -> None:
        """Orderly restart: PCRs back to their reset values."""
        self.stop()
        self.start()

    def tools(self, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run a tpm2-tools command against this swtpm."""
        env = dict(os.environ, TPM2TOOLS_TCTI=self.tcti)
        done = subprocess.run(list(args), input=input, capture_output=True, env=env, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {done.stderr.decode()}")
        return done

    def extend(self, pcr: int, bank: str = "sha256", digest: str = "0" * 64) -> None:
        self.tools("tpm2_pcrextend", f"{pcr}:{bank}={digest}")

    def clear_lockout(self) -> None:
        self.tools("tpm2_dictionarylockout", "--clear-lockout")

    def __enter__(self) -> Swtpm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class GuestTpm:
    """swtpm for one QEMU boot: a unix control socket; ends when QEMU lets go (--terminate)."""

    state_dir: Path
    socket_path: Path
    proc: subprocess.Popen | None = None

    def __enter__(self) -> GuestTpm:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir}", "--terminate",
             "--ctrl", f"type=unixio,path={self.socket_path}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(self.socket_path.exists, str(self.socket_path))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.socket_path.unlink(missing_ok=True)

    def qemu_args(self) -> list[str]:
        return ["-chardev", f"socket,id=chrtpm,path={self.socket_path}",
                "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0"]
