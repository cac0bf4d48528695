"""The three places a sealed key can live, behind one interface: token, NV index, blob files.

`put` seals a key and returns the token fields that find it again; `take` unseals it; `destroy`
removes what `put` made. Blob files are marshalled exactly as `tpm2_create --public/--private`
writes them, so tpm2-tools reads ours and we read theirs.
"""

from __future__ import annotations

import os

from unlocker import TYPE_CHECKING
from unlocker.branch import candidates, read_selection
from unlocker.errors import CorruptError, PinNeededError, PolicyError, UnlockerError, UsageError
from unlocker.lean.record import record
from unlocker.log import say
from unlocker.secret import Secret
from unlocker.token import Branch, Token, parse_nv_index
from unlocker.tpm.client import Tpm
from unlocker.tpm.nv import DEFAULT_NV_INDEX
from unlocker.tpm.policy import PolicyPlan
from unlocker.tpm.seal import SealedObject, sealed_auth_policy, sealed_no_da

if TYPE_CHECKING:
    from unlocker.signature import Signature

# A file store's pairs alternate between two names, so that a re-seal writes its new pair beside the
# old one, which keeps working until the new enrolment is proven (the token names its pair). The
# first is tpm2-tools' and the ArchWiki recipe's own: DIR/key.pub, DIR/key.priv.
BLOB_NAMES = ("key", "key.2")
PENDING = ".new"


def blob_paths(blob_dir: str, name: str) -> tuple[str, str]:
    return os.path.join(blob_dir, name + ".pub"), os.path.join(blob_dir, name + ".priv")


@record(frozen=True)
class StoreSpec:
    """What `--store` asked for: token, nv[=INDEX] or file=DIR."""

    kind: str
    nv_index: int = DEFAULT_NV_INDEX
    blob_dir: str = ""
    blob_name: str = BLOB_NAMES[0]

    @classmethod
    def parse(cls, text: str) -> StoreSpec:
        kind, sep, arg = text.partition("=")
        if kind == "token" and not sep:
            return cls("token")
        if kind == "nv":
            return cls("nv", nv_index=parse_nv_index(arg)) if sep else cls("nv")
        if kind == "file" and sep and arg:
            return cls("file", blob_dir=os.path.abspath(arg))
        raise UsageError(f"unknown store '{text}' (use token, nv, nv=INDEX or file=DIR)")

    @classmethod
    def beside(cls, token: Token) -> StoreSpec:
        """Where a re-seal of `token` puts its new key: the same kind of store, beside the old key
        (the NV index after it, the other file pair), so the old one works until it is removed."""
        other = BLOB_NAMES[1] if token.blob_name == BLOB_NAMES[0] else BLOB_NAMES[0]
        return cls(token.store, nv_index=token.nv_index or DEFAULT_NV_INDEX, blob_dir=token.blob_dir, blob_name=other)


@record
class Placement:
    """The token fields that say where the sealed key went."""

    store: str
    public: bytes = b""
    private: bytes = b""
    nv_index: int = 0
    blob_dir: str = ""
    blob_name: str = BLOB_NAMES[0]


def put(tpm: Tpm, spec: StoreSpec, key: Secret, policy: bytes, *, next_free_nv: bool = False,
        auth: Secret | None = None) -> Placement:
    """Seal `key` under `policy` in the store `spec` names (`auth`: a PIN's auth value, which the
    policy's PolicyAuthValue asks for).

    With `next_free_nv`, an NV store takes the first free index after the one named (re-seal writes
    its new index beside the old one, which is removed only afterwards; a file store's spec from
    StoreSpec.beside names the other pair).
    """
    if spec.kind == "nv":
        index = tpm.free_nv_index(spec.nv_index + 1) if next_free_nv else spec.nv_index
        tpm.nv_define_and_write(index, key, policy, auth)
        return Placement("nv", nv_index=index)
    sealed = tpm.seal(key, policy, auth)
    if spec.kind == "file":
        write_blob_files(spec.blob_dir, spec.blob_name, sealed)
        return Placement("file", blob_dir=spec.blob_dir, blob_name=spec.blob_name)
    return Placement("token", public=sealed.public, private=sealed.private)


def take(tpm: Tpm, token: Token, auth: Secret | None = None, signatures: list[Signature] | None = None) -> Secret:
    """Unseal the key a token points at, over a session salted with the SRK the token pinned;
    `auth`: the PIN's auth value, which a token with a PIN needs; `signatures`: the disk's signed
    policies (an enrolment with a signing key). Raises PolicyError, CorruptError, LockoutError,
    NoTpmError, BadPinError, PinNeededError."""
    return take_branch(tpm, token, auth, signatures)[0]


