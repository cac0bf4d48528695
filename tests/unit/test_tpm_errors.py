"""TPM errors are classified by the operation that failed, never by the words of its message."""

from __future__ import annotations

import pytest

from unlocker.errors import CorruptError, LockoutError, NoTpmError, PolicyError, UnlockerError, UsageError
from unlocker.tpm import errors
from unlocker.tpm.errors import Operation, tpm_error
from unlocker.tpm.tss import TssError, lib

# Response codes as swtpm returns them (shared/notes-tpm2-pytss.md): a failed PolicyPCR in session 1,
# a wrong PIN in session 1, and the TCTI layer's "no connection".
POLICY_FAIL_SESSION_1 = 0x99D
AUTH_FAIL_SESSION_1 = 0x98E
TCTI_IO_ERROR = 0x000A000A


@pytest.mark.parametrize(("rc", "op", "expected"), [
    (POLICY_FAIL_SESSION_1, errors.UNSEAL, PolicyError),
    (POLICY_FAIL_SESSION_1, errors.NV_READ, PolicyError),
    # the same code where no policy guards the command: not "the PCRs changed"
    (POLICY_FAIL_SESSION_1, errors.SEAL, NoTpmError),
    (POLICY_FAIL_SESSION_1, errors.LOAD, NoTpmError),
    (AUTH_FAIL_SESSION_1, errors.UNSEAL, PolicyError),
    (lib.TPM2_RC_LOCKOUT, errors.UNSEAL, LockoutError),
    (lib.TPM2_RC_LOCKOUT, errors.CREATE_SRK, LockoutError),
    (lib.TPM2_RC_INTEGRITY, errors.LOAD, CorruptError),
    (lib.TPM2_RC_HANDLE, errors.NV_READ, CorruptError),
    (lib.TPM2_RC_HANDLE, errors.LOAD, NoTpmError),
    (lib.TPM2_RC_NV_DEFINED, errors.NV_DEFINE, UsageError),
    (TCTI_IO_ERROR, errors.UNSEAL, NoTpmError),
])
def test_the_operation_decides_the_error(rc: int, op: Operation, expected: type[UnlockerError]) -> None:
    assert type(tpm_error(TssError(rc), op)) is expected


@pytest.mark.parametrize("op", [errors.UNSEAL, errors.NV_READ, errors.LOAD, errors.SEAL, errors.CREATE_SRK,
                                errors.NV_DEFINE, errors.NV_UNDEFINE, errors.READ_PCRS])
@pytest.mark.parametrize("rc", [POLICY_FAIL_SESSION_1, AUTH_FAIL_SESSION_1, lib.TPM2_RC_HANDLE,
                                lib.TPM2_RC_NV_DEFINED, lib.TPM2_RC_INTEGRITY, TCTI_IO_ERROR])
def test_rewording_an_operation_never_changes_the_error(op: Operation, rc: int) -> None:
    reworded = Operation("doing something put in other words", op.policy_guarded, op.nv_index)
    assert type(tpm_error(TssError(rc), reworded)) is type(tpm_error(TssError(rc), op))


def test_the_message_says_what_failed_and_names_the_index() -> None:
    exc = tpm_error(TssError(POLICY_FAIL_SESSION_1), errors.NV_READ.at(0x1500016))
    assert exc.message == "the PCR policy is not satisfied while reading NV index 0x01500016"
    assert exc.exit_code == 3
