"""Other tools' enrolments in a LUKS2 header: systemd-cryptenroll's and Clevis's tokens.

`status` lists what it sees; `adopt --from systemd|clevis` takes over a systemd-tpm2 token or a Clevis
tpm2 pin. A header is anyone's to write, so a token is parsed as hostile input: anything malformed is
a CorruptError naming the token, anything well-formed that adopt cannot take (a FIDO2 key, a Tang
server, a signed PCR policy) an Unadoptable saying why.

Formats, as systemd 252 (Debian 12) writes them (src/shared/tpm2-util.c, tpm2_make_luks2_json):
`tpm2-blob` is base64 of the sealed object's TPM2B_PRIVATE followed by its TPM2B_PUBLIC, sealed under
the primary of tpm2-tools' default template (ECC P-256, RSA-2048 on a TPM without ECC: `tpm2-primary-alg`);
its policy is PolicyPCR over `tpm2-pcr-bank`:`tpm2-pcrs`, then PolicyAuthValue with `tpm2-pin`, the
auth value being SHA-256 of the PIN; the keyslot's passphrase is base64 of the unsealed secret.
systemd 254 and later name their storage key in `tpm2_srk` (its TPM2B_PUBLIC). Clevis's tpm2 pin
(clevis luks bind, LUKS2 token type `clevis`) holds a JWE whose protected header carries
`clevis.tpm2`: the sealed JWK (`jwk_pub`, `jwk_priv`, base64url), the primary's `hash` and `key`
algorithm (`tpm2_createprimary -C o -g HASH -G KEY`) and the policy's `pcr_bank`/`pcr_ids`; the JWE's
plaintext is the keyslot's passphrase.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from unlocker.errors import CorruptError, UnlockerError, UsageError
from unlocker.luks import LuksDevice
from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import BANKS, PCR_COUNT, PcrSelection, policy_auth_value, policy_pcr
from unlocker.tpm.seal import SealedObject, sealed_auth_policy, validate_sealed
from unlocker.tpm.srk import srk_name_of

SYSTEMD_TPM2 = "systemd-tpm2"
CLEVIS = "clevis"
# the token types status names, and the `adopt --from` value that takes each (None: none can)
KNOWN_TYPES = {SYSTEMD_TPM2: "systemd", "systemd-fido2": None, "systemd-recovery": None, CLEVIS: "clevis"}
FROM = {"systemd": SYSTEMD_TPM2, "clevis": CLEVIS}
# A sealed object's two parts are a few hundred bytes each (ours cap at token.MAX_BLOB); a JWE's
# fields here are a JWK sealed twice over and a passphrase of at most cryptsetup's 512 characters.
MAX_BLOB = 8192
MAX_JWE_FIELD = 16384
MAX_PASSPHRASE = 8192
_BASE64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


class Unadoptable(UsageError):
    """A well-formed enrolment of another tool that `adopt --from` cannot take."""


@dataclass(frozen=True)
class SystemdTpm2:
    """A systemd-tpm2 token, parsed."""

    token_id: int
    keyslot: int
    sealed: SealedObject
    selection: PcrSelection | None  # None: sealed to no PCRs
    primary_alg: str  # "ecc" or "rsa": tpm2-tools' default primary of that algorithm
    policy_hash: bytes
    pin: bool
    srk_public: bytes = b""  # tpm2_srk (systemd >= 254): the storage key, by its TPM2B_PUBLIC

    @property
    def srk_name(self) -> bytes | None:
        return srk_name_of(self.srk_public) if self.srk_public else None


@dataclass(frozen=True)
class ClevisTpm2:
    """A Clevis token with a tpm2 pin, parsed; the JWE's parts decoded, its protected header as it is
    (the AES-GCM tag covers its text)."""

    token_id: int
    keyslot: int
    sealed: SealedObject  # the JWK, sealed
    selection: PcrSelection | None  # None: bound to no PCRs (the object opens with its empty auth value)
    primary_alg: str
    protected: bytes
    iv: bytes
    ciphertext: bytes
    tag: bytes


Adoptable = SystemdTpm2 | ClevisTpm2


@dataclass
class OtherEnrolment:
    """What status says about another tool's token."""

    token_id: int
    type: str
    keyslots: list[int]
    pin_type: str = ""  # a Clevis token's pin: tpm2, tang, sss, ...
    pcrs: str = ""  # the PCRs a TPM enrolment is bound to ("" unknown; "none")
    tpm_pin: bool = False  # a systemd-tpm2 token that asks for a PIN too
    adopt_from: str | None = None  # the `adopt --from` value that takes it; None: none can
    why_not: str = ""  # why not, when not
    policy_satisfied: bool | None = None  # whether the current PCRs satisfy its policy (TPM enrolments)


