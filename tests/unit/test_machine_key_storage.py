"""The machine key's storage check on a fake sysfs: the filesystem's block device (the st_dev of a
real file in tmp_path, as /sys/dev/block/MAJ:MIN) and the devices below it; only a dm-crypt mapping
somewhere in that stack counts as encrypted. And the key file itself: 0600 in a 0700 directory,
made once."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from unlocker.commands import machine_key
from unlocker.commands.machine_key import on_encrypted_storage
from unlocker.errors import UsageError


class FakeSysfs:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "dev" / "block").mkdir(parents=True)
        self.devices = root / "devices"

    def device(self, path: str, dm_uuid: str | None = None, partition: bool = False) -> Path:
        device = self.devices / path
        device.mkdir(parents=True)
        (device / "slaves").mkdir()
        if dm_uuid is not None:
            (device / "dm").mkdir()
            (device / "dm" / "uuid").write_text(dm_uuid + "\n")
        if partition:
            (device / "partition").write_text("2\n")
        return device

    def slave(self, upper: Path, lower: Path) -> None:
        (upper / "slaves" / lower.name).symlink_to(os.path.relpath(lower, upper / "slaves"))

    def mount_on(self, target: Path, device: Path) -> None:
        """`target`'s filesystem (its real st_dev) is on `device`."""
        st_dev = os.stat(target).st_dev
        link = self.root / "dev" / "block" / f"{os.major(st_dev)}:{os.minor(st_dev)}"
        link.symlink_to(os.path.relpath(device, link.parent))


@pytest.fixture
def sysfs(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path / "sys")


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


def test_a_plain_partition_is_not_encrypted(sysfs: FakeSysfs, target: Path) -> None:
    sysfs.device("pci0/block/sda")
    sysfs.mount_on(target, sysfs.device("pci0/block/sda/sda2", partition=True))
    assert on_encrypted_storage(target, str(sysfs.root)) is False


def test_a_filesystem_on_dm_crypt_is(sysfs: FakeSysfs, target: Path) -> None:
    sda2 = sysfs.device("pci0/block/sda/sda2", partition=True)
    crypt = sysfs.device("virtual/block/dm-0", dm_uuid="CRYPT-LUKS2-0123abcd-luks-0123")
    sysfs.slave(crypt, sda2)
    sysfs.mount_on(target, crypt)
    assert on_encrypted_storage(target, str(sysfs.root)) is True


def test_lvm_on_dm_crypt_is(sysfs: FakeSysfs, target: Path) -> None:
    sda2 = sysfs.device("pci0/block/sda/sda2", partition=True)
    crypt = sysfs.device("virtual/block/dm-0", dm_uuid="CRYPT-LUKS2-0123abcd-luks-0123")
    root = sysfs.device("virtual/block/dm-1", dm_uuid="LVM-abcdefABCDEF")
    sysfs.slave(crypt, sda2)
    sysfs.slave(root, crypt)
    sysfs.mount_on(target, root)
    assert on_encrypted_storage(target, str(sysfs.root)) is True


@pytest.mark.parametrize("dm_uuid", ["CRYPT-INTEGRITY-sda2", "CRYPT-VERITY-0123abcd-root", "CRYPT-SUBDEV-x"])
def test_cryptsetup_mappings_that_do_not_encrypt_are_not(dm_uuid: str, sysfs: FakeSysfs, target: Path) -> None:
    """dm-integrity alone, dm-verity: cryptsetup names them CRYPT- too, and they encrypt nothing."""
    sda2 = sysfs.device("pci0/block/sda/sda2", partition=True)
    mapped = sysfs.device("virtual/block/dm-0", dm_uuid=dm_uuid)
    sysfs.slave(mapped, sda2)
    sysfs.mount_on(target, mapped)
    assert on_encrypted_storage(target, str(sysfs.root)) is False


