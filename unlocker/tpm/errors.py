"""TPM errors become ours by the operation that failed, named by the caller, never by the words of a
message: rewording what a user reads can never change an exit code.

The same TPM response code means different things in different operations: TPM_RC_POLICY_FAIL in
an unseal or NV read says the PCRs changed; TPM_RC_HANDLE in an NV read says the index is gone.
"""

from __future__ import annotations

from unlocker.errors import BadPinError, CorruptError, LockoutError, NoTpmError, PolicyError, UnlockerError, UsageError
from unlocker.lean.record import record
from unlocker.tpm.tss import TssError, lib

# The TCTI layer of a TSS2_RC: the connection to the TPM failed, not the TPM itself.
_TCTI_LAYER_MASK = 0xFFFF0000
_TCTI_LAYER = 0x000A0000


@record(frozen=True)
class Operation:
    """What we asked of the TPM: `doing` completes "... while <doing>"; the flags say what its
    failures mean."""

    doing: str
    # a policy session guards it: a policy failure means the PCR values differ from the sealed ones
    policy_guarded: bool = False
    # it addresses an NV index: a missing handle means the index is not defined
    nv_index: bool = False

    def at(self, index: int) -> Operation:
        """The same operation on NV index `index` (named in the message)."""
        return Operation(f"{self.doing} 0x{index:08x}", self.policy_guarded, self.nv_index)


CONNECT = Operation("connecting")
CREATE_SRK = Operation("creating the storage root key")
START_SESSION = Operation("starting a session")
READ_PCRS = Operation("reading PCRs")
EXTEND_PCR = Operation("extending the lock PCR")
READ_PROPERTIES = Operation("reading TPM properties")
SEAL = Operation("sealing the key")
LOAD = Operation("loading the sealed object")
UNSEAL = Operation("unsealing", policy_guarded=True)
NV_LOOKUP = Operation("looking up NV index", nv_index=True)
NV_DEFINE = Operation("defining NV index", nv_index=True)
NV_WRITE = Operation("writing NV index", nv_index=True)
NV_READ = Operation("reading NV index", policy_guarded=True, nv_index=True)
NV_UNDEFINE = Operation("removing NV index", nv_index=True)
NV_LIST = Operation("listing NV indexes from", nv_index=True)
COUNTER_READ = Operation("reading NV counter", nv_index=True)
COUNTER_INCREMENT = Operation("incrementing NV counter", nv_index=True)
READ_CLOCK = Operation("reading the TPM's reset count")

# the sealed object (or its parent) is not what the TPM can load: damaged, or made elsewhere
_DAMAGED = frozenset(("TPM2_RC_INTEGRITY", "TPM2_RC_BINDING", "TPM2_RC_SIZE", "TPM2_RC_INSUFFICIENT",
                      "TPM2_RC_KEY", "TPM2_RC_TYPE", "TPM2_RC_ATTRIBUTES", "TPM2_RC_HASH",
                      "TPM2_RC_SYMMETRIC", "TPM2_RC_SCHEME"))
_DAMAGED_RC = frozenset(getattr(lib, name) for name in _DAMAGED)


def tpm_error(exc: TssError, op: Operation, *, with_pin: bool = False) -> UnlockerError:
    """Our error for `exc`, raised by `op`, with one line saying what failed. `with_pin`: the
    operation's authorisation was a PIN, so an authorisation failure means a wrong PIN."""
    rc = exc.rc
    if rc & _TCTI_LAYER_MASK == _TCTI_LAYER:
        return NoTpmError(f"the TPM stopped answering while {op.doing} ({exc})")
    base = exc.error or rc
    if base == lib.TPM2_RC_LOCKOUT:
        return LockoutError("the TPM is in dictionary-attack lockout",
                            hint="it recovers by itself after its recovery time; "
                                 "tpm2_dictionarylockout --clear-lockout resets it")
    if with_pin and base in (lib.TPM2_RC_AUTH_FAIL, lib.TPM2_RC_BAD_AUTH):
        return BadPinError("wrong TPM PIN")
    # TPM_RC_POLICY: a PolicyNV or PolicyCounterTimer comparison failed (a grace's counter or boots);
    # TPM_RC_SIGNATURE: VerifySignature refused a signed policy's signature
    if op.policy_guarded and base in (lib.TPM2_RC_POLICY_FAIL, lib.TPM2_RC_PCR_CHANGED, lib.TPM2_RC_VALUE,
                                      lib.TPM2_RC_POLICY, lib.TPM2_RC_SIGNATURE):
        return PolicyError(f"the PCR policy is not satisfied while {op.doing}")
    if base in (lib.TPM2_RC_AUTH_FAIL, lib.TPM2_RC_BAD_AUTH):
        return PolicyError(f"the TPM refused the authorisation while {op.doing}")
    if base in _DAMAGED_RC:
        return CorruptError(f"the sealed object is damaged or not ours ({exc}) while {op.doing}")
    if op.nv_index and op.policy_guarded and base == lib.TPM2_RC_HANDLE:
        return CorruptError(f"the NV index does not exist while {op.doing}")
    if op.policy_guarded and base == lib.TPM2_RC_HANDLE:
        # the object is loaded already: a missing handle is an NV index the policy asserts (a counter)
        return PolicyError(f"an NV index the policy asserts does not exist while {op.doing}")
    if op.nv_index and base == lib.TPM2_RC_NV_DEFINED:
        return UsageError(f"the NV index is already defined while {op.doing}")
    return NoTpmError(f"the TPM refused {op.doing}: {exc}")
