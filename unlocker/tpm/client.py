"""The TPM client: one open connection and everything we ask of it (ESAPI through tss.py).

Built from parts with one job each: base (the ESAPI context, capability queries), srk (which
storage root key), session (salted, encrypted sessions), seal (sealed objects), nv (NV indexes);
here the PCR reads and the facts `status` shows. TPM errors become ours in errors.py, by operation.
"""

from __future__ import annotations

from unlocker.errors import UsageError
from unlocker.lean.record import record
from unlocker.tpm import errors, tss
from unlocker.tpm.base import pcr_selection
from unlocker.tpm.nv import NvStorage
from unlocker.tpm.policy import BANKS, PcrSelection
from unlocker.tpm.seal import Sealing
from unlocker.tpm.tss import TssError, lib

# TPM_PT_PERMANENT's inLockout bit (TPM 2.0 Part 2, TPMA_PERMANENT)
_IN_LOCKOUT = 1 << 9


@record(frozen=True)
class TpmInfo:
    """What `status` reports about the TPM."""

    manufacturer: str
    banks: list[str]
    lockout_counter: int
    max_tries: int
    in_lockout: bool
    # seconds after which a lockout lets one more try through (TPM2_PT_LOCKOUT_INTERVAL)
    lockout_interval: int = 0

    @property
    def tries_left(self) -> int:
        """Failed authorisations the TPM takes before it locks out (0: locked out now)."""
        return 0 if self.in_lockout else max(self.max_tries - self.lockout_counter, 0)


class Tpm(Sealing, NvStorage):
    """An open connection to one TPM. Use as a context manager."""

    def __enter__(self) -> Tpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_pcrs(self, selection: PcrSelection) -> dict[int, bytes]:
        """Current values of the selected PCRs (the TPM returns at most 8 per call)."""
        values: dict[int, bytes] = {}
        try:
            for start in range(0, len(selection.pcrs), 8):
                chunk = PcrSelection(selection.bank, selection.pcrs[start:start + 8])
                sel_out = tss.new("TPML_PCR_SELECTION **")
                digests = tss.new("TPML_DIGEST **")
                self._esys.call("PCR_Read", tss.NONE, tss.NONE, tss.NONE, pcr_selection(chunk), tss.ffi.NULL,
                                sel_out, digests)
                try:
                    out = sel_out[0]
                    bitmap = bytes(out.pcrSelections[0].pcrSelect[i] for i in range(3)) if out.count else bytes(3)
                    returned = [p for p in chunk.pcrs if p in PcrSelection.pcrs_in(bitmap)]
                    if len(returned) != len(chunk.pcrs) or digests[0].count != len(returned):
                        raise UsageError(f"the TPM has no active {selection.bank} PCR bank")
                    for i, p in enumerate(returned):
                        values[p] = tss.tpm2b_bytes(digests[0].digests[i])
                finally:
                    tss.free(sel_out[0])
                    tss.free(digests[0])
        except TssError as exc:
            raise errors.tpm_error(exc, errors.READ_PCRS) from None
        return values

    def pcr_event(self, pcr: int, event: bytes) -> None:
        """TPM2_PCR_Event: the TPM hashes `event` in every active bank and extends PCR `pcr` with it
        (one command: a bank left out would leave a policy over it unlocked)."""
        data = tss.new("TPM2B_EVENT *")
        tss.fill_tpm2b(data, event[:len(data.buffer)])
        digests = tss.new("TPML_DIGEST_VALUES **")
        try:
            if self._srk is None:
                self._esys.call("PCR_Event", lib.ESYS_TR_PCR0 + pcr, tss.PASSWORD, tss.NONE, tss.NONE, data, digests)
            else:
                # after an unseal the SRK the token pinned is selected: a session salted with it makes
                # the TPM's answer carry an HMAC that only the real TPM can key, so something between
                # us and the TPM cannot fake the extend's success (with no SRK selected, making one
                # only for this would pin nothing)
                with self._salted_session(lib.TPM2_SE_HMAC) as session:
                    # PCR_Event's response starts with no TPM2B: response encryption is refused for it
                    self._esys.call("TRSess_SetAttributes", session, 0, lib.TPMA_SESSION_ENCRYPT)
                    self._esys.call("PCR_Event", lib.ESYS_TR_PCR0 + pcr, session, tss.NONE, tss.NONE, data, digests)
            tss.free(digests[0])
        except TssError as exc:
            raise errors.tpm_error(exc, errors.EXTEND_PCR) from None

    def reset_count(self) -> int:
        """How many times the TPM was reset (TPMS_CLOCK_INFO.resetCount): one more every boot."""
        out = tss.new("TPMS_TIME_INFO **")
        try:
            self._esys.call("ReadClock", tss.NONE, tss.NONE, tss.NONE, out)
        except TssError as exc:
            raise errors.tpm_error(exc, errors.READ_CLOCK) from None
        try:
            return int(out[0].clockInfo.resetCount)
        finally:
            tss.free(out[0])

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
            raise errors.tpm_error(exc, errors.READ_PROPERTIES) from None
        names = {alg: name for name, (alg, _) in BANKS.items()}
        manufacturer = props.get(lib.TPM2_PT_MANUFACTURER, 0).to_bytes(4, "big")
        permanent = props.get(lib.TPM2_PT_PERMANENT, 0)
        return TpmInfo(
            manufacturer=manufacturer.rstrip(b"\0").decode(errors="replace").strip(),
            banks=[names.get(alg, hex(alg)) for alg in algs],
            lockout_counter=props.get(lib.TPM2_PT_LOCKOUT_COUNTER, 0),
            max_tries=props.get(lib.TPM2_PT_MAX_AUTH_FAIL, 0),
            in_lockout=bool(permanent & _IN_LOCKOUT),
            lockout_interval=props.get(lib.TPM2_PT_LOCKOUT_INTERVAL, 0),
        )
