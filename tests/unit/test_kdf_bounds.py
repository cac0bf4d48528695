"""A keyslot's PBKDF cost read from the header is bounded before a key is tried on it; cryptsetup runs
that derive a key or read the header end in bounded time whatever the header says."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from helpers import PASSPHRASE, add_keyslot, make_luks_image, rewrite_header_json

from unlocker import luks
from unlocker.boot.devices import read_luks_header
from unlocker.errors import CryptsetupError
from unlocker.luks import LuksDevice, kdf_cost_problem

HOSTILE_ARGON2 = {"type": "argon2id", "time": 2**32 - 1, "memory": 1048576, "cpus": 1}


def test_what_luksformat_picks_on_this_machine_is_within_the_bounds(tmp_path: Path) -> None:
    """LUKS2's default PBKDF after cryptsetup's own benchmark (2 s here), as a user's passphrase
    keyslot has it. (Its PBKDF2 benchmark picks a few million iterations here: far below the bound.)"""
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(20 * 1024 * 1024)
    subprocess.run(["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf", "argon2id",
                    "--key-file=-", str(disk)], input=PASSPHRASE, check=True, capture_output=True)
    device = LuksDevice(str(disk))
    kdf = device.keyslot_kdf(0)
    assert kdf["type"] == "argon2id"
    assert kdf_cost_problem(kdf) == ""
    assert device.key_plan() == ([0], [])


@pytest.mark.parametrize(("kdf", "problem"), [
    (HOSTILE_ARGON2, "its argon2id cost (4294967295 passes over 1048576 KiB) is above 32 passes over 1 GiB"),
    ({"type": "argon2i", "time": 4, "memory": 4 * 1024 * 1024 + 1}, "its argon2i cost (4 passes over 4194305 KiB)"),
    ({"type": "argon2id", "time": 33, "memory": 1048576}, "is above 32 passes over 1 GiB"),
    ({"type": "pbkdf2", "hash": "sha256", "iterations": 2**32 - 1}, "its PBKDF2 cost (4294967295 iterations) is above"),
    ({"type": "pbkdf2", "iterations": "1000"}, "its PBKDF2 iteration count is unreadable"),
    ({"type": "pbkdf2", "iterations": True}, "its PBKDF2 iteration count is unreadable"),
    ({"type": "argon2id", "time": -1, "memory": 1024}, "its argon2id parameters are unreadable"),
    ({"type": "argon2id", "time": 4.5, "memory": 1024}, "its argon2id parameters are unreadable"),
    ({"type": "scrypt", "N": 2**40}, "its PBKDF 'scrypt' is unknown"),
    ("argon2id", "its PBKDF parameters are unreadable"),
])
def test_a_hostile_or_unreadable_pbkdf_is_named_with_why(kdf: object, problem: str) -> None:
    assert problem in kdf_cost_problem(kdf)


@pytest.mark.parametrize("kdf", [
    {"type": "argon2id", "time": 32, "memory": 1048576, "cpus": 4},
    {"type": "argon2i", "time": 4, "memory": 4 * 1024 * 1024},  # cryptsetup's largest memory, at luksFormat's passes
    {"type": "pbkdf2", "hash": "sha512", "iterations": 100_000_000},
    {"type": "pbkdf2", "hash": "sha256", "iterations": 1000},
])
def test_costs_up_to_the_bounds_are_tried(kdf: dict) -> None:
    assert kdf_cost_problem(kdf) == ""


def test_the_passphrase_is_tried_on_cryptsetups_view_of_the_header(tmp_path: Path) -> None:
    """The boot reads the primary header itself; cryptsetup takes the copy with the higher sequence id.
    A hostile disk with a harmless primary and a costly keyslot in its newer secondary: which keyslots
    the passphrase is tried on is decided on what cryptsetup will use."""
    disk = make_luks_image(tmp_path / "disk.img")
    add_keyslot(disk, b"second")
    add_keyslot(disk, b"third")
    subprocess.run(["cryptsetup", "luksKillSlot", "--key-file=-", str(disk), "1"], input=PASSPHRASE, check=True)
    rewrite_header_json(disk, lambda doc: doc["keyslots"]["2"].update(kdf={**doc["keyslots"]["2"]["kdf"],
                                                                           **HOSTILE_ARGON2}),
                        copies=(1,), seqid_step=1)
    found = read_luks_header(str(disk))
    assert found is not None and found[1] is not None
    device = LuksDevice(str(disk))
    device.seed_metadata(found[1])
    assert device.key_plan() == ([0, 2], []), "the boot's own read sees the harmless primary"
    device.use_cryptsetups_view()
    tried, skipped = device.key_plan()
    assert tried == [0] and [slot for slot, _ in skipped] == [2]


def _sleeping_cryptsetup(tmp_path: Path, verb: str) -> str:
    """A `cryptsetup` first in PATH that hangs in `verb` (as on a keyslot the bounds missed) and runs
    the real one otherwise."""
    real = subprocess.run(["sh", "-c", "command -v cryptsetup"], capture_output=True, text=True).stdout.strip()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "cryptsetup"
    script.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "{verb}" ] && exec sleep 120; done\nexec {real} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return f"{bindir}:{os.environ['PATH']}"


@pytest.mark.parametrize(("verb", "call"), [
    ("--test-passphrase", lambda d: d.test_key(PASSPHRASE)),
    ("--test-passphrase", lambda d: d.test_key(PASSPHRASE, 0)),
    ("luks2", lambda d: d.open(PASSPHRASE, "tpm2u-never")),  # open --type luks2
    ("luksDump", lambda d: d.metadata()),
])
def test_a_cryptsetup_run_that_never_ends_is_stopped(verb: str, call, disk: Path, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _sleeping_cryptsetup(tmp_path, verb))
    monkeypatch.setattr(luks, "OPEN_TIMEOUT", 1.0)
    monkeypatch.setattr(luks, "READ_TIMEOUT", 1.0)
    device = LuksDevice(str(disk))
    if verb != "luksDump":
        device.seed_metadata(luks_json_of(disk))
    started = time.monotonic()
    with pytest.raises(CryptsetupError, match=r"did not finish within 1 s and was stopped"):
        call(device)
    assert time.monotonic() - started < 10


def luks_json_of(disk: Path) -> dict:
    found = read_luks_header(str(disk))
    assert found is not None and found[1] is not None
    return found[1]
