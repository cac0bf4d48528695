"""adopt --from systemd|clevis: move a disk from systemd-cryptenroll's or Clevis's TPM enrolment to ours
without a passphrase typed.

The other tool's sealed secret is unsealed once, under the primary that tool made, over a salted
session; it is (or decrypts to) the passphrase of the keyslot its token names, and that passphrase
authorises our own enrolment: a new keyslot with our own random key, sealed to our policy with the
lock PCR, proven as `enroll` proves it. Only with --replace, and only after ours is proven, do the
other tool's token and keyslot go. The PCR policy is checked before anything changes: a disk whose
PCRs moved since the other tool sealed is refused with the header untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from unlocker.commands import others, pending
from unlocker.commands.enroll import KEY_SIZE, PinAuth, add_sealed_keyslot
from unlocker.commands.others import Adoptable, ClevisTpm2, SystemdTpm2
from unlocker.commands.undo import Undo
from unlocker.errors import CorruptError, PolicyError, UnlockerError, UsageError
from unlocker.log import say
from unlocker.luks import LuksDevice
from unlocker.options import DEFAULT_LOCK_PCR
from unlocker.secret import Secret
from unlocker.store import StoreSpec
from unlocker.token import Token
from unlocker.tpm.client import Tpm
from unlocker.tpm.policy import DEFAULT_PCRS, PcrSelection, PolicyPlan
from unlocker.tpm.tcti import resolve_tcti

ENROLLED_BY = {"systemd": "systemd-cryptenroll", "clevis": "Clevis"}


@dataclass(frozen=True)
class AdoptFromOptions:
    device: str
    tool: str  # "systemd" or "clevis"
    replace: bool
    selection: PcrSelection | None  # the PCRs ours seals to (None: the other tool's)
    pin_file: str | None
    tcti: str | None


@dataclass(frozen=True)
class Adopted:
    device: str
    tool: str
    token: Token  # ours
    other_token_id: int
    other_keyslot: int
    replaced: bool
    # every keyslot besides ours that opens the disk, with the tokens that name it ("systemd-fido2 token 2")
    remaining: tuple[tuple[int, tuple[str, ...]], ...]

    @property
    def retire_command(self) -> str:
        """The other tool's own command that removes its enrolment (for a later, once ours has booted)."""
        if self.tool == "systemd":
            return f"'systemd-cryptenroll --wipe-slot={self.other_keyslot} {self.device}'"
        return f"'clevis luks unbind -d {self.device} -s {self.other_keyslot}'"

    @property
    def remaining_text(self) -> str:
        """What still opens the disk besides ours, named by keyslot and token: a passphrase only where
        no token names the keyslot (a FIDO2 or recovery-key keyslot is no passphrase)."""
        if not self.remaining:
            return "only ours opens the disk"
        named = [f"{slot} ({', '.join(tokens) if tokens else 'no token: a passphrase or key file'})"
                 for slot, tokens in self.remaining]
        listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
        return f"besides ours, keyslot{'s' if len(named) > 1 else ''} {listed} open{'' if len(named) > 1 else 's'} the disk"


def _check_policy(tpm: Tpm, other: Adoptable, tool: str) -> None:
    """The current PCR values satisfy the other enrolment's policy, else PolicyError (nothing has
    changed yet, and no PIN has been tried: a PolicyPCR failure costs no lockout try)."""
    if others.policy_holds(tpm, other) or other.selection is None:
        return
    pcrs = ", ".join(str(p) for p in other.selection.pcrs)
    raise PolicyError(f"the PCRs changed since {ENROLLED_BY[tool]} enrolled: its policy over {other.selection} does not "
                      f"hold now (one or more of PCRs {pcrs} differ from the values it was sealed to); nothing was "
                      "changed",
                      hint="adopt it in the boot state it was enrolled in, or use 'tpm2-unlocker enroll' with the passphrase")


def _select_parent(tpm: Tpm, other: Adoptable) -> None:
    """Select the primary the other tool sealed under: the one a token's tpm2_srk names, else the
    primary of tpm2-tools' default template both tools make."""
    if isinstance(other, SystemdTpm2) and other.srk_name is not None:
        tpm.check_srk(other.srk_name)
    else:
        tpm.use_tpm2_tools_srk(other.primary_alg)


def _pin_auth(other: Adoptable, pin_file: str | None, device: str) -> Secret | None:
    """The auth value of the systemd-tpm2 enrolment's PIN (None: it has none): SHA-256 of the PIN, as
    systemd 252 derives it (hash_pin)."""
    if not isinstance(other, SystemdTpm2) or not other.pin:
        if pin_file is not None:
            say("that enrolment has no PIN: --pin-file is not used")
        return None
    from unlocker.commands.pin import existing_pin
    from unlocker.pin import auth_value

    with existing_pin(pin_file, f"TPM PIN of the systemd-tpm2 enrolment of {device}: ") as pin:
        return auth_value(pin)


def _unseal(tpm: Tpm, other: Adoptable, auth: Secret | None) -> Secret:
    """The other tool's sealed secret, unsealed over a session salted with the primary selected."""
    if isinstance(other, ClevisTpm2) and other.selection is None:
        return tpm.unseal_by_auth_value(other.sealed)
    return tpm.unseal(other.sealed, PolicyPlan(other.selection, auth_value=auth is not None), None, auth)


def _passphrase(other: Adoptable, unsealed: Secret) -> Secret:
    """The keyslot's passphrase from the unsealed secret: systemd's is its base64 (base64mem); Clevis's
    is the plaintext of its JWE, under the key of the JWK it sealed."""
    from unlocker.commands import b64, jwe

    if isinstance(other, SystemdTpm2):
        return b64.encode(unsealed)
    with jwe.jwk_key(unsealed) as key:
        return jwe.decrypt_a256gcm(key, other.protected, other.iv, other.ciphertext, other.tag)


