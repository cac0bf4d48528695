"""NV indexes: the key kept in TPM memory, readable only through the PCR policy."""

from __future__ import annotations

from unlocker import TYPE_CHECKING
from unlocker.errors import CorruptError, UsageError
from unlocker.lean.record import record
from unlocker.secret import Secret
from unlocker.tpm import errors, tss
from unlocker.tpm.policy import PolicyPlan
from unlocker.tpm.seal import take_secret
from unlocker.tpm.session import Sessions
from unlocker.tpm.tss import TssError, lib

if TYPE_CHECKING:
    from unlocker.tpm.tss import CData

DEFAULT_NV_INDEX = 0x01500016
# where an enrolment's NV counter (prepare-update's one-boot grace) is defined: the first free index from here
DEFAULT_COUNTER_INDEX = 0x01500030
# TPM_NT_COUNTER: only ever incremented, and a counter defined again starts above the highest value any
# counter of this TPM had (TPM 2.0 Part 1, NV counters). authread|authwrite with an empty password:
# anyone may read it (no secret) and increment it, which only ends a grace early (a prompt, never an
# unlock). noDA: its empty password never counts towards lockout.
OUR_COUNTER_ATTRIBUTES = ((lib.TPM2_NT_COUNTER << lib.TPMA_NV_TPM2_NT_SHIFT) | lib.TPMA_NV_AUTHWRITE
                          | lib.TPMA_NV_AUTHREAD | lib.TPMA_NV_NO_DA)
OUR_NV_ATTRIBUTES = (lib.TPMA_NV_POLICYREAD | lib.TPMA_NV_OWNERWRITE | lib.TPMA_NV_WRITEDEFINE
                     | lib.TPMA_NV_NO_DA)
# who else may read or write an index with an empty password, beside its policy
_READ_WITHOUT_POLICY = lib.TPMA_NV_AUTHREAD | lib.TPMA_NV_OWNERREAD | lib.TPMA_NV_PPREAD
_WRITE_WITHOUT_POLICY = lib.TPMA_NV_AUTHWRITE | lib.TPMA_NV_OWNERWRITE | lib.TPMA_NV_PPWRITE


@record(frozen=True)
class NvInfo:
    """An NV index as the TPM reports it: size, attributes, policy digest, whether it has noDA."""

    index: int
    size: int
    attributes: int
    auth_policy: bytes
    no_da: bool

    @property
    def readable_without_policy(self) -> bool:
        """authread/ownerread/ppread: readable with a password (empty unless someone set one)."""
        return bool(self.attributes & _READ_WITHOUT_POLICY)

    @property
    def writable_without_policy(self) -> bool:
        """authwrite/ppwrite, or ownerwrite without a write lock: the key can be replaced."""
        locked = self.attributes & lib.TPMA_NV_WRITELOCKED
        return bool(self.attributes & _WRITE_WITHOUT_POLICY) and not locked


