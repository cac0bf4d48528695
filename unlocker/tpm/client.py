"""Everything we ask of a TPM: connect, SRK, seal/unseal, NV, PCRs, sessions (ESAPI through tss.py).

Every transient handle is flushed (swtpm and /dev/tpm0 have no resource manager). Every unseal and
NV read runs over a policy session salted with the SRK and with parameter encryption, so the secret
never crosses the TPM bus in clear. TPM errors become the exceptions of errors.py.
"""

from __future__ import annotations

import os

# tpm2-tss logs every TPM error on stderr; we report our own one line instead.
os.environ.setdefault("TSS2_LOG", "all+NONE")

from unlocker import TYPE_CHECKING
from unlocker.errors import CorruptError, LockoutError, NoTpmError, PolicyError, UsageError
from unlocker.lean.record import record
from unlocker.log import trace
from unlocker.secret import Secret
from unlocker.tpm import tss
from unlocker.tpm.node import ACPI_TPM2_TABLE, DEVICE_NODES, wait_for_node
from unlocker.tpm.policy import BANKS, PcrSelection
from unlocker.tpm.tss import TssError, lib

if TYPE_CHECKING:
    from unlocker.tpm.tss import CData

SRK_PERSISTENT_HANDLE = 0x81000001
MAX_SEALED = 128  # TPM2B_SENSITIVE_DATA limit
DEFAULT_NV_INDEX = 0x01500016
_TCTI_LAYER_MASK = 0xFFFF0000
_TCTI_LAYER = 0x000A0000


def resolve_tcti(explicit: str | None, wait: float = 0) -> str:
    """--tcti, else TPM2_UNLOCKER_TCTI, else TPM2TOOLS_TCTI, else the kernel's resource manager.

    With `wait`, give a TPM the firmware announces that many seconds to get its device node.
    """
    for value in (explicit, os.environ.get("TPM2_UNLOCKER_TCTI"), os.environ.get("TPM2TOOLS_TCTI")):
        if value:
            return value
    node = wait_for_node(DEVICE_NODES, wait, ACPI_TPM2_TABLE,
                         on_wait=lambda: trace("the firmware has a TPM 2.0; waiting for its device node"))
    if node is None:
        raise NoTpmError("no TPM found (no /dev/tpmrm0 or /dev/tpm0; set --tcti for a simulator)")
    return f"device:{node}"


@record(frozen=True)
class TpmInfo:
    """What `status` reports about the TPM."""

    manufacturer: str
    banks: list[str]
    lockout_counter: int
    max_tries: int
    in_lockout: bool


@record
class SealedObject:
    """A sealed key as TPM2B_PUBLIC + TPM2B_PRIVATE, marshalled (what tpm2_create writes)."""

    public: bytes
    private: bytes


@record(frozen=True)
class NvInfo:
    """An NV index as the TPM reports it: size, attributes, policy digest, whether it has noDA."""

    index: int
    size: int
    attributes: int
    auth_policy: bytes
    no_da: bool


# tpm2-tools' tpm2_createprimary default: fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|
# restricted|decrypt
_TPM2_TOOLS_PRIMARY_ATTRS = (lib.TPMA_OBJECT_FIXEDTPM | lib.TPMA_OBJECT_FIXEDPARENT
                             | lib.TPMA_OBJECT_SENSITIVEDATAORIGIN | lib.TPMA_OBJECT_USERWITHAUTH
                             | lib.TPMA_OBJECT_RESTRICTED | lib.TPMA_OBJECT_DECRYPT)
# Our SRK: the ECC P-256 storage primary of `tpm2_createprimary -C o -G ecc`, plus noDA (as the TCG
# provisioning guidance and systemd have it). Without noDA every use of the SRK marks the boot as
# DA-relevant, and each power cut then counts towards lockout: measured, lockout on the 4th cut.
# The other: tpm2-tools' own (no noDA), the parent of objects made by the ArchWiki recipe.
SRK_TEMPLATES = {"tcg": _TPM2_TOOLS_PRIMARY_ATTRS | lib.TPMA_OBJECT_NODA, "tpm2-tools": _TPM2_TOOLS_PRIMARY_ATTRS}
_SEAL_ATTRS = lib.TPMA_OBJECT_FIXEDTPM | lib.TPMA_OBJECT_FIXEDPARENT | lib.TPMA_OBJECT_NODA


