"""The only importer of tpm2_pytss: connect, SRK, seal/unseal, NV, PCRs, sessions.

Every transient handle is flushed (swtpm and /dev/tpm0 have no resource manager). Every unseal and
NV read runs over a policy session salted with the SRK and with parameter encryption, so the secret
never crosses the TPM bus in clear. TPM errors become the exceptions of errors.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# tpm2-tss logs every TPM error on stderr; we report our own one line instead.
os.environ.setdefault("TSS2_LOG", "all+NONE")

from typing import Self

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_PT,
    TPM2_RC,
    TPM2_SE,
    TPMA_NV,
    TPMA_OBJECT,
    TPMA_SESSION,
)
from tpm2_pytss.types import (
    TPM2B_AUTH,
    TPM2B_DIGEST,
    TPM2B_MAX_NV_BUFFER,
    TPM2B_NV_PUBLIC,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPML_PCR_SELECTION,
    TPMS_NV_PUBLIC,
    TPMS_SENSITIVE_CREATE,
    TPMT_PUBLIC,
    TPMT_SYM_DEF,
)

from .errors import CorruptError, LockoutError, NoTpmError, PolicyError, UsageError
from .log import trace
from .policy import PcrSelection
from .secret import Secret

SRK_PERSISTENT_HANDLE = 0x81000001
MAX_SEALED = 128  # TPM2B_SENSITIVE_DATA limit
DEFAULT_NV_INDEX = 0x01500016
_TCTI_LAYER_MASK = 0xFFFF0000
_TCTI_LAYER = 0x000A0000


# The firmware's ACPI table for a TPM 2.0: when present, a missing /dev/tpmrm0 only means its driver
# has not loaded yet (udev's coldplug is still running beside us at boot).
ACPI_TPM2_TABLE = "/sys/firmware/acpi/tables/TPM2"
DEVICE_NODES = ("/dev/tpmrm0", "/dev/tpm0")


def resolve_tcti(explicit: str | None, wait: float = 0) -> str:
    """--tcti, else TPM2_UNLOCKER_TCTI, else TPM2TOOLS_TCTI, else the kernel's resource manager.

    With `wait`, give a TPM the firmware announces that many seconds to get its device node.
    """
    for value in (explicit, os.environ.get("TPM2_UNLOCKER_TCTI"), os.environ.get("TPM2TOOLS_TCTI")):
        if value:
            return value
    deadline = time.monotonic() + wait
    waited = False
    while True:
        for dev in DEVICE_NODES:
            if os.path.exists(dev):
                return f"device:{dev}"
        if time.monotonic() >= deadline or not os.path.exists(ACPI_TPM2_TABLE):
            break
        if not waited:
            trace("the firmware has a TPM 2.0; waiting for its device node")
            waited = True
        time.sleep(0.05)
    raise NoTpmError("no TPM found (no /dev/tpmrm0 or /dev/tpm0; set --tcti for a simulator)")


@dataclass(frozen=True)
class TpmInfo:
    manufacturer: str
    banks: list[str]
    lockout_counter: int
    max_tries: int
    in_lockout: bool


@dataclass
class SealedObject:
    public: bytes
    private: bytes


@dataclass(frozen=True)
class NvInfo:
    index: int
    size: int
    attributes: int
    auth_policy: bytes
    no_da: bool


# Our SRK: the ECC P-256 storage primary of `tpm2_createprimary -C o -G ecc`, plus noDA (as the TCG
# provisioning guidance and systemd have it). Without noDA every use of the SRK marks the boot as
# DA-relevant, and each power cut then counts towards lockout: measured, lockout on the 4th cut.
SRK_TCG_ATTRS = TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS | TPMA_OBJECT.NODA
# tpm2-tools' default template (no noDA): the parent of objects made by the ArchWiki recipe.
SRK_TPM2_TOOLS_ATTRS = TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS
SRK_TEMPLATES = {"tcg": SRK_TCG_ATTRS, "tpm2-tools": SRK_TPM2_TOOLS_ATTRS}


def _srk_template(kind: str) -> TPM2B_PUBLIC:
    return TPM2B_PUBLIC.parse("ecc256:aes128cfb", objectAttributes=SRK_TEMPLATES[kind])


def _tpm_error(exc: TSS2_Exception, doing: str) -> Exception:
    """Turn a TSS2 error into ours, with one line saying what failed."""
    rc = int(exc.rc)
    if rc & _TCTI_LAYER_MASK == _TCTI_LAYER:
        return NoTpmError(f"the TPM stopped answering while {doing} ({exc})")
    base = int(exc.error) if exc.error else rc
    if base == TPM2_RC.LOCKOUT:
        return LockoutError("the TPM is in dictionary-attack lockout",
                            hint="it recovers by itself after its recovery time; "
                                 "tpm2_dictionarylockout --clear-lockout resets it")
    if base in (TPM2_RC.POLICY_FAIL, TPM2_RC.PCR_CHANGED, TPM2_RC.VALUE) and doing.startswith(("unsealing", "reading NV")):
        return PolicyError(f"the PCR policy is not satisfied while {doing}")
    if base in (TPM2_RC.AUTH_FAIL, TPM2_RC.BAD_AUTH):
        return PolicyError(f"the TPM refused the authorisation while {doing}")
    if base in (TPM2_RC.INTEGRITY, TPM2_RC.BINDING, TPM2_RC.SIZE, TPM2_RC.INSUFFICIENT, TPM2_RC.KEY, TPM2_RC.TYPE,
                TPM2_RC.ATTRIBUTES, TPM2_RC.HASH, TPM2_RC.SYMMETRIC, TPM2_RC.SCHEME):
        return CorruptError(f"the sealed object is damaged or not ours ({exc}) while {doing}")
    if base == TPM2_RC.HANDLE and doing.startswith("reading NV"):
        return CorruptError(f"the NV index does not exist while {doing}")
    if base == TPM2_RC.NV_DEFINED:
        return UsageError(f"the NV index is already defined while {doing}")
    return NoTpmError(f"the TPM refused {doing}: {exc}")


class Tpm:
    """An open connection to one TPM. Use as a context manager."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        try:
            self._esys = ESAPI(tcti)
        except TSS2_Exception as exc:
            raise NoTpmError(f"cannot reach the TPM at '{tcti}' ({exc})") from None
        except Exception as exc:  # TCTI loader errors surface as plain exceptions in some versions
            raise NoTpmError(f"cannot reach the TPM at '{tcti}' ({exc})") from None
        self._srk: ESYS_TR | None = None
        self._srk_transient = False
        self._srk_for_sealing = False
        self._srk_name = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._srk is not None and self._srk_transient:
            self._flush(self._srk)
        self._srk = None
        try:
            self._esys.close()
        except Exception:
            pass

    def _flush(self, handle: ESYS_TR) -> None:
        try:
            self._esys.flush_context(handle)
        except TSS2_Exception:
            pass

    # --- SRK and sessions -----------------------------------------------------------------------
    def _set_srk(self, handle: ESYS_TR, transient: bool, for_sealing: bool) -> None:
        if self._srk is not None and self._srk_transient:
            self._flush(self._srk)
        self._srk, self._srk_transient, self._srk_for_sealing = handle, transient, for_sealing
        self._srk_name = bytes(self._esys.tr_get_name(handle))

    def _current_srk(self) -> ESYS_TR:
        """The SRK selected last (by check_srk for an unseal), else the sealing one."""
        return self._srk if self._srk is not None else self.srk()

    def _persistent_srk(self) -> tuple[ESYS_TR, bool] | None:
        """0x81000001 if present, with whether it has noDA."""
        if SRK_PERSISTENT_HANDLE not in self._persistent_handles():
            return None
        handle = self._esys.tr_from_tpmpublic(SRK_PERSISTENT_HANDLE)
        public, _, _ = self._esys.read_public(handle)
        return handle, bool(public.publicArea.objectAttributes & TPMA_OBJECT.NODA)

    def _create_srk(self, kind: str) -> ESYS_TR:
        handle, _, _, _, _ = self._esys.create_primary(TPM2B_SENSITIVE_CREATE(), _srk_template(kind), ESYS_TR.OWNER)
        return handle

    def srk(self) -> ESYS_TR:
        """The SRK new keys are sealed under: 0x81000001 when present and noDA, else our noDA primary."""
        if self._srk is not None and self._srk_for_sealing:
            return self._srk
        try:
            persistent = self._persistent_srk()
            if persistent is not None and persistent[1]:
                self._set_srk(persistent[0], transient=False, for_sealing=True)
            else:
                self._set_srk(self._create_srk("tcg"), transient=True, for_sealing=True)
        except TSS2_Exception as exc:
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
            if persistent is not None and bytes(self._esys.tr_get_name(persistent[0])) == expected:
                self._set_srk(persistent[0], transient=False, for_sealing=persistent[1])
                return
            for kind in SRK_TEMPLATES:
                self._set_srk(self._create_srk(kind), transient=True, for_sealing=kind == "tcg")
                if self._srk_name == expected:
                    return
        except TSS2_Exception as exc:
            raise _tpm_error(exc, "creating the storage root key") from None
        raise NoTpmError("this TPM's storage root key is not the one the key was sealed under "
                         "(a different or cleared TPM)")

    def use_tpm2_tools_srk(self) -> None:
        """Select tpm2-tools' default primary, the parent of objects made by the ArchWiki recipe."""
        try:
            self._set_srk(self._create_srk("tpm2-tools"), transient=True, for_sealing=False)
        except TSS2_Exception as exc:
            raise _tpm_error(exc, "creating the storage root key") from None

    def _persistent_handles(self) -> set[int]:
        _more, data = self._esys.get_capability(TPM2_CAP.HANDLES, 0x81000000, 64)
        return {int(h) for h in data.data.handles}

    @contextmanager
    def _salted_session(self, session_type: TPM2_SE) -> Iterator[ESYS_TR]:
        """A session salted with the SRK, encrypting the first command and response parameter."""
        session = self._esys.start_auth_session(
            tpm_key=self._current_srk(), bind=ESYS_TR.NONE, session_type=session_type,
            symmetric=TPMT_SYM_DEF.parse("aes128cfb"), auth_hash=TPM2_ALG.SHA256)
        try:
            self._esys.trsess_set_attributes(
                session, TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.ENCRYPT | TPMA_SESSION.DECRYPT)
            yield session
        finally:
            self._flush(session)

    def _policy_pcr(self, session: ESYS_TR, selection: PcrSelection) -> None:
        self._esys.policy_pcr(session, TPM2B_DIGEST(), TPML_PCR_SELECTION.parse(str(selection)))

    # --- PCRs and facts ---------------------------------------------------------------------------
    def read_pcrs(self, selection: PcrSelection) -> dict[int, bytes]:
        """Current values of the selected PCRs (the TPM returns at most 8 per call)."""
        values: dict[int, bytes] = {}
        try:
            for start in range(0, len(selection.pcrs), 8):
                chunk = PcrSelection(selection.bank, selection.pcrs[start:start + 8])
                _, sel_out, digests = self._esys.pcr_read(TPML_PCR_SELECTION.parse(str(chunk)))
                returned = [p for p in chunk.pcrs
                            if sel_out.count and sel_out.pcrSelections[0].pcrSelect[p // 8] & (1 << (p % 8))]
                if len(returned) != len(chunk.pcrs):
                    raise UsageError(f"the TPM has no active {selection.bank} PCR bank")
                for p, d in zip(returned, digests, strict=True):
                    values[p] = bytes(d)
        except TSS2_Exception as exc:
            raise _tpm_error(exc, "reading PCRs") from None
        return values

    def info(self) -> TpmInfo:
        try:
            _, fixed = self._esys.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.MANUFACTURER, 1)
            manufacturer = int(fixed.data.tpmProperties.tpmProperty[0].value).to_bytes(4, "big")
            _, var = self._esys.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.PERMANENT, 64)
            props = {int(p.property): int(p.value) for p in var.data.tpmProperties}
            _, pcrs = self._esys.get_capability(TPM2_CAP.PCRS, 0, 16)
        except TSS2_Exception as exc:
            raise _tpm_error(exc, "reading TPM properties") from None
        names = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}
        banks = [names.get(int(s.hash), hex(int(s.hash))) for s in pcrs.data.assignedPCR
                 if any(s.pcrSelect[i] for i in range(s.sizeofSelect))]
        permanent = props.get(int(TPM2_PT.PERMANENT), 0)
        return TpmInfo(
            manufacturer=manufacturer.rstrip(b"\0").decode(errors="replace").strip(),
            banks=banks,
            lockout_counter=props.get(int(TPM2_PT.LOCKOUT_COUNTER), 0),
            max_tries=props.get(int(TPM2_PT.MAX_AUTH_FAIL), 0),
            in_lockout=bool(permanent & (1 << 9)),
        )

    def trial_policy_pcr(self, selection: PcrSelection, with_pin: bool = False) -> bytes:
        """The TPM's own PolicyPCR digest for the current values (tests compare policy.py to it)."""
        session = self._esys.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, None, TPM2_ALG.SHA256)
        try:
            self._policy_pcr(session, selection)
            if with_pin:
                self._esys.policy_auth_value(session)
            return bytes(self._esys.policy_get_digest(session))
        finally:
            self._flush(session)

    # --- sealed objects ---------------------------------------------------------------------------
    def seal(self, secret: Secret, policy: bytes) -> SealedObject:
        """Seal `secret` under the SRK, readable only through `policy` (PolicyPCR). noDA is set."""
        if len(secret) > MAX_SEALED:
            raise UsageError(f"a sealed secret can hold at most {MAX_SEALED} bytes, this one has {len(secret)}")
        template = TPMT_PUBLIC(type=TPM2_ALG.KEYEDHASH, nameAlg=TPM2_ALG.SHA256,
                               objectAttributes=TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.NODA,
                               authPolicy=TPM2B_DIGEST(policy))
        template.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
        sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=_tpm2b_from_secret(TPM2B_SENSITIVE_DATA, secret)))
        try:
            parent = self.srk()
            # The HMAC session's DECRYPT flag encrypts inSensitive on its way to the TPM.
            with self._salted_session(TPM2_SE.HMAC) as session:
                private, public, _, _, _ = self._esys.create(parent, sensitive, TPM2B_PUBLIC(publicArea=template),
                                                             session1=session)
        except TSS2_Exception as exc:
            raise _tpm_error(exc, "sealing the key") from None
        finally:
            _wipe_cdata(sensitive.sensitive.data)
        return SealedObject(public=public.marshal(), private=private.marshal())

    def unseal(self, sealed: SealedObject, selection: PcrSelection) -> Secret:
        """Load and unseal over a salted, encrypted PolicyPCR session."""
        public, private = _unmarshal_sealed(sealed)
        try:
            obj = self._esys.load(self._current_srk(), private, public)
        except TSS2_Exception as exc:
            raise _tpm_error(exc, "loading the sealed object") from None
        try:
            with self._salted_session(TPM2_SE.POLICY) as session:
                self._policy_pcr(session, selection)
                data = self._esys.unseal(obj, session1=session)
            return _take_secret(data)
        except TSS2_Exception as exc:
            raise _tpm_error(exc, "unsealing") from None
        finally:
            self._flush(obj)

    # --- NV indexes -------------------------------------------------------------------------------
    def _nv_lookup(self, index: int) -> tuple[ESYS_TR, TPM2B_NV_PUBLIC] | None:
        """The ESYS handle (the caller closes it) and public area of `index`; None when undefined."""
        try:
            _more, data = self._esys.get_capability(TPM2_CAP.HANDLES, index, 1)
            if not data.data.handles.count or int(data.data.handles[0]) != index:
                return None
            handle = self._esys.tr_from_tpmpublic(index)
        except TSS2_Exception as exc:
            raise _tpm_error(exc, f"reading NV index 0x{index:08x}") from None
        try:
            nvpub, _ = self._esys.nv_read_public(handle)
        except TSS2_Exception as exc:
            self._esys.tr_close(handle)
            raise _tpm_error(exc, f"reading NV index 0x{index:08x}") from None
        return handle, nvpub

    def nv_info(self, index: int) -> NvInfo | None:
        found = self._nv_lookup(index)
        if found is None:
            return None
        handle, nvpub = found
        self._esys.tr_close(handle)
        attrs = int(nvpub.nvPublic.attributes)
        return NvInfo(index=index, size=int(nvpub.nvPublic.dataSize), attributes=attrs,
                      auth_policy=bytes(nvpub.nvPublic.authPolicy), no_da=bool(attrs & TPMA_NV.NO_DA))

    def nv_define_and_write(self, index: int, secret: Secret, policy: bytes) -> None:
        """Define `index` (policyread|authwrite|no_da, like the seed's tpm2_nvdefine plus noDA) and write."""
        if self.nv_info(index) is not None:
            raise UsageError(f"NV index 0x{index:08x} is already defined (choose another with --store nv=INDEX)")
        public = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(
            nvIndex=index, nameAlg=TPM2_ALG.SHA256,
            attributes=TPMA_NV.POLICYREAD | TPMA_NV.AUTHWRITE | TPMA_NV.NO_DA,
            authPolicy=TPM2B_DIGEST(policy), dataSize=len(secret)))
        try:
            handle = self._esys.nv_define_space(TPM2B_AUTH(b""), public, auth_handle=ESYS_TR.OWNER)
        except TSS2_Exception as exc:
            raise _tpm_error(exc, f"defining NV index 0x{index:08x}") from None
        buffer = _tpm2b_from_secret(TPM2B_MAX_NV_BUFFER, secret)
        try:
            with self._salted_session(TPM2_SE.HMAC) as session:
                self._esys.nv_write(handle, buffer, 0, auth_handle=handle, session1=session)
        except TSS2_Exception as exc:
            self.nv_undefine(index)
            raise _tpm_error(exc, f"writing NV index 0x{index:08x}") from None
        finally:
            _wipe_cdata(buffer)
            self._esys.tr_close(handle)

    def nv_read(self, index: int, selection: PcrSelection) -> Secret:
        found = self._nv_lookup(index)
        if found is None:
            raise CorruptError(f"NV index 0x{index:08x} does not exist in this TPM")
        handle, nvpub = found
        try:
            with self._salted_session(TPM2_SE.POLICY) as session:
                self._policy_pcr(session, selection)
                data = self._esys.nv_read(handle, int(nvpub.nvPublic.dataSize), 0, auth_handle=handle,
                                          session1=session)
            return _take_secret(data)
        except TSS2_Exception as exc:
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
            self._esys.nv_undefine_space(handle, auth_handle=ESYS_TR.OWNER)
        except TSS2_Exception as exc:
            self._esys.tr_close(handle)
            raise _tpm_error(exc, f"removing NV index 0x{index:08x}") from None
        return True

    def free_nv_index(self, start: int) -> int:
        """The first index from `start` on (within 256) that is not defined: one capability query."""
        defined: set[int] = set()
        try:
            first, more = start, True
            while more and first < start + 256:
                more, data = self._esys.get_capability(TPM2_CAP.HANDLES, first, start + 256 - first)
                handles = [int(h) for h in data.data.handles]
                if not handles:
                    break
                defined.update(handles)
                first = max(handles) + 1
        except TSS2_Exception as exc:
            raise _tpm_error(exc, f"listing NV indexes from 0x{start:08x}") from None
        for index in range(start, start + 256):
            if index not in defined:
                return index
        raise UsageError(f"no free NV index near 0x{start:08x}")


