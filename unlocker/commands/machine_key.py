"""The machine key: this system's own signing key for signed policies, so that kernel and initramfs
updates are approved (reseal --predict signs the next boot's PCR values) with no passphrase.

The booted system cannot unseal its key (the initramfs extended the lock PCR), so without a signing
key every update needs the passphrase, which unattended upgrades do not have. A key kept on the
machine lets root approve any boot chain; that is no more than root of the running system can do
anyway (it can read the volume key from the kernel) — but only while the key file lives on the
encrypted disk. On plain storage anyone holding the disk could read it and approve their own boot
chain, so it is made and used only on dm-crypt (on_encrypted_storage).

The private key is never logged or printed; it lives in STATE_DIR/policy-key.pem, mode 0600, in a
directory of mode 0700.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from unlocker.commands.keys import PrivateKey, cryptography_serialization
from unlocker.errors import UnlockerError, UsageError
from unlocker.tpm.signing import key_name as name_of

STATE_DIR_ENV = "TPM2_UNLOCKER_STATE_DIR"
# another sysfs in place of /sys for the storage check (tests: a fake device stack), as
# TPM2_UNLOCKER_EVENTLOG names another event log
SYSFS_ENV = "TPM2_UNLOCKER_SYSFS"
DEFAULT_STATE_DIR = "/var/lib/tpm2-unlocker"
KEY_FILE = "policy-key.pem"
# dm's uuid prefixes of the mappings cryptsetup makes that encrypt (CRYPT-LUKS2-<uuid>-<name>, ...);
# not CRYPT-INTEGRITY- (dm-integrity alone), CRYPT-VERITY- or CRYPT-SUBDEV-, which do not
CRYPT_UUID_PREFIXES = ("CRYPT-LUKS1-", "CRYPT-LUKS2-", "CRYPT-PLAIN-", "CRYPT-TCRYPT-", "CRYPT-BITLK-")
# device stacks deeper than this are not real (and a loop in a fake or broken sysfs must end)
MAX_DEPTH = 16


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def key_path() -> Path:
    return state_dir() / KEY_FILE


def _existing(path: Path) -> Path:
    """`path`, or its nearest existing ancestor (the state directory may not be made yet: it will be
    on its parent's filesystem)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def on_encrypted_storage(path: str | os.PathLike[str], sysfs: str = "/sys") -> bool:
    """Whether the filesystem holding `path` lives on dm-crypt: its block device (st_dev) or a device
    below it (slaves/, recursively: LVM on LUKS) is a dm device with a CRYPT- uuid. A filesystem
    without a block device of its own (tmpfs, overlay, btrfs's anonymous st_dev) counts as not
    encrypted: when in doubt the key must not be made."""
    st_dev = os.stat(_existing(Path(path))).st_dev
    start = Path(sysfs) / "dev" / "block" / f"{os.major(st_dev)}:{os.minor(st_dev)}"
    try:
        device = start.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return _crypt_below(device, 0, set())


def state_dir_encrypted() -> bool:
    """Whether STATE_DIR is on dm-crypt; an unreadable path counts as not (the key is then not made)."""
    try:
        return on_encrypted_storage(state_dir(), os.environ.get(SYSFS_ENV) or "/sys")
    except OSError:
        return False


def _crypt_below(device: Path, depth: int, seen: set[Path]) -> bool:
    if depth > MAX_DEPTH or device in seen:
        return False
    seen.add(device)
    try:
        uuid = (device / "dm" / "uuid").read_text().strip()
    except OSError:
        uuid = ""
    if uuid.startswith(CRYPT_UUID_PREFIXES):
        return True
    below: list[Path] = []
    if (device / "partition").exists():  # a partition: what holds it is its whole disk
        below.append(device.parent)
    try:
        below += [slave.resolve(strict=True) for slave in (device / "slaves").iterdir()]
    except (OSError, RuntimeError):
        pass
    return any(_crypt_below(d, depth + 1, seen) for d in below)


def _check_private(path: Path) -> None:
    """A key file others can read or that is not a regular file is refused (a secret, kept 0600)."""
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077:
        raise UsageError(f"the machine key {path} is not a regular file of mode 0600: refusing to use it")


def machine_key_present() -> bool:
    return key_path().exists()


def load() -> PrivateKey:
    """The machine key; UsageError if absent or unusable."""
    path = key_path()
    try:
        _check_private(path)
    except FileNotFoundError:
        raise UsageError(f"there is no machine key at {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read the machine key {path}: {exc.strerror or exc}") from None
    return PrivateKey(str(path))


def create() -> bool:
    """Make the machine key unless there is one: True if this call made it. A directory that cannot
    be written (a root mounted read-only, a full disk) is a UsageError, said in one line."""
    try:
        return _create()
    except OSError as exc:
        raise UsageError(f"cannot write the machine key in {state_dir()}: {exc.strerror or exc}") from None


def _create() -> bool:
    """Written to a temporary file (O_EXCL, 0600) and linked into place, so no reader ever sees half a
    key and two runs at once keep one key (link, unlike rename, never replaces one already there)."""
    serialization = cryptography_serialization()
    from cryptography.hazmat.primitives.asymmetric import ec

    directory, path = state_dir(), key_path()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory.stat().st_mode & 0o077:
        raise UsageError(f"{directory} is open to other users (mode {directory.stat().st_mode & 0o777:o}); "
                         "make it 0700 to keep a machine key there")
    if path.exists():
        return False
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    temporary = directory / f".{KEY_FILE}.{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:  # another run made it first: its key is the one
            return False
    finally:
        temporary.unlink(missing_ok=True)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the key survives a power cut right after enrolment took its public half
    finally:
        os.close(dir_fd)
    return True


def remove() -> None:
    """Remove the machine key (an enrolment that made it failed: nothing else took it)."""
    key_path().unlink(missing_ok=True)


def matches(key_name: bytes) -> bool:
    """Whether the machine key is present, usable and named `key_name` (a Signed branch's key).
    Any failure reading it counts as no: the caller falls back to what it did without one."""
    if not machine_key_present():
        return False
    try:
        key = load()
    except (UnlockerError, OSError):
        return False
    return name_of(key.public) == key_name
