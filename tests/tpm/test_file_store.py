"""The file store across re-seals: the old pair keeps working until the new one is proven, and a
failed re-seal leaves it as it was."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
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


def test_a_planted_link_in_place_of_a_pending_file_is_never_written_through(disk: Path, key_file: Path,
                                                                           tpm: Swtpm, tmp_path: Path) -> None:
    """A symbolic link where the re-seal writes its pending file (key.2.pub.new, pointing at a file
    of someone else's) is removed, not followed: the target keeps its bytes."""
    blob = tmp_path / "blob"
    enroll(disk, key_file, tpm, "--store", f"file={blob}", "--pcrs", "sha256:7")
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours to overwrite")
    for name in ("key.2.pub.new", "key.2.priv.new"):
        (blob / name).symlink_to(victim)
    tpm.extend(7)
    done = run_cli("reseal", str(disk), "--unlock-key-file", str(key_file), tpm=tpm)
    assert done.returncode == 0, done.stderr
    assert victim.read_bytes() == b"not yours to overwrite"
    assert sorted(p.name for p in blob.iterdir()) == ["key.2.priv", "key.2.pub"]
    assert not (blob / "key.2.pub").is_symlink()
    assert run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm).returncode == 0


@pytest.fixture
def carried_dir() -> Iterator[Path]:
    """A directory under /etc/tpm2-unlocker/, the one place whose file stores the image carries."""
    import tempfile

    Path("/etc/tpm2-unlocker").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="test-", dir="/etc/tpm2-unlocker"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def test_unpack_names_exactly_the_blob_files_of_carried_file_stores(disk: Path, key_file: Path, tpm: Swtpm,
                                                                   tmp_path: Path, carried_dir: Path) -> None:
    from helpers import make_luks_image, replace_token

    from unlocker.commands.unpack import blob_files

    other = make_luks_image(tmp_path / "other.img")
    enroll(disk, key_file, tpm, "--store", f"file={carried_dir / 'blob'}")
    done = run_cli("enroll", str(other), "--unlock-key-file", str(key_file), "--store", f"file={tmp_path / 'elsewhere'}",
                   tpm=tpm)
    assert done.returncode == 0 and b"is not under /etc/tpm2-unlocker/: the initramfs hooks carry no files" in done.stderr
    plain = tmp_path / "plain"
    plain.write_bytes(bytes(8192))
    devices = [str(disk), str(other), str(plain), str(tmp_path / "gone")]
    assert blob_files(devices) == [str(carried_dir / "blob" / "key.priv"), str(carried_dir / "blob" / "key.pub")]
    # a hostile stick's token naming /etc, or a link where a pair file should be: nothing of it carried
    (tid, token), = our_tokens(other).items()
    token["blob_dir"] = "/etc"
    replace_token(other, tid, token)
    (carried_dir / "blob" / "key.pub").unlink()
    (carried_dir / "blob" / "key.pub").symlink_to("/etc/shadow")
    assert blob_files(devices) == [str(carried_dir / "blob" / "key.priv")]


@pytest.mark.parametrize("blob_dir", ["/etc/tpm2-unlocker/../../etc", "/etc/tpm2-unlocker/a b", "/etc/*", "relative"])
def test_a_token_whose_blob_dir_is_no_plain_path_is_corrupt(blob_dir: str) -> None:
    from unlocker.errors import CorruptError
    from unlocker.token import parse_token

    doc = {"type": "tpm2-unlocker", "keyslots": ["1"], "version": 1, "store": "file", "pcr_bank": "sha256",
           "pcrs": [7], "pcr_values": {"7": "00" * 32}, "policy_hash": "11" * 32, "srk_name": "000b" + "22" * 32,
           "pin": False, "keyslot_owned": True, "blob_dir": blob_dir}
    with pytest.raises(CorruptError, match="blob_dir is not a plain absolute path"):
        parse_token(doc)