def test_lvm_on_a_plain_partition_is_not(sysfs: FakeSysfs, target: Path) -> None:
    sda2 = sysfs.device("pci0/block/sda/sda2", partition=True)
    root = sysfs.device("virtual/block/dm-1", dm_uuid="LVM-abcdefABCDEF")
    sysfs.slave(root, sda2)
    sysfs.mount_on(target, root)
    assert on_encrypted_storage(target, str(sysfs.root)) is False


def test_a_partition_of_a_dm_crypt_device_is(sysfs: FakeSysfs, target: Path) -> None:
    sysfs.device("virtual/block/dm-0", dm_uuid="CRYPT-PLAIN-disk")
    sysfs.mount_on(target, sysfs.device("virtual/block/dm-0/dm-0p1", partition=True))
    assert on_encrypted_storage(target, str(sysfs.root)) is True


def test_a_loop_device_is_not(sysfs: FakeSysfs, target: Path) -> None:
    sysfs.mount_on(target, sysfs.device("virtual/block/loop0"))
    assert on_encrypted_storage(target, str(sysfs.root)) is False


def test_a_filesystem_without_a_block_device_is_not(sysfs: FakeSysfs, target: Path) -> None:
    """tmpfs (and overlay, btrfs's anonymous device): no /sys/dev/block entry for its st_dev."""
    sysfs.device("virtual/block/dm-0", dm_uuid="CRYPT-LUKS2-0123abcd-luks-0123")
    assert on_encrypted_storage(target, str(sysfs.root)) is False


def test_a_loop_in_a_broken_sysfs_ends(sysfs: FakeSysfs, target: Path) -> None:
    a = sysfs.device("virtual/block/dm-0", dm_uuid="LVM-a")
    b = sysfs.device("virtual/block/dm-1", dm_uuid="LVM-b")
    sysfs.slave(a, b)
    sysfs.slave(b, a)
    sysfs.mount_on(target, a)
    assert on_encrypted_storage(target, str(sysfs.root)) is False


def test_a_state_dir_not_made_yet_is_judged_by_its_parent(sysfs: FakeSysfs, target: Path) -> None:
    sysfs.mount_on(target, sysfs.device("virtual/block/dm-0", dm_uuid="CRYPT-LUKS2-x"))
    assert on_encrypted_storage(target / "not" / "yet", str(sysfs.root)) is True


def test_the_key_is_made_once_0600_in_a_0700_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "var" / "lib" / "tpm2-unlocker"
    monkeypatch.setenv(machine_key.STATE_DIR_ENV, str(state))
    assert machine_key.create() is True
    path = state / "policy-key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(state.stat().st_mode) == 0o700
    first = path.read_bytes()
    assert first.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert machine_key.create() is False and path.read_bytes() == first  # reused, never replaced
    assert [p.name for p in state.iterdir()] == ["policy-key.pem"]  # no temporary file left
    assert len(machine_key.load().public) > 0


def test_a_key_others_can_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(machine_key.STATE_DIR_ENV, str(tmp_path / "state"))
    machine_key.create()
    machine_key.key_path().chmod(0o644)
    with pytest.raises(UsageError, match="is not a regular file of mode 0600: refusing to use it"):
        machine_key.load()
    assert machine_key.matches(b"\0" * 34) is False


def test_a_state_dir_open_to_others_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    monkeypatch.setenv(machine_key.STATE_DIR_ENV, str(state))
    with pytest.raises(UsageError, match="is open to other users"):
        machine_key.create()
    assert not machine_key.key_path().exists()


def test_a_state_dir_that_cannot_be_written_is_one_usage_error(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A root mounted read-only (an initramfs's view, a rescue system) or a file in the way: one line,
    no OSError (enroll then enrols without a machine key)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(machine_key.STATE_DIR_ENV, str(blocker / "tpm2-unlocker"))
    with pytest.raises(UsageError, match="cannot write the machine key in .*tpm2-unlocker: Not a directory"):
        machine_key.create()
