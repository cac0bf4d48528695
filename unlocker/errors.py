"""Exception types. Each carries the one line a user sees and its exit code (README.md, Exit codes).

cli.py is the one place that turns these into a message on stderr and an exit code.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_NO_TPM = 2
EXIT_POLICY = 3
EXIT_LOCKOUT = 4
EXIT_CORRUPT = 5
EXIT_WRONG_PASSPHRASE = 6
EXIT_CRYPTSETUP = 7
EXIT_NO_DEVICE = 8
# a bug of ours (an exception no code path expected): never success, never a user's mistake
EXIT_INTERNAL = 9
EXIT_PIN_NEEDED = 10
EXIT_INTERRUPTED = 130

# What each code means, for the README's table and the man page's EXIT STATUS (docgen/manpage.py;
# tests/unit/test_manpage.py holds the README to it).
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "done"),
    (EXIT_USAGE, "usage"),
    (EXIT_NO_TPM, "no usable TPM (or not the enrolled one)"),
    (EXIT_POLICY, "PCR policy not satisfied (or the key is locked for this boot)"),
    (EXIT_LOCKOUT, "TPM lockout"),
    (EXIT_CORRUPT, "corrupt token, blob or NV index"),
    (EXIT_WRONG_PASSPHRASE, "wrong passphrase after N tries (or a wrong TPM PIN)"),
    (EXIT_CRYPTSETUP, "cryptsetup failed"),
    (EXIT_NO_DEVICE, "device not found"),
    (EXIT_INTERNAL, "internal error (a bug; the message says to run with --debug)"),
    (EXIT_PIN_NEEDED, "the key needs the TPM PIN and none was given (or a run told --defer-pin left it to the next)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
)


class UnlockerError(Exception):
    """Base of every error a user may see. `message` is one line, without a trailing period."""

    exit_code = EXIT_USAGE
    # True once its line (and hint) reached the user: cli then only turns it into the exit code
    said = False

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def as_said(self) -> UnlockerError:
        self.said = True
        return self


class UsageError(UnlockerError):
    exit_code = EXIT_USAGE


class NoTpmError(UnlockerError):
    """No TPM reachable, the TCTI failed, or the TPM is not the one enrolled."""

    exit_code = EXIT_NO_TPM


class PolicyError(UnlockerError):
    """The PCR policy is not satisfied: the boot chain changed since sealing."""

    exit_code = EXIT_POLICY

    def __init__(self, message: str, changed_pcrs: list[int] | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.changed_pcrs = changed_pcrs or []


class LockoutError(UnlockerError):
    exit_code = EXIT_LOCKOUT


class CorruptError(UnlockerError):
    """A token, blob or NV index is malformed, missing or does not match."""

    exit_code = EXIT_CORRUPT


class WrongPassphraseError(UnlockerError):
    exit_code = EXIT_WRONG_PASSPHRASE


class BadPinError(WrongPassphraseError):
    """The TPM refused the PIN (its dictionary-attack counter went up by one)."""


class PinNeededError(UnlockerError):
    """The key needs the TPM PIN and none was given (or this run leaves asking to a later one)."""

    exit_code = EXIT_PIN_NEEDED


class CryptsetupError(UnlockerError):
    exit_code = EXIT_CRYPTSETUP


class DeviceNotFoundError(UnlockerError):
    exit_code = EXIT_NO_DEVICE


class InternalError(UnlockerError):
    """A bug of ours met while opening one of several devices: said, and the others still tried."""

    exit_code = EXIT_INTERNAL