def srk_template(kind: str) -> CData:
    """TPM2B_PUBLIC of an ECC P-256 storage key with AES-128-CFB, as tpm2-tools' "ecc256:aes128cfb"."""
    public = tss.new("TPM2B_PUBLIC *")
    area = public.publicArea
    area.type = lib.TPM2_ALG_ECC
    area.nameAlg = lib.TPM2_ALG_SHA256
    area.objectAttributes = SRK_TEMPLATES[kind]
    ecc = area.parameters.eccDetail
    ecc.symmetric.algorithm = lib.TPM2_ALG_AES
    ecc.symmetric.keyBits.aes = 128
    ecc.symmetric.mode.aes = lib.TPM2_ALG_CFB
    ecc.scheme.scheme = lib.TPM2_ALG_NULL
    ecc.curveID = lib.TPM2_ECC_NIST_P256
    ecc.kdf.scheme = lib.TPM2_ALG_NULL
    return public


def _pcr_selection(selection: PcrSelection) -> CData:
    """TPML_PCR_SELECTION of one bank (three select bytes: PCRs 0-23)."""
    tpml = tss.new("TPML_PCR_SELECTION *")
    tpml.count = 1
    tpml.pcrSelections[0].hash = BANKS[selection.bank][0]
    tpml.pcrSelections[0].sizeofSelect = 3
    for p in selection.pcrs:
        tpml.pcrSelections[0].pcrSelect[p // 8] |= 1 << (p % 8)
    return tpml


def _tpm_error(exc: TssError, doing: str) -> Exception:
    """Turn a TSS2 error into ours, with one line saying what failed."""
    rc = exc.rc
    if rc & _TCTI_LAYER_MASK == _TCTI_LAYER:
        return NoTpmError(f"the TPM stopped answering while {doing} ({exc})")
    base = exc.error or rc
    if base == lib.TPM2_RC_LOCKOUT:
        return LockoutError("the TPM is in dictionary-attack lockout",
                            hint="it recovers by itself after its recovery time; "
                                 "tpm2_dictionarylockout --clear-lockout resets it")
    if base in (lib.TPM2_RC_POLICY_FAIL, lib.TPM2_RC_PCR_CHANGED, lib.TPM2_RC_VALUE) \
            and doing.startswith(("unsealing", "reading NV")):
        return PolicyError(f"the PCR policy is not satisfied while {doing}")
    if base in (lib.TPM2_RC_AUTH_FAIL, lib.TPM2_RC_BAD_AUTH):
        return PolicyError(f"the TPM refused the authorisation while {doing}")
    if base in (lib.TPM2_RC_INTEGRITY, lib.TPM2_RC_BINDING, lib.TPM2_RC_SIZE, lib.TPM2_RC_INSUFFICIENT,
                lib.TPM2_RC_KEY, lib.TPM2_RC_TYPE, lib.TPM2_RC_ATTRIBUTES, lib.TPM2_RC_HASH,
                lib.TPM2_RC_SYMMETRIC, lib.TPM2_RC_SCHEME):
        return CorruptError(f"the sealed object is damaged or not ours ({exc}) while {doing}")
    if base == lib.TPM2_RC_HANDLE and doing.startswith("reading NV"):
        return CorruptError(f"the NV index does not exist while {doing}")
    if base == lib.TPM2_RC_NV_DEFINED:
        return UsageError(f"the NV index is already defined while {doing}")
    return NoTpmError(f"the TPM refused {doing}: {exc}")


class _Session:
    """A session handle for a `with` block, flushed from the TPM at its end. (Context managers here
    are classes, not @contextmanager: contextlib is not imported on the boot path, README.)"""

    def __init__(self, esys: tss.Esys, session: int) -> None:
        self._esys, self._session = esys, session

    def __enter__(self) -> int:
        return self._session

    def __exit__(self, *exc_info: object) -> None:
        self._esys.flush(self._session)


class _Capability:
    """TPM2_GetCapability's answer for a `with` block: (TPMU_CAPABILITIES, more?), freed at its end."""

    def __init__(self, esys: tss.Esys, capability: int, first: int, count: int) -> None:
        self._esys, self._query = esys, (capability, first, count)
        self._data: CData = None

    def __enter__(self) -> tuple[CData, bool]:
        more = tss.new("TPMI_YES_NO *")
        self._data = tss.new("TPMS_CAPABILITY_DATA **")
        self._esys.call("GetCapability", tss.NONE, tss.NONE, tss.NONE, *self._query, more, self._data)
        return self._data[0].data, bool(more[0])

    def __exit__(self, *exc_info: object) -> None:
        tss.free(self._data[0])


class Tpm:
    """An open connection to one TPM. Use as a context manager."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        try:
            self._esys = tss.Esys(tcti)
        except TssError as exc:
            raise NoTpmError(f"cannot reach the TPM at '{tcti}' ({exc})") from None
        self._srk: int | None = None
        self._srk_transient = False
        self._srk_for_sealing = False
        self._srk_name = b""
        self._spare_policy_session: int | None = None

    def __enter__(self) -> Tpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._spare_policy_session is not None:
            self._esys.flush(self._spare_policy_session)
            self._spare_policy_session = None
        if self._srk is not None and self._srk_transient:
            self._esys.flush(self._srk)
        self._srk = None
        self._esys.close()

    # --- SRK and sessions -----------------------------------------------------------------------
    def _set_srk(self, handle: int, transient: bool, for_sealing: bool) -> None:
        if self._srk is not None and self._srk_transient:
            self._esys.flush(self._srk)
        self._srk, self._srk_transient, self._srk_for_sealing = handle, transient, for_sealing
        self._srk_name = self._esys.name(handle)

    def _current_srk(self) -> int:
        """The SRK selected last (by check_srk for an unseal), else the sealing one."""
        return self._srk if self._srk is not None else self.srk()

    def _capability(self, capability: int, first: int, count: int) -> _Capability:
        """TPM2_GetCapability: `with` it for the TPMU_CAPABILITIES (valid inside the block) and
        whether there is more."""
        return _Capability(self._esys, capability, first, count)

    def _handles(self, first: int, count: int) -> tuple[list[int], bool]:
        """Handles from `first` on (at most `count`), and whether the TPM has more."""
        with self._capability(lib.TPM2_CAP_HANDLES, first, count) as (data, more):
            return [data.handles.handle[i] for i in range(data.handles.count)], more

    def _from_tpm_public(self, handle: int) -> int:
        out = tss.new("ESYS_TR *")
        self._esys.call("TR_FromTPMPublic", handle, tss.NONE, tss.NONE, tss.NONE, out)
        return out[0]

    def _persistent_srk(self) -> tuple[int, bool] | None:
        """0x81000001 if present, with whether it has noDA."""
        handles, _ = self._handles(SRK_PERSISTENT_HANDLE, 1)
        if SRK_PERSISTENT_HANDLE not in handles:
            return None
        handle = self._from_tpm_public(SRK_PERSISTENT_HANDLE)
        public = tss.new("TPM2B_PUBLIC **")
        self._esys.call("ReadPublic", handle, tss.NONE, tss.NONE, tss.NONE, public, tss.ffi.NULL, tss.ffi.NULL)
        try:
            return handle, bool(public[0].publicArea.objectAttributes & lib.TPMA_OBJECT_NODA)
        finally:
            tss.free(public[0])

    def _create_srk(self, kind: str) -> int:
        out = tss.new("ESYS_TR *")
        self._esys.call("CreatePrimary", lib.ESYS_TR_RH_OWNER, tss.PASSWORD, tss.NONE, tss.NONE,
                        tss.new("TPM2B_SENSITIVE_CREATE *"), srk_template(kind), tss.new("TPM2B_DATA *"),
                        tss.new("TPML_PCR_SELECTION *"), out, tss.ffi.NULL, tss.ffi.NULL, tss.ffi.NULL,
                        tss.ffi.NULL)
        return out[0]

    def srk(self) -> int:
        """The SRK new keys are sealed under: 0x81000001 when present and noDA, else our noDA primary."""
        if self._srk is not None and self._srk_for_sealing:
            return self._srk
        try:
            persistent = self._persistent_srk()
            if persistent is not None and persistent[1]:
                self._set_srk(persistent[0], transient=False, for_sealing=True)
            else:
                self._set_srk(self._create_srk("tcg"), transient=True, for_sealing=True)
        except TssError as exc:
            raise _tpm_error(exc, "creating the storage root key") from None
        return self._srk  # type: ignore[return-value]

    def srk_name(self) -> bytes:
        """Name of the SRK new keys are sealed under."""
        self.srk()
        return self._srk_name

    def current_srk_name(self) -> bytes:
        """Name of the SRK selected last (the parent of what was just loaded)."""
        self._current_srk()
        return self._srk_name

    def check_srk(self, expected: bytes) -> None:
        """Select the SRK a key was sealed under, by its name; refuse a TPM that has none such.

        Tried in order: the one already selected, 0x81000001, our noDA primary, tpm2-tools' primary
        (adopted objects). A swapped or cleared TPM derives other keys and is refused.
        """
        try:
            if self._srk is not None and self._srk_name == expected:
                return
            persistent = self._persistent_srk()
            if persistent is not None and self._esys.name(persistent[0]) == expected:
                self._set_srk(persistent[0], transient=False, for_sealing=persistent[1])
                return
            for kind in SRK_TEMPLATES:
                self._set_srk(self._create_srk(kind), transient=True, for_sealing=kind == "tcg")
                if self._srk_name == expected:
                    return
        except TssError as exc:
            raise _tpm_error(exc, "creating the storage root key") from None
        raise NoTpmError("this TPM's storage root key is not the one the key was sealed under "
                         "(a different or cleared TPM)")

    def use_tpm2_tools_srk(self) -> None:
        """Select tpm2-tools' default primary, the parent of objects made by the ArchWiki recipe."""
        try:
            self._set_srk(self._create_srk("tpm2-tools"), transient=True, for_sealing=False)
        except TssError as exc:
            raise _tpm_error(exc, "creating the storage root key") from None

    def _start_session(self, session_type: int, salted: bool) -> int:
        """A session (salted with the SRK: encrypting the first command and response parameter)."""
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
                raise _tpm_error(exc, "starting a session") from None

    def _salted_session(self, session_type: int) -> _Session:
        """`with` it for a salted session (the spare policy session when one is ready), flushed after."""
        if session_type == lib.TPM2_SE_POLICY and self._spare_policy_session is not None:
            session, self._spare_policy_session = self._spare_policy_session, None
        else:
            session = self._start_session(session_type, salted=True)
        return _Session(self._esys, session)

    def _policy_pcr(self, session: int, selection: PcrSelection) -> None:
        self._esys.call("PolicyPCR", session, tss.NONE, tss.NONE, tss.NONE, tss.new("TPM2B_DIGEST *"),
                        _pcr_selection(selection))

    # --- PCRs and facts ---------------------------------------------------------------------------
    def read_pcrs(self, selection: PcrSelection) -> dict[int, bytes]:
        """Current values of the selected PCRs (the TPM returns at most 8 per call)."""
        values: dict[int, bytes] = {}
        try:
            for start in range(0, len(selection.pcrs), 8):
                chunk = PcrSelection(selection.bank, selection.pcrs[start:start + 8])
                sel_out = tss.new("TPML_PCR_SELECTION **")
                digests = tss.new("TPML_DIGEST **")
                self._esys.call("PCR_Read", tss.NONE, tss.NONE, tss.NONE, _pcr_selection(chunk), tss.ffi.NULL,
                                sel_out, digests)
                try:
                    out = sel_out[0]
                    returned = [p for p in chunk.pcrs
                                if out.count and out.pcrSelections[0].pcrSelect[p // 8] & (1 << (p % 8))]
                    if len(returned) != len(chunk.pcrs) or digests[0].count != len(returned):
                        raise UsageError(f"the TPM has no active {selection.bank} PCR bank")
                    for i, p in enumerate(returned):
                        values[p] = tss.tpm2b_bytes(digests[0].digests[i])
                finally:
                    tss.free(sel_out[0])
                    tss.free(digests[0])
        except TssError as exc:
            raise _tpm_error(exc, "reading PCRs") from None
        return values

    def _properties(self, first: int, count: int) -> dict[int, int]:
        with self._capability(lib.TPM2_CAP_TPM_PROPERTIES, first, count) as (data, _):
            props = data.tpmProperties
            return {props.tpmProperty[i].property: props.tpmProperty[i].value for i in range(props.count)}

    def _active_banks(self) -> list[int]:
        """Hash algorithms of the PCR banks that have at least one PCR allocated."""
        with self._capability(lib.TPM2_CAP_PCRS, 0, 16) as (data, _):
            selections = [data.assignedPCR.pcrSelections[i] for i in range(data.assignedPCR.count)]
            return [s.hash for s in selections if any(s.pcrSelect[j] for j in range(s.sizeofSelect))]

    def info(self) -> TpmInfo:
        try:
            props = self._properties(lib.TPM2_PT_MANUFACTURER, 1)
            props.update(self._properties(lib.TPM2_PT_PERMANENT, 64))
            algs = self._active_banks()
        except TssError as exc:
            raise _tpm_error(exc, "reading TPM properties") from None
        names = {alg: name for name, (alg, _) in BANKS.items()}
        manufacturer = props.get(lib.TPM2_PT_MANUFACTURER, 0).to_bytes(4, "big")
        permanent = props.get(lib.TPM2_PT_PERMANENT, 0)
        return TpmInfo(
            manufacturer=manufacturer.rstrip(b"\0").decode(errors="replace").strip(),
            banks=[names.get(alg, hex(alg)) for alg in algs],
            lockout_counter=props.get(lib.TPM2_PT_LOCKOUT_COUNTER, 0),
            max_tries=props.get(lib.TPM2_PT_MAX_AUTH_FAIL, 0),
            in_lockout=bool(permanent & (1 << 9)),
        )

    def trial_policy_pcr(self, selection: PcrSelection, with_pin: bool = False) -> bytes:
        """The TPM's own PolicyPCR digest for the current values (tests compare policy.py to it)."""
        session = self._start_session(lib.TPM2_SE_TRIAL, salted=False)
        try:
            self._policy_pcr(session, selection)
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

    # --- sealed objects ---------------------------------------------------------------------------
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
            raise _tpm_error(exc, "sealing the key") from None
        finally:
            tss.wipe(sensitive.sensitive.data)

    def unseal(self, sealed: SealedObject, selection: PcrSelection) -> Secret:
        """Load and unseal over a salted, encrypted PolicyPCR session."""
        public, private = _unmarshal_sealed(sealed)
        loaded = tss.new("ESYS_TR *")
        try:
            self._esys.call("Load", self._current_srk(), tss.PASSWORD, tss.NONE, tss.NONE, private, public, loaded)
        except TssError as exc:
            raise _tpm_error(exc, "loading the sealed object") from None
        try:
            with self._salted_session(lib.TPM2_SE_POLICY) as session:
                self._policy_pcr(session, selection)
                data = tss.new("TPM2B_SENSITIVE_DATA **")
                self._esys.call("Unseal", loaded[0], session, tss.NONE, tss.NONE, data)
            return _take_secret(data[0])
        except TssError as exc:
            raise _tpm_error(exc, "unsealing") from None
        finally:
            self._esys.flush(loaded[0])

    # --- NV indexes -------------------------------------------------------------------------------
    def _nv_lookup(self, index: int) -> tuple[int, CData] | None:
        """The ESYS handle (the caller closes it) and TPMS_NV_PUBLIC of `index`; None when undefined."""
        try:
            handles, _ = self._handles(index, 1)
            if index not in handles:
                return None
            handle = self._from_tpm_public(index)
        except TssError as exc:
            raise _tpm_error(exc, f"reading NV index 0x{index:08x}") from None
        public = tss.new("TPM2B_NV_PUBLIC **")
        try:
            self._esys.call("NV_ReadPublic", handle, tss.NONE, tss.NONE, tss.NONE, public, tss.ffi.NULL)
        except TssError as exc:
            self._esys.tr_close(handle)
            raise _tpm_error(exc, f"reading NV index 0x{index:08x}") from None
        nv_public = tss.new("TPMS_NV_PUBLIC *", public[0].nvPublic)
        tss.free(public[0])
        return handle, nv_public

    def nv_info(self, index: int) -> NvInfo | None:
        found = self._nv_lookup(index)
        if found is None:
            return None
        handle, nv_public = found
        self._esys.tr_close(handle)
        attrs = nv_public.attributes
        return NvInfo(index=index, size=nv_public.dataSize,
                      attributes=attrs, auth_policy=tss.tpm2b_bytes(nv_public.authPolicy),
                      no_da=bool(attrs & lib.TPMA_NV_NO_DA))

    def nv_define_and_write(self, index: int, secret: Secret, policy: bytes) -> None:
        """Define `index` (policyread|authwrite|no_da, like the seed's tpm2_nvdefine plus noDA) and write."""
        if self.nv_info(index) is not None:
            raise UsageError(f"NV index 0x{index:08x} is already defined (choose another with --store nv=INDEX)")
        public = tss.new("TPM2B_NV_PUBLIC *")
        public.nvPublic.nvIndex = index
        public.nvPublic.nameAlg = lib.TPM2_ALG_SHA256
        public.nvPublic.attributes = lib.TPMA_NV_POLICYREAD | lib.TPMA_NV_AUTHWRITE | lib.TPMA_NV_NO_DA
        tss.fill_tpm2b(public.nvPublic.authPolicy, policy)
        public.nvPublic.dataSize = len(secret)
        handle = tss.new("ESYS_TR *")
        try:
            self._esys.call("NV_DefineSpace", lib.ESYS_TR_RH_OWNER, tss.PASSWORD, tss.NONE, tss.NONE,
                            tss.new("TPM2B_AUTH *"), public, handle)
        except TssError as exc:
            raise _tpm_error(exc, f"defining NV index 0x{index:08x}") from None
        buffer = tss.new("TPM2B_MAX_NV_BUFFER *")
        tss.fill_tpm2b(buffer, secret.data)
        try:
            with self._salted_session(lib.TPM2_SE_HMAC) as session:
                self._esys.call("NV_Write", handle[0], handle[0], session, tss.NONE, tss.NONE, buffer, 0)
        except TssError as exc:
            self.nv_undefine(index)
            raise _tpm_error(exc, f"writing NV index 0x{index:08x}") from None
        finally:
            tss.wipe(buffer)
            self._esys.tr_close(handle[0])

    def nv_read(self, index: int, selection: PcrSelection) -> Secret:
        found = self._nv_lookup(index)
        if found is None:
            raise CorruptError(f"NV index 0x{index:08x} does not exist in this TPM")
        handle, nv_public = found
        try:
            with self._salted_session(lib.TPM2_SE_POLICY) as session:
                self._policy_pcr(session, selection)
                data = tss.new("TPM2B_MAX_NV_BUFFER **")
                self._esys.call("NV_Read", handle, handle, session, tss.NONE, tss.NONE,
                                nv_public.dataSize, 0, data)
            return _take_secret(data[0])
        except TssError as exc:
            raise _tpm_error(exc, f"reading NV index 0x{index:08x}") from None
        finally:
            self._esys.tr_close(handle)

    def nv_undefine(self, index: int) -> bool:
        """Undefine `index`; False if it did not exist."""
        found = self._nv_lookup(index)
        if found is None:
            return False
        handle, _ = found
        try:
            self._esys.call("NV_UndefineSpace", lib.ESYS_TR_RH_OWNER, handle, tss.PASSWORD, tss.NONE, tss.NONE)
        except TssError as exc:
            self._esys.tr_close(handle)
            raise _tpm_error(exc, f"removing NV index 0x{index:08x}") from None
        return True

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
            raise _tpm_error(exc, f"listing NV indexes from 0x{start:08x}") from None
        for index in range(start, start + 256):
            if index not in defined:
                return index
        raise UsageError(f"no free NV index near 0x{start:08x}")


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


def _take_secret(pointer: CData) -> Secret:
    """Copy what the ESAPI returned into a Secret; zero and free its buffer."""
    try:
        return Secret(tss.secret_bytes(pointer))
    finally:
        tss.free(pointer, secret=True)


def sealed_auth_policy(sealed: SealedObject) -> bytes:
    """The authPolicy digest in a sealed object's public area (empty when it has none)."""
    public, _ = _unmarshal_sealed(sealed)
    return tss.tpm2b_bytes(public.publicArea.authPolicy)