def take_branch(tpm: Tpm, token: Token, auth: Secret | None = None,
                signatures: list[Signature] | None = None) -> tuple[Secret, Branch]:
    """take(), and the branch of the token's policy that unsealed it. With several branches the
    PCRs are read once and each branch they allow is tried in turn (the chain they are on, then
    signatures, then the grace); the first refusal is the one reported."""
    if token.pin and auth is None:
        raise PinNeededError("the key needs the TPM PIN")
    if not token.pin:
        auth = None
    branches = token.branches()
    if len(branches) == 1 and token.signed is None:  # the TPM judges: no PCR read
        return _unseal(tpm, token, token.plan_for(branches[0]), auth), branches[0]
    found = signatures or []
    current = tpm.read_pcrs(read_selection(token, found))
    refused: PolicyError | None = None
    for branch in candidates(token, current, found):
        try:
            return _unseal(tpm, token, token.plan_for(branch), auth), branch
        except PolicyError:
            # the values read were the branch's: the TPM's refusal says the header lies about them
            reason = PolicyError("the TPM refused the PCR policy although the PCR values match the enrolment")
            if branch.kind == "grace":
                reason = grace_refused(tpm, token)
            elif branch.kind == "signed":
                reason = signed_refused(tpm, token, branch)
            refused = refused or reason
    assert refused is not None
    raise refused


def grace_refused(tpm: Tpm, token: Token) -> PolicyError:
    """Why the TPM refused the grace branch of prepare-update (its PCRs were the ones bound): its NV
    counter moved on (the grace was used, or someone ended it), or the boots it was valid for are past."""
    grace = token.grace
    assert grace is not None
    left_out = list(grace.left_out)
    hint = "the passphrase opens the disk; then run 'tpm2-unlocker reseal'"
    try:
        count, resets = tpm.counter_read(token.counter), tpm.reset_count()
    except UnlockerError as exc:
        return PolicyError(f"the firmware update's one-boot grace is refused ({exc})", left_out, hint)
    if count != grace.count:
        return PolicyError(f"the firmware update's one-boot grace was used already (NV counter 0x{token.counter:08x} "
                           f"is at {count}, the grace needs {grace.count})", left_out, hint)
    if resets > grace.reset_limit:
        return PolicyError(f"the firmware update's grace has expired (the TPM was reset {resets - grace.reset_limit} "
                           "time(s) more than 'prepare-update --boots' allowed)", left_out, hint)
    return PolicyError("the TPM refused the firmware update's grace although its counter and boot count hold",
                       left_out, hint)


def _unseal(tpm: Tpm, token: Token, plan: PolicyPlan, auth: Secret | None) -> Secret:
    pinned = token.srk_name
    if token.store == "nv":
        return tpm.nv_read(token.nv_index, plan, pinned, auth)
    if token.store == "file":
        sealed = read_blob_pair(*blob_paths(token.blob_dir, token.blob_name))
    else:
        sealed = SealedObject(token.public, token.private)
    return tpm.unseal(sealed, plan, pinned, auth)


def signed_refused(tpm: Tpm, token: Token, branch: Branch) -> PolicyError:
    """Why the TPM refused a signature approving the PCR values of now: retired (its epoch is below
    the enrolment's counter), else not a signature by the enrolment's key over what it says."""
    assert token.signed is not None
    epoch = int.from_bytes(branch.plan.nv_checks[0].operand, "big")
    hint = "approve the values of now with 'tpm2-unlocker sign-policy', or type the passphrase"
    try:
        now = tpm.counter_read(token.signed.epoch)
    except UnlockerError as exc:
        return PolicyError(f"the signed policy for these PCR values is refused ({exc})", hint=hint)
    if now > epoch:
        return PolicyError(f"the signed policy for these PCR values is retired (signed for epoch {epoch}, the "
                           f"enrolment is at epoch {now})", hint=hint)
    return PolicyError("the TPM refused the signed policy for these PCR values (not the enrolment's signing key's "
                       "signature over them)", hint=hint)


def check_placement(tpm: Tpm, token: Token) -> None:
    """Without unsealing: the sealed key the token points at carries the token's policy, and (a
    sealed object) loads under the SRK the token pinned. CorruptError when not."""
    if token.store == "nv":
        info = tpm.nv_info(token.nv_index)
        if info is None or info.auth_policy != token.policy_hash:
            raise CorruptError(f"NV index 0x{token.nv_index:08x} does not hold the enrolment's policy")
        return
    if token.store == "file":
        sealed = read_blob_pair(*blob_paths(token.blob_dir, token.blob_name))
    else:
        sealed = SealedObject(token.public, token.private)
    if sealed_auth_policy(sealed) != token.policy_hash:
        raise CorruptError("the sealed object does not carry the enrolment's policy")
    tpm.load_check(sealed, token.srk_name)