def _keyslot(doc: dict[str, Any], what: str) -> int:
    slots = doc.get("keyslots")
    if (not isinstance(slots, list) or len(slots) != 1 or not isinstance(slots[0], str) or not slots[0].isascii()
            or not slots[0].isdigit() or len(slots[0]) > 2):
        raise CorruptError(f"{what} does not name exactly one keyslot")
    return int(slots[0])


def keyslots_named(doc: Any) -> list[int]:
    """The keyslots a token names (whatever its type; none when it is malformed)."""
    slots = doc.get("keyslots") if isinstance(doc, dict) else None
    if not isinstance(slots, list):
        return []
    return [int(s) for s in slots if isinstance(s, str) and s.isascii() and s.isdigit() and len(s) <= 2]


def _text(doc: dict[str, Any], key: str, what: str, most: int) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise CorruptError(f"{what} has no '{key}' string")
    if len(value) > most:
        raise CorruptError(f"{what}: '{key}' is impossibly large ({len(value)} characters)")
    return value


def _base64(text: str, what: str, urlsafe: bool = False) -> bytes:
    try:
        raw = text.encode("ascii")
        if urlsafe:  # urlsafe_b64decode skips what is not of its alphabet: check it ourselves
            if raw.strip(_BASE64URL) or len(raw) % 4 == 1:
                raise ValueError
            return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
        return base64.b64decode(raw, validate=True)
    except (ValueError, binascii.Error):
        raise CorruptError(f"{what} is not base64{'url' if urlsafe else ''}") from None


def _sealed(private_and_public: bytes, what: str) -> SealedObject:
    """A TPM2B_PRIVATE followed by a TPM2B_PUBLIC, split by their size fields and checked."""
    data = private_and_public
    if len(data) < 4:
        raise CorruptError(f"{what} is too short for a sealed object")
    private_end = 2 + int.from_bytes(data[:2], "big")
    public_end = private_end + 2 + int.from_bytes(data[private_end:private_end + 2], "big")
    if private_end + 2 > len(data) or public_end != len(data):
        raise CorruptError(f"{what} is not a TPM2B_PRIVATE and a TPM2B_PUBLIC")
    sealed = SealedObject(public=data[private_end:], private=data[:private_end])
    _check_sealed(sealed, what)
    return sealed


def _check_sealed(sealed: SealedObject, what: str) -> None:
    try:
        validate_sealed(sealed)
    except CorruptError as exc:
        raise CorruptError(f"{what}: {exc}") from None


def _selection(bank: str, pcrs: list[int]) -> PcrSelection | None:
    return PcrSelection(bank, tuple(sorted(pcrs))) if pcrs else None


