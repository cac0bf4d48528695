"""The LUKS2 token that records an enrolment: schema, strict parse, serialise.

The header is writable by anyone who holds the disk, so every field is checked on read; anything
unexpected raises CorruptError rather than reaching the TPM or cryptsetup.
"""

from __future__ import annotations

import binascii  # not base64, which imports re (start-up time at boot)

from unlocker import TYPE_CHECKING
from unlocker.errors import CorruptError, UsageError
from unlocker.lean.jsonload import loads
from unlocker.lean.record import field, record
from unlocker.options import LOCK_PCRS
from unlocker.tpm.policy import (
    BANKS,
    EO_EQ,
    EO_UNSIGNED_LE,
    MAX_BRANCHES,
    PCR_COUNT,
    Authorization,
    NvCheck,
    PcrSelection,
    PolicyPlan,
    branch_digest,
    combined_policy,
)

if TYPE_CHECKING:
    from typing import Any

TOKEN_TYPE = "tpm2-unlocker"
TOKEN_VERSION = 1
STORES = ("token", "nv", "file")
MAX_BLOB = 4096  # a sealed object's TPM2B_PUBLIC/PRIVATE are a few hundred bytes
NV_INDEX_MIN, NV_INDEX_MAX = 0x01000000, 0x01FFFFFF

_COMMON = {"type", "keyslots", "version", "store", "pcr_bank", "pcrs", "pcr_values", "policy_hash",
           "srk_name", "srk_public", "pin", "keyslot_owned", "lock_pcr", "branches", "branch_policies",
           "counter", "grace", "signed", "pcr_events"}
_PER_STORE = {"token": {"tpm2_public", "tpm2_private"}, "nv": {"nv_index"}, "file": {"blob_dir", "blob_name"}}
BLOB_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
_DIGITS = "0123456789"
_LOWER_HEX = _DIGITS + "abcdef"
_HEX = _LOWER_HEX + "ABCDEF"


def parse_nv_index(text: str) -> int:
    """An NV index as the user writes it, with tpm2-tools' meaning: hexadecimal with or without 0x,
    and a value below the owner range is an offset into it (tpm2_nvdefine 0x2000A defines 0x0102000a)."""
    digits = text[2:] if text.lower().startswith("0x") else text
    if not _spelled_with(digits, _HEX, range(1, 9)):
        raise UsageError(f"'{text}' is not an NV index (write it like 0x1500016)")
    index = int(digits, 16)
    if index < NV_INDEX_MIN:
        index += NV_INDEX_MIN
    if not NV_INDEX_MIN <= index <= NV_INDEX_MAX:
        raise UsageError(f"NV index {text} is outside the owner range 0x01000000-0x01ffffff")
    return index


def _spelled_with(text: str, alphabet: str, lengths: range) -> bool:
    """What re.fullmatch("[alphabet]{m,n}") says, with str methods: `re` is not imported at boot."""
    return len(text) in lengths and not text.strip(alphabet)


@record
class PcrBranch:
    """A boot chain the key unseals in: PCRs of the token's bank and their values (the lock PCR
    apart: every branch also binds it to its reset value)."""

    selection: PcrSelection
    pcr_values: dict[int, bytes]


@record
class Grace:
    """prepare-update's one-boot grace: for each chain, a branch without the PCRs `left_out` (the
    firmware's), valid while the enrolment's NV counter (named `counter_name`) still holds `count`
    and the TPM's resetCount is at most `reset_limit` (both checked by the TPM in the policy)."""

    left_out: tuple[int, ...]
    counter_name: bytes
    count: int
    reset_limit: int


@record
class Signed:
    """enroll --signing-key: a branch that PolicyAuthorize opens to whatever PCR policy the key
    signs (sign-policy), among them PolicyNV(epoch counter <= the signature's epoch): incrementing
    the counter retires every older signature."""

    key_public: bytes  # the signing key's TPM2B_PUBLIC (LoadExternal at boot)
    key_name: bytes
    policy_ref: bytes
    selection: PcrSelection  # the PCRs sign-policy approves by default
    epoch: int  # NV counter index
    epoch_name: bytes