def _retire(device: LuksDevice, other: Adoptable, document: object, theirs: Secret, ours: Secret, our_slot: int) -> None:
    """Remove the other tool's keyslot (authorised by our key, which opens a keyslot that stays), then
    its token: the token goes last, as in `remove`, so an interrupted run leaves a token naming a
    keyslot that is gone, never a keyslot nobody knows. A keyslot another token names too stays.

    The header is read afresh first: adopt read it before the PIN prompt and the proof, and another
    program may have written it since (a keyslot killed and a new passphrase put in its place). The
    kill goes ahead only if the other tool's token is still the one adopt read (`document`), its
    secret (`theirs`) still opens its keyslot, and a keyslot besides that one and ours is left."""
    if device.raw_tokens().get(other.token_id) != document:
        raise CorruptError(f"token {other.token_id} changed since adopt read the header (another program wrote it "
                           f"meanwhile): keyslot {other.keyslot} stays")
    if not [s for s in device.opening_keyslots() if s not in (other.keyslot, our_slot)]:
        raise UsageError(f"keyslot {other.keyslot} stays: besides ours it is now the only keyslot that opens the disk")
    if not device.test_key(theirs, other.keyslot):
        raise CorruptError(f"keyslot {other.keyslot} no longer opens with the secret token {other.token_id} holds "
                           f"(another program wrote the header meanwhile): keyslot {other.keyslot} stays")
    named = [tid for tid, doc in device.raw_tokens().items()
             if tid != other.token_id and other.keyslot in others.keyslots_named(doc)]
    if named:
        say(f"keyslot {other.keyslot} stays: token {named[0]} names it too")
    else:
        device.kill_slot(other.keyslot, ours)
    device.remove_token(other.token_id)


def adopt_from(opts: AdoptFromOptions) -> Adopted:
    device = LuksDevice(opts.device)
    device.metadata()
    if device.our_tokens():
        raise UsageError(f"{opts.device} is already enrolled; run 'remove' first")
    other = others.find(device, opts.tool)
    document = device.raw_tokens()[other.token_id]  # as read now: --replace checks it is still so
    if other.keyslot not in device.keyslots():
        raise CorruptError(f"token {other.token_id} names keyslot {other.keyslot}, which {opts.device} does not have")
    # an unbound keyslot (luksAddKey --unbound) or a reencryption keyslot opens nothing: not counted
    if opts.replace and not [s for s in device.opening_keyslots() if s != other.keyslot]:
        raise UsageError(f"refusing --replace: keyslot {other.keyslot} is the only keyslot that opens {opts.device} "
                         "besides the new one; without it no passphrase would open the disk",
                         hint="add a passphrase first (cryptsetup luksAddKey), or adopt without --replace")
    selection = opts.selection or other.selection or PcrSelection.parse(DEFAULT_PCRS)
    if DEFAULT_LOCK_PCR in selection.pcrs:
        raise UsageError(f"the new enrolment would bind PCR {DEFAULT_LOCK_PCR}, the lock PCR: give --pcrs without it")
    with Tpm(resolve_tcti(opts.tcti)) as tpm:
        _check_policy(tpm, other, opts.tool)
        _select_parent(tpm, other)
        with PinAuth(_pin_auth(other, opts.pin_file, opts.device)) as pin:
            auth = pin.value
            with _unseal(tpm, other, auth) as unsealed:
                passphrase = _passphrase(other, unsealed)
            with passphrase, Secret.random(KEY_SIZE) as key:
                if not device.test_key(passphrase, other.keyslot):
                    raise CorruptError(f"the secret token {other.token_id} holds does not open keyslot {other.keyslot}, "
                                       "the one it names")
                with Undo("adoption") as undo:
                    # ours keeps the other enrolment's PIN: the TPM still asks for it
                    token, marker = add_sealed_keyslot(tpm, device, passphrase, key, selection, StoreSpec("token"),
                                                       undo, lock_pcr=DEFAULT_LOCK_PCR, auth=auth)
                    pending.end(device, marker)
                if opts.replace:
                    try:
                        _retire(device, other, document, passphrase, key, token.keyslot)
                    except UnlockerError as exc:  # ours stays: it is proven, and the other's token still names its slot
                        exc.message = (f"ours is enrolled and proven (keyslot {token.keyslot}, token {token.token_id}), "
                                       f"but removing {ENROLLED_BY[opts.tool]}'s token {other.token_id} and keyslot "
                                       f"{other.keyslot} failed: {exc.message}")
                        raise
    return Adopted(opts.device, opts.tool, token, other.token_id, other.keyslot, opts.replace,
                   _remaining(device, token.keyslot))


def _token_label(token_id: int, doc: object) -> str:
    """A token by its type ("systemd-fido2 token 2"), the type shown only if it is a plain name (the
    header is anyone's to write, and the message one line)."""
    kind = doc.get("type") if isinstance(doc, dict) else None
    if isinstance(kind, str) and re.fullmatch(r"[A-Za-z0-9._-]{1,40}", kind):
        return f"{kind} token {token_id}"
    return f"token {token_id} of unknown type"


def _remaining(device: LuksDevice, ours: int) -> tuple[tuple[int, tuple[str, ...]], ...]:
    """Every keyslot besides ours that opens the disk, read afresh, with the tokens that name it."""
    tokens = sorted(device.raw_tokens().items())
    return tuple((slot, tuple(_token_label(tid, doc) for tid, doc in tokens if slot in others.keyslots_named(doc)))
                 for slot in device.opening_keyslots() if slot != ours)

