"""The PCRs a signing key approves are bound by the sealed policy, not taken from the header.

The signed branch is PolicyAuthorize(key, reference) + the lock PCR: it opens to any PCR policy the
key signs. Were the PCRs the signers approve (sign-policy, the machine key in the update hooks, as
root with no passphrase) read from the header, an evil maid who rewrote them to PCR 0 alone would
have the next kernel update approve any kernel. The reference binds them: H("tpm2-unlocker" || the
epoch counter's name || the enrolment's PCR selection), and every signer holds the token to it
(commands/claims.py). Found by a second reader; each attack below is refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import Swtpm, our_tokens, replace_token
from helpers import enroll_or_fail as enroll
from test_machine_key import KERNEL_A, SEL, after, boot, encrypted, no_passphrase, place_machine_key, signatures, state, unlock  # noqa: F401  (fixtures)

from unlocker.commands.reseal import ResealOptions, reseal
from unlocker.errors import CorruptError
from unlocker.token import parse_token

pytestmark = pytest.mark.tpm

EVIL_KERNEL = "ee" * 32


def test_signed_pcrs_rewritten_in_the_header_make_the_machine_key_approve_nothing(
        disk: Path, key_file: Path, tpm: Swtpm, state: Path, no_passphrase: None,  # noqa: F811
        encrypted: Path) -> None:  # noqa: F811
    public = place_machine_key(state)
    enroll(disk, key_file, tpm, "--pcrs", str(SEL), "--signing-key", str(public))
    ((tid, doc),) = our_tokens(disk).items()
    assert doc["signed"]["pcrs"] == [0, 4, 7]
    doc["signed"]["pcrs"] = [0]  # the evil maid's edit: no digest, no key touched
    replace_token(disk, tid, doc)
    before = signatures(disk)

    tpm.extend(15, digest="15" * 32)  # the booted system; the kernel hook's reseal --predict
    with pytest.raises(CorruptError, match="signed PCRs are not the ones its policy binds"):
        reseal(ResealOptions(str(disk), None, None, tpm.tcti, predicted=(after(tpm, 4, KERNEL_A),)))
    assert signatures(disk) == before, "nothing signed"
    boot(tpm, EVIL_KERNEL)
    code, said = unlock(disk, tpm)
    assert code != 0, said


def test_a_planted_token_copying_the_signed_branch_for_other_pcrs_steers_nothing(
        disk: Path, key_file: Path, tpm: Swtpm, state: Path, no_passphrase: None,  # noqa: F811
        encrypted: Path) -> None:  # noqa: F811
    """The real token untouched; the attacker (who can also use the TPM) seals junk under the real SRK
    with a policy of their own: PCR 0 alone plus the real token's signed branch copied. Its own object
    carries the policy it describes, but the copied reference binds the real PCRs: refused."""
    from unlocker import store
    from unlocker.secret import Secret
    from unlocker.store import StoreSpec
    from unlocker.token import Signed, Token
    from unlocker.tpm.client import Tpm
    from unlocker.tpm.policy import PcrSelection

    public = place_machine_key(state)
    enroll(disk, key_file, tpm, "--pcrs", str(SEL), "--signing-key", str(public))
    ((tid, doc),) = our_tokens(disk).items()
    real = parse_token(doc, int(tid))
    assert real.signed is not None
    zero = PcrSelection.parse("sha256:0")
    with Tpm(tpm.tcti) as t:
        planted = Token(keyslot=real.keyslot, store="token", selection=zero, pcr_values=t.read_pcrs(zero),
                        policy_hash=b"", srk_name=t.srk_name(), lock_pcr=real.lock_pcr,
                        signed=Signed(real.signed.key_public, real.signed.key_name, real.signed.policy_ref, zero,
                                      real.signed.epoch, real.signed.epoch_name))
        planted.compute_policy()
        placement = store.put(t, StoreSpec("token"), Secret(b"junk" * 8), planted.policy_hash)
        planted.public, planted.private = placement.public, placement.private
    subprocess.run(["cryptsetup", "token", "import", "--json-file", "-", str(disk)],
                   input=json.dumps(planted.to_json()).encode(), check=True)
    assert len(our_tokens(disk)) == 2

    tpm.extend(15, digest="15" * 32)
    with pytest.raises(CorruptError, match="signed PCRs are not the ones its policy binds"):
        reseal(ResealOptions(str(disk), None, None, tpm.tcti, predicted=(after(tpm, 4, KERNEL_A),)))
    assert not any(tuple(s["pcrs"]) == (0,) for s in signatures(disk).values())
    boot(tpm, EVIL_KERNEL)
    code, said = unlock(disk, tpm)
    assert code != 0, said
