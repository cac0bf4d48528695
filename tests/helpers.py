"""Shared test helpers: a real swtpm, real LUKS2 images, and the CLI run as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from vm.guest import PASSPHRASE  # noqa: E402,F401  (one test passphrase for host and guest)
from vm.swtpm import Swtpm, free_port_pair  # noqa: F401  (re-exported for the tests)

ZERO_DIGEST = "0" * 64


def unlocker_command() -> list[str]:
    """The CLI under test: the frozen binary when TPM2_UNLOCKER_BIN is set, else the package."""
    binary = os.environ.get("TPM2_UNLOCKER_BIN")
    return [binary] if binary else [sys.executable, "-m", "unlocker.cli"]


def cli_env(tcti: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The CLI's environment: ours without any inherited TCTI, plus the one given."""
    env = {k: v for k, v in os.environ.items() if k not in ("TPM2TOOLS_TCTI", "TPM2_UNLOCKER_TCTI")}
    if tcti is not None:
        env["TPM2_UNLOCKER_TCTI"] = tcti
    env.update(extra or {})
    return env


def run_cli(*args: str, tpm: Swtpm | None = None, input: bytes | None = None,
            env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = cli_env(tpm.tcti if tpm is not None else None, env)
    return subprocess.run([*unlocker_command(), *args], input=input if input is not None else b"",
                          capture_output=True, env=full_env, timeout=timeout)


CHEAP_PBKDF2 = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
# a passphrase keyslot as luksFormat makes it (argon2id), at a cost kept small so tests stay fast
CHEAP_ARGON2ID = ("--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32768")


def make_luks_image(path: Path, passphrase: bytes = PASSPHRASE, size_mb: int = 20,
                    pbkdf: tuple[str, ...] = CHEAP_PBKDF2) -> Path:
    """A real LUKS2 image with one passphrase keyslot (its PBKDF kept cheap so tests stay fast)."""
    with open(path, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    subprocess.run(["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", *pbkdf, "--key-file=-", str(path)],
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


# tpm2-tools' attributes for our SRK: its default ECC primary plus noda.
from vm.swtpm import SRK_ATTRS  # noqa: E402


def tpm2_tools_unseal(tpm: Swtpm, blob: Path, pcrs: str, work: Path, name: str = "key") -> bytes:
    """Read a file-store key (the pair NAME.pub/NAME.priv) with tpm2-tools (interop, and to know what
    must never appear elsewhere)."""
    work.mkdir(exist_ok=True)
    tpm.tools("tpm2_createprimary", "-C", "o", "--key-algorithm=ecc", f"--attributes={SRK_ATTRS}",
              f"--key-context={work / 'p.ctx'}")
    tpm.tools("tpm2_load", f"--parent-context={work / 'p.ctx'}", f"--public={blob / (name + '.pub')}",
              f"--private={blob / (name + '.priv')}", f"--key-context={work / 'k.ctx'}")
    tpm.tools("tpm2_flushcontext", "-t")
    key = tpm.tools("tpm2_unseal", f"--object-context={work / 'k.ctx'}", f"--auth=pcr:{pcrs}").stdout
    tpm.tools("tpm2_flushcontext", "-t")
    return key


CLEVIS_CONFIG = '{"pcr_bank":"sha256","pcr_ids":"0,7"}'


def systemd_enroll(disk: Path, key_file: Path, tpm: Swtpm, pcrs: str = "0+7", pin: bytes | None = None) -> dict:
    """systemd-cryptenroll --tpm2-device=swtpm:... (the existing passphrase from a file); its token."""
    env = dict(os.environ)
    args = ["systemd-cryptenroll", f"--tpm2-device={tpm.tcti}", f"--tpm2-pcrs={pcrs}", f"--unlock-key-file={key_file}"]
    if pin is not None:
        env["NEWPIN"] = pin.decode()  # systemd-cryptenroll's own way to take a PIN without a terminal
        args.append("--tpm2-with-pin=yes")
    done = subprocess.run([*args, str(disk)], env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    # systemd 252 leaves its unseal's HMAC session loaded; with no resource manager (swtpm here) it
    # stays until flushed, as the kernel's would flush it when the process ends
    tpm.tools("tpm2_flushcontext", "--loaded-session")
    (token,) = [t for t in luks_json(disk)["tokens"].values() if t["type"] == "systemd-tpm2"]
    return token


def clevis_bind(disk: Path, tpm: Swtpm, config: str = CLEVIS_CONFIG) -> dict:
    """clevis luks bind -d DISK tpm2 CONFIG (the existing passphrase on stdin); its token."""
    done = subprocess.run(["clevis", "luks", "bind", "-y", "-k", "-", "-d", str(disk), "tpm2", config],
                          input=PASSPHRASE, env=dict(os.environ, TPM2TOOLS_TCTI=tpm.tcti), capture_output=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    (token,) = [t for t in luks_json(disk)["tokens"].values() if t["type"] == "clevis"]
    return token


SEED_SECRET = b"my secret\n"  # what the ArchWiki recipe's `echo "my secret" | ...` seals


def add_keyslot(disk: Path, secret: bytes, existing: bytes = PASSPHRASE) -> None:
    """Add `secret` as a keyslot of `disk` (what a user of the ArchWiki recipe did), via a pipe."""
    r, w = os.pipe()
    os.write(w, secret)
    os.close(w)
    try:
        subprocess.run(["cryptsetup", "luksAddKey", "--key-file=-", "--pbkdf", "pbkdf2",
                        "--pbkdf-force-iterations", "1000", str(disk), f"/proc/self/fd/{r}"],
                       input=existing, check=True, pass_fds=(r,))
    finally:
        os.close(r)


def seal_the_archwiki_way(tpm: Swtpm, work: Path, pcrs: str, secret: bytes = SEED_SECRET) -> tuple[Path, Path]:
    """The seed's exact tpm2-tools commands: createpolicy, createprimary, create. Returns (pub, priv)."""
    pol, primary = work / "pcr.pol", work / "primary.ctx"
    pub, priv = work / "secret.pub", work / "secret.priv"
    tpm.tools("tpm2_createpolicy", "--policy-pcr", f"--pcr-list={pcrs}", f"--policy={pol}")
    tpm.tools("tpm2_createprimary", "--key-algorithm=ecc", f"--key-context={primary}")
    tpm.tools("tpm2_flushcontext", "-t")
    tpm.tools("tpm2_create", f"--parent-context={primary}", "--sealing-input=-", f"--public={pub}",
              f"--private={priv}", f"--policy={pol}", input=secret)
    tpm.tools("tpm2_flushcontext", "-t")
    return pub, priv


LUKS2_CSUM_OFFSET = 448  # the binary header's checksum field (64 bytes; SHA-256 fills the first 32)


def rewrite_header_json(disk: Path, edit: Callable[[dict], object], *, copies: tuple[int, ...] = (0, 1),
                        seqid_step: int = 0) -> None:
    """Change the LUKS2 JSON metadata as one who holds the disk can: `edit` changes the primary's
    document in place, which is written into the header copies named (0 primary, 1 secondary) with
    their checksums recomputed (cryptsetup checks them), their sequence id raised by `seqid_step`."""
    import hashlib
    import struct

    with open(disk, "r+b") as f:
        primary = f.read(4096)
        size = struct.unpack(">Q", primary[8:16])[0]
        f.seek(4096)
        document = json.loads(f.read(size - 4096).split(b"\0", 1)[0])
        edit(document)
        text = json.dumps(document, separators=(",", ":")).encode()
        assert len(text) < size - 4096
        for copy in copies:
            f.seek(copy * size)
            area = bytearray(f.read(4096))
            assert area[:6] in (b"LUKS\xba\xbe", b"SKUL\xba\xbe")
            seqid = struct.unpack(">Q", area[16:24])[0] + seqid_step
            area[16:24] = struct.pack(">Q", seqid)
            area += text + bytes(size - 4096 - len(text))
            area[LUKS2_CSUM_OFFSET:LUKS2_CSUM_OFFSET + 64] = bytes(64)
            area[LUKS2_CSUM_OFFSET:LUKS2_CSUM_OFFSET + 32] = hashlib.sha256(area).digest()
            f.seek(copy * size)
            f.write(area)


def replace_token(disk: Path, token_id: str, token: dict) -> None:
    """Overwrite a token in the header, as an attacker or a bit flip would."""
    subprocess.run(["cryptsetup", "token", "import", "--token-replace", "--token-id", token_id, "--json-file", "-",
                    str(disk)], input=json.dumps(token).encode(), check=True)


def unlock_with_prompt(disk: Path, tcti: str, reason: str, answer: bytes | None) -> int:
    """`unlock --test` on a terminal: expect the TPM failure `reason`, then the prompt; type `answer`
    (None: end of input, nobody answers). Returns the exit status."""
    import pexpect

    cmd = unlocker_command()
    child = pexpect.spawn(cmd[0], [*cmd[1:], "unlock", str(disk), "--test"], env=cli_env(tcti), timeout=60)
    child.expect(reason)
    child.expect("Enter passphrase for ")
    if answer is None:
        child.sendeof()
    else:
        child.sendline(answer)
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def enroll_or_fail(disk: Path, key_file: Path, tpm: Swtpm, *extra: str, env: dict[str, str] | None = None,
                   status: int = 0) -> subprocess.CompletedProcess:
    """`enroll DISK --unlock-key-file KEY_FILE EXTRA...` as users run it (`env` added to the CLI's
    environment). The test fails unless it exits with `status`; a success must name the keyslot."""
    done = run_cli("enroll", str(disk), "--unlock-key-file", str(key_file), *extra, tpm=tpm, env=env)
    assert done.returncode == status, done.stderr.decode()
    if status == 0:
        assert f"{disk}: enrolled keyslot ".encode() in done.stderr, done.stderr.decode()
    return done


def tpm_messages(pcap: Path) -> list[tuple[str, bytes]]:
    """The TPM commands ("command") and responses ("response"), in order, from a capture of
    tpm2-tss's pcap TCTI (pcapng, raw IPv4 frames; the TPM's side is port 2321)."""
    import struct

    data = pcap.read_bytes()
    streams: dict[str, bytearray] = {"command": bytearray(), "response": bytearray()}
    order: list[tuple[str, bytes]] = []
    offset = 0
    while offset + 12 <= len(data):
        block_type, block_length = struct.unpack_from("<II", data, offset)
        if block_type == 6:  # enhanced packet block
            captured = struct.unpack_from("<I", data, offset + 20)[0]
            frame = data[offset + 28:offset + 28 + captured]
            ip_length = (frame[0] & 0x0F) * 4
            tcp = frame[ip_length:]
            destination = struct.unpack_from(">H", tcp, 2)[0]
            payload = tcp[(tcp[12] >> 4) * 4:]
            direction = "command" if destination == 2321 else "response"
            stream = streams[direction]
            stream += payload
            while len(stream) >= 10 and len(stream) >= struct.unpack_from(">I", stream, 2)[0]:
                size = struct.unpack_from(">I", stream, 2)[0]
                order.append((direction, bytes(stream[:size])))
                del stream[:size]
        offset += block_length
    return order
