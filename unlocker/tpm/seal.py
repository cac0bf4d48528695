"""Sealed objects: seal a key under the SRK behind a policy, load and unseal it over a salted,
encrypted policy session; a blob's shape checked without a TPM."""

from __future__ import annotations

from unlocker import TYPE_CHECKING
from unlocker.errors import CorruptError, UsageError
from unlocker.lean.record import record
from unlocker.secret import Secret
from unlocker.tpm import errors, tss
from unlocker.tpm.policy import PcrSelection
from unlocker.tpm.session import Sessions
from unlocker.tpm.tss import TssError, lib

if TYPE_CHECKING:
    from unlocker.tpm.tss import CData

MAX_SEALED = 128  # TPM2B_SENSITIVE_DATA limit
# noDA: a key without a PIN must not mark a boot DA-relevant (power cuts would count towards lockout)
_SEAL_ATTRS = lib.TPMA_OBJECT_FIXEDTPM | lib.TPMA_OBJECT_FIXEDPARENT | lib.TPMA_OBJECT_NODA


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


def take_secret(pointer: CData) -> Secret:
    """Copy what the ESAPI returned into a Secret; zero and free its buffer."""
    try:
        return Secret(tss.secret_bytes(pointer))
    finally:
        tss.free(pointer, secret=True)


class Sealing(Sessions):
    def seal(self, secret: Secret, policy: bytes) -> SealedObject:
        """Seal `secret` under the SRK, readable only through `policy` (PolicyPCR). noDA is set."""
        if len(secret) > MAX_SEALED:
            raise UsageError(f"a sealed secret can hold at most {MAX_SEALED} bytes, this one has {len(secret)}")
        template = tss.new("TPM2B_PUBLIC *")
        template.publicArea.type = lib.TPM2_ALG_KEYEDHASH
        template.publicArea.nameAlg = lib.TPM2_ALG_SHA256
        template.publicArea.objectAttributes = _SEAL_ATTRS
        tss.fill_tpm2b(template.publicArea.authPolicy, policy)
        template.publicArea.parameters.keyedHashDetail.scheme.scheme = lib.TPM2_ALG_NULL
        sensitive = tss.new("TPM2B_SENSITIVE_CREATE *")
        tss.fill_tpm2b(sensitive.sensitive.data, secret.data)
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

    def unseal(self, sealed: SealedObject, selection: PcrSelection, pinned_srk: bytes | None) -> Secret:
        """Load under the SRK named `pinned_srk` and unseal over a PolicyPCR session salted with that
        same SRK and parameter-encrypted (None: the SRK selected now; enrolment and adopt only)."""
        loaded = self._load(sealed, pinned_srk)
        try:
            with self._pinned_policy_session(pinned_srk) as session:
                self._policy_pcr(session, selection)
                data = tss.new("TPM2B_SENSITIVE_DATA **")
                self._esys.call("Unseal", loaded, session, tss.NONE, tss.NONE, data)
            return take_secret(data[0])
        except TssError as exc:
            raise errors.tpm_error(exc, errors.UNSEAL) from None
        finally:
            self._esys.flush(loaded)