def _unmarshal_sealed(sealed: SealedObject) -> tuple[TPM2B_PUBLIC, TPM2B_PRIVATE]:
    try:
        public, used_pub = TPM2B_PUBLIC.unmarshal(sealed.public)
        private, used_priv = TPM2B_PRIVATE.unmarshal(sealed.private)
    except TSS2_Exception:
        raise CorruptError("the sealed object is truncated or malformed") from None
    if used_pub != len(sealed.public) or used_priv != len(sealed.private):
        raise CorruptError("the sealed object has trailing bytes (not a TPM2B_PUBLIC/TPM2B_PRIVATE pair)")
    if public.publicArea.type != TPM2_ALG.KEYEDHASH:
        raise CorruptError("the sealed object is not a sealed data object")
    return public, private


def validate_sealed(sealed: SealedObject) -> None:
    """Check a blob's shape without a TPM (adopt and file stores call this first)."""
    _unmarshal_sealed(sealed)


def _take_secret(tpm2b: object) -> Secret:
    """Copy a TPM2B's bytes into a Secret and zero the TPM2B."""
    from tpm2_pytss._libtpm2_pytss import ffi

    cdata = tpm2b._cdata  # type: ignore[attr-defined]
    secret = Secret(bytearray(ffi.buffer(cdata.buffer, cdata.size)))
    ffi.memmove(cdata.buffer, bytes(len(cdata.buffer)), len(cdata.buffer))
    return secret


def _wipe_cdata(tpm2b: object) -> None:
    from tpm2_pytss._libtpm2_pytss import ffi

    cdata = tpm2b._cdata  # type: ignore[attr-defined]
    ffi.memmove(cdata.buffer, bytes(len(cdata.buffer)), len(cdata.buffer))


def _tpm2b_from_secret(cls: type, secret: Secret) -> object:
    """A TPM2B filled from the secret's bytearray without an immutable bytes copy."""
    from tpm2_pytss._libtpm2_pytss import ffi

    obj = cls()
    obj._cdata.size = len(secret)  # type: ignore[attr-defined]
    ffi.memmove(obj._cdata.buffer, secret.data, len(secret))  # type: ignore[attr-defined]
    return obj


def sealed_auth_policy(sealed: SealedObject) -> bytes:
    """The authPolicy digest in a sealed object's public area (empty when it has none)."""
    public, _ = _unmarshal_sealed(sealed)
    return bytes(public.publicArea.authPolicy)
