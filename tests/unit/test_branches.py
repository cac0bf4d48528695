"""PolicyOR enrolments without a TPM: the token's branches parsed strictly (the header is hostile
input), today's single-branch tokens read as before, and the choice of branch from the PCRs read."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from unlocker.branch import choose, closest_changes, holds, unmet
from unlocker.errors import CorruptError, UsageError
from unlocker.token import PcrBranch, Token, parse_token
from unlocker.tpm.policy import PcrSelection

SEL = PcrSelection.parse("sha256:0,4,7")
OLD = {0: b"\x00" * 32, 4: b"\x04" * 32, 7: b"\x07" * 32}
NEW = {**OLD, 4: b"\x44" * 32}


def two_chain_token(lock: int | None = 15, pin: bool = False) -> Token:
    token = Token(keyslot=1, store="token", selection=SEL, pcr_values=dict(OLD), policy_hash=b"",
                  srk_name=b"\x00\x0b" + b"\x02" * 32, public=b"\x00\x10" + b"p" * 16,
                  private=b"\x00\x10" + b"q" * 16, lock_pcr=lock, pin=pin,
                  more_branches=[PcrBranch(SEL, dict(NEW))])
    token.compute_policy()
    return token


def now(values: dict[int, bytes], lock: bytes = bytes(32)) -> dict[int, bytes]:
    return {**values, 15: lock}


def test_a_token_with_branches_round_trips_and_lists_one_digest_per_branch() -> None:
    token = two_chain_token()
    doc = token.to_json()
    assert doc["branches"] == [{"pcrs": [0, 4, 7], "pcr_values": {str(p): v.hex() for p, v in NEW.items()}}]
    assert len(doc["branch_policies"]) == 2 and len(set(doc["branch_policies"])) == 2
    back = parse_token(doc, 2)
    assert back == token and back.policy_hash != back.branch_policies[0]


def test_a_single_branch_token_is_written_and_read_as_before() -> None:
    token = two_chain_token()
    token.more_branches = []
    token.compute_policy()
    doc = token.to_json()
    assert "branches" not in doc and "branch_policies" not in doc
    assert parse_token(doc) == token and token.branch_policy(0) == token.policy_hash


def _mutations() -> list[tuple[Any, str]]:
    return [
        (lambda d: d.update(branches=[]), "1 to 7 further chains"),
        (lambda d: d.update(branches=d["branches"] * 8), "1 to 7 further chains"),
        (lambda d: d.update(branches={"pcrs": [4]}), "wrong type"),
        (lambda d: d["branches"].append("x"), "branch 2 is not an object"),
        (lambda d: d["branches"][0].update(extra=1), "branch 1 is not an object of pcrs and pcr_values"),
        (lambda d: d["branches"][0].update(pcrs=[7, 4]), "branches.1.PCR list is not a sorted list"),
        (lambda d: d["branches"][0].update(pcrs=[4, 15]), "branches.1.PCR values do not match"),
        (lambda d: d["branches"][0]["pcr_values"].update({"4": "ab"}), "branches.1.pcr_values.4"),
        (lambda d: d.pop("branch_policies"), "no 'branch_policies'"),
        (lambda d: d.update(branch_policies=d["branch_policies"][:1]), "one digest per branch"),
        (lambda d: d.update(branch_policies=[1, 2]), "branch_policies.0"),
        (lambda d: d["branch_policies"].__setitem__(1, "AB" * 32), "branch_policies.1"),
    ]


@pytest.mark.parametrize(("mutate", "message"), _mutations())
def test_hostile_branches_are_refused(mutate: Any, message: str) -> None:
    doc = copy.deepcopy(two_chain_token().to_json())
    mutate(doc)
    with pytest.raises(CorruptError, match=message):
        parse_token(doc)


def test_the_lock_pcr_in_a_branch_is_refused_and_a_lone_branch_list_too() -> None:
    doc = copy.deepcopy(two_chain_token().to_json())
    doc["branches"][0] = {"pcrs": [4, 15], "pcr_values": {"4": "44" * 32, "15": "00" * 32}}
    with pytest.raises(CorruptError, match="lock_pcr is not a lock PCR apart from its PCR list"):
        parse_token(doc)
    single = two_chain_token()
    single.more_branches = []
    doc = single.to_json()
    doc["branch_policies"] = [single.policy_hash.hex()]
    with pytest.raises(CorruptError, match="one digest per branch"):
        parse_token(doc)


def test_a_policy_takes_eight_branches_and_no_more() -> None:
    token = two_chain_token()
    token.more_branches = [PcrBranch(SEL, {**OLD, 4: bytes([i]) * 32}) for i in range(7)]
    token.compute_policy()
    assert len(token.branch_policies) == 8
    assert parse_token(token.to_json()) == token
    token.more_branches.append(PcrBranch(SEL, NEW))
    with pytest.raises(UsageError, match="at most 8 branches"):
        token.compute_policy()


def test_the_branch_whose_values_the_pcrs_have_is_chosen_and_every_branch_binds_the_lock() -> None:
    token = two_chain_token()
    assert choose(token, now(OLD)).plan.values == now(OLD)
    chosen = choose(token, now(NEW))
    assert chosen.plan.values == now(NEW) and chosen.plan.selection == PcrSelection.parse("sha256:0,4,7,15")
    assert token.plan_for(chosen).or_digests == tuple(token.branch_policies)
    assert token.read_selection() == PcrSelection.parse("sha256:0,4,7,15")
    locked = unmet(token, now(NEW, lock=b"\x0f" * 32))
    assert "the key is locked for this boot" in locked.message and locked.changed_pcrs == [15]


def test_no_branch_matching_names_the_pcrs_of_the_closest_chain() -> None:
    token = two_chain_token()
    third = {**NEW, 7: b"\x77" * 32}  # the new chain but PCR 7 changed too: closest is the new one
    with pytest.raises(Exception) as raised:
        choose(token, now(third))
    assert raised.value.message == "PCR 7 changed since enrolment (sha256 bank; the closest of 2 sealed chains)"
    assert raised.value.changed_pcrs == [7] and closest_changes(token, now(third)) == [7]
    far = {0: b"\x01" * 32, 4: b"\x45" * 32, 7: b"\x07" * 32}
    assert unmet(token, now(far)).changed_pcrs == [0, 4]


def test_python_judges_the_policy_held_for_each_chain_and_not_for_a_third() -> None:
    token = two_chain_token(pin=True)
    assert holds(token, now(OLD)) and holds(token, now(NEW))
    assert not holds(token, now({**NEW, 7: b"\x77" * 32}))
    lying = two_chain_token(pin=True)
    lying.branch_policies[1] = bytes(32)  # the list no longer makes the token's policy
    assert not holds(lying, now(NEW))


def grace_signed_token() -> dict[str, Any]:
    from bench.fuzz import VALID_GRACE_SIGNED_TOKEN

    return copy.deepcopy(VALID_GRACE_SIGNED_TOKEN)


def test_a_token_with_a_grace_and_a_signing_key_round_trips_with_its_branches_in_order() -> None:
    token = parse_token(grace_signed_token())
    assert [b.kind for b in token.branches()] == ["pcr", "signed", "grace"]
    assert [b.index for b in token.branches()] == [0, 1, 2]
    grace = token.branches()[2].plan
    assert grace.selection == PcrSelection.parse("sha256:7,15") and grace.reset_limit == 9
    assert grace.nv_checks[0].index == 0x01500030 and grace.nv_checks[0].operand == (5).to_bytes(8, "big")
    signed = token.branches()[1].plan
    assert signed.selection is None and signed.authorize is not None and signed.lock == PcrSelection.parse("sha256:15")
    assert parse_token(token.to_json()) == token


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["grace"].update(left_out=[None, False]), "grace left_out is not a sorted list"),  # found by bench.fuzz
    (lambda d: d["grace"].update(left_out=[2]), "grace left_out is not a sorted list of the token's PCRs"),
    (lambda d: d["grace"].update(count=-1), "'count' is out of range"),
    (lambda d: d["grace"].update(reset_limit=1 << 32), "'reset_limit' is out of range"),
    (lambda d: d.pop("counter"), "token grace has no counter"),
    (lambda d: d["grace"].update(extra=1), "grace is not an object of left_out"),
    (lambda d: d["signed"].update(key_name="00"), "signed.key_name"),
    (lambda d: d["signed"].update(epoch="0x81000001"), "signed.epoch 0x81000001 is outside the owner NV range"),
    (lambda d: d["signed"].update(pcrs=[7, 0]), "signed.pcrs is not a sorted list"),
    (lambda d: d["signed"].pop("key"), "signed is not an object of key"),
    (lambda d: d.update(branch_policies=d["branch_policies"][:2]), "one digest per branch"),
])
def test_hostile_graces_and_signing_keys_are_refused(mutate: Any, message: str) -> None:
    doc = grace_signed_token()
    mutate(doc)
    with pytest.raises(CorruptError, match=message):
        parse_token(doc)


def test_signature_tokens_are_parsed_strictly_and_a_bad_one_is_skipped() -> None:
    from bench.fuzz import VALID_SIGNATURE
    from unlocker.signature import parse_signature, signatures_in

    good = parse_signature(VALID_SIGNATURE, 4)
    assert good.epoch == 3 and good.selection == PcrSelection.parse("sha256:4") and good.token_id == 4
    assert parse_signature(good.to_json()) == good
    for bad in ({**VALID_SIGNATURE, "keyslots": ["1"]}, {**VALID_SIGNATURE, "epoch": True},
                {**VALID_SIGNATURE, "extra": 1}, {**VALID_SIGNATURE, "approved": "zz"}):
        with pytest.raises(CorruptError):
            parse_signature(bad)
    newer = {**VALID_SIGNATURE, "epoch": 7}
    found = signatures_in({1: VALID_SIGNATURE, 2: {**VALID_SIGNATURE, "epoch": "x"}, 3: newer, 4: {"type": "other"}})
    assert [s.epoch for s in found] == [7, 3]  # newest first, the malformed one left out


def test_a_signature_applies_only_to_the_key_and_reference_it_names_and_never_while_locked() -> None:
    from bench.fuzz import VALID_SIGNATURE
    from unlocker.branch import candidates
    from unlocker.signature import parse_signature

    token = parse_token(grace_signed_token())
    assert token.signed is not None
    doc = {**VALID_SIGNATURE, "key_name": token.signed.key_name.hex(), "policy_ref": token.signed.policy_ref.hex()}
    signature = parse_signature(doc)
    now = {0: b"\x01" * 32, 4: b"\x44" * 32, 7: b"\x07" * 32, 15: bytes(32)}
    (chosen,) = candidates(token, now, [signature])
    assert chosen.kind == "signed" and chosen.plan.values == {4: b"\x44" * 32}
    assert chosen.plan.nv_checks[0].operand == (3).to_bytes(8, "big")
    other = parse_signature({**doc, "policy_ref": "00"})
    with pytest.raises(Exception, match="changed since enrolment"):
        candidates(token, now, [other])
    with pytest.raises(Exception, match="the key is locked for this boot"):
        candidates(token, {**now, 15: b"\x0f" * 32}, [signature])
