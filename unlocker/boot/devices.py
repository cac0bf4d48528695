"""Which devices to open at boot: the kernel command line, else crypttab, else every LUKS2 device
carrying our token. Reads LUKS headers directly (no child process per device)."""

from __future__ import annotations

import os
import struct
import time

from unlocker import initrd
from unlocker.lean.jsonload import loads
from unlocker.lean.record import record
from unlocker.token import TOKEN_TYPE

LUKS_MAGIC = b"LUKS\xba\xbe"
UUID_OFFSET, UUID_SIZE = 168, 40
LUKS2_HEADER_MAX = 4 * 1024 * 1024


@record(frozen=True)
class Target:
    """A device to open: `source` is a path or UUID=/PARTUUID=/LABEL=, `name` the mapping."""

    source: str
    name: str | None = None


@record(frozen=True)
class Found:
    """A device node found for a Target; `header` (UUID, LUKS2 metadata) when finding it meant
    reading its header (no udev links), so that the caller need not read it again."""

    path: str
    header: tuple[str, dict | None] | None = None


def _luks_name(uuid: str) -> str:
    return f"luks-{uuid}"


def from_cmdline(cmdline: str) -> list[Target] | None:
    """Targets named by rd.luks.uuid=, rd.luks.name= (dracut/systemd) and cryptdevice= (mkinitcpio).

    None when the command line names none; [] when rd.luks=0 turns unlocking off.
    """
    targets: list[Target] = []
    named = False
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if key == "rd.luks" and value in ("0", "no", "false"):
            return []
        if key == "rd.luks.uuid" and value:
            uuid = value.removeprefix("luks-")
            targets.append(Target(f"UUID={uuid}", _luks_name(uuid)))
            named = True
        elif key == "rd.luks.name" and "=" in value:
            uuid, _, name = value.partition("=")
            uuid = uuid.removeprefix("luks-")
            targets.append(Target(f"UUID={uuid}", name or _luks_name(uuid)))
            named = True
        elif key == "cryptdevice" and value:
            # mkinitcpio: cryptdevice=DEVICE:NAME[:OPTIONS], DEVICE may be UUID=..., /dev/...
            source, _, rest = value.partition(":")
            targets.append(Target(source, rest.split(":", 1)[0] or None))
            named = True
    # rd.luks.name wins over a bare rd.luks.uuid for the same disk
    unique: dict[str, Target] = {}
    for t in targets:
        if t.source not in unique or t.name != _luks_name(t.source.removeprefix("UUID=")):
            unique[t.source] = t
    return list(unique.values()) if named else None


def from_crypttab(path: str = "/etc/crypttab") -> list[Target]:
    targets: list[Target] = []
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) < 2 or fields[0].startswith("#"):
            continue
        options = fields[3].split(",") if len(fields) > 3 else []
        if "noauto" in options:
            continue
        targets.append(Target(fields[1], fields[0]))
    return targets


def read_luks_header(path: str, uuid: str | None = None) -> tuple[str, dict | None] | None:
    """(UUID, LUKS2 JSON metadata or None for LUKS1) of `path`, or None if it is not LUKS. With
    `uuid`, None too when the device has another: its JSON (any stick's, an attacker's) is not
    parsed at all. A header we cannot make sense of is LUKS without metadata, never an error."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
            if len(head) < 4096 or not head.startswith(LUKS_MAGIC):
                return None
            found = head[UUID_OFFSET:UUID_OFFSET + UUID_SIZE].split(b"\0", 1)[0].decode(errors="replace")
            if uuid is not None and found != uuid:
                return None
            version = struct.unpack(">H", head[6:8])[0]
            if version != 2:
                return found, None
            hdr_size = struct.unpack(">Q", head[8:16])[0]
            if not 4096 < hdr_size <= LUKS2_HEADER_MAX:
                return found, None
            area = f.read(hdr_size - 4096).split(b"\0", 1)[0]
    except OSError:
        return None
    try:
        meta = loads(area)
    except ValueError:  # not JSON, or nested deeper than the interpreter recurses
        return found, None
    return found, meta if isinstance(meta, dict) else None


def block_devices() -> list[str]:
    try:
        names = sorted(os.listdir("/sys/class/block"))
    except OSError:
        return []
    return [f"/dev/{n}" for n in names if not n.startswith(("loop", "ram", "dm-", "zram")) and os.path.exists(f"/dev/{n}")]


def has_our_token(meta: dict | None) -> bool:
    tokens = meta.get("tokens", {}) if meta else {}
    return isinstance(tokens, dict) and any(isinstance(t, dict) and t.get("type") == TOKEN_TYPE for t in tokens.values())


def scan() -> list[Target]:
    """Every LUKS2 block device that carries a tpm2-unlocker token."""
    found = []
    for dev in block_devices():
        header = read_luks_header(dev)
        if header is not None and has_our_token(header[1]):
            found.append(Target(dev, _luks_name(header[0])))
    return found


def resolve(source: str) -> Found | None:
    """The device node for a path or UUID=/PARTUUID=/LABEL= source, or None if not (yet) present."""
    if source.startswith("/"):
        return Found(source) if os.path.exists(source) else None
    kind, _, value = source.partition("=")
    links = {"UUID": "by-uuid", "PARTUUID": "by-partuuid", "LABEL": "by-label"}
    if kind not in links or not value or "/" in value or value in (".", ".."):
        return None  # a value with a '/' would lead the link's path out of /dev/disk
    link = f"/dev/disk/{links[kind]}/{value}"
    if os.path.exists(link):
        return Found(os.path.realpath(link))
    if kind == "UUID":  # no udev (plain busybox initramfs): read the headers ourselves
        for dev in block_devices():
            header = read_luks_header(dev, uuid=value)
            if header is not None:
                return Found(dev, header)
    return None


def wait_for(source: str, timeout: float) -> Found | None:
    deadline = time.monotonic() + timeout
    while True:
        found = resolve(source)
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def boot_targets(cmdline_path: str = initrd.CMDLINE, crypttab: str = "/etc/crypttab") -> list[Target]:
    named = from_cmdline(" ".join(initrd.kernel_words(cmdline_path)))
    if named is not None:
        return named
    return from_crypttab(crypttab) or scan()