@record(frozen=True)
class Branch:
    """One branch of an enrolment's policy as the boot tries it: `kind` "pcr" (a chain's PCR values),
    "signed" (PolicyAuthorize: PCR values a signature approves) or "grace" (a chain without the
    firmware's PCRs, for one boot); its plan (the PCRs it binds with the lock PCR, their values, the
    grace's PolicyNV and PolicyCounterTimer, PolicyAuthValue with a PIN); its place in branch_policies."""

    kind: str
    plan: PolicyPlan
    index: int = 0

    def matches(self, current: dict[int, bytes]) -> bool:
        """The PCR values read now are the ones this branch binds."""
        selection = self.plan.selection
        return selection is not None and all(current.get(p) == self.plan.values.get(p) for p in selection.pcrs)


@record
class Token:
    """Our LUKS2 token: where the key is sealed, for which keyslot, under which PCR policy."""

    keyslot: int
    store: str
    selection: PcrSelection
    pcr_values: dict[int, bytes]
    policy_hash: bytes
    srk_name: bytes
    # the SRK's TPM2B_PUBLIC, as systemd keeps it (tpm2_srk): its name is srk_name; older tokens lack it
    srk_public: bytes = b""
    public: bytes = b""
    private: bytes = b""
    nv_index: int = 0
    blob_dir: str = ""
    blob_name: str = "key"  # the file store's pair: BLOB_DIR/NAME.pub, NAME.priv
    pin: bool = False
    keyslot_owned: bool = True  # False when adopted: the keyslot is the user's own, never removed
    # the PCR the initramfs extends once the disks are open, bound to its reset value: no unseal
    # after that in this boot (None: an adopted object's own policy, or an older enrolment)
    lock_pcr: int | None = None
    # further chains the key unseals in, oldest first after the one above (reseal --predict adds
    # the predicted chain): the policy is then PolicyOR over every branch's digest
    more_branches: list[PcrBranch] = field(default_factory=list)
    # every branch's policy digest, in branches() order (PolicyOR's list; empty with one branch):
    # the boot needs no hash code for PolicyOR, and a digest changed here only makes the TPM refuse
    branch_policies: list[bytes] = field(default_factory=list)
    # the enrolment's NV counter (prepare-update defines it; kept for the next one, `remove` takes it)
    counter: int = 0
    grace: Grace | None = None
    signed: Signed | None = None
    # what the firmware's log held per PCR at sealing, "TYPE:DIGEST" prefixes (measure/events.py): the
    # boot and `status` name the events behind a changed PCR from it (older tokens: none recorded)
    pcr_events: dict[int, list[str]] = field(default_factory=dict)
    token_id: int | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": TOKEN_TYPE,
            "keyslots": [str(self.keyslot)],
            "version": TOKEN_VERSION,
            "store": self.store,
            "pcr_bank": self.selection.bank,
            "pcrs": list(self.selection.pcrs),
            "pcr_values": _values_json(self.pcr_values),
            "policy_hash": self.policy_hash.hex(),
            "srk_name": self.srk_name.hex(),
            "pin": self.pin,
            "keyslot_owned": self.keyslot_owned,
        }
        if self.lock_pcr is not None:
            doc["lock_pcr"] = self.lock_pcr
        if self.more_branches:
            doc["branches"] = [{"pcrs": list(b.selection.pcrs), "pcr_values": _values_json(b.pcr_values)}
                               for b in self.more_branches]
        if self.branch_policies:
            doc["branch_policies"] = [d.hex() for d in self.branch_policies]
        if self.counter:
            doc["counter"] = f"0x{self.counter:08x}"
        if self.grace is not None:
            doc["grace"] = {"left_out": list(self.grace.left_out), "counter_name": self.grace.counter_name.hex(),
                            "count": self.grace.count, "reset_limit": self.grace.reset_limit}
        if self.signed is not None:
            doc["signed"] = {"key": binascii.b2a_base64(self.signed.key_public, newline=False).decode(),
                             "key_name": self.signed.key_name.hex(), "policy_ref": self.signed.policy_ref.hex(),
                             "pcrs": list(self.signed.selection.pcrs), "epoch": f"0x{self.signed.epoch:08x}",
                             "epoch_name": self.signed.epoch_name.hex()}
        if self.pcr_events:
            doc["pcr_events"] = {str(p): list(e) for p, e in sorted(self.pcr_events.items())}
        if self.srk_public:
            doc["srk_public"] = binascii.b2a_base64(self.srk_public, newline=False).decode()
        if self.store == "token":
            doc["tpm2_public"] = binascii.b2a_base64(self.public, newline=False).decode()
            doc["tpm2_private"] = binascii.b2a_base64(self.private, newline=False).decode()
        elif self.store == "nv":
            doc["nv_index"] = f"0x{self.nv_index:08x}"
        else:
            doc["blob_dir"] = self.blob_dir
            doc["blob_name"] = self.blob_name
        return doc

    def policy_selection(self) -> PcrSelection:
        """The PCRs the policy binds: the enrolled ones and the lock PCR."""
        if self.lock_pcr is None:
            return self.selection
        return PcrSelection(self.selection.bank, tuple(sorted({*self.selection.pcrs, self.lock_pcr})))

    def expected_values(self) -> dict[int, bytes]:
        """The values the policy binds them to: the lock PCR's is its reset value (zeros)."""
        if self.lock_pcr is None:
            return dict(self.pcr_values)
        return {**self.pcr_values, self.lock_pcr: bytes(self.selection.digest_size)}

    def _with_lock(self, selection: PcrSelection) -> PcrSelection:
        if self.lock_pcr is None:
            return selection
        return PcrSelection(selection.bank, tuple(sorted({*selection.pcrs, self.lock_pcr})))

    def _lock_values(self) -> dict[int, bytes]:
        return {} if self.lock_pcr is None else {self.lock_pcr: bytes(self.selection.digest_size)}

    def pcr_branches(self) -> list[PcrBranch]:
        """The chains the key unseals in: the one above, then more_branches."""
        return [PcrBranch(self.selection, dict(self.pcr_values)), *self.more_branches]

    def grace_chains(self) -> list[PcrBranch]:
        """Each chain without the PCRs the grace leaves out (the same one once)."""
        if self.grace is None:
            return []
        chains: list[PcrBranch] = []
        for chain in self.pcr_branches():
            pcrs = tuple(p for p in chain.selection.pcrs if p not in self.grace.left_out)
            short = PcrBranch(PcrSelection(chain.selection.bank, pcrs), {p: chain.pcr_values[p] for p in pcrs})
            if short not in chains:
                chains.append(short)
        return chains

    def lock_selection(self) -> PcrSelection | None:
        return None if self.lock_pcr is None else PcrSelection(self.selection.bank, (self.lock_pcr,))

    def branches(self) -> list[Branch]:
        """Every branch of the policy, in the order of branch_policies: the chains, the signed one,
        the grace's. The signed branch's plan is PolicyAuthorize's part only: the PCR policy before it
        comes from a signature (signed_plan)."""
        found = [Branch("pcr", PolicyPlan(self._with_lock(b.selection), {**b.pcr_values, **self._lock_values()},
                                          auth_value=self.pin))
                 for b in self.pcr_branches()]
        if self.signed is not None:
            found.append(Branch("signed", PolicyPlan(None, authorize=Authorization(self.signed.key_name,
                                                                                   self.signed.policy_ref),
                                                     lock=self.lock_selection(), auth_value=self.pin)))
        if self.grace is not None:
            check = NvCheck(self.counter, self.grace.counter_name, self.grace.count.to_bytes(8, "big"), EO_EQ)
            found += [Branch("grace", PolicyPlan(self._with_lock(b.selection), {**b.pcr_values, **self._lock_values()},
                                                 nv_checks=(check,), reset_limit=self.grace.reset_limit,
                                                 auth_value=self.pin))
                      for b in self.grace_chains()]
        return [Branch(b.kind, b.plan, index) for index, b in enumerate(found)]

    def signed_index(self) -> int:
        return len(self.pcr_branches())

    def read_selection(self) -> PcrSelection:
        """Every PCR some branch binds, the lock PCR included: what the boot reads once to choose."""
        pcrs = {p for b in self.pcr_branches() for p in b.selection.pcrs}
        return self._with_lock(PcrSelection(self.selection.bank, tuple(sorted(pcrs))))

    def compute_policy(self) -> None:
        """Set branch_policies and policy_hash from the branches (Python's digests: enrolment and
        re-seal hold them to the TPM's trial sessions before anything is sealed to them)."""
        digests = [branch_digest(b.plan) for b in self.branches()]
        if len(digests) > MAX_BRANCHES:
            raise UsageError(f"a policy takes at most {MAX_BRANCHES} branches, this one has {len(digests)}")
        self.branch_policies = digests if len(digests) > 1 else []
        self.policy_hash = combined_policy(digests)

    def policy_described(self) -> bool:
        """Whether the header's description of the policy (its chains and their values, the lock PCR,
        the PIN, the signing key's name and reference, the grace's counter and limits) digests to its
        policy_hash. The header is anyone's to write and the TPM enforces the digests only: what a
        re-seal or a signature carries over from a token must be proven this way first, and the
        policy_hash itself against the sealed key (store.check_placement, or an unseal through it)."""
        try:
            digests = [branch_digest(b.plan) for b in self.branches()]
        except (ValueError, KeyError, TypeError):
            return False
        if len(digests) == 1:
            return not self.branch_policies and digests[0] == self.policy_hash
        return digests == self.branch_policies and combined_policy(digests) == self.policy_hash

    def branch_policy(self, index: int) -> bytes:
        """The digest of branch `index` (the policy itself when it is the only one)."""
        return self.branch_policies[index] if self.branch_policies else self.policy_hash

    def plan_for(self, branch: Branch) -> PolicyPlan:
        """The branch's plan as the unseal runs it: with PolicyOR over every branch's digest last."""
        if not self.branch_policies:
            return branch.plan
        plan = branch.plan
        return PolicyPlan(plan.selection, plan.values, plan.nv_checks, plan.reset_limit, plan.authorize, plan.lock,
                          plan.auth_value, tuple(self.branch_policies))

    def epoch_check(self, epoch: int) -> NvCheck:
        """A signature's PolicyNV: the enrolment's epoch counter at most `epoch` (older ones retired)."""
        assert self.signed is not None
        return NvCheck(self.signed.epoch, self.signed.epoch_name, epoch.to_bytes(8, "big"), EO_UNSIGNED_LE)

    def describe_store(self) -> str:
        if self.store == "nv":
            return f"nv index 0x{self.nv_index:08x}"
        if self.store == "file":
            return f"files {self.blob_name}.pub/.priv in {self.blob_dir}"
        return "LUKS2 token"


