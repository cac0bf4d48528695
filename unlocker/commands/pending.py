"""Interrupted verbs: a marker in the header names what a verb is about to add, so that whatever a
SIGKILL or a power cut leaves half-done is recognised as ours, reported, and undone or finished by
the next verb.

enroll, reseal and recovery-key write a token of type tpm2-unlocker-pending before luksAddKey: it
names the keyslot about to be added, where the new sealed key goes (an NV index, a pair of blob
files) and, for reseal, the enrolment being replaced. reseal rewrites it as committed once the new
enrolment is proven: from then on the old one goes. The marker goes last. A run that finds one:
- not committed: undoes that verb (its token, its sealed key, its keyslot): the disk is as before;
- committed: finishes the re-seal (the old token, sealed key and keyslot go).
A remove interrupted after a keyslot went leaves a token that names none (cryptsetup drops a killed
keyslot from the tokens that named it): the next verb removes that token.

A marker is header data like any token: parsed strictly, and it never makes us kill a keyslot that
commands/keyslots.py keeps, nor remove a sealed key a token still points at.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from unlocker.commands.keyslots import made_by_us, names, why_keep
from unlocker.errors import CorruptError, UnlockerError
from unlocker.log import say
from unlocker.luks import LuksDevice
from unlocker.secret import Secret
from unlocker.store import BLOB_NAMES, PENDING, StoreSpec, blob_paths, nv_attributes_ours
from unlocker.token import BLOB_NAME_CHARS, NV_INDEX_MAX, NV_INDEX_MIN, STORES, TOKEN_TYPE, Token, parse_token
from unlocker.tpm.client import Tpm

if TYPE_CHECKING:
    from unlocker.commands.undo import Undo

PENDING_TOKEN_TYPE = "tpm2-unlocker-pending"
RECOVERY_TOKEN_TYPE = "tpm2-unlocker-recovery"  # the recovery key's token (commands/recovery.py)
VERBS = ("enroll", "reseal", "recovery-key")
_FIELDS = {"type", "keyslots", "verb", "keyslot", "new", "old", "committed"}


@dataclass(frozen=True)
class Place:
    """Where a sealed key is: the store fields of a token ("token": in the token itself)."""

    store: str
    nv_index: int = 0
    blob_dir: str = ""
    blob_name: str = ""

    @classmethod
    def of(cls, token: Token) -> Place:
        if token.store == "nv":
            return cls("nv", nv_index=token.nv_index)
        if token.store == "file":
            return cls("file", blob_dir=token.blob_dir, blob_name=token.blob_name)
        return cls("token")

    @classmethod
    def of_spec(cls, spec: StoreSpec) -> Place:
        if spec.kind == "nv":
            return cls("nv", nv_index=spec.nv_index)
        if spec.kind == "file":
            return cls("file", blob_dir=spec.blob_dir, blob_name=spec.blob_name)
        return cls("token")

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"store": self.store}
        if self.store == "nv":
            doc["nv_index"] = f"0x{self.nv_index:08x}"
        elif self.store == "file":
            doc["blob_dir"], doc["blob_name"] = self.blob_dir, self.blob_name
        return doc

    @classmethod
    def parse(cls, doc: object) -> Place:
        if not isinstance(doc, dict) or doc.get("store") not in STORES:
            raise CorruptError("pending marker: no store")
        kind = doc["store"]
        if kind == "nv":
            text = doc.get("nv_index")
            if set(doc) != {"store", "nv_index"} or not isinstance(text, str) or not text.startswith("0x") \
                    or not 3 <= len(text) <= 10 or text[2:].strip("0123456789abcdef"):
                raise CorruptError("pending marker: nv_index is not a hex number")
            index = int(text, 16)
            if not NV_INDEX_MIN <= index <= NV_INDEX_MAX:
                raise CorruptError("pending marker: nv_index is outside the owner range")
            return cls("nv", nv_index=index)
        if kind == "file":
            blob_dir, name = doc.get("blob_dir"), doc.get("blob_name")
            if set(doc) != {"store", "blob_dir", "blob_name"} or not isinstance(blob_dir, str) \
                    or not blob_dir.startswith("/") or blob_dir.strip(BLOB_NAME_CHARS + "/") or len(blob_dir) > 4096 \
                    or ".." in blob_dir.split("/") or name not in BLOB_NAMES:
                raise CorruptError("pending marker: blob_dir or blob_name is not a plain path")
            return cls("file", blob_dir=blob_dir, blob_name=str(name))
        if set(doc) != {"store"}:
            raise CorruptError("pending marker: unknown fields")
        return cls("token")

    def describe(self) -> str:
        if self.store == "nv":
            return f"NV index 0x{self.nv_index:08x}"
        if self.store == "file":
            return f"files {self.blob_name}.pub/.priv in {self.blob_dir}"
        return "LUKS2 token"


@dataclass
class Marker:
    """What a verb is about to do: the keyslot it adds (None: a re-seal with the old key keeps the
    old keyslot), where the new sealed key goes and, for reseal, the enrolment it replaces."""

    verb: str
    keyslot: int | None
    new: Place
    old_token: int | None = None
    old_keyslot: int | None = None
    old: Place | None = None
    committed: bool = False
    token_id: int = -1
    ended: bool = False

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"type": PENDING_TOKEN_TYPE, "keyslots": [], "verb": self.verb,
                               "new": self.new.to_json(), "committed": self.committed}
        if self.keyslot is not None:
            doc["keyslot"] = str(self.keyslot)
        if self.old is not None:
            doc["old"] = {**self.old.to_json(), "token": str(self.old_token), "keyslot": str(self.old_keyslot)}
        return doc


def _number(value: object, what: str, most: int) -> int:
    if not isinstance(value, str) or not value.isdigit() or not value.isascii() or len(value) > 3 or int(value) > most:
        raise CorruptError(f"pending marker: {what} is not a number")
    return int(value)


def parse_marker(doc: object, token_id: int) -> Marker:
    """A marker's JSON object, parsed strictly (the header is anyone's to write)."""
    if not isinstance(doc, dict) or doc.get("type") != PENDING_TOKEN_TYPE:
        raise CorruptError("pending marker: not one")
    if set(doc) - _FIELDS or doc.get("keyslots") != [] or doc.get("verb") not in VERBS \
            or not isinstance(doc.get("committed"), bool):
        raise CorruptError("pending marker: unknown fields, or no verb")
    marker = Marker(verb=doc["verb"], keyslot=None, new=Place.parse(doc.get("new")), committed=doc["committed"],
                    token_id=token_id)
    if "keyslot" in doc:
        marker.keyslot = _number(doc["keyslot"], "keyslot", 31)
    if "old" in doc:
        old = doc["old"]
        if not isinstance(old, dict):
            raise CorruptError("pending marker: old is not an object")
        marker.old_token = _number(old.get("token"), "old token", 31)
        marker.old_keyslot = _number(old.get("keyslot"), "old keyslot", 31)
        marker.old = Place.parse({k: v for k, v in old.items() if k not in ("token", "keyslot")})
    if (marker.verb == "reseal") != (marker.old is not None) or (marker.verb != "reseal" and marker.committed) \
            or (marker.verb != "reseal" and marker.keyslot is None):
        raise CorruptError("pending marker: its fields do not fit its verb")
    return marker


# --- the verbs' side --------------------------------------------------------------------------------

def begin(device: LuksDevice, marker: Marker, undo: Undo) -> Marker:
    """Write the marker before the verb changes anything; it goes last, whether the verb ends or is undone."""
    # the highest free id: the verb's own tokens take the ids they would take without it
    marker.token_id = device.import_document(marker.to_json(), highest=True)
    # kept when a step could not be undone: the next run then finds what is left
    undo.push("remove the pending marker", lambda: None if marker.ended or undo.failed else end(device, marker))
    return marker


def commit(device: LuksDevice, marker: Marker) -> None:
    """The new enrolment is proven: from now on an interrupted re-seal is finished, not undone."""
    marker.committed = True
    device.replace_document(marker.token_id, marker.to_json())


def end(device: LuksDevice, marker: Marker) -> None:
    device.remove_token(marker.token_id)
    marker.ended = True


# --- what a later run finds -----------------------------------------------------------------------------

@dataclass
class Leftover:
    """One thing an interrupted verb left: for `status`."""

    kind: str  # pending | orphan-keyslot | orphan-nv-index | sealed-key-gone | keyslot-gone | corrupt-marker
    token_id: int | None
    keyslot: int | None
    what: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def markers(device: LuksDevice) -> list[tuple[int, Marker | CorruptError]]:
    found: list[tuple[int, Marker | CorruptError]] = []
    for tid, doc in sorted(device.raw_tokens().items()):
        if isinstance(doc, dict) and doc.get("type") == PENDING_TOKEN_TYPE:
            try:
                found.append((tid, parse_marker(doc, tid)))
            except CorruptError as exc:
                found.append((tid, exc))
    return found


def _tokens_without_keyslot(device: LuksDevice) -> list[tuple[int, dict[str, Any]]]:
    """Our tokens and recovery tokens that name no keyslot (it went, and cryptsetup dropped it)."""
    return [(tid, doc) for tid, doc in sorted(device.raw_tokens().items())
            if isinstance(doc, dict) and doc.get("type") in (TOKEN_TYPE, RECOVERY_TOKEN_TYPE) and doc.get("keyslots") == []]


def anything_left(device: LuksDevice) -> bool:
    """Whether an interrupted run left a marker, or a token whose keyslot went."""
    return bool(markers(device) or _tokens_without_keyslot(device))


def _parsed_ours(device: LuksDevice) -> list[Token]:
    return [t for _, t in device.our_tokens() if isinstance(t, Token)]


def _place_in_use(device: LuksDevice, place: Place, ignoring: int | None = None) -> bool:
    """Whether a token of ours (other than `ignoring`) points at `place`."""
    if place.store == "token":
        return False
    return any(Place.of(t) == place for t in _parsed_ours(device) if t.token_id != ignoring)


def _new_tokens(device: LuksDevice, marker: Marker) -> list[int]:
    """The tokens the interrupted verb wrote."""
    found = []
    for tid, doc in sorted(device.raw_tokens().items()):
        if marker.verb == "recovery-key":
            if isinstance(doc, dict) and doc.get("type") == RECOVERY_TOKEN_TYPE and marker.keyslot is not None \
                    and names(doc, marker.keyslot):
                found.append(tid)
            continue
        slot = marker.keyslot if marker.keyslot is not None else marker.old_keyslot
        if tid == marker.old_token or slot is None or not names(doc, slot):
            continue
        try:
            token = parse_token(doc, tid)
        except CorruptError:
            continue
        if Place.of(token) == marker.new or marker.new.store == "token" == token.store:
            found.append(tid)
    return found


def _made_its_key(device: LuksDevice, marker: Marker, new_tokens: list[int]) -> bool:
    """Whether the interrupted run may have made its new sealed key: it does so after adding its
    keyslot (or, keeping the old keyslot, after writing the marker). Before that, an NV index the
    marker names is not ours to remove: someone else may have defined it since."""
    return marker.committed or marker.keyslot is None or marker.keyslot in device.keyslots() or bool(new_tokens)


def _nv_is_ours(tpm: Tpm, index: int) -> bool:
    info = tpm.nv_info(index)
    return info is not None and nv_attributes_ours(info.attributes)


def _place_exists(place: Place, tpm: Tpm | None) -> bool:
    if place.store == "nv":
        return tpm is not None and _nv_is_ours(tpm, place.nv_index)
    if place.store == "file":
        return any(os.path.lexists(p + tail) for p in blob_paths(place.blob_dir, place.blob_name) for tail in ("", PENDING))
    return False


def _destroy(device: LuksDevice, place: Place, tpm: Tpm | None, secret: Callable[[], Secret | None],
             ignoring: int | None = None) -> None:
    """Remove a sealed key an interrupted verb left, unless a token of ours points at it; an NV index
    only if it has the attributes ours are made with. Only once this disk's passphrase was given (it
    opens a keyslot): a marker is anyone's to write, and one on a USB stick may name another disk's
    NV index or files, which a run on the stick alone must never remove."""
    if place.store == "token" or _place_in_use(device, place, ignoring):
        return
    if _place_exists(place, tpm) and secret() is None:
        say(f"{device.path}: {place.describe()} stays until a run given this disk's passphrase removes it "
            "(a header alone is anyone's to write)")
        return
    if place.store == "nv":
        if tpm is None:
            say(f"{device.path}: {place.describe()} stays: the TPM is not reachable")
            return
        if _nv_is_ours(tpm, place.nv_index):
            tpm.nv_undefine(place.nv_index)
            say(f"{device.path}: removed {place.describe()}, which an interrupted run left")
        return
    if _place_exists(place, tpm):
        for path in blob_paths(place.blob_dir, place.blob_name):
            for name in (path, path + PENDING):
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass
        say(f"{device.path}: removed {place.describe()}, which an interrupted run left")


def _kill(device: LuksDevice, slot: int | None, secret: Callable[[], Secret | None], going: set[int],
          did: str = "added") -> None:
    if slot is None or slot not in device.keyslots():
        return
    given = secret()
    if given is None:
        say(f"{device.path}: keyslot {slot} stays until a run is given the passphrase (--unlock-key-file)")
        return
    why = why_keep(device, slot, given, going)
    if why:
        say(f"{device.path}: keyslot {slot}, which an interrupted run {did}, stays: {why}")
        return
    device.kill_slot(slot, given)
    say(f"{device.path}: removed keyslot {slot}, which an interrupted run {did}")


def clean_up(device: LuksDevice, secret: Callable[[], Secret | None], tpm: Tpm | None) -> int:
    """Undo (or, for a committed re-seal, finish) what interrupted runs left; remove tokens whose
    keyslot went. `secret`: the passphrase, asked only when a keyslot is to go. How many were dealt with."""
    dealt = 0
    for tid, marker in markers(device):
        dealt += 1
        if isinstance(marker, CorruptError):
            say(f"{device.path}: token {tid} is a pending marker that cannot be read ({marker}); removing it")
            device.remove_token(tid)
            continue
        if marker.committed:
            say(f"{device.path}: finishing an interrupted reseal (token {tid})")
            if marker.old_token in device.raw_tokens() and marker.old_keyslot is not None:
                doc = device.raw_tokens()[marker.old_token]
                if isinstance(doc, dict) and doc.get("type") == TOKEN_TYPE and \
                        (names(doc, marker.old_keyslot) or doc.get("keyslots") == []):
                    device.remove_token(marker.old_token)
            if marker.old is not None:
                _destroy(device, marker.old, tpm, secret)
            if marker.keyslot is not None:  # a new keyslot replaced the old one
                _kill(device, marker.old_keyslot, secret, {tid}, did="replaced")
        else:
            say(f"{device.path}: undoing an interrupted {marker.verb} (token {tid})")
            new_tokens = _new_tokens(device, marker)
            made = _made_its_key(device, marker, new_tokens)
            for new in new_tokens:
                device.remove_token(new)
            if made:
                _destroy(device, marker.new, tpm, secret)
            _kill(device, marker.keyslot, secret, {tid})
        device.remove_token(tid)
    for tid, doc in _tokens_without_keyslot(device):
        dealt += 1
        if doc.get("type") == TOKEN_TYPE:
            try:
                _destroy(device, Place.of(parse_token({**doc, "keyslots": ["0"]}, tid)), tpm, secret,
                         ignoring=tid)
            except (CorruptError, UnlockerError) as exc:
                say(f"{device.path}: could not remove the sealed key of token {tid} ({exc})")
        say(f"{device.path}: removing token {tid}, whose keyslot an interrupted run removed")
        device.remove_token(tid)
    return dealt


def leftovers(device: LuksDevice, tpm: Tpm | None) -> list[Leftover]:
    """What interrupted runs left, for people (read only)."""
    found: list[Leftover] = []
    keyslots = set(device.keyslots())
    tokens = device.raw_tokens()
    for tid, marker in markers(device):
        if isinstance(marker, CorruptError):
            found.append(Leftover("corrupt-marker", tid, None, f"token {tid} is a pending marker that cannot be read "
                                  f"({marker}); any verb removes it"))
            continue
        again = f"run 'tpm2-unlocker {marker.verb}' again (or 'remove')"
        if marker.committed:
            state = f"the new enrolment is proven; the old one (token {marker.old_token}, keyslot {marker.old_keyslot}) " \
                    "is still to go"
            found.append(Leftover("pending", tid, marker.old_keyslot,
                                  f"an interrupted reseal (token {tid}): {state}; {again} to finish it"))
        else:
            added = marker.keyslot is not None and marker.keyslot in keyslots
            new = _new_tokens(device, marker)
            state = (f"token {new[0]} written, not proven" if new else
                     f"keyslot {marker.keyslot} added, no token names it" if added else
                     "nothing added yet" if marker.keyslot is not None else "the new sealed key may be written")
            found.append(Leftover("pending", tid, marker.keyslot,
                                  f"an interrupted {marker.verb} (token {tid}): {state}; {again} to undo it"))
        # the keyslot the run added (undone) or the one it replaced (finished), when no token names it
        slot = (marker.old_keyslot if marker.keyslot is not None else None) if marker.committed else marker.keyslot
        if slot is not None and slot in keyslots and not any(names(doc, slot) for doc in tokens.values()) \
                and made_by_us(device, slot):
            found.append(Leftover("orphan-keyslot", tid, slot,
                                  f"keyslot {slot} was {'replaced' if marker.committed else 'added'} by an interrupted "
                                  f"{marker.verb} and no token names it; {again} to remove it"))
        place = marker.old if marker.committed else marker.new
        if place is not None and place.store == "nv" and tpm is not None and _place_exists(place, tpm) \
                and not _place_in_use(device, place) and _made_its_key(device, marker, _new_tokens(device, marker)):
            found.append(Leftover("orphan-nv-index", tid, None,
                                  f"{place.describe()} holds a sealed key no token points at (left by an interrupted "
                                  f"{marker.verb}); {again} to remove it"))
    for token in _parsed_ours(device):
        if token.store in ("nv", "file") and (tpm is not None or token.store == "file") \
                and not _place_exists(Place.of(token), tpm):
            found.append(Leftover("sealed-key-gone", token.token_id, token.keyslot,
                                  f"token {token.token_id}'s sealed key ({Place.of(token).describe()}) is gone (a "
                                  "remove was interrupted, or the TPM cleared): 'tpm2-unlocker remove' removes the rest, "
                                  "'reseal' makes a new key"))
    for tid, doc in _tokens_without_keyslot(device):
        found.append(Leftover("keyslot-gone", tid, None,
                              f"token {tid} ({doc.get('type')}) names no keyslot: its keyslot was removed by an "
                              "interrupted run; 'tpm2-unlocker remove' (or any verb) removes the token"))
    return found
