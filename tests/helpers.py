"""Shared test helpers: a real swtpm, real LUKS2 images, and the CLI run as users run it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PASSPHRASE = b"correct horse battery"
ZERO_DIGEST = "0" * 64


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


@dataclass
class Swtpm:
    """swtpm as a TCP server with its own state directory, stopped through its control channel."""

    state_dir: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

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
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("swtpm did not start")

    def stop(self) -> None:
        """Orderly: TPM2_Shutdown via the control channel, as a clean power-off."""
        if self.proc is None:
            return
        subprocess.run(["swtpm_ioctl", "--tcp", f"127.0.0.1:{self.port + 1}", "-s"],
                       capture_output=True, timeout=10)
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
        done = subprocess.run(list(args), input=input, capture_output=True, env=env)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {done.stderr.decode()}")
        return done

    def extend(self, pcr: int, bank: str = "sha256", digest: str = ZERO_DIGEST) -> None:
        self.tools("tpm2_pcrextend", f"{pcr}:{bank}={digest}")

    def clear_lockout(self) -> None:
        self.tools("tpm2_dictionarylockout", "--clear-lockout")


def unlocker_command() -> list[str]:
    """The CLI under test: the frozen binary when TPM2_UNLOCKER_BIN is set, else the package."""
    binary = os.environ.get("TPM2_UNLOCKER_BIN")
    return [binary] if binary else [sys.executable, "-m", "unlocker.cli"]


def run_cli(*args: str, tpm: Swtpm | None = None, input: bytes | None = None,
            env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.pop("TPM2TOOLS_TCTI", None)
    full_env.pop("TPM2_UNLOCKER_TCTI", None)
    if tpm is not None:
        full_env["TPM2_UNLOCKER_TCTI"] = tpm.tcti
    full_env.update(env or {})
    return subprocess.run([*unlocker_command(), *args], input=input if input is not None else b"",
                          capture_output=True, env=full_env, timeout=timeout)


def make_luks_image(path: Path, passphrase: bytes = PASSPHRASE, size_mb: int = 20) -> Path:
    """A real LUKS2 image with one passphrase keyslot (PBKDF2 kept cheap so tests stay fast)."""
    with open(path, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    subprocess.run(["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--key-file=-", str(path)],
                   input=passphrase, check=True, capture_output=True)
    return path


def luks_json(path: Path) -> dict:
    out = subprocess.run(["cryptsetup", "luksDump", "--dump-json-metadata", str(path)],
                         capture_output=True, check=True).stdout
    return json.loads(out)


def opens(path: Path, key: bytes, slot: int | None = None) -> bool:
    args = ["cryptsetup", "open", "--test-passphrase", "--key-file=-", str(path)]
    if slot is not None:
        args[2:2] = ["--key-slot", str(slot)]
    return subprocess.run(args, input=key, capture_output=True).returncode == 0


def our_tokens(path: Path) -> dict[str, dict]:
    return {k: v for k, v in luks_json(path).get("tokens", {}).items() if v.get("type") == "tpm2-unlocker"}


def write_key_file(directory: Path, data: bytes = PASSPHRASE) -> Path:
    path = directory / "passphrase.key"
    path.write_bytes(data)
    return path


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="tpm2-unlocker-test-"))


def have(program: str) -> bool:
    return shutil.which(program) is not None

# tpm2-tools' attributes for our SRK: its default ECC primary plus noda.
SRK_ATTRS = "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda"


def tpm2_tools_unseal(tpm: Swtpm, blob: Path, pcrs: str, work: Path) -> bytes:
    """Read a file-store key with tpm2-tools (interop, and to know what must never appear elsewhere)."""
    work.mkdir(exist_ok=True)
    tpm.tools("tpm2_createprimary", "-C", "o", "--key-algorithm=ecc", f"--attributes={SRK_ATTRS}",
              f"--key-context={work / 'p.ctx'}")
    tpm.tools("tpm2_load", f"--parent-context={work / 'p.ctx'}", f"--public={blob / 'key.pub'}",
              f"--private={blob / 'key.priv'}", f"--key-context={work / 'k.ctx'}")
    tpm.tools("tpm2_flushcontext", "-t")
    key = tpm.tools("tpm2_unseal", f"--object-context={work / 'k.ctx'}", f"--auth=pcr:{pcrs}").stdout
    tpm.tools("tpm2_flushcontext", "-t")
    return key
