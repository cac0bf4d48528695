"""The boot's own re-seal, after an unseal by a branch that says the enrolment is behind the machine:
the grace of prepare-update (the firmware changed: re-sealed to the new full values, the grace spent)
or a chain newer than the first (a predicted chain booted: the older ones are stale and go).

Here the key is in hand and the lock PCR not extended yet; the booted system could only re-seal with
the passphrase. Only the token store (a header can be written here; /etc and the owner's NV cannot be
counted on). The new token is written beside the old one and proven (unsealed) before the old one
goes, the grace's counter incremented in between; any failure is said in one line and the disk is
opened all the same.
"""

from __future__ import annotations

from unlocker import TYPE_CHECKING, store
from unlocker.log import say, trace
from unlocker.token import Token
from unlocker.tpm.policy import PolicyPlan

if TYPE_CHECKING:
    from unlocker.luks import LuksDevice
    from unlocker.secret import Secret
    from unlocker.token import Branch
    from unlocker.tpm.client import Tpm


def needed(token: Token, branch: Branch) -> bool:
    """Whether unsealing by `branch` leaves the enrolment behind: a grace branch, or a chain after
    the first (not with a grace as well: its branches stay until that is used)."""
    if branch.kind == "grace":
        return True
    return branch.kind == "pcr" and token.grace is None and branch.index > 0


def _copy(token: Token, tpm: Tpm) -> Token:
    """A token for the same keyslot and key, policy still to be set."""
    srk_name = tpm.srk_name()
    return Token(keyslot=token.keyslot, store="token", selection=token.selection, pcr_values={}, policy_hash=b"",
                 srk_name=srk_name, srk_public=token.srk_public if srk_name == token.srk_name else b"",
                 pin=token.pin, keyslot_owned=token.keyslot_owned, lock_pcr=token.lock_pcr, counter=token.counter,
                 signed=token.signed)


def _set_policy(tpm: Tpm, new: Token, listed: list[bytes]) -> None:
    """The new token's branch digests `listed` (plus the signed branch's, kept from the token: the
    unseal that just ran through PolicyOR over the old list proved it the sealed one), and the
    PolicyOR over them from a trial session (no hash code at boot)."""
    if len(listed) == 1:
        new.branch_policies, new.policy_hash = [], listed[0]
    else:
        new.branch_policies = listed
        new.policy_hash = tpm.trial_plan(PolicyPlan(None, or_digests=tuple(listed)))


def _signed_digest(token: Token) -> list[bytes]:
    return [token.branch_policy(token.signed_index())] if token.signed is not None else []


def after_grace(tpm: Tpm, token: Token) -> Token:
    """The enrolment bound to the PCR values of now (the new firmware's), its digest the TPM's own."""
    new = _copy(token, tpm)
    new.pcr_values = tpm.read_pcrs(token.selection)
    _set_policy(tpm, new, [tpm.trial_plan(new.branches()[0].plan, current=True), *_signed_digest(token)])
    return new


def without_stale(tpm: Tpm, token: Token, index: int) -> Token:
    """The enrolment from chain `index` on, with their digests from the token (as the signed one's)."""
    new = _copy(token, tpm)
    chains = token.pcr_branches()[index:]
    new.selection, new.pcr_values, new.more_branches = chains[0].selection, chains[0].pcr_values, chains[1:]
    _set_policy(tpm, new, [*token.branch_policies[index:len(token.pcr_branches())], *_signed_digest(token)])
    return new


def refresh(tpm: Tpm, device: LuksDevice, token: Token, branch: Branch, key: Secret, auth: Secret | None) -> None:
    """Re-seal `key` (unsealed by `branch` of `token`) to where the machine is now; see the module."""
    if token.store != "token":
        say(f"{device.path}: the enrolment is behind this boot's PCR values, but a {token.describe_store()} "
            "is not re-sealed at boot: run 'tpm2-unlocker reseal'")
        return
    grace = branch.kind == "grace"
    if not token.policy_described():
        # the unseal proved the digests, not the header's words about them (the PCRs a grace left
        # out, a chain's values, the signing key): a re-seal from those could bind less than was
        # sealed. A grace used here is spent all the same (its counter is the one its policy names).
        spent = ""
        if grace and token.grace is not None and tpm.nv_name(token.counter) == token.grace.counter_name:
            tpm.counter_increment(token.counter)
            spent = "; the firmware update's one-boot grace is spent"
        say(f"{device.path}: the enrolment is behind this boot's PCR values, but its token describes another "
            f"policy than its sealed key carries (was the header edited?): not re-sealed at boot{spent}")
        return
    new = after_grace(tpm, token) if grace else without_stale(tpm, token, branch.index)
    sealed = tpm.seal(key, new.policy_hash, auth)
    new.public, new.private = sealed.public, sealed.private
    with store.take(tpm, new, auth) as back:
        if back != key:
            raise ValueError("the re-sealed key unseals to other bytes")
    device.import_token(new)
    trace(f"{device.path}: token {new.token_id} written")
    if grace:
        tpm.counter_increment(token.counter)  # the grace is spent: no branch of an old token holds it again
    device.remove_token(token.token_id if token.token_id is not None else -1)
    if grace:
        say(f"{device.path}: re-sealed to this boot's PCR values of {new.selection} (the firmware update's "
            "one-boot grace is spent)")
    else:
        say(f"{device.path}: re-sealed to the chain this boot is on (the older chains are dropped)")


def try_refresh(tpm: Tpm, device: LuksDevice, token: Token, branch: Branch, key: Secret, auth: Secret | None) -> None:
    """refresh() when needed(); a failure is said in one line and never stops the unlock."""
    if not needed(token, branch):
        return
    try:
        refresh(tpm, device, token, branch, key, auth)
    except Exception as exc:  # the disk still opens with the key in hand: say it, go on
        what = "its grace stays for the boots it was given" if branch.kind == "grace" else "the older chains stay"
        say(f"{device.path}: could not re-seal to this boot's PCR values ({type(exc).__name__}: {exc}); {what}, "
            "or run 'tpm2-unlocker reseal'")