def _values_json(values: dict[int, bytes]) -> dict[str, str]:
    return {str(p): v.hex() for p, v in sorted(values.items())}


def _need(doc: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in doc:
        raise CorruptError(f"token has no '{key}'")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CorruptError(f"token field '{key}' has the wrong type")
    return value


def _hex(value: str, what: str, sizes: tuple[int, ...]) -> bytes:
    if value.strip(_LOWER_HEX) or len(value) % 2:
        raise CorruptError(f"token field '{what}' is not lower-case hex (an even number of digits)")
    raw = binascii.a2b_hex(value)
    if len(raw) not in sizes:
        raise CorruptError(f"token field '{what}' has {len(raw)} bytes")
    return raw


def _b64(value: str, what: str) -> bytes:
    try:
        raw = binascii.a2b_base64(value.encode("ascii"), strict_mode=True)  # as b64decode(validate=True)
    except (binascii.Error, ValueError):
        raise CorruptError(f"token field '{what}' is not base64") from None
    if not 2 < len(raw) <= MAX_BLOB:
        raise CorruptError(f"token field '{what}' has an impossible size ({len(raw)} bytes)")
    return raw


# events.MAX_RECORDED_EVENTS (not imported: the boot parses every token, and reads the log only on failure)
MAX_RECORDED_EVENTS = 64


def _pcr_events(raw: dict[str, Any], selection: PcrSelection) -> dict[int, list[str]]:
    """The record of each PCR's events at sealing: PCRs of the selection, each a list of at most
    MAX_RECORDED_EVENTS entries "tttttttt:dddddddd" (event type and digest prefix, lower-case hex)."""
    if not set(raw) <= {str(p) for p in selection.pcrs}:
        raise CorruptError("token pcr_events names PCRs outside its PCR list")
    found: dict[int, list[str]] = {}
    for key, entries in raw.items():
        if not isinstance(entries, list) or len(entries) > MAX_RECORDED_EVENTS or any(
                not isinstance(e, str) or len(e) != 17 or e[8] != ":" or (e[:8] + e[9:]).strip(_LOWER_HEX)
                for e in entries):
            raise CorruptError(f"token pcr_events.{key} is not a list of at most {MAX_RECORDED_EVENTS} "
                               "'type:digest' entries")
        found[int(key)] = entries
    return found


def parse_token(doc: Any, token_id: int | None = None) -> Token:
    """Parse one token's JSON object strictly. Raises CorruptError naming the first problem."""
    if not isinstance(doc, dict):
        raise CorruptError("token is not a JSON object")
    if doc.get("type") != TOKEN_TYPE:
        raise CorruptError(f"token type is not '{TOKEN_TYPE}'")
    version = _need(doc, "version", int)
    if version != TOKEN_VERSION:
        raise CorruptError(f"token version {version} is not supported (this build reads {TOKEN_VERSION})")
    store = _need(doc, "store", str)
    if store not in STORES:
        raise CorruptError(f"token store '{store}' is unknown")
    unknown = set(doc) - _COMMON - _PER_STORE[store]
    if unknown:
        raise CorruptError(f"token has unknown fields: {', '.join(sorted(unknown))}")
    keyslots = _need(doc, "keyslots", list)
    if len(keyslots) != 1 or not isinstance(keyslots[0], str) or not _spelled_with(keyslots[0], _DIGITS, range(1, 3)):
        raise CorruptError("token must name exactly one keyslot")
    bank = _need(doc, "pcr_bank", str)
    if bank not in BANKS:
        raise CorruptError(f"token PCR bank '{bank}' is unknown")
    first = _pcr_branch(doc, bank, "")
    selection, values = first.selection, first.pcr_values
    token = Token(
        keyslot=int(keyslots[0]),
        store=store,
        selection=selection,
        pcr_values=values,
        policy_hash=_hex(_need(doc, "policy_hash", str), "policy_hash", (32,)),
        srk_name=_hex(_need(doc, "srk_name", str), "srk_name", (34, 50, 66)),
        pin=_need(doc, "pin", bool),
        keyslot_owned=_need(doc, "keyslot_owned", bool),
        token_id=token_id,
    )
    if "srk_public" in doc:
        token.srk_public = _b64(_need(doc, "srk_public", str), "srk_public")
    if "branches" in doc:
        raw_branches = _need(doc, "branches", list)
        if not 0 < len(raw_branches) < MAX_BRANCHES:
            raise CorruptError(f"token branches must list 1 to {MAX_BRANCHES - 1} further chains")
        for i, raw in enumerate(raw_branches):
            if not isinstance(raw, dict) or set(raw) != {"pcrs", "pcr_values"}:
                raise CorruptError(f"token branch {i + 1} is not an object of pcrs and pcr_values")
            token.more_branches.append(_pcr_branch(raw, bank, f"branches.{i + 1}."))
    if "lock_pcr" in doc:
        lock = _need(doc, "lock_pcr", int)
        if lock not in LOCK_PCRS or any(lock in b.selection.pcrs for b in token.pcr_branches()):
            raise CorruptError("token lock_pcr is not a lock PCR apart from its PCR list")
        token.lock_pcr = lock
    if "pcr_events" in doc:
        token.pcr_events = _pcr_events(_need(doc, "pcr_events", dict), selection)
    if "counter" in doc:
        token.counter = _nv_index(_need(doc, "counter", str), "counter")
    if "grace" in doc:
        token.grace = _grace(_need(doc, "grace", dict), token)
    if "signed" in doc:
        token.signed = _signed(_need(doc, "signed", dict), bank)
    count = len(token.branches())
    if count > MAX_BRANCHES:
        raise CorruptError(f"token has {count} branches (PolicyOR takes at most {MAX_BRANCHES})")
    if "branch_policies" in doc or count > 1:
        raw_policies = _need(doc, "branch_policies", list)
        if len(raw_policies) != count or count < 2:
            raise CorruptError(f"token branch_policies must hold one digest per branch ({count})")
        token.branch_policies = [_hex(d if isinstance(d, str) else "", f"branch_policies.{i}", (32,))
                                 for i, d in enumerate(raw_policies)]
    if store == "token":
        token.public = _b64(_need(doc, "tpm2_public", str), "tpm2_public")
        token.private = _b64(_need(doc, "tpm2_private", str), "tpm2_private")
    elif store == "nv":
        token.nv_index = _nv_index(_need(doc, "nv_index", str), "nv_index")
    else:
        blob_dir = _need(doc, "blob_dir", str)
        if (not blob_dir.startswith("/") or not _spelled_with(blob_dir, BLOB_NAME_CHARS + "/", range(1, 4097))
                or ".." in blob_dir.split("/")):
            raise CorruptError("token blob_dir is not a plain absolute path (letters, digits, '._-/')")
        token.blob_dir = blob_dir
        if "blob_name" in doc:  # older tokens: the one pair, key.pub/key.priv
            name = _need(doc, "blob_name", str)
            if not _spelled_with(name, BLOB_NAME_CHARS, range(1, 65)) or name.startswith("."):
                raise CorruptError("token blob_name is not a plain file name")
            token.blob_name = name
    return token


def _nv_index(text: str, what: str) -> int:
    if not (text.startswith("0x") and _spelled_with(text[2:], _HEX, range(1, 9))):
        raise CorruptError(f"token {what} is not a hex number")
    index = int(text, 16)
    if not NV_INDEX_MIN <= index <= NV_INDEX_MAX:
        raise CorruptError(f"token {what} {text} is outside the owner NV range")
    return index


def _whole(doc: dict[str, Any], key: str, below: int) -> int:
    value = _need(doc, key, int)
    if not 0 <= value < below:
        raise CorruptError(f"token field '{key}' is out of range")
    return value


def _grace(doc: dict[str, Any], token: Token) -> Grace:
    if set(doc) != {"left_out", "counter_name", "count", "reset_limit"}:
        raise CorruptError("token grace is not an object of left_out, counter_name, count and reset_limit")
    if not token.counter:
        raise CorruptError("token grace has no counter")
    left_out = _need(doc, "left_out", list)
    if not left_out or any(not isinstance(p, int) or isinstance(p, bool) or p not in token.selection.pcrs
                           for p in left_out) or left_out != sorted(set(left_out)):
        raise CorruptError("token grace left_out is not a sorted list of the token's PCRs")
    return Grace(tuple(left_out), _hex(_need(doc, "counter_name", str), "counter_name", (34,)),
                 _whole(doc, "count", 1 << 64), _whole(doc, "reset_limit", 1 << 32))


def _signed(doc: dict[str, Any], bank: str) -> Signed:
    if set(doc) != {"key", "key_name", "policy_ref", "pcrs", "epoch", "epoch_name"}:
        raise CorruptError("token signed is not an object of key, key_name, policy_ref, pcrs, epoch and epoch_name")
    pcrs = _need(doc, "pcrs", list)
    if not pcrs or any(not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < PCR_COUNT for p in pcrs) \
            or pcrs != sorted(set(pcrs)):
        raise CorruptError("token signed.pcrs is not a sorted list of PCRs 0-23")
    ref = _need(doc, "policy_ref", str)
    return Signed(_b64(_need(doc, "key", str), "signed.key"),
                  _hex(_need(doc, "key_name", str), "signed.key_name", (34,)),
                  _hex(ref, "signed.policy_ref", tuple(range(65))) if ref else b"",
                  PcrSelection(bank, tuple(pcrs)), _nv_index(_need(doc, "epoch", str), "signed.epoch"),
                  _hex(_need(doc, "epoch_name", str), "signed.epoch_name", (34,)))


def _pcr_branch(doc: dict[str, Any], bank: str, where: str) -> PcrBranch:
    """The PCR list and values of one chain (the token's own, or one of its branches)."""
    pcrs = _need(doc, "pcrs", list)
    if not pcrs or any(not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < PCR_COUNT for p in pcrs) \
            or pcrs != sorted(set(pcrs)):
        raise CorruptError(f"token {where}PCR list is not a sorted list of PCRs 0-23")
    selection = PcrSelection(bank, tuple(pcrs))
    raw_values = _need(doc, "pcr_values", dict)
    if set(raw_values) != {str(p) for p in pcrs}:
        raise CorruptError(f"token {where}PCR values do not match its PCR list")
    values = {int(p): _hex(_need(raw_values, p, str), f"{where}pcr_values.{p}", (selection.digest_size,))
              for p in raw_values}
    return PcrBranch(selection, values)


def parse_token_text(text: str | bytes, token_id: int | None = None) -> Token:
    try:
        doc = loads(text)
    except (ValueError, UnicodeDecodeError):
        raise CorruptError("token is not valid JSON") from None
    return parse_token(doc, token_id)
