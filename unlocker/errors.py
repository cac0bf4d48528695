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


class CryptsetupError(UnlockerError):
    exit_code = EXIT_CRYPTSETUP


class DeviceNotFoundError(UnlockerError):
    exit_code = EXIT_NO_DEVICE


class InternalError(UnlockerError):
    """A bug of ours met while opening one of several devices: said, and the others still tried."""

    exit_code = EXIT_INTERNAL
