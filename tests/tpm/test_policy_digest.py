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
