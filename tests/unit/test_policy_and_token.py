"""Pure-Python parts: PCR selections, token schema (hostile input), store specs."""

from __future__ import annotations

import copy

import pytest

from unlocker.errors import CorruptError, UsageError
from unlocker.store import StoreSpec
from unlocker.token import Token, parse_token, parse_token_text
from unlocker.tpm.policy import PcrSelection, policy_or, policy_pcr


def test_pcr_selection_parses_bank_and_sorts() -> None:
    sel = PcrSelection.parse("sha256:7,0,4,2")
    assert sel.bank == "sha256" and sel.pcrs == (0, 2, 4, 7)
    assert str(sel) == "sha256:0,2,4,7"
    assert PcrSelection.parse("7+0").pcrs == (0, 7)
    assert sel.marshal() == bytes.fromhex("00000001000b03950000")


@pytest.mark.parametrize("text,message", [
    ("md5:0", "unknown PCR bank"),
    ("sha256:", "no PCRs"),
    ("sha256:24", "out of range"),
    ("sha256:x", "not a PCR number"),
])
def test_pcr_selection_rejects_bad_input(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        PcrSelection.parse(text)


# Known answers from tpm2-tools on swtpm (checked live in tests/tpm/test_policy_digest.py), with
# PCR 0 as TPM2_Startup(CLEAR) leaves it, 32 zero bytes (tpm2_pcrread sha256:0):
#   tpm2_createpolicy --policy-pcr --pcr-list=sha256:0 --policy=pcr0.pol
POLICY_PCR_SHA256_0_ZERO = bytes.fromhex("093ceb41181d47808862d7946268ee6a17a10e3d1b79b32351bc56e4beaceff0")
#   (zero.pol: 32 zero bytes) tpm2_startauthsession --session=s.ctx (a trial session), then
#   tpm2_policyor --session=s.ctx --policy=or.pol sha256:pcr0.pol,zero.pol
POLICY_OR_PCR0_AND_ZERO = bytes.fromhex("5e8cf7fc3b194582ecd321d234592d04fe3bc5b18a0206cadbe2ac608d003b83")


def test_policy_pcr_known_answer() -> None:
    """PolicyPCR over sha256:0 with PCR 0 all zeros is tpm2_createpolicy's digest, byte for byte; a
    PCR value of the wrong size for the bank is refused."""
    sel = PcrSelection.parse("sha256:0")
    assert policy_pcr(sel, {0: bytes(32)}) == POLICY_PCR_SHA256_0_ZERO
    with pytest.raises(ValueError):
        policy_pcr(sel, {0: bytes(20)})


def test_policy_or_known_answer() -> None:
    """PolicyOR over that PolicyPCR digest and an all-zero branch is tpm2_policyor's digest."""
    assert policy_or([POLICY_PCR_SHA256_0_ZERO, bytes(32)]) == POLICY_OR_PCR0_AND_ZERO


def sample_token() -> Token:
    sel = PcrSelection.parse("sha256:0,7")
    return Token(keyslot=1, store="token", selection=sel, pcr_values={0: bytes(32), 7: b"\x07" * 32},
                 policy_hash=b"\x01" * 32, srk_name=b"\x00\x0b" + b"\x02" * 32, public=b"\x00\x10" + b"p" * 16,
                 private=b"\x00\x10" + b"q" * 16)


def test_token_round_trips() -> None:
    token = sample_token()
    doc = token.to_json()
    back = parse_token(doc, 3)
    assert back == token and back.token_id == 3


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(type="systemd-tpm2"), "type"),
    (lambda d: d.update(version=2), "version 2"),
    (lambda d: d.update(keyslots=["1", "2"]), "exactly one keyslot"),
    (lambda d: d.update(keyslots=[1]), "exactly one keyslot"),
    (lambda d: d.update(store="cloud"), "store 'cloud'"),
    (lambda d: d.update(pcrs=[7, 0]), "sorted list"),
    (lambda d: d.update(pcrs=[True]), "sorted list"),
    (lambda d: d.update(pcr_bank="md5"), "bank"),
    (lambda d: d.update(policy_hash="ab"), "policy_hash"),
    (lambda d: d.update(srk_name="00"), "srk_name"),
    (lambda d: d.update(tpm2_public="!!notbase64"), "base64"),
    (lambda d: d.update(tpm2_private="QUFB" * 2000), "impossible size"),
    (lambda d: d.pop("tpm2_private"), "tpm2_private"),
    (lambda d: d.update(extra=1), "unknown fields"),
    (lambda d: d["pcr_values"].pop("7"), "PCR values do not match"),
    (lambda d: d.update(pin="no"), "wrong type"),
])
def test_token_parse_rejects_hostile_documents(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    doc = copy.deepcopy(sample_token().to_json())
    mutate(doc)
    with pytest.raises(CorruptError, match=message):
        parse_token(doc)


def test_token_parse_rejects_non_json() -> None:
    with pytest.raises(CorruptError, match="not valid JSON"):
        parse_token_text(b"{not json")
    with pytest.raises(CorruptError, match="not a JSON object"):
        parse_token_text(b"[]")


def test_nv_token_index_must_be_in_owner_range() -> None:
    token = sample_token()
    token.store, token.nv_index = "nv", 0x01500016
    doc = token.to_json()
    assert parse_token(doc).nv_index == 0x01500016
    doc["nv_index"] = "0x81000001"
    with pytest.raises(CorruptError, match="outside the owner NV range"):
        parse_token(doc)


def test_store_spec_parsing() -> None:
    assert StoreSpec.parse("token").kind == "token"
    assert StoreSpec.parse("nv").nv_index == 0x01500016
    assert StoreSpec.parse("nv=0x1500020").nv_index == 0x01500020
    assert StoreSpec.parse("file=/tmp/x").blob_dir == "/tmp/x"
    for bad in ("disk", "nv=zz", "nv=0x81000001", "file="):
        with pytest.raises(UsageError):
            StoreSpec.parse(bad)
