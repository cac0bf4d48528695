"""Which branch of an enrolment's policy the PCR values read now satisfy, and why none does.

Pure: the caller reads the PCRs (once, read_selection()) and the TPM has the last word: a branch
chosen here only decides which assertions the session makes.
"""

from __future__ import annotations

from unlocker import TYPE_CHECKING
from unlocker.errors import PolicyError
from unlocker.token import Branch, PcrBranch, Token
from unlocker.tpm.policy import PcrSelection, changed_pcrs

if TYPE_CHECKING:
    from unlocker.signature import Signature

RESEAL_HINT = "after an intended update, run 'tpm2-unlocker reseal' once booted"


def read_selection(token: Token, signatures: list[Signature] | None = None) -> PcrSelection:
    """The PCRs to read once: every one a branch of `token` binds, the lock PCR, and those of the
    signatures that apply to it."""
    pcrs = set(token.read_selection().pcrs)
    for signature in signatures or []:
        if signature.applies_to(token):
            pcrs.update(signature.selection.pcrs)
    return PcrSelection(token.selection.bank, tuple(sorted(pcrs)))


def candidates(token: Token, current: dict[int, bytes], signatures: list[Signature] | None = None) -> list[Branch]:
    """The branches to try, in order: the chain the PCRs are on; each signature approving the values
    read now (newest epoch first: sign-policy); the grace (last: using it spends it). Else the
    PolicyError naming what differs from the closest chain."""
    from unlocker.signature import MAX_TRIED, signed_branch

    branches = token.branches()
    found = [b for b in branches if b.kind == "pcr" and b.matches(current)][:1]
    lock = token.lock_pcr
    unlocked = lock is None or current.get(lock) == bytes(token.selection.digest_size)
    approving = [s for s in signatures or [] if s.applies_to(token)
                 and all(current.get(p) == v for p, v in s.pcr_values.items())] if token.signed else []
    if unlocked:
        found += [signed_branch(token, s) for s in approving[:MAX_TRIED]]
    found += [b for b in branches if b.kind == "grace" and b.matches(current)][:1]
    if not found:
        raise locked(lock) if approving and lock is not None and not unlocked else unmet(token, current)
    return found


def choose(token: Token, current: dict[int, bytes], signatures: list[Signature] | None = None) -> Branch:
    """The first branch to try (candidates()); else the PolicyError naming what differs."""
    return candidates(token, current, signatures)[0]


def locked(lock: int) -> PolicyError:
    return PolicyError(f"the key is locked for this boot (lock PCR {lock} was extended once the disks were opened); "
                       "it unseals again after a reboot", changed_pcrs=[lock])


def unmet(token: Token, current: dict[int, bytes]) -> PolicyError:
    """Why no branch holds: the PCRs that differ from the closest chain (fewest differences; the
    lock PCR on its own says the key is locked for this boot)."""
    chains = token.pcr_branches()
    differences = [changed_pcrs(chain.pcr_values, current) for chain in chains]
    changed = min(differences, key=len)
    lock = token.lock_pcr
    if not changed and lock is not None and current.get(lock) != bytes(token.selection.digest_size):
        return locked(lock)
    if not changed:
        return PolicyError("the TPM refused the PCR policy although the PCR values match the enrolment")
    names = ", ".join(str(p) for p in changed)
    plural = "s" if len(changed) > 1 else ""
    closest = f"; the closest of {len(chains)} sealed chains" if len(chains) > 1 else ""
    signed = ", and no signed policy approves the values of now" if token.signed is not None else ""
    return PolicyError(f"PCR{plural} {names} changed since enrolment ({token.selection.bank} bank{closest}){signed}",
                       changed_pcrs=changed,
                       hint="sign the new values ('tpm2-unlocker sign-policy') or run 'tpm2-unlocker reseal' once "
                            "booted" if token.signed is not None else RESEAL_HINT)


def closest_chain(token: Token, current: dict[int, bytes]) -> PcrBranch:
    """The chain closest to the values read now (fewest PCRs that differ; the older one on a tie)."""
    return min(token.pcr_branches(), key=lambda chain: len(changed_pcrs(chain.pcr_values, current)))


def closest_changes(token: Token, current: dict[int, bytes]) -> list[int]:
    """The PCRs that differ from the chain closest to the values read now (none: one matches)."""
    return changed_pcrs(closest_chain(token, current).pcr_values, current)


def holds(token: Token, current: dict[int, bytes]) -> bool:
    """Whether the policy holds for `current` by Python's digests alone (status: no unseal): some
    branch's digest for these values is the one the token lists for it, and the token's policy is
    the PolicyOR over that list."""
    from unlocker.tpm.policy import PolicyPlan, branch_digest, combined_policy

    branches = token.branches()
    listed = [token.branch_policy(i) for i in range(len(branches))]
    if combined_policy(listed) != token.policy_hash:
        return False
    for index, branch in enumerate(branches):
        plan = branch.plan
        if plan.selection is None or not all(p in current for p in plan.selection.pcrs):
            continue
        now = PolicyPlan(plan.selection, {p: current[p] for p in plan.selection.pcrs}, plan.nv_checks,
                         plan.reset_limit, plan.authorize, plan.lock, plan.auth_value)
        if branch_digest(now) == listed[index]:
            return True
    return False


def pending_chains(token: Token, current: dict[int, bytes]) -> list[PcrBranch]:
    """The chains a re-seal keeps beside the one the PCRs are on now: those sealed after it (oldest
    first), predicted for boots still to come. A chain sealed before it is stale: the machine has
    booted a newer one. When the PCRs are on no chain (an update nobody predicted), none is kept."""
    chains = token.pcr_branches()
    for index, chain in enumerate(chains):
        if all(current.get(p) == v for p, v in chain.pcr_values.items()):
            return chains[index + 1:]
    return []
