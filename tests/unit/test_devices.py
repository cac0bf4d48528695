"""Which devices boot opens: command line forms of dracut, systemd and mkinitcpio; crypttab; headers."""

from __future__ import annotations

from pathlib import Path

import pytest

from unlocker.boot.devices import Target, from_cmdline, from_crypttab, has_our_token, read_luks_header


def test_cmdline_forms() -> None:
    assert from_cmdline("root=/dev/sda quiet") is None
    assert from_cmdline("rd.luks.uuid=1234") == [Target("UUID=1234", "luks-1234")]
    assert from_cmdline("rd.luks.uuid=luks-1234") == [Target("UUID=1234", "luks-1234")]
    assert from_cmdline("rd.luks.name=1234=cryptroot") == [Target("UUID=1234", "cryptroot")]
    assert from_cmdline("rd.luks.uuid=1234 rd.luks.name=1234=root") == [Target("UUID=1234", "root")]
    assert from_cmdline("cryptdevice=UUID=abcd:root:allow-discards") == [Target("UUID=abcd", "root")]
    assert from_cmdline("cryptdevice=/dev/vda2:cryptroot") == [Target("/dev/vda2", "cryptroot")]
    assert from_cmdline("rd.luks=0 rd.luks.uuid=1234") == []


def test_crypttab(tmp_path: Path) -> None:
    tab = tmp_path / "crypttab"
    tab.write_text("# comment\nroot UUID=1234 none luks\nswap /dev/vdb none luks,noauto\n")
    assert from_crypttab(str(tab)) == [Target("UUID=1234", "root")]
    assert from_crypttab(str(tmp_path / "missing")) == []


def test_luks_header_is_read_without_cryptsetup(disk: Path, tmp_path: Path) -> None:
    import subprocess
    uuid = subprocess.run(["cryptsetup", "luksUUID", str(disk)], capture_output=True, check=True).stdout.decode().strip()
    header = read_luks_header(str(disk))
    assert header is not None and header[0] == uuid
    assert header[1] is not None and "keyslots" in header[1]
    assert not has_our_token(header[1])
    plain = tmp_path / "plain"
    plain.write_bytes(bytes(8192))
    assert read_luks_header(str(plain)) is None


def test_without_udev_links_a_uuid_is_found_by_its_header_and_the_header_is_handed_on(
        disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A busybox image without udev has no /dev/disk/by-uuid: the devices' headers are read, and the
    one read for the match is kept for the unlock (not read a second time)."""
    import subprocess

    from unlocker.boot import devices

    uuid = subprocess.run(["cryptsetup", "luksUUID", str(disk)], capture_output=True, check=True).stdout.decode().strip()
    plain = tmp_path / "plain"
    plain.write_bytes(bytes(8192))
    monkeypatch.setattr(devices, "block_devices", lambda: [str(plain), str(disk)])  # /sys/class/block's list
    found = devices.resolve(f"UUID={uuid}")
    assert found is not None and found.path == str(disk)
    assert found.header is not None and found.header[0] == uuid and "keyslots" in (found.header[1] or {})
    assert devices.resolve("UUID=00000000-0000-0000-0000-000000000000") is None
    assert devices.resolve(str(disk)) == devices.Found(str(disk))  # a path: nothing read
    assert devices.wait_for("UUID=00000000-0000-0000-0000-000000000000", timeout=0.1) is None
