"""The TPM PIN at unlock: asked (our prompt, or systemd's agents in a systemd initrd), up to
PIN_TRIES times; each wrong one says how many the TPM's dictionary-attack counter leaves, and at
lockout the passphrase follows at once with the time the TPM needs."""

from __future__ import annotations

from unlocker import TYPE_CHECKING, store
from unlocker.boot.deadline import within
from unlocker.boot.prompt import ask_secret
from unlocker.errors import BadPinError, CorruptError, LockoutError, PinNeededError
from unlocker.log import say

if TYPE_CHECKING:
    from unlocker.boot.connection import TpmConnection
    from unlocker.secret import Secret
    from unlocker.signature import Signature
    from unlocker.token import Token
    from unlocker.tpm.client import Tpm, TpmInfo

PIN_TRIES = 3
# how long systemd's agents wait for each answer: the unit's TimeoutStartSec covers PIN_TRIES of them
PIN_WAIT = 90.0


def locked_out(info: TpmInfo) -> LockoutError:
    return LockoutError(f"the TPM is locked out ({info.lockout_interval} s)",
                        hint=f"it lets one more PIN try through every {info.lockout_interval} s; the passphrase "
                             "or recovery key opens the disk now")


def _ready(tpm: Tpm, token: Token, signatures: list[Signature]) -> None:
    """Before asking: a PIN can only fail when the TPM is locked out or the PCRs changed (a PIN
    asked then would be asked for nothing)."""
    from unlocker.branch import choose, read_selection

    info = tpm.info()
    if info.tries_left == 0:
        raise locked_out(info)
    choose(token, tpm.read_pcrs(read_selection(token, signatures)), signatures)


def _take(path: str, tpm: Tpm, token: Token, auth: Secret, signatures: list[Signature]) -> Secret:
    """The key; re-sealed first where its branch leaves the enrolment behind (boot/refresh.py)."""
    from unlocker.boot.refresh import needed, try_refresh
    from unlocker.luks import LuksDevice

    key, branch = store.take_branch(tpm, token, auth, signatures)
    if needed(token, branch):
        try_refresh(tpm, LuksDevice(path), token, branch, key, auth)
    return key


def unseal_with_pin(path: str, pinned: list[Token], connection: TpmConnection, seconds: float,
                    signatures: list[Signature] | None = None) -> tuple[Secret, Token]:
    """The key of the one enrolment with a PIN among `pinned`, unsealed with the PIN the user gives.
    Raises PinNeededError (no PIN given), BadPinError (PIN_TRIES wrong), LockoutError, PolicyError,
    NoTpmError, CorruptError (more than one)."""
    from unlocker.pin import MAX_PIN, auth_value

    tpm = within(seconds, connection, connection.get, "tpm")
    if len(pinned) > 1:
        # one PIN enrolment per disk (enroll and reseal keep it so): a second is a copy of an old
        # one put into the header, whose PIN the TPM would count as wrong until it locks out
        ids = ", ".join(str(t.token_id) for t in pinned)
        raise CorruptError(f"the disk has several enrolments with a PIN (tokens {ids}): none is tried, "
                           "as each wrong PIN counts towards the TPM's lockout; run 'tpm2-unlocker remove' "
                           "and enroll again")
    token = pinned[0]
    found = signatures or []
    within(seconds, connection, lambda: _ready(tpm, token, found), "pin-check")
    for _ in range(PIN_TRIES):
        pin = ask_secret(f"Enter TPM PIN for {path}: ", PIN_WAIT)
        if pin is None or not len(pin):
            if pin is not None:
                pin.wipe()
            raise PinNeededError("no TPM PIN given")
        if len(pin) > MAX_PIN:  # no enrolment takes one this long: never worth a try of the TPM's
            pin.wipe()
            say(f"that is no TPM PIN (more than {MAX_PIN} bytes); not tried")
            continue
        with pin, auth_value(pin) as auth:
            try:
                return within(seconds, connection, lambda: _take(path, tpm, token, auth, found), "unseal"), token
            except (BadPinError, LockoutError):
                info = within(seconds, connection, tpm.info, "tpm-info")
                if info.tries_left == 0:
                    raise locked_out(info) from None
                left = info.tries_left
                say(f"wrong TPM PIN ({left} {'try' if left == 1 else 'tries'} left before the TPM locks out)")
    raise BadPinError(f"no right TPM PIN in {PIN_TRIES} tries")
