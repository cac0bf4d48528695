"""Sealed objects: seal a key under the SRK behind a policy, load and unseal it over a salted,
encrypted policy session; a blob's shape checked without a TPM."""

from __future__ import annotations

from unlocker import TYPE_CHECKING
from unlocker.errors import CorruptError, UsageError
from unlocker.lean.record import record
from unlocker.secret import Secret
from unlocker.tpm import errors, tss
from unlocker.tpm.policy import PolicyPlan
from unlocker.tpm.session import Sessions
from unlocker.tpm.tss import TssError, lib

if TYPE_CHECKING:
    from unlocker.tpm.tss import CData

MAX_SEALED = 128  # TPM2B_SENSITIVE_DATA limit
# noDA: a key without a PIN must not mark a boot DA-relevant (power cuts would count towards lockout).
# A key with a PIN is DA-protected: the TPM's lockout is what stops guessing the PIN. No
# userWithAuth in either: only the policy session (PolicyPCR, then PolicyAuthValue) authorises.
_SEAL_ATTRS = lib.TPMA_OBJECT_FIXEDTPM | lib.TPMA_OBJECT_FIXEDPARENT
_NO_DA = lib.TPMA_OBJECT_NODA


@record
class SealedObject:
    """A sealed key as TPM2B_PUBLIC + TPM2B_PRIVATE, marshalled (what tpm2_create writes)."""

    public: bytes
    private: bytes


def _unmarshal_sealed(sealed: SealedObject) -> tuple[CData, CData]:
    try:
        public, used_pub = tss.unmarshal("TPM2B_PUBLIC", sealed.public)
        private, used_priv = tss.unmarshal("TPM2B_PRIVATE", sealed.private)
    except TssError:
        raise CorruptError("the sealed object is truncated or malformed") from None
    if used_pub != len(sealed.public) or used_priv != len(sealed.private):
        raise CorruptError("the sealed object has trailing bytes (not a TPM2B_PUBLIC/TPM2B_PRIVATE pair)")
    if public.publicArea.type != lib.TPM2_ALG_KEYEDHASH:
        raise CorruptError("the sealed object is not a sealed data object")
    return public, private


def validate_sealed(sealed: SealedObject) -> None:
    """Check a blob's shape without a TPM (adopt and file stores call this first)."""
    _unmarshal_sealed(sealed)


def sealed_auth_policy(sealed: SealedObject) -> bytes:
    """The authPolicy digest in a sealed object's public area (empty when it has none)."""
    public, _ = _unmarshal_sealed(sealed)
    return tss.tpm2b_bytes(public.publicArea.authPolicy)


def sealed_no_da(sealed: SealedObject) -> bool:
    """Whether the sealed object has noDA (ours without a PIN)."""
    public, _ = _unmarshal_sealed(sealed)
    return bool(public.publicArea.objectAttributes & lib.TPMA_OBJECT_NODA)


def take_secret(pointer: CData) -> Secret:
    """Copy what the ESAPI returned into a Secret; zero and free its buffer."""
    try:
        return Secret(tss.secret_bytes(pointer))
    finally:
        tss.free(pointer, secret=True)