class NvStorage(Sessions):
    def _nv_lookup(self, index: int, op: errors.Operation) -> tuple[int, CData] | None:
        """The ESYS handle (the caller closes it) and TPMS_NV_PUBLIC of `index`; None when undefined."""
        try:
            handles, _ = self._handles(index, 1)
            if index not in handles:
                return None
            handle = self._from_tpm_public(index)
        except TssError as exc:
            raise errors.tpm_error(exc, op.at(index)) from None
        public = tss.new("TPM2B_NV_PUBLIC **")
        try:
            self._esys.call("NV_ReadPublic", handle, tss.NONE, tss.NONE, tss.NONE, public, tss.ffi.NULL)
        except TssError as exc:
            self._esys.tr_close(handle)
            raise errors.tpm_error(exc, op.at(index)) from None
        nv_public = tss.new("TPMS_NV_PUBLIC *", public[0].nvPublic)
        tss.free(public[0])
        return handle, nv_public

    def nv_info(self, index: int) -> NvInfo | None:
        found = self._nv_lookup(index, errors.NV_LOOKUP)
        if found is None:
            return None
        handle, nv_public = found
        self._esys.tr_close(handle)
        attrs = nv_public.attributes
        return NvInfo(index=index, size=nv_public.dataSize,
                      attributes=attrs, auth_policy=tss.tpm2b_bytes(nv_public.authPolicy),
                      no_da=bool(attrs & lib.TPMA_NV_NO_DA))

    def nv_define_and_write(self, index: int, secret: Secret, policy: bytes, auth: Secret | None = None) -> None:
        """Define `index`, write the key and lock it against writes until the index is undefined.

        policyread: read only through the PCR policy. ownerwrite|writedefine: written once with the
        owner's authorization, then NV_WriteLock: nothing, not even the owner, can overwrite the key
        (the ArchWiki recipe's authwrite with an empty password lets anyone replace it); the owner
        can still undefine it (remove, reseal). noDA: reads never count towards lockout; but with
        `auth` (a PIN's auth value, for the policy's PolicyAuthValue) the index is DA-protected."""
        if self.nv_info(index) is not None:
            raise UsageError(f"NV index 0x{index:08x} is already defined (choose another with --store nv=INDEX)")
        public = tss.new("TPM2B_NV_PUBLIC *")
        public.nvPublic.nvIndex = index
        public.nvPublic.nameAlg = lib.TPM2_ALG_SHA256
        public.nvPublic.attributes = OUR_NV_ATTRIBUTES if auth is None else OUR_NV_ATTRIBUTES & ~lib.TPMA_NV_NO_DA
        tss.fill_tpm2b(public.nvPublic.authPolicy, policy)
        public.nvPublic.dataSize = len(secret)
        handle = tss.new("ESYS_TR *")
        index_auth = tss.new("TPM2B_AUTH *")
        if auth is not None:
            tss.fill_tpm2b(index_auth, auth.data)
        try:
            # the auth value is sent in NV_DefineSpace's first parameter: a salted session encrypts it
            with self._salted_session(lib.TPM2_SE_HMAC) as session:
                self._esys.call("NV_DefineSpace", lib.ESYS_TR_RH_OWNER, session, tss.NONE, tss.NONE,
                                index_auth, public, handle)
        except TssError as exc:
            raise errors.tpm_error(exc, errors.NV_DEFINE.at(index)) from None
        finally:
            tss.wipe(index_auth)
        buffer = tss.new("TPM2B_MAX_NV_BUFFER *")
        tss.fill_tpm2b(buffer, secret.data)
        try:
            # the salted session's DECRYPT flag encrypts the key on its way to the TPM
            with self._salted_session(lib.TPM2_SE_HMAC) as session:
                self._esys.call("NV_Write", lib.ESYS_TR_RH_OWNER, handle[0], session, tss.NONE, tss.NONE, buffer, 0)
            self._esys.call("NV_WriteLock", lib.ESYS_TR_RH_OWNER, handle[0], tss.PASSWORD, tss.NONE, tss.NONE)
        except TssError as exc:
            self.nv_undefine(index)
            raise errors.tpm_error(exc, errors.NV_WRITE.at(index)) from None
        finally:
            tss.wipe(buffer)
            self._esys.tr_close(handle[0])

    def nv_read(self, index: int, plan: PolicyPlan, pinned_srk: bytes | None,
                auth: Secret | None = None) -> Secret:
        """Read the key in `index` over a policy session (the branch `plan`) salted with the SRK
        named `pinned_srk` (None: the SRK selected now; adopt only)."""
        if pinned_srk is not None:
            self.check_srk(pinned_srk)
        found = self._nv_lookup(index, errors.NV_READ)
        if found is None:
            raise CorruptError(f"NV index 0x{index:08x} does not exist in this TPM")
        handle, nv_public = found
        try:
            with self._pinned_policy_session(pinned_srk) as session:
                self._run_plan(session, plan, handle, auth)
                data = tss.new("TPM2B_MAX_NV_BUFFER **")
                self._esys.call("NV_Read", handle, handle, session, tss.NONE, tss.NONE,
                                nv_public.dataSize, 0, data)
            return take_secret(data[0])
        except TssError as exc:
            raise errors.tpm_error(exc, errors.NV_READ.at(index), with_pin=auth is not None) from None
        finally:
            self._esys.tr_close(handle)

    def nv_undefine(self, index: int) -> bool:
        """Undefine `index`; False if it did not exist."""
        found = self._nv_lookup(index, errors.NV_UNDEFINE)
        if found is None:
            return False
        handle, _ = found
        try:
            self._esys.call("NV_UndefineSpace", lib.ESYS_TR_RH_OWNER, handle, tss.PASSWORD, tss.NONE, tss.NONE)
        except TssError as exc:
            self._esys.tr_close(handle)
            raise errors.tpm_error(exc, errors.NV_UNDEFINE.at(index)) from None
        return True

    def counter_define(self, index: int) -> None:
        """Define our NV counter at `index` and increment it once (a counter reads only once written)."""
        public = tss.new("TPM2B_NV_PUBLIC *")
        public.nvPublic.nvIndex = index
        public.nvPublic.nameAlg = lib.TPM2_ALG_SHA256
        public.nvPublic.attributes = OUR_COUNTER_ATTRIBUTES
        public.nvPublic.dataSize = 8
        handle = tss.new("ESYS_TR *")
        try:
            self._esys.call("NV_DefineSpace", lib.ESYS_TR_RH_OWNER, tss.PASSWORD, tss.NONE, tss.NONE,
                            tss.new("TPM2B_AUTH *"), public, handle)
        except TssError as exc:
            raise errors.tpm_error(exc, errors.NV_DEFINE.at(index)) from None
        self._esys.tr_close(handle[0])
        self.counter_increment(index)

    def is_our_counter(self, index: int) -> bool:
        """`index` is a counter with our attributes (written or not): one we may use, and remove."""
        info = self.nv_info(index)
        return info is not None and info.size == 8 and info.attributes & ~lib.TPMA_NV_WRITTEN == OUR_COUNTER_ATTRIBUTES

    def _counter(self, index: int, op: errors.Operation) -> int:
        try:
            handles, _ = self._handles(index, 1)
            if index not in handles:
                raise CorruptError(f"NV counter 0x{index:08x} does not exist in this TPM")
            return self._from_tpm_public(index)
        except TssError as exc:
            raise errors.tpm_error(exc, op.at(index)) from None

    def counter_read(self, index: int) -> int:
        handle = self._counter(index, errors.COUNTER_READ)
        data = tss.new("TPM2B_MAX_NV_BUFFER **")
        try:
            self._esys.call("NV_Read", handle, handle, tss.PASSWORD, tss.NONE, tss.NONE, 8, 0, data)
            try:
                return int.from_bytes(tss.tpm2b_bytes(data[0]), "big")
            finally:
                tss.free(data[0])
        except TssError as exc:
            raise errors.tpm_error(exc, errors.COUNTER_READ.at(index)) from None
        finally:
            self._esys.tr_close(handle)

    def counter_increment(self, index: int) -> None:
        handle = self._counter(index, errors.COUNTER_INCREMENT)
        try:
            self._esys.call("NV_Increment", handle, handle, tss.PASSWORD, tss.NONE, tss.NONE)
        except TssError as exc:
            raise errors.tpm_error(exc, errors.COUNTER_INCREMENT.at(index)) from None
        finally:
            self._esys.tr_close(handle)

    def nv_name(self, index: int) -> bytes:
        """The NV index's name (its public area's digest): what PolicyNV binds."""
        handle = self._counter(index, errors.NV_LOOKUP)
        try:
            return self._esys.name(handle)
        except TssError as exc:
            raise errors.tpm_error(exc, errors.NV_LOOKUP.at(index)) from None
        finally:
            self._esys.tr_close(handle)

    def free_nv_index(self, start: int) -> int:
        """The first index from `start` on (within 256) that is not defined: one capability query."""
        defined: set[int] = set()
        try:
            first, more = start, True
            while more and first < start + 256:
                handles, more = self._handles(first, start + 256 - first)
                if not handles:
                    break
                defined.update(handles)
                first = max(handles) + 1
        except TssError as exc:
            raise errors.tpm_error(exc, errors.NV_LIST.at(start)) from None
        for index in range(start, start + 256):
            if index not in defined:
                return index
        raise UsageError(f"no free NV index near 0x{start:08x}")
