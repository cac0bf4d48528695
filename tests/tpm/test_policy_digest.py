"""The policy digest computed in Python equals the TPM's own and tpm2_createpolicy's."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Swtpm

from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import PcrSelection, policy_auth_value, policy_pcr

pytestmark = pytest.mark.tpm


@pytest.mark.parametrize("text", ["sha256:0,2,4,7", "sha256:7", "sha1:0,1,2,3,4,5,6,7,8,9,10",
                                  "sha384:0,7,14", "sha256:0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,23"])
def test_policy_digest_matches_the_tpm(text: str, tpm: Swtpm, tmp_path: Path) -> None:
    tpm.extend(7, "sha256", "11" * 32)
    tpm.extend(7, "sha1", "22" * 20)
    tpm.extend(7, "sha384", "33" * 48)
    sel = PcrSelection.parse(text)
    with Tpm(tpm.tcti) as t:
        values = t.read_pcrs(sel)
        ours = policy_pcr(sel, values)
        assert ours == t.trial_policy_pcr(sel)
        assert policy_auth_value(ours) == t.trial_policy_pcr(sel, with_pin=True)
    if len(sel.pcrs) > 8:
        return  # tpm2_createpolicy stops at 8 PCRs; the TPM comparison above covers the rest
    out = tmp_path / "pcr.pol"
    tpm.tools("tpm2_createpolicy", "--policy-pcr", f"--pcr-list={text}", f"--policy={out}")
    assert out.read_bytes() == ours


# The known answers tests/unit/test_policy_and_token.py checks the Python against (without a TPM).
POLICY_PCR_SHA256_0_ZERO = "093ceb41181d47808862d7946268ee6a17a10e3d1b79b32351bc56e4beaceff0"
POLICY_OR_PCR0_AND_ZERO = "5e8cf7fc3b194582ecd321d234592d04fe3bc5b18a0206cadbe2ac608d003b83"


def test_the_unit_tests_known_answers_are_tpm2_tools_own(tpm: Swtpm, tmp_path: Path) -> None:
    """Those vectors made again with the commands their comment names, on PCR 0 as TPM2_Startup(CLEAR)
    leaves it: tpm2_createpolicy's PolicyPCR digest, then tpm2_policyor's over it and a zero branch."""
    assert tpm.tools("tpm2_pcrread", "sha256:0").stdout.decode().split()[-1] == "0x" + "00" * 32
    pcr0, zero, either = tmp_path / "pcr0.pol", tmp_path / "zero.pol", tmp_path / "or.pol"
    tpm.tools("tpm2_createpolicy", "--policy-pcr", "--pcr-list=sha256:0", f"--policy={pcr0}")
    assert pcr0.read_bytes().hex() == POLICY_PCR_SHA256_0_ZERO
    zero.write_bytes(bytes(32))
    session = tmp_path / "trial.ctx"
    tpm.tools("tpm2_startauthsession", f"--session={session}")
    tpm.tools("tpm2_policyor", f"--session={session}", f"--policy={either}", f"sha256:{pcr0},{zero}")
    tpm.tools("tpm2_flushcontext", str(session))
    assert either.read_bytes().hex() == POLICY_OR_PCR0_AND_ZERO
