"""The user's existing passphrase: from --unlock-key-file or asked on the terminal, checked on the header."""

from __future__ import annotations

from unlocker.boot.prompt import ask_passphrase
from unlocker.errors import UsageError, WrongPassphraseError
from unlocker.log import say
from unlocker.luks import LuksDevice
from unlocker.secret import Secret


def existing_passphrase(device: LuksDevice, key_file: str | None, tries: int = 3) -> Secret:
    """A passphrase (or key file) that opens a keyslot of `device` now.

    Raises UsageError when no terminal can ask, WrongPassphraseError after `tries` wrong answers.
    """
    if key_file is not None:
        try:
            secret = Secret.read_file(key_file)
        except OSError as exc:
            raise UsageError(f"cannot read --unlock-key-file {key_file}: {exc.strerror}") from None
        except ValueError as exc:
            raise UsageError(f"--unlock-key-file {key_file}: {exc}") from None
        if not device.test_key(secret):
            secret.wipe()
            raise WrongPassphraseError(f"--unlock-key-file {key_file} does not open any keyslot of {device.path}")
        return secret
    for _ in range(max(tries, 1)):
        answer = ask_passphrase(f"Passphrase for {device.path}: ")
        if answer is None:
            raise UsageError("no terminal to ask for the passphrase on (use --unlock-key-file FILE)")
        if device.test_key(answer):
            return answer
        answer.wipe()
        say("that passphrase does not open the disk")
    raise WrongPassphraseError(f"no passphrase given opens {device.path}")
