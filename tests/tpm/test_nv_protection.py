"""Our NV index: nothing without the PCR policy reads the key, nothing at all overwrites it; an
adopted index that is readable or writable without the policy is named at adoption."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import PASSPHRASE, SEED_SECRET, Swtpm, add_keyslot, opens, run_cli
from helpers import enroll_or_fail as enroll

pytestmark = pytest.mark.tpm


def test_nobody_overwrites_or_reads_our_nv_key_without_the_policy(disk: Path, key_file: Path, tpm: Swtpm,
                                                                 tmp_path: Path) -> None:
    enroll(disk, key_file, tpm, "--store", "nv", "--pcrs", "sha256:7")
    forged = b"f" * 32
    # the index's own (empty) password, then the owner's: the first is no write right, the second is locked out
    for hierarchy in ([], ["--hierarchy=o"]):
        done = tpm.tools("tpm2_nvwrite", *hierarchy, "--input=-", "0x1500016", input=forged, check=False)
        assert done.returncode != 0, done.stdout
    for hierarchy in ([], ["--hierarchy=o"]):
        done = tpm.tools("tpm2_nvread", *hierarchy, "0x1500016", check=False)
        assert done.returncode != 0 and forged not in done.stdout
    done = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    assert run_cli("remove", str(disk), "--unlock-key-file", str(key_file), tpm=tpm).returncode == 0
    assert tpm.tools("tpm2_nvreadpublic", "0x1500016", check=False).returncode != 0  # the owner could undefine it
    assert opens(disk, PASSPHRASE)


def test_adopting_an_index_readable_without_the_policy_warns(disk: Path, tpm: Swtpm, tmp_path: Path) -> None:
    add_keyslot(disk, SEED_SECRET)
    pol = tmp_path / "pcr.pol"
    tpm.tools("tpm2_createpolicy", "--policy-pcr", "--pcr-list=sha256:7", f"--policy={pol}")
    tpm.tools("tpm2_nvdefine", "--size", "10", "--attributes=policyread|authread|authwrite", f"--policy={pol}",
              "0x2000B")
    tpm.tools("tpm2_nvwrite", "--input=-", "0x2000B", input=SEED_SECRET)
    done = run_cli("adopt", str(disk), "--nv", "0x2000B", "--pcrs", "sha256:7", tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    assert (b"NV index 0x0102000b can be read without the PCR policy (authread or ownerread with a password "
            b"that is empty unless you set one)") in done.stderr
    assert b"can be overwritten without the PCR policy" in done.stderr