class Sealing(Sessions):
    def seal(self, secret: Secret, policy: bytes, auth: Secret | None = None) -> SealedObject:
        """Seal `secret` under the SRK, readable only through `policy` (PolicyPCR, with `auth`
        PolicyAuthValue after it: the PIN's auth value). noDA unless it has an auth value."""
        if len(secret) > MAX_SEALED:
            raise UsageError(f"a sealed secret can hold at most {MAX_SEALED} bytes, this one has {len(secret)}")
        template = tss.new("TPM2B_PUBLIC *")
        template.publicArea.type = lib.TPM2_ALG_KEYEDHASH
        template.publicArea.nameAlg = lib.TPM2_ALG_SHA256
        template.publicArea.objectAttributes = _SEAL_ATTRS if auth is not None else _SEAL_ATTRS | _NO_DA
        tss.fill_tpm2b(template.publicArea.authPolicy, policy)
        template.publicArea.parameters.keyedHashDetail.scheme.scheme = lib.TPM2_ALG_NULL
        sensitive = tss.new("TPM2B_SENSITIVE_CREATE *")
        tss.fill_tpm2b(sensitive.sensitive.data, secret.data)
        if auth is not None:
            tss.fill_tpm2b(sensitive.sensitive.userAuth, auth.data)
        private = tss.new("TPM2B_PRIVATE **")
        public = tss.new("TPM2B_PUBLIC **")
        try:
            parent = self.srk()
            # The HMAC session's DECRYPT flag encrypts inSensitive on its way to the TPM.
            with self._salted_session(lib.TPM2_SE_HMAC) as session:
                self._esys.call("Create", parent, session, tss.NONE, tss.NONE, sensitive, template,
                                tss.new("TPM2B_DATA *"), tss.new("TPML_PCR_SELECTION *"), private, public,
                                tss.ffi.NULL, tss.ffi.NULL, tss.ffi.NULL)
            try:
                return SealedObject(public=tss.marshal("TPM2B_PUBLIC", public[0]),
                                    private=tss.marshal("TPM2B_PRIVATE", private[0]))
            finally:
                tss.free(public[0])
                tss.free(private[0])
        except TssError as exc:
            raise errors.tpm_error(exc, errors.SEAL) from None
        finally:
            tss.wipe(sensitive.sensitive.data)
            tss.wipe(sensitive.sensitive.userAuth)

    def _load(self, sealed: SealedObject, pinned_srk: bytes | None) -> int:
        """Load the object under the SRK named `pinned_srk` (the TPM checks its integrity); its
        handle, for the caller to flush."""
        public, private = _unmarshal_sealed(sealed)
        if pinned_srk is not None:
            self.check_srk(pinned_srk)
        loaded = tss.new("ESYS_TR *")
        try:
            self._esys.call("Load", self._current_srk(), tss.PASSWORD, tss.NONE, tss.NONE, private, public, loaded)
        except TssError as exc:
            raise errors.tpm_error(exc, errors.LOAD) from None
        return int(loaded[0])

    def load_check(self, sealed: SealedObject, pinned_srk: bytes) -> None:
        """The object loads under the SRK named `pinned_srk` (flushed again at once)."""
        self._esys.flush(self._load(sealed, pinned_srk))

    def unseal(self, sealed: SealedObject, plan: PolicyPlan, pinned_srk: bytes | None,
               auth: Secret | None = None) -> Secret:
        """Load under the SRK named `pinned_srk` and unseal over a policy session (the branch
        `plan`: PolicyPCR, ..., PolicyOR) salted with that same SRK and parameter-encrypted (None:
        the SRK selected now; enrolment and adopt only). `auth`: the PIN's auth value, for
        PolicyAuthValue (BadPinError when the TPM refuses it)."""
        loaded = self._load(sealed, pinned_srk)
        try:
            with self._pinned_policy_session(pinned_srk) as session:
                self._run_plan(session, plan, loaded, auth)
                data = tss.new("TPM2B_SENSITIVE_DATA **")
                self._esys.call("Unseal", loaded, session, tss.NONE, tss.NONE, data)
            return take_secret(data[0])
        except TssError as exc:
            raise errors.tpm_error(exc, errors.UNSEAL, with_pin=auth is not None) from None
        finally:
            self._esys.flush(loaded)

    def unseal_by_auth_value(self, sealed: SealedObject) -> Secret:
        """Load under the SRK selected now and unseal an object with no policy that its (empty) auth
        value opens (userWithAuth: a Clevis tpm2 pin bound to no PCRs), over an HMAC session
        salted with that SRK and parameter-encrypted."""
        loaded = self._load(sealed, None)
        try:
            with self._salted_session(lib.TPM2_SE_HMAC) as session:
                data = tss.new("TPM2B_SENSITIVE_DATA **")
                self._esys.call("Unseal", loaded, session, tss.NONE, tss.NONE, data)
            return take_secret(data[0])
        except TssError as exc:
            raise errors.tpm_error(exc, errors.UNSEAL) from None
        finally:
            self._esys.flush(loaded)