def da_protected(tpm: Tpm, token: Token) -> bool:
    """Whether the sealed key is DA-protected (ours are exactly when they have a PIN): by the
    object's public area (Load binds it to the private part) or the TPM's NV public area."""
    if token.store == "nv":
        info = tpm.nv_info(token.nv_index)
        if info is None:
            raise CorruptError(f"NV index 0x{token.nv_index:08x} does not exist in this TPM")
        return not info.no_da
    if token.store == "file":
        sealed = read_blob_pair(*blob_paths(token.blob_dir, token.blob_name))
    else:
        sealed = SealedObject(token.public, token.private)
    return not sealed_no_da(sealed)


def destroy(tpm: Tpm | None, token: Token, adopted_ok: bool = False) -> None:
    """Remove the sealed key a token points at (an NV index, or its pair of blob files), only when
    it is the enrolment's: the header that names it is anyone's to write, and may name another
    tool's NV index, another disk's sealed key or any file ending in .pub. An NV index goes only
    with our attributes (or, `adopted_ok`, an adopted index) and the token's policy, which the token's
    description digests to; blob files only when they hold a sealed object with that policy. Anything
    else stays, and is said (a token copied whole from another disk is not told apart: README)."""
    if token.store == "nv" and tpm is not None:
        info = tpm.nv_info(token.nv_index)
        if info is None:
            return
        # `adopted_ok` (a re-seal of an adopted index, its token proven first): tpm2-tools' attributes
        # go too once ours replaced it, as it holds the key; never on the header's word alone
        ours = nv_attributes_ours(info.attributes) or (adopted_ok and not token.keyslot_owned)
        if not ours or info.auth_policy != token.policy_hash or not token.policy_described():
            say(f"NV index 0x{token.nv_index:08x} stays: it is not this enrolment's sealed key (other attributes "
                "or policy); if it is yours, 'tpm2_nvundefine' it")
            return
        tpm.nv_undefine(token.nv_index)
    elif token.store == "file":
        pair = blob_paths(token.blob_dir, token.blob_name)
        if any(os.path.lexists(path) for path in pair):
            try:
                policy: bytes | None = sealed_auth_policy(read_blob_pair(*pair))
            except (OSError, UnlockerError):
                policy = None
            if policy != token.policy_hash or not token.policy_described():
                say(f"{token.describe_store()} stay: they do not hold this enrolment's sealed key")
                return
        for path in blob_paths(token.blob_dir, token.blob_name):
            for name in (path, path + PENDING):
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass


def nv_attributes_ours(attributes: int) -> bool:
    """The attributes our NV stores are defined with (written and locked, or not yet), with or
    without noDA (a key with a PIN is DA-protected)."""
    from unlocker.tpm.nv import OUR_NV_ATTRIBUTES
    from unlocker.tpm.tss import lib

    attributes &= ~(lib.TPMA_NV_WRITTEN | lib.TPMA_NV_WRITELOCKED)
    return attributes in (OUR_NV_ATTRIBUTES, OUR_NV_ATTRIBUTES & ~lib.TPMA_NV_NO_DA)


def read_blob_pair(pub_path: str, priv_path: str) -> SealedObject:
    parts = []
    for path in (pub_path, priv_path):
        try:
            with open(path, "rb") as f:
                parts.append(f.read(8192))
        except FileNotFoundError:
            raise CorruptError(f"sealed blob file {path} is missing") from None
        except OSError as exc:
            raise CorruptError(f"sealed blob file {path} cannot be read ({exc.strerror})") from None
    return SealedObject(parts[0], parts[1])


def write_blob_files(blob_dir: str, name: str, sealed: SealedObject) -> None:
    """Write NAME.pub/NAME.priv: both to *.new first and synced, then renamed into place. Nothing
    live is overwritten (a re-seal writes the pair no token names), so a crash at any point leaves
    the old enrolment's pair as it was."""
    try:
        os.makedirs(blob_dir, mode=0o700, exist_ok=True)
        paths = blob_paths(blob_dir, name)
        for path, data in zip(paths, (sealed.public, sealed.private), strict=True):
            # a leftover *.new (a crashed run's, or a link someone planted to make us write through
            # it) is removed, never followed: the new file is made afresh
            try:
                os.unlink(path + PENDING)
            except FileNotFoundError:
                pass
            fd = os.open(path + PENDING, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        for path in paths:
            os.rename(path + PENDING, path)
        dir_fd = os.open(blob_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise UsageError(f"cannot write the sealed blob to {blob_dir}: {exc.strerror}") from None
