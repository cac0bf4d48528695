"""Sessions: salted with the SRK and parameter-encrypted, so a secret never crosses the TPM bus in
clear; the policy session the boot prepares ahead; the branch plans they assert (PolicyPCR, PolicyNV,
PolicyCounterTimer, PolicyAuthorize, PolicyAuthValue, PolicyOR) and trial digests."""

from __future__ import annotations

from unlocker import TYPE_CHECKING
from unlocker.errors import CorruptError
from unlocker.tpm import errors, tss
from unlocker.tpm.base import pcr_selection
from unlocker.tpm.policy import EO_UNSIGNED_LE, RESET_COUNT_OFFSET, PcrSelection, PolicyPlan, pcr_composite_digest
from unlocker.tpm.signing import unmarshal_public, unmarshal_signature
from unlocker.tpm.srk import SrkHolder
from unlocker.tpm.tss import TssError, lib

if TYPE_CHECKING:
    from unlocker.secret import Secret
    from unlocker.tpm.tss import CData


class _Session:
    """A session handle for a `with` block, flushed from the TPM at its end."""

    def __init__(self, esys: tss.Esys, session: int) -> None:
        self._esys, self._session = esys, session

    def __enter__(self) -> int:
        return self._session

    def __exit__(self, *exc_info: object) -> None:
        self._esys.flush(self._session)


