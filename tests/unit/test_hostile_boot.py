"""What the boot takes from the kernel command line, crypttab and other disks' headers: never an
option for cryptsetup, never a path out of /dev/disk, never a crash that stops the other devices."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from helpers import run_cli

from unlocker.boot import at_boot, devices
from unlocker.boot.at_boot import BootOptions, _open_targets
from unlocker.boot.devices import LUKS_MAGIC, Target, from_crypttab, read_luks_header, resolve
from unlocker.boot.unlock import check_mapping_name
from unlocker.errors import EXIT_INTERNAL, UnlockerError, UsageError
from unlocker.luks import LuksDevice


@pytest.mark.parametrize("name", ["--test-passphrase", "-x", "", ".", "..", "a/b", "../root", "a b", "tab\tname",
                                  "x" * 128, "line\nbreak"])
def test_a_mapping_name_that_is_no_plain_name_is_refused(name: str) -> None:
    with pytest.raises(UsageError, match="is not a usable mapping name"):
        check_mapping_name(name)


@pytest.mark.parametrize("name", ["root", "luks-0b7c3c2e-6f1a-4a39-9c0e-2b1f0e4a6d11", "cr_home", "x" * 127, "a-b.c"])
def test_plain_mapping_names_pass(name: str) -> None:
    check_mapping_name(name)


def test_a_name_like_an_option_is_refused_before_cryptsetup_runs(disk: Path) -> None:
    done = run_cli("unlock", str(disk), "--", "--test-passphrase")
    assert done.returncode == 1
    assert b"'--test-passphrase' is not a usable mapping name" in done.stderr


def test_cryptsetup_gets_every_path_and_name_after_the_end_of_its_options(disk: Path) -> None:
    device = LuksDevice(str(disk))
    opening = device._open_args("-n", 1)
    assert opening[opening.index("--"):] == ["--", str(disk), "-n"]
    for testing in (device._test_args(1), device._test_args(None)):
        assert testing[testing.index("--"):] == ["--", str(disk)]


@pytest.mark.parametrize("source", ["UUID=../../vda", "UUID=..", "LABEL=a/../../b", "PARTUUID=/etc/passwd"])
def test_a_source_with_a_slash_never_leaves_dev_disk(source: str) -> None:
    assert resolve(source) is None


def _luks_file(path: Path, uuid: bytes, json_area: bytes) -> Path:
    head = bytearray(4096)
    head[0:6] = LUKS_MAGIC
    head[6:8] = struct.pack(">H", 2)
    head[8:16] = struct.pack(">Q", 16384)
    head[168:168 + len(uuid)] = uuid
    path.write_bytes(bytes(head) + json_area + bytes(16384 - 4096 - len(json_area)))
    return path


def test_another_disks_header_is_never_parsed_when_a_uuid_is_looked_for(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    stick = _luks_file(tmp_path / "stick", b"1111-attacker", b'{"tokens": {}}')

    def no_parse(data: object) -> object:
        raise AssertionError("the JSON of a disk with another UUID was parsed")

    monkeypatch.setattr(devices, "loads", no_parse)
    assert read_luks_header(str(stick), uuid="2222-ours") is None


def test_a_crypttab_that_is_not_utf8_still_reads(tmp_path: Path) -> None:
    tab = tmp_path / "crypttab"
    tab.write_bytes(b"root UUID=1234 none luks\n\xff\xfe junk\n")
    assert from_crypttab(str(tab))[0] == Target("UUID=1234", "root")


def test_a_bug_met_at_one_device_never_stops_the_next(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    tried: list[str] = []

    def open_target(target: Target, opts: BootOptions, context: object) -> None:
        tried.append(target.source)
        if target.source == "/dev/first":
            raise KeyError("a bug")
        if target.source == "/dev/second":
            raise UsageError("/dev/second: refused")

    monkeypatch.setattr(at_boot, "_open_target", open_target)
    failures = _open_targets([Target("/dev/first"), Target("/dev/second"), Target("/dev/third")],
                             BootOptions(tries=0, tcti=None, timeout=0), None)
    assert tried == ["/dev/first", "/dev/second", "/dev/third"]
    assert [f.exit_code for f in failures] == [EXIT_INTERNAL, 1]
    assert all(isinstance(f, UnlockerError) for f in failures)
    assert capsys.readouterr().err.splitlines() == [
        "tpm2-unlocker: /dev/first: internal error: KeyError: 'a bug'", "tpm2-unlocker: /dev/second: refused"]


def test_a_kernel_command_line_with_any_byte_still_reads(tmp_path: Path) -> None:
    """A byte that is no UTF-8 stopped the whole boot before any device was tried."""
    from unlocker import initrd

    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"root=/dev/vda rd.luks.uuid=\xff\xfe quiet tpm2_unlocker.debug\n")
    words = initrd.kernel_words(str(cmdline))
    assert words[0] == "root=/dev/vda" and "tpm2_unlocker.debug" in words
    assert devices.boot_targets(str(cmdline), str(tmp_path / "no-crypttab"))[0].source.startswith("UUID=")


def test_device_mappers_control_node_is_no_mapping_name() -> None:
    with pytest.raises(UsageError, match="not device-mapper's own 'control'"):
        check_mapping_name("control")
