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
from unlocker.tpm.policy import BANKS, PCR_COUNT, PcrSelection

if TYPE_CHECKING:
    from typing import Any

TOKEN_TYPE = "tpm2-unlocker"
TOKEN_VERSION = 1
STORES = ("token", "nv", "file")
MAX_BLOB = 4096  # a sealed object's TPM2B_PUBLIC/PRIVATE are a few hundred bytes
NV_INDEX_MIN, NV_INDEX_MAX = 0x01000000, 0x01FFFFFF

_COMMON = {"type", "keyslots", "version", "store", "pcr_bank", "pcrs", "pcr_values", "policy_hash",
           "srk_name", "srk_public", "pin", "keyslot_owned", "lock_pcr"}
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
    token_id: int | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": TOKEN_TYPE,
            "keyslots": [str(self.keyslot)],
            "version": TOKEN_VERSION,
            "store": self.store,
            "pcr_bank": self.selection.bank,
            "pcrs": list(self.selection.pcrs),
            "pcr_values": {str(p): v.hex() for p, v in sorted(self.pcr_values.items())},
            "policy_hash": self.policy_hash.hex(),
            "srk_name": self.srk_name.hex(),
            "pin": self.pin,
            "keyslot_owned": self.keyslot_owned,
        }
        if self.lock_pcr is not None:
            doc["lock_pcr"] = self.lock_pcr
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

    def describe_store(self) -> str:
        if self.store == "nv":
            return f"nv index 0x{self.nv_index:08x}"
        if self.store == "file":
            return f"files {self.blob_name}.pub/.priv in {self.blob_dir}"
        return "LUKS2 token"


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
    pcrs = _need(doc, "pcrs", list)
    if not pcrs or any(not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < PCR_COUNT for p in pcrs) \
            or pcrs != sorted(set(pcrs)):
        raise CorruptError("token PCR list is not a sorted list of PCRs 0-23")
    selection = PcrSelection(bank, tuple(pcrs))
    raw_values = _need(doc, "pcr_values", dict)
    if set(raw_values) != {str(p) for p in pcrs}:
        raise CorruptError("token PCR values do not match its PCR list")
    values = {int(p): _hex(_need(raw_values, p, str), f"pcr_values.{p}", (selection.digest_size,))
              for p in raw_values}
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
    if "lock_pcr" in doc:
        lock = _need(doc, "lock_pcr", int)
        if lock not in LOCK_PCRS or lock in selection.pcrs:
            raise CorruptError("token lock_pcr is not a lock PCR apart from its PCR list")
        token.lock_pcr = lock
    if store == "token":
        token.public = _b64(_need(doc, "tpm2_public", str), "tpm2_public")
        token.private = _b64(_need(doc, "tpm2_private", str), "tpm2_private")
    elif store == "nv":
        text = _need(doc, "nv_index", str)
        if not (text.startswith("0x") and _spelled_with(text[2:], _HEX, range(1, 9))):
            raise CorruptError("token nv_index is not a hex number")
        token.nv_index = int(text, 16)
        if not NV_INDEX_MIN <= token.nv_index <= NV_INDEX_MAX:
            raise CorruptError(f"token nv_index {text} is outside the owner NV range")
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


def parse_token_text(text: str | bytes, token_id: int | None = None) -> Token:
    try:
        doc = loads(text)
    except (ValueError, UnicodeDecodeError):
        raise CorruptError("token is not valid JSON") from None
    return parse_token(doc, token_id)