class Sessions(SrkHolder):
    """Starts the sessions every unseal, NV read and seal runs in."""

    def __init__(self, tcti: str) -> None:
        super().__init__(tcti)
        self._spare_policy_session: int | None = None
        self._spare_salt_name = b""  # the name of the key that salted the spare session

    def close(self) -> None:
        if self._spare_policy_session is not None:
            self._esys.flush(self._spare_policy_session)
            self._spare_policy_session = None
        super().close()

    def _start_session(self, session_type: int, salted: bool) -> int:
        """A session (salted with the SRK selected now: encrypting the first command and response
        parameter). Only a key whose name was checked may salt what carries a secret: see
        _pinned_policy_session."""
        out = tss.new("ESYS_TR *")
        symmetric = tss.new("TPMT_SYM_DEF *")
        if salted:
            symmetric.algorithm = lib.TPM2_ALG_AES
            symmetric.keyBits.aes = 128
            symmetric.mode.aes = lib.TPM2_ALG_CFB
        else:
            symmetric.algorithm = lib.TPM2_ALG_NULL
        self._esys.call("StartAuthSession", self._current_srk() if salted else tss.NONE, tss.NONE, tss.NONE,
                        tss.NONE, tss.NONE, tss.ffi.NULL, session_type, symmetric, lib.TPM2_ALG_SHA256, out)
        session = out[0]
        if salted:
            try:
                flags = lib.TPMA_SESSION_CONTINUESESSION | lib.TPMA_SESSION_ENCRYPT | lib.TPMA_SESSION_DECRYPT
                self._esys.call("TRSess_SetAttributes", session, flags, 0xFF)
            except TssError:
                self._esys.flush(session)
                raise
        return session

    def prepare_policy_session(self) -> None:
        """Start the salted policy session the next unseal or NV read takes.

        At boot this runs before the disk appears: the session's salt (an ECDH exchange with the
        TPM, which also waits for the kernel's random pool) is then off the way from "the disk is
        there" to "the disk is open". Any loaded key may salt a session, so a later switch to
        another SRK (check_srk) leaves it usable.
        """
        if self._spare_policy_session is None:
            try:
                self._spare_policy_session = self._start_session(lib.TPM2_SE_POLICY, salted=True)
            except TssError as exc:
                raise errors.tpm_error(exc, errors.START_SESSION) from None
            self._spare_salt_name = self._srk_name

    def _salted_session(self, session_type: int) -> _Session:
        """`with` it for a salted session (the spare policy session when one is ready), flushed after."""
        if session_type == lib.TPM2_SE_POLICY and self._spare_policy_session is not None:
            session, self._spare_policy_session = self._spare_policy_session, None
        else:
            session = self._start_session(session_type, salted=True)
        return _Session(self._esys, session)

    def _pinned_policy_session(self, pinned_srk: bytes | None) -> _Session:
        """`with` it for the policy session an unseal or NV read runs in, salted with the SRK whose
        name a token pinned: check_srk selects it by that name (a swapped TPM, or something between
        us and the TPM answering with its own key, is refused there), and a spare session salted
        with any other key (the boot prepares one before the token is read) is flushed unused.
        None: no pin yet (enrolment, adopt): the SRK selected now, trusted on first use."""
        if pinned_srk is not None:
            self.check_srk(pinned_srk)
        if self._spare_policy_session is not None and self._spare_salt_name != self._current_srk_name():
            self._esys.flush(self._spare_policy_session)
            self._spare_policy_session = None
        return self._salted_session(lib.TPM2_SE_POLICY)

    def _policy_pcr(self, session: int, selection: PcrSelection, values_digest: bytes = b"") -> None:
        """PolicyPCR over `selection`: the TPM's current values (a trial session: those whose
        composite digest is `values_digest`, when given)."""
        digest = tss.new("TPM2B_DIGEST *")
        tss.fill_tpm2b(digest, values_digest)
        self._esys.call("PolicyPCR", session, tss.NONE, tss.NONE, tss.NONE, digest, pcr_selection(selection))

    def _run_plan(self, session: int, plan: PolicyPlan, handle: int | None, auth: Secret | None,
                  trial: bool = False) -> None:
        """Assert one branch's plan in `session`, in its order (policy.PolicyPlan). `handle`: the
        object or NV index the session authorises, whose auth value `auth` is (a PIN's). `trial`:
        the PCR values are the plan's, not the TPM's (their digest is computed here: never at boot,
        where hashlib is not imported)."""
        if plan.selection is not None:
            self._policy_pcr(session, plan.selection, pcr_composite_digest(plan.values, plan.selection) if trial else b"")
        for check in plan.nv_checks:
            self._policy_nv(session, check.index, check.operand, check.offset, check.operation)
        if plan.reset_limit is not None:
            self._policy_counter_timer(session, plan.reset_operand(), RESET_COUNT_OFFSET, EO_UNSIGNED_LE)
        if plan.authorize is not None:
            self._policy_authorize(session, plan, trial)
        if plan.lock is not None:
            zeros = dict.fromkeys(plan.lock.pcrs, bytes(plan.lock.digest_size))
            self._policy_pcr(session, plan.lock, pcr_composite_digest(zeros, plan.lock) if trial else b"")
        if plan.auth_value:
            if handle is None or auth is None:
                self._esys.call("PolicyAuthValue", session, tss.NONE, tss.NONE, tss.NONE)
            else:
                self._policy_auth_value(session, handle, auth)
        if plan.or_digests:
            self._policy_or(session, plan.or_digests)

    def _policy_or(self, session: int, digests: tuple[bytes, ...]) -> None:
        hash_list = tss.new("TPML_DIGEST *")
        hash_list.count = len(digests)
        for i, digest in enumerate(digests):
            tss.fill_tpm2b(hash_list.digests[i], digest)
        self._esys.call("PolicyOR", session, tss.NONE, tss.NONE, tss.NONE, hash_list)

    def _operand(self, data: bytes) -> CData:
        operand = tss.new("TPM2B_OPERAND *")
        tss.fill_tpm2b(operand, data)
        return operand

    def _policy_nv(self, session: int, index: int, operand: bytes, offset: int, operation: int) -> None:
        """PolicyNV on NV index `index`, read with its own (empty) password: our counters are
        authread, and what they hold is no secret."""
        handle = self._from_tpm_public(index)
        try:
            self._esys.call("PolicyNV", handle, handle, session, tss.PASSWORD, tss.NONE, tss.NONE,
                            self._operand(operand), offset, operation)
        finally:
            self._esys.tr_close(handle)

    def _policy_counter_timer(self, session: int, operand: bytes, offset: int, operation: int) -> None:
        self._esys.call("PolicyCounterTimer", session, tss.NONE, tss.NONE, tss.NONE, self._operand(operand),
                        offset, operation)

    def _policy_authorize(self, session: int, plan: PolicyPlan, trial: bool) -> None:
        """PolicyAuthorize: the signature of the plan's key over H(approved || policyRef), checked by
        the TPM (LoadExternal of the public key, VerifySignature: a ticket), makes the PCR policy
        asserted so far, if it is the approved one, into the key's. A trial session takes no ticket."""
        authorize = plan.authorize
        assert authorize is not None
        approved, ref, name = tss.new("TPM2B_DIGEST *"), tss.new("TPM2B_NONCE *"), tss.new("TPM2B_NAME *")
        tss.fill_tpm2b(approved, authorize.approved)
        tss.fill_tpm2b(ref, authorize.policy_ref)
        name.size = len(authorize.key_name)
        tss.ffi.memmove(name.name, authorize.key_name, len(authorize.key_name))
        if trial:
            ticket = tss.new("TPMT_TK_VERIFIED *")
            ticket.tag, ticket.hierarchy = lib.TPM2_ST_VERIFIED, lib.TPM2_RH_NULL
            self._esys.call("PolicyAuthorize", session, tss.NONE, tss.NONE, tss.NONE, approved, ref, name, ticket)
            return
        key = self.load_external(authorize.key_public)
        try:
            signed, signature = tss.new("TPM2B_DIGEST *"), unmarshal_signature(authorize.signature)
            tss.fill_tpm2b(signed, authorize.signed_digest)
            verified = tss.new("TPMT_TK_VERIFIED **")
            self._esys.call("VerifySignature", key, tss.NONE, tss.NONE, tss.NONE, signed, signature, verified)
            try:
                self._esys.call("PolicyAuthorize", session, tss.NONE, tss.NONE, tss.NONE, approved, ref, name,
                                verified[0])
            finally:
                tss.free(verified[0])
        finally:
            self._esys.flush(key)

    def load_external(self, public: bytes) -> int:
        """A public key (a marshalled TPM2B_PUBLIC) loaded in the owner hierarchy, whose tickets
        PolicyAuthorize accepts (a key in the null hierarchy gets null tickets); the caller flushes it."""
        out = tss.new("ESYS_TR *")
        self._esys.call("LoadExternal", tss.NONE, tss.NONE, tss.NONE, tss.ffi.NULL, unmarshal_public(public),
                        lib.ESYS_TR_RH_OWNER, out)
        return int(out[0])

    def external_key_name(self, public: bytes) -> bytes:
        """The name the TPM computes for the public key `public` (which it must take as a signing key)."""
        try:
            key = self.load_external(public)
        except TssError as exc:
            raise CorruptError(f"the TPM does not take the signing key ({exc})") from None
        try:
            return self._esys.name(key)
        finally:
            self._esys.flush(key)

    def verify_signature(self, public: bytes, digest: bytes, signature: bytes) -> bytes:
        """The TPM's check of `signature` (a marshalled TPMT_SIGNATURE) by the key `public` over
        `digest`: CorruptError when it fails. The key's name as the TPM computes it."""
        try:
            key = self.load_external(public)
        except TssError as exc:
            raise CorruptError(f"the TPM does not take the signing key ({exc})") from None
        try:
            name = self._esys.name(key)
            signed = tss.new("TPM2B_DIGEST *")
            tss.fill_tpm2b(signed, digest)
            verified = tss.new("TPMT_TK_VERIFIED **")
            try:
                self._esys.call("VerifySignature", key, tss.NONE, tss.NONE, tss.NONE, signed,
                                unmarshal_signature(signature), verified)
            except TssError as exc:
                raise CorruptError(f"the TPM refuses the signature ({exc})") from None
            tss.free(verified[0])
            return name
        finally:
            self._esys.flush(key)

    def trial_plan(self, plan: PolicyPlan, current: bool = False) -> bytes:
        """The TPM's own digest for `plan` with the plan's PCR values (a trial session takes them
        as given): policy.branch_digest is held to it. `current`: with the values the PCRs have now
        instead (the boot's re-seal, which computes no digest itself). A plan of PolicyOR alone
        gives the OR's digest (a trial session does not check its list)."""
        session = self._start_session(lib.TPM2_SE_TRIAL, salted=False)
        try:
            self._run_plan(session, plan, None, None, trial=not current)
            return self._policy_digest(session)
        finally:
            self._esys.flush(session)

    def _policy_digest(self, session: int) -> bytes:
        digest = tss.new("TPM2B_DIGEST **")
        self._esys.call("PolicyGetDigest", session, tss.NONE, tss.NONE, tss.NONE, digest)
        try:
            return tss.tpm2b_bytes(digest[0])
        finally:
            tss.free(digest[0])

    def _policy_auth_value(self, session: int, handle: int, auth: Secret) -> None:
        """PolicyAuthValue, and the object's auth value given to the ESAPI for the session's HMAC (the
        value itself never crosses the bus: the salted session keys the HMAC)."""
        value = tss.new("TPM2B_AUTH *")
        tss.fill_tpm2b(value, auth.data)
        try:
            self._esys.call("TR_SetAuth", handle, value)
        finally:
            tss.wipe(value)
        self._esys.call("PolicyAuthValue", session, tss.NONE, tss.NONE, tss.NONE)

    def trial_policy_pcr(self, selection: PcrSelection, with_pin: bool = False,
                         values_digest: bytes | None = None) -> bytes:
        """The TPM's own PolicyPCR digest for the current values, or for the values whose digest
        is `values_digest` (a trial session takes them as given): policy.py is held to it."""
        session = self._start_session(lib.TPM2_SE_TRIAL, salted=False)
        try:
            self._policy_pcr(session, selection, values_digest or b"")
            if with_pin:
                self._esys.call("PolicyAuthValue", session, tss.NONE, tss.NONE, tss.NONE)
            return self._policy_digest(session)
        finally:
            self._esys.flush(session)
