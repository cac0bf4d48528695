"""DA lockout, power cuts, half-way failures, secrets in argv/on the bus, policy math against the TPM."""

from __future__ import annotations

import base64
import os
import shutil
import stat
from pathlib import Path

import pytest
from helpers import (
    PASSPHRASE,
    SEED_SECRET,
    SRK_ATTRS,
    Swtpm,
    add_keyslot,
    luks_json,
    make_luks_image,
    opens,
    run_cli,
    seal_the_archwiki_way,
    tpm2_tools_unseal,
    unlock_with_prompt,
)
from helpers import enroll_or_fail as enroll

pytestmark = pytest.mark.tpm


def adopt_da_protected_blob(disk: Path, tpm: Swtpm, work: Path) -> None:
    """A key sealed the ArchWiki way (no noDA), adopted: the kind of object DA lockout blocks."""
    add_keyslot(disk, SEED_SECRET)
    pub, priv = seal_the_archwiki_way(tpm, work, "sha256:0,7")
    done = run_cli("adopt", str(disk), "--blob", str(pub), str(priv), "--pcrs", "sha256:0,7", tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()


def force_lockout(tpm: Swtpm, work: Path) -> None:
    """Fail a password authorisation until the TPM locks out (swtpm's default: 3 tries)."""
    tpm.tools("tpm2_createprimary", "--key-algorithm=ecc", f"--key-context={work / 'p2.ctx'}")
    tpm.tools("tpm2_flushcontext", "-t")
    tpm.tools("tpm2_create", f"--parent-context={work / 'p2.ctx'}", "--sealing-input=-", "--key-auth=right",
              f"--public={work / 'pw.pub'}", f"--private={work / 'pw.priv'}", input=b"x")
    tpm.tools("tpm2_flushcontext", "-t")
    tpm.tools("tpm2_load", f"--parent-context={work / 'p2.ctx'}", f"--public={work / 'pw.pub'}",
              f"--private={work / 'pw.priv'}", f"--key-context={work / 'pw.ctx'}")
    for _ in range(5):
        tpm.tools("tpm2_flushcontext", "-t")
        tpm.tools("tpm2_unseal", f"--object-context={work / 'pw.ctx'}", "--auth=wrong", check=False)
    tpm.tools("tpm2_flushcontext", "-t")
    assert "inLockout:                 1" in tpm.tools("tpm2_getcap", "properties-variable").stdout.decode()


def test_da_lockout_says_so_and_falls_back(disk: Path, tpm: Swtpm, tmp_path: Path) -> None:
    adopt_da_protected_blob(disk, tpm, tmp_path)
    force_lockout(tpm, tmp_path)
    assert unlock_with_prompt(disk, tpm.tcti, "the TPM is in dictionary-attack lockout", PASSPHRASE) == 0
    done = run_cli("unlock", str(disk), "--test", tpm=tpm)
    assert done.returncode == 4
    assert b"lockout" in done.stderr and b"Traceback" not in done.stderr
    status = run_cli("status", tpm=tpm).stdout.decode()
    assert "(IN LOCKOUT: one more try every " in status


def test_our_noda_enrolment_unlocks_during_lockout(disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    enroll(disk, key_file, tpm)
    force_lockout(tpm, tmp_path)
    done = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()


def test_four_power_cuts_in_a_row_every_store_still_unlocks(key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    disks = {}
    for store in ("token", "nv", "file"):
        disks[store] = make_luks_image(tmp_path / f"{store}.img")
        spec = f"file={tmp_path / 'blob'}" if store == "file" else store
        enroll(disks[store], key_file, tpm, "--store", spec)
    # A DA-protected object (the ArchWiki way) beside ours shows the cuts really count.
    seed_disk = make_luks_image(tmp_path / "seed.img")
    adopt_da_protected_blob(seed_disk, tpm, tmp_path)
    try:
        for cut in range(4):
            for store, disk in disks.items():
                done = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
                assert done.returncode == 0, f"cut {cut}, {store}: {done.stderr.decode()}"
            run_cli("unlock", str(seed_disk), "--test", "--tries", "0", tpm=tpm)
            tpm.power_cut()
            tpm.start()
        for store, disk in disks.items():
            done = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
            assert done.returncode == 0, f"after 4 cuts, {store}: {done.stderr.decode()}"
        seed = run_cli("unlock", str(seed_disk), "--test", "--tries", "0", tpm=tpm)
        assert seed.returncode == 4, "the DA-protected object should be locked out by now"
    finally:
        tpm.tools("tpm2_nvundefine", "0x1500016", check=False)


def _wrapper_bin(tmp_path: Path, body: str) -> Path:
    """A `cryptsetup` first in PATH that runs the real one, plus `body` afterwards."""
    real = shutil.which("cryptsetup")
    assert real is not None
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "cryptsetup"
    script.write_text(f'#!/bin/sh\n{body}\n{real} "$@"\nrc=$?\n' + 'case "$1" in luksAddKey) ' + "{after} ;; esac\n"
                      'exit $rc\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bindir


def test_enrol_failure_half_way_leaves_the_disk_as_before(disk: Path, key_file: Path, tpm: Swtpm,
                                                           tmp_path: Path) -> None:
    """The TPM goes away right after the keyslot was added: everything added is undone."""
    bindir = _wrapper_bin(tmp_path, ":")
    script = bindir / "cryptsetup"
    script.write_text(script.read_text().replace(
        "{after}", f"swtpm_ioctl --tcp 127.0.0.1:{tpm.port + 1} -s >/dev/null 2>&1"))
    before = luks_json(disk)
    done = enroll(disk, key_file, tpm, env={"PATH": f"{bindir}:{os.environ['PATH']}"}, status=2)
    assert b"enrolment failed, undoing what was added" in done.stderr
    assert luks_json(disk) == before
    assert opens(disk, PASSPHRASE)


def test_enrol_failure_when_nv_index_taken_leaves_the_disk_as_before(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    tpm.tools("tpm2_nvdefine", "--size", "8", "--attributes=ownerread|ownerwrite", "0x1500016")
    try:
        before = luks_json(disk)
        done = enroll(disk, key_file, tpm, "--store", "nv", status=1)
        assert b"already defined" in done.stderr
        assert luks_json(disk) == before
    finally:
        tpm.tools("tpm2_nvundefine", "0x1500016")


def test_no_secret_in_argv_or_environment_of_cryptsetup(disk: Path, key_file: Path, tpm: Swtpm,
                                                         tmp_path: Path) -> None:
    log = tmp_path / "argv.log"
    bindir = _wrapper_bin(tmp_path, f"{{ tr '\\0' ' ' </proc/$$/cmdline; echo; tr '\\0' ' ' </proc/$$/environ; "
                                    f"echo; }} >>{log}")
    script = bindir / "cryptsetup"
    script.write_text(script.read_text().replace("{after}", ":"))
    env = {"PATH": f"{bindir}:{os.environ['PATH']}"}
    blob = tmp_path / "blob"
    enroll(disk, key_file, tpm, "--store", f"file={blob}", env=env)
    assert run_cli("unlock", str(disk), "--test", tpm=tpm, env=env).returncode == 0
    keys = [tpm2_tools_unseal(tpm, blob, "sha256:0,2,4,7,15", tmp_path / "ctx1")]
    tpm.extend(7)
    assert run_cli("reseal", str(disk), "--unlock-key-file", str(key_file), tpm=tpm, env=env).returncode == 0
    assert run_cli("unlock", str(disk), "--test", tpm=tpm, env=env).returncode == 0
    keys.append(tpm2_tools_unseal(tpm, blob, "sha256:0,2,4,7,15", tmp_path / "ctx2", name="key.2"))
    assert run_cli("remove", str(disk), "--unlock-key-file", str(key_file), tpm=tpm, env=env).returncode == 0
    recorded = log.read_bytes()
    assert b"luksAddKey" in recorded and b"--test-passphrase" in recorded and b"luksKillSlot" in recorded
    assert PASSPHRASE not in recorded
    assert len(keys) == 2 and keys[0] != keys[1] and all(len(k) == 32 for k in keys)
    for key in keys:
        assert key not in recorded and key.hex().encode() not in recorded
        assert base64.b64encode(key) not in recorded



def test_key_never_crosses_the_bus_in_clear(disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    """pcap TCTI capture of our unseal holds no key bytes; tpm2_unseal's (unsalted) capture does."""
    blob = tmp_path / "blob"
    enroll(disk, key_file, tpm, "--store", f"file={blob}", "--pcrs", "sha256:7")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    tpm.tools("tpm2_createprimary", "-C", "o", "--key-algorithm=ecc", f"--attributes={SRK_ATTRS}",
              f"--key-context={ctx / 'p.ctx'}")
    tpm.tools("tpm2_load", f"--parent-context={ctx / 'p.ctx'}", f"--public={blob / 'key.pub'}",
              f"--private={blob / 'key.priv'}", f"--key-context={ctx / 'k.ctx'}")
    tpm.tools("tpm2_flushcontext", "-t")
    plain_pcap = tmp_path / "plain.pcap"
    import subprocess
    key = subprocess.run(["tpm2_unseal", f"--object-context={ctx / 'k.ctx'}", "--auth=pcr:sha256:7,15"],
                         env=dict(os.environ, TPM2TOOLS_TCTI=f"pcap:{tpm.tcti}", TCTI_PCAP_FILE=str(plain_pcap)),
                         capture_output=True, check=True).stdout
    tpm.tools("tpm2_flushcontext", "-t")
    assert len(key) == 32 and opens(disk, key, slot=1)
    assert key in plain_pcap.read_bytes(), "the contrast capture must show the key (else this test proves nothing)"
    ours_pcap = tmp_path / "ours.pcap"
    done = run_cli("unlock", str(disk), "--test", "--tries", "0", "--tcti", f"pcap:{tpm.tcti}",
                   env={"TCTI_PCAP_FILE": str(ours_pcap)})
    assert done.returncode == 0, done.stderr.decode()
    capture = ours_pcap.read_bytes()
    assert len(capture) > 1000
    assert key not in capture
