"""A new TPM PIN for enroll and reseal: from --pin-file, or asked twice on the terminal (never argv)."""

from __future__ import annotations

from unlocker.boot.prompt import ask_on_terminal
from unlocker.errors import UsageError
from unlocker.pin import checked, read_pin_file
from unlocker.secret import Secret


def new_pin(pin_file: str | None, unlock_key_file: str | None) -> Secret:
    """The PIN to seal with. '-' for both --pin-file and --unlock-key-file is refused: one stdin."""
    if pin_file is not None:
        if pin_file == "-" and unlock_key_file == "-":
            raise UsageError("--pin-file - and --unlock-key-file - would both read stdin: give one of them a file")
        return read_pin_file(pin_file)
    pin = checked(ask_on_terminal("New TPM PIN: "), "TPM PIN")
    try:
        with checked(ask_on_terminal("The same TPM PIN again: "), "TPM PIN") as again:
            if again != pin:
                raise UsageError("the two PINs differ; nothing was changed")
    except BaseException:  # no second answer, a bad one, one that differs, Ctrl-C: the first goes too
        pin.wipe()
        raise
    return pin


def existing_pin(pin_file: str | None, prompt: str) -> Secret:
    """A PIN an enrolment already has (adopt's systemd-tpm2 token): from --pin-file, or asked once."""
    if pin_file is not None:
        return read_pin_file(pin_file)
    return checked(ask_on_terminal(prompt), "TPM PIN")
