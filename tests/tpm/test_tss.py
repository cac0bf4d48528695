"""Our ESAPI calls through tss.py agree with tpm2-tools on the same swtpm: SRK names, PCR values,
marshalled blobs; and the boot path never loads tpm2-pytss's Python layer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Swtpm

from unlocker.errors import CorruptError
from unlocker.secret import Secret
from unlocker.tpm import tss
from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import PcrSelection
from unlocker.tpm.seal import SealedObject, validate_sealed

pytestmark = pytest.mark.tpm
ROOT = Path(__file__).resolve().parents[2]

TOOLS_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|decrypt"


def tools_primary_name(tpm: Swtpm, tmp_path: Path, attrs: str) -> bytes:
    ctx, name = tmp_path / "primary.ctx", tmp_path / "primary.name"
    tpm.tools("tpm2_createprimary", "-C", "o", "-G", "ecc", "-a", attrs, "-c", str(ctx))
    tpm.tools("tpm2_readpublic", "-c", str(ctx), "-n", str(name))
    tpm.tools("tpm2_flushcontext", "-t")
    return name.read_bytes()


def test_srk_names_are_those_of_tpm2_createprimary(tpm: Swtpm, tmp_path: Path) -> None:
    with Tpm(tpm.tcti) as t:
        ours_tcg = t.srk_name()
        t.use_tpm2_tools_srk()
        ours_tools = t.current_srk_name()
    assert ours_tools == tools_primary_name(tpm, tmp_path, TOOLS_ATTRS)
    assert ours_tcg == tools_primary_name(tpm, tmp_path, TOOLS_ATTRS + "|noda")
    assert ours_tcg != ours_tools


def test_pcr_values_are_those_of_tpm2_pcrread(tpm: Swtpm, tmp_path: Path) -> None:
    tpm.extend(7, "sha256", "ab" * 32)
    out = tmp_path / "pcrs.bin"
    tpm.tools("tpm2_pcrread", "sha256:0,7,16", "-o", str(out))
    raw = out.read_bytes()
    with Tpm(tpm.tcti) as t:
        ours = t.read_pcrs(PcrSelection.parse("sha256:0,7,16"))
    assert raw == ours[0] + ours[7] + ours[16]
    assert ours[7] != bytes(32)


def test_a_sealed_blob_loads_in_tpm2_tools(tpm: Swtpm, tmp_path: Path) -> None:
    """What we marshal is what tpm2_load reads (and tpm2_unseal returns the key under our policy)."""
    key = Secret(bytearray(b"k" * 32))
    sel = PcrSelection.parse("sha256:7")
    with Tpm(tpm.tcti) as t:
        from unlocker.tpm.policy import policy_pcr
        sealed = t.seal(key, policy_pcr(sel, t.read_pcrs(sel)))
    (tmp_path / "key.pub").write_bytes(sealed.public)
    (tmp_path / "key.priv").write_bytes(sealed.private)
    ctx = tmp_path / "primary.ctx"
    # no resource manager in front of the swtpm: every tool's transient objects are flushed after it
    tpm.tools("tpm2_createprimary", "-C", "o", "-G", "ecc", "-a", TOOLS_ATTRS + "|noda", "-c", str(ctx))
    tpm.tools("tpm2_flushcontext", "-t")
    tpm.tools("tpm2_load", "-C", str(ctx), "-u", str(tmp_path / "key.pub"), "-r", str(tmp_path / "key.priv"),
              "-c", str(tmp_path / "key.ctx"))
    tpm.tools("tpm2_flushcontext", "-t")
    done = tpm.tools("tpm2_unseal", "-c", str(tmp_path / "key.ctx"), "-p", "pcr:sha256:7")
    assert done.stdout == b"k" * 32


def test_malformed_blobs_are_refused_before_any_tpm(tpm: Swtpm) -> None:
    with Tpm(tpm.tcti) as t:
        sealed = t.seal(Secret(bytearray(b"x" * 32)), b"")
    validate_sealed(sealed)
    for broken in (SealedObject(sealed.public[:-3], sealed.private),
                   SealedObject(sealed.public + b"\0", sealed.private),
                   SealedObject(sealed.public, b"\x00\x02")):
        with pytest.raises(CorruptError):
            validate_sealed(broken)


def test_tss_errors_strip_the_parameter_number() -> None:
    # TPM_RC_VALUE (0x084) on parameter 1: 0x1c4; TPM_RC_LOCKOUT (format zero) stays as it is
    err = tss.TssError(0x1C4)
    assert err.error == 0x084 and "value" in str(err).lower()
    assert tss.TssError(0x921).error == 0x921


def test_the_boot_path_does_not_import_the_tpm2_pytss_package() -> None:
    code = ("import sys, unlocker.cli, unlocker.boot.unlock, unlocker.tpm.client, unlocker.store; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('tpm2_pytss', 'cryptography')))))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["tpm2_pytss._libtpm2_pytss", "tpm2_pytss._libtpm2_pytss.lib"]
