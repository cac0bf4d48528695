"""The file store across re-seals: the old pair keeps working until the new one is proven, and a
failed re-seal leaves it as it was."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from helpers import PASSPHRASE, Swtpm, opens, our_tokens, run_cli
from helpers import enroll_or_fail as enroll

pytestmark = pytest.mark.tpm


def _failing_token_import(tmp_path: Path) -> dict[str, str]:
    """A cryptsetup whose `token import` fails (a full header, a crash): what a re-seal meets half-way."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    real = shutil.which("cryptsetup")
    script = bindir / "cryptsetup"
    script.write_text(f'#!/bin/sh\n[ "$1 $2" = "token import" ] && {{ echo "no space" >&2; exit 1; }}\n'
                      f'exec {real} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bindir}:{os.environ['PATH']}"}


def test_a_failed_reseal_of_a_file_store_leaves_the_old_pair_working(disk: Path, key_file: Path, tpm: Swtpm,
                                                                     tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    enroll(disk, key_file, tpm, "--store", f"file={blob}", "--pcrs", "sha256:7")
    before = {p.name: p.read_bytes() for p in blob.iterdir()}
    tokens_before = our_tokens(disk)
    done = run_cli("reseal", str(disk), "--unlock-key-file", str(key_file), tpm=tpm, env=_failing_token_import(tmp_path))
    assert done.returncode == 7, done.stderr
    assert b"writing the LUKS2 token failed: no space" in done.stderr
    assert b"re-seal failed, undoing what was added" in done.stderr
    assert {p.name: p.read_bytes() for p in blob.iterdir()} == before
    assert our_tokens(disk) == tokens_before
    assert run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm).returncode == 0
    assert opens(disk, PASSPHRASE)


def test_a_reseal_of_a_file_store_writes_a_new_pair_and_drops_the_old(disk: Path, key_file: Path, tpm: Swtpm,
                                                                      tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    enroll(disk, key_file, tpm, "--store", f"file={blob}", "--pcrs", "sha256:7")
    assert sorted(p.name for p in blob.iterdir()) == ["key.priv", "key.pub"]
    for names in (["key.2.priv", "key.2.pub"], ["key.priv", "key.pub"]):  # the pair alternates
        tpm.extend(7)
        done = run_cli("reseal", str(disk), "--unlock-key-file", str(key_file), tpm=tpm)
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in blob.iterdir()) == names
        assert run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm).returncode == 0


def test_unpack_names_the_blob_directories_of_file_store_enrolments(disk: Path, key_file: Path, tpm: Swtpm,
                                                                    tmp_path: Path) -> None:
    from helpers import make_luks_image

    from unlocker.commands.unpack import blob_dirs

    other = make_luks_image(tmp_path / "other.img")
    enroll(disk, key_file, tpm, "--store", f"file={tmp_path / 'blob'}")
    enroll(other, key_file, tpm)  # a token store: nothing to carry
    plain = tmp_path / "plain"
    plain.write_bytes(bytes(8192))
    assert blob_dirs([str(disk), str(other), str(plain), str(tmp_path / "gone")]) == [str(tmp_path / "blob")]
