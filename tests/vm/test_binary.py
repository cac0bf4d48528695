"""The frozen binary the VM images carry, checked on the host."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import PASSPHRASE, Swtpm, clevis_bind, enroll_or_fail, luks_json, opens, run_cli
from PyInstaller.archive.readers import CArchiveReader

from vm.images import Artifacts


def test_python_in_the_binary_does_not_wait_for_the_kernels_random_pool(artifacts: Artifacts) -> None:
    """Python reads a hash seed from the kernel before it runs anything, and early in boot on a
    machine without a CPU RNG that read waits ~1 s for the pool; the binary runs with a fixed seed
    (the secrets still come from the seeded pool, which the warm-up waits for beside the start)."""
    assert "hash_seed=0" in CArchiveReader(str(artifacts.binary)).options


def test_unpack_lays_out_the_program_that_unseals_with_nothing_left_to_unpack_at_start(
        artifacts: Artifacts, disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the initramfs hooks carry: `unpack DIR` writes the one-folder program, whose archive has
    no library left to copy out at start (so no /run, no second process), and which unseals and
    opens a real enrolment on a real swtpm with the libraries next to it."""
    out = tmp_path / "unpacked"
    done = subprocess.run([str(artifacts.binary), "unpack", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    program = out / "tpm2-unlocker"
    archive = CArchiveReader(str(program))
    kinds = {entry[-1] for entry in archive.toc.values()}
    assert kinds <= {"m", "s", "z"}, f"entries to unpack at start: {kinds}"
    assert "hash_seed=0" in archive.options and "pyi-contents-directory _internal" in archive.options
    assert (out / "_internal" / "libtss2-esys.so.0").is_file()
    # cryptography (adopt --from clevis, on the installed system) is in the one file, not in the image
    assert any(name.startswith("cryptography/") for name in CArchiveReader(str(artifacts.binary)).toc)
    assert not any(p.name.startswith("cryptography") for p in (out / "_internal").iterdir())

    enroll_or_fail(disk, key_file, tpm)
    monkeypatch.setenv("TPM2_UNLOCKER_BIN", str(program))
    opened = run_cli("unlock", str(disk), "--test", tpm=tpm)
    assert opened.returncode == 0, opened.stderr.decode()
    assert b"unlocked with the TPM" in opened.stderr


def test_unpack_refuses_a_directory_in_use(artifacts: Artifacts, tmp_path: Path) -> None:
    (tmp_path / "something").touch()
    done = subprocess.run([str(artifacts.binary), "unpack", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr == f"tpm2-unlocker: {tmp_path} exists and is not an empty directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["something"]


def test_unpack_where_nothing_can_be_written_says_so_and_exits_1(artifacts: Artifacts, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    out = tmp_path / "a-file" / "tpm2-unlocker"
    done = subprocess.run([str(artifacts.binary), "unpack", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr == f"tpm2-unlocker: cannot unpack into {out}: Not a directory\n"


def test_unpack_onto_a_noexec_mount_copies_without_starting_it(artifacts: Artifacts, tmp_path: Path) -> None:
    """mkinitcpio stages its image under /tmp, dracut under /var/tmp; hardened systems mount them
    noexec. The image build must not fail there: the program is copied, not started."""
    staging = tmp_path / "staging"
    staging.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec", "tmpfs", str(staging)], check=True)
    try:
        out = staging / "usr" / "lib" / "tpm2-unlocker"
        done = subprocess.run([str(artifacts.binary), "unpack", str(out)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stderr == f"tpm2-unlocker: unpacked into {out} (not started to check it: {out} is on a noexec mount)\n"
        assert (out / "tpm2-unlocker").read_bytes() == _launcher_in(artifacts.binary, tmp_path)
        assert (out / "_internal" / "libpython3.11.so.1.0").is_file()
    finally:
        subprocess.run(["umount", str(staging)], check=True)


def _launcher_in(binary: Path, work: Path) -> bytes:
    """The one-folder launcher as the one file carries it, unpacked by a normal (checked) run."""
    done = subprocess.run([str(binary), "unpack", str(work / "reference")], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return (work / "reference" / "tpm2-unlocker").read_bytes()


def test_the_binary_adopts_a_clevis_tpm2_pin_decrypting_its_jwe(artifacts: Artifacts, disk: Path, tpm: Swtpm,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The frozen one file carries cryptography for Clevis's JWE: adopt --from clevis works installed."""
    clevis_bind(disk, tpm)
    monkeypatch.setenv("TPM2_UNLOCKER_BIN", str(artifacts.binary))
    done = run_cli("adopt", str(disk), "--from", "clevis", "--replace", tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    assert not any(t["type"] == "clevis" for t in luks_json(disk)["tokens"].values())
    opened = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
    assert opened.returncode == 0, opened.stderr.decode()
    assert opens(disk, PASSPHRASE, slot=0)