def parse_systemd_tpm2(doc: Any, token_id: int) -> SystemdTpm2:
    """A systemd-tpm2 token. CorruptError when malformed, Unadoptable for a policy we do not redo."""
    what = f"systemd-tpm2 token {token_id}"
    if not isinstance(doc, dict) or doc.get("type") != SYSTEMD_TPM2:
        raise CorruptError(f"{what} is not a systemd-tpm2 token")
    keyslot = _keyslot(doc, what)
    for newer in ("tpm2_pcrlock", "tpm2_pcrlock_nv", "tpm2_salt"):
        if newer in doc:
            raise Unadoptable(f"{what} uses {newer} (a systemd newer than the 252 whose tokens adopt reads): "
                              "enrol with 'tpm2-unlocker enroll' instead")
    if doc.get("tpm2_pubkey_pcrs"):
        raise Unadoptable(f"{what} has a signed PCR policy (tpm2_pubkey_pcrs): adopt takes only a plain PCR "
                          "policy; enrol with 'tpm2-unlocker enroll' instead")
    pcrs = doc.get("tpm2-pcrs")
    if (not isinstance(pcrs, list) or len(pcrs) > PCR_COUNT
            or any(not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < PCR_COUNT for p in pcrs)
            or len(set(pcrs)) != len(pcrs)):
        raise CorruptError(f"{what}: 'tpm2-pcrs' is not a list of PCRs 0-23")
    bank = doc.get("tpm2-pcr-bank", "sha256")  # systemd before 250 wrote none: it used sha256
    if not isinstance(bank, str) or bank.lower() not in BANKS:
        raise CorruptError(f"{what}: 'tpm2-pcr-bank' is not one of {', '.join(BANKS)}")
    alg = doc.get("tpm2-primary-alg", "ecc")  # before 250: always ECC
    if not isinstance(alg, str) or alg.lower() not in ("ecc", "rsa"):
        raise CorruptError(f"{what}: 'tpm2-primary-alg' is neither ecc nor rsa")
    pin = doc.get("tpm2-pin", False)
    if not isinstance(pin, bool):
        raise CorruptError(f"{what}: 'tpm2-pin' is not true or false")
    policy_text = _text(doc, "tpm2-policy-hash", what, 64)
    try:
        policy_hash = bytes.fromhex(policy_text)
    except ValueError:
        raise CorruptError(f"{what}: 'tpm2-policy-hash' is not hex") from None
    if len(policy_hash) != 32:
        raise CorruptError(f"{what}: 'tpm2-policy-hash' is not a SHA-256 digest")
    blob = _base64(_text(doc, "tpm2-blob", what, MAX_BLOB * 4 // 3 + 4), f"{what}: 'tpm2-blob'")
    sealed = _sealed(blob, f"{what}: 'tpm2-blob'")
    if sealed_auth_policy(sealed) != policy_hash:
        raise CorruptError(f"{what}: the sealed object's policy is not the 'tpm2-policy-hash' of the token")
    srk_public = b""
    if "tpm2_srk" in doc:
        srk_public = _base64(_text(doc, "tpm2_srk", what, MAX_BLOB), f"{what}: 'tpm2_srk'")
        try:
            srk_name_of(srk_public)
        except ValueError:
            raise CorruptError(f"{what}: 'tpm2_srk' is not a TPM2B_PUBLIC with a SHA-256 name") from None
    return SystemdTpm2(token_id, keyslot, sealed, _selection(bank.lower(), pcrs), alg.lower(), policy_hash, pin,
                       srk_public)


def clevis_header(doc: dict[str, Any], what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JWE of a Clevis token and its decoded protected header."""
    jwe = doc.get("jwe")
    if not isinstance(jwe, dict):
        raise CorruptError(f"{what} has no JWE")
    protected = _base64(_text(jwe, "protected", what, MAX_JWE_FIELD), f"{what}: the JWE's protected header", True)
    try:
        header = json.loads(protected)
    except (ValueError, RecursionError):
        raise CorruptError(f"{what}: the JWE's protected header is not JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("clevis"), dict):
        raise CorruptError(f"{what}: the JWE's protected header has no clevis object")
    return jwe, header


def clevis_pin(doc: dict[str, Any], what: str) -> str:
    """The pin a Clevis token was bound with (tpm2, tang, sss, ...)."""
    _, header = clevis_header(doc, what)
    pin = header["clevis"].get("pin")
    if not isinstance(pin, str) or not pin.isascii() or not pin.isprintable() or not 0 < len(pin) <= 32:
        raise CorruptError(f"{what}: its pin is not named")
    return pin


def parse_clevis_tpm2(doc: Any, token_id: int) -> ClevisTpm2:
    """A Clevis token with a tpm2 pin. CorruptError when malformed, Unadoptable for another pin."""
    what = f"clevis token {token_id}"
    if not isinstance(doc, dict) or doc.get("type") != CLEVIS:
        raise CorruptError(f"{what} is not a Clevis token")
    keyslot = _keyslot(doc, what)
    pin = clevis_pin(doc, what)
    if pin != "tpm2":
        why = {"tang": "a Tang server, not a TPM", "sss": "secret sharing across pins (sss), not a TPM alone"}
        raise Unadoptable(f"{what} is bound with the {pin} pin: {why.get(pin, 'not a TPM')}; adopt takes a tpm2 pin")
    jwe, header = clevis_header(doc, what)
    if header.get("alg") != "dir" or header.get("enc") != "A256GCM" or "zip" in header:
        raise Unadoptable(f"{what}: its JWE is not Clevis's tpm2 form (alg dir, enc A256GCM, no zip)")
    parts = {}
    for field in ("iv", "ciphertext", "tag"):
        parts[field] = _base64(_text(jwe, field, what, MAX_JWE_FIELD), f"{what}: the JWE's {field}", True)
    if jwe.get("encrypted_key", "") != "":
        raise Unadoptable(f"{what}: its JWE has an encrypted key (Clevis's tpm2 pin uses none)")
    if len(parts["iv"]) != 12 or len(parts["tag"]) != 16 or not 0 < len(parts["ciphertext"]) <= MAX_PASSPHRASE:
        raise CorruptError(f"{what}: its JWE's iv, tag or ciphertext has an impossible size")
    tpm2 = header["clevis"].get("tpm2")
    if not isinstance(tpm2, dict):
        raise CorruptError(f"{what}: the JWE's header has no clevis.tpm2 object")
    if tpm2.get("hash", "sha256") != "sha256":
        raise Unadoptable(f"{what}: its object's hash is {tpm2.get('hash')!r}; adopt takes sha256 (Clevis's default)")
    alg = tpm2.get("key", "ecc")
    if alg not in ("ecc", "rsa"):
        raise Unadoptable(f"{what}: its primary key algorithm {alg!r} is neither ecc nor rsa")
    selection = None
    if "pcr_ids" in tpm2:
        ids, bank = tpm2.get("pcr_ids"), tpm2.get("pcr_bank", "sha1")  # clevis's default bank is sha1
        if not isinstance(bank, str) or bank not in BANKS:
            raise CorruptError(f"{what}: its pcr_bank is not one of {', '.join(BANKS)}")
        if not isinstance(ids, str) or len(ids) > 100:
            raise CorruptError(f"{what}: its pcr_ids are not a list of PCRs")
        if ids:  # with pcr_digest the values given at bind time, else those of then: the object's policy has them
            try:
                selection = PcrSelection.parse(f"{bank}:{ids}")
            except UsageError:
                raise CorruptError(f"{what}: its pcr_ids are not a list of PCRs 0-23") from None
    pub = _base64(_text(tpm2, "jwk_pub", what, MAX_BLOB), f"{what}: jwk_pub", True)
    priv = _base64(_text(tpm2, "jwk_priv", what, MAX_BLOB), f"{what}: jwk_priv", True)
    sealed = SealedObject(public=pub, private=priv)
    _check_sealed(sealed, f"{what}: the sealed JWK")
    return ClevisTpm2(token_id, keyslot, sealed, selection, alg, jwe["protected"].encode("ascii"),
                      parts["iv"], parts["ciphertext"], parts["tag"])


def parse(doc: Any, token_id: int) -> Adoptable:
    """The enrolment a systemd-tpm2 or clevis token holds (CorruptError, Unadoptable)."""
    if isinstance(doc, dict) and doc.get("type") == SYSTEMD_TPM2:
        return parse_systemd_tpm2(doc, token_id)
    return parse_clevis_tpm2(doc, token_id)


def expected_policy(selection: PcrSelection | None, values: dict[int, bytes], with_pin: bool) -> bytes:
    """The policy digest of PolicyPCR over `selection` at `values` (None: no PolicyPCR), then
    PolicyAuthValue with `with_pin`: what systemd and Clevis seal to."""
    digest = policy_pcr(selection, values) if selection is not None else bytes(32)
    return policy_auth_value(digest) if with_pin else digest


def policy_holds(tpm: Tpm, other: Adoptable) -> bool:
    """Whether the current PCR values satisfy the sealed object's policy (computed, nothing unsealed).
    CorruptError when the object's policy is not what its token says it is sealed to."""
    policy = sealed_auth_policy(other.sealed)
    pin = isinstance(other, SystemdTpm2) and other.pin
    if other.selection is None:
        if isinstance(other, ClevisTpm2):  # no PCRs: the object opens with its empty auth value, no policy
            if policy:
                raise CorruptError(f"clevis token {other.token_id} names no PCRs, but its sealed JWK has a policy")
            return True
        if policy != expected_policy(None, {}, pin):
            raise CorruptError(f"systemd-tpm2 token {other.token_id} names no PCRs, but its sealed object's policy is "
                               "not that of no PCRs")
        return True
    values = tpm.read_pcrs(other.selection)
    if policy == expected_policy(other.selection, values, pin):
        return True
    if isinstance(other, SystemdTpm2) and policy == expected_policy(other.selection, values, not pin):
        raise CorruptError(f"systemd-tpm2 token {other.token_id} says tpm2-pin is {str(pin).lower()}, but its sealed "
                           "object's policy says otherwise")
    return False


def find(device: LuksDevice, from_tool: str) -> Adoptable:
    """The first enrolment of `from_tool` (systemd, clevis) that adopt can take. Without one: the
    error of the first token of that tool (CorruptError, Unadoptable), else a UsageError."""
    wanted = FROM[from_tool]
    first_error: Exception | None = None
    for tid, doc in sorted(device.raw_tokens().items()):
        if not isinstance(doc, dict) or doc.get("type") != wanted:
            continue
        try:
            return parse(doc, tid)
        except (CorruptError, Unadoptable) as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    raise UsageError(f"{device.path} has no {wanted} enrolment to adopt")


def describe(token_id: int, doc: Any, tpm: Tpm | None) -> OtherEnrolment | None:
    """What status says about a token of another tool we know (None: ours, or a type we do not know);
    with a TPM, whether its policy holds now."""
    if not isinstance(doc, dict) or not isinstance(doc.get("type"), str) or doc["type"] not in KNOWN_TYPES:
        return None
    kind = doc["type"]
    entry = OtherEnrolment(token_id, kind, keyslots_named(doc))
    if kind == "systemd-fido2":
        entry.why_not = "a FIDO2 security key, not a TPM: it stays as it is"
        return entry
    if kind == "systemd-recovery":
        entry.why_not = "a recovery key, sealed by nothing: it stays as it is"
        return entry
    try:
        if kind == CLEVIS:
            entry.pin_type = clevis_pin(doc, f"clevis token {token_id}")
        parsed = parse(doc, token_id)
    except (CorruptError, Unadoptable) as exc:
        entry.why_not = str(exc)
        return entry
    entry.pcrs = str(parsed.selection) if parsed.selection is not None else "none"
    entry.tpm_pin = isinstance(parsed, SystemdTpm2) and parsed.pin
    entry.adopt_from = KNOWN_TYPES[kind]
    if tpm is not None:
        try:
            entry.policy_satisfied = policy_holds(tpm, parsed)
        except UnlockerError as exc:
            entry.adopt_from, entry.why_not = None, str(exc)
    return entry


def other_enrolments(device: LuksDevice, tpm: Tpm | None) -> list[OtherEnrolment]:
    """Every enrolment of another tool status knows, in token order."""
    found = (describe(tid, doc, tpm) for tid, doc in sorted(device.raw_tokens().items()))
    return [entry for entry in found if entry is not None]


def describe_other(entry: OtherEnrolment) -> str:
    """One line for people: the token, what it is, and whether `adopt --from` can take it."""
    kind = f"{entry.type} ({entry.pin_type} pin)" if entry.pin_type else entry.type
    slots = ", ".join(str(s) for s in entry.keyslots) or "none"
    facts = [f"keyslot {slots}"]
    if entry.pcrs:
        facts.append(f"PCRs {entry.pcrs}" + (" and a PIN" if entry.tpm_pin else ""))
    if entry.policy_satisfied is not None:
        facts.append("current PCR values satisfy its policy" if entry.policy_satisfied else "POLICY NOT SATISFIED")
    if entry.adopt_from is None:
        take = f"adopt cannot take it: {entry.why_not}"
    elif entry.policy_satisfied is False:
        take = f"'adopt --from {entry.adopt_from}' can take it once its PCRs hold again"
    else:
        take = f"'adopt --from {entry.adopt_from}' can take it"
    return f"token {entry.token_id}: {kind}, {', '.join(facts)}; {take}"
