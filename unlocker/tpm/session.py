"""Sessions: salted with the SRK and parameter-encrypted, so a secret never crosses the TPM bus in
clear; the policy session the boot prepares ahead; PolicyPCR and trial digests."""

from __future__ import annotations

from unlocker.tpm import errors, tss
from unlocker.tpm.base import pcr_selection
from unlocker.tpm.policy import PcrSelection
from unlocker.tpm.srk import SrkHolder
from unlocker.tpm.tss import TssError, lib


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

    def _policy_pcr(self, session: int, selection: PcrSelection) -> None:
        self._esys.call("PolicyPCR", session, tss.NONE, tss.NONE, tss.NONE, tss.new("TPM2B_DIGEST *"),
                        pcr_selection(selection))

    def trial_policy_pcr(self, selection: PcrSelection, with_pin: bool = False,
                         values_digest: bytes | None = None) -> bytes:
        """The TPM's own PolicyPCR digest for the current values, or for the values whose digest
        is `values_digest` (a trial session takes them as given): policy.py is held to it."""
        session = self._start_session(lib.TPM2_SE_TRIAL, salted=False)
        try:
            if values_digest is None:
                self._policy_pcr(session, selection)
            else:
                digest_in = tss.new("TPM2B_DIGEST *")
                tss.fill_tpm2b(digest_in, values_digest)
                self._esys.call("PolicyPCR", session, tss.NONE, tss.NONE, tss.NONE, digest_in,
                                pcr_selection(selection))
            if with_pin:
                self._esys.call("PolicyAuthValue", session, tss.NONE, tss.NONE, tss.NONE)
            digest = tss.new("TPM2B_DIGEST **")
            self._esys.call("PolicyGetDigest", session, tss.NONE, tss.NONE, tss.NONE, digest)
            try:
                return tss.tpm2b_bytes(digest[0])
            finally:
                tss.free(digest[0])
        finally:
            self._esys.flush(session)
