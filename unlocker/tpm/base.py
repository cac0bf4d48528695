"""The ESAPI connection every part of the TPM client stands on: open, close, capability queries."""

from __future__ import annotations

import os

# tpm2-tss logs every TPM error on stderr; we report our own one line instead.
os.environ.setdefault("TSS2_LOG", "all+NONE")

from unlocker import TYPE_CHECKING  # noqa: E402
from unlocker.errors import NoTpmError  # noqa: E402
from unlocker.tpm import tss  # noqa: E402
from unlocker.tpm.policy import PcrSelection  # noqa: E402
from unlocker.tpm.tss import TssError, lib  # noqa: E402

if TYPE_CHECKING:
    from unlocker.tpm.tss import CData


def pcr_selection(selection: PcrSelection) -> CData:
    """TPML_PCR_SELECTION of one bank, with the selection's own bitmap (PCRs 0-23)."""
    tpml = tss.new("TPML_PCR_SELECTION *")
    tpml.count = 1
    tpml.pcrSelections[0].hash = selection.alg_id
    bitmap = selection.bitmap()
    tpml.pcrSelections[0].sizeofSelect = len(bitmap)
    for i, bits in enumerate(bitmap):
        tpml.pcrSelections[0].pcrSelect[i] = bits
    return tpml


class _Capability:
    """TPM2_GetCapability's answer for a `with` block: (TPMU_CAPABILITIES, more?), freed at its end.
    (Context managers here are classes: contextlib is not imported on the boot path.)"""

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


class TpmBase:
    """An open ESAPI context on one TPM; the parts of the client (srk, session, seal, nv) build on it.
    Every transient handle is flushed: swtpm and /dev/tpm0 have no resource manager."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        try:
            self._esys = tss.Esys(tcti)
        except TssError as exc:
            raise NoTpmError(f"cannot reach the TPM at '{tcti}' ({exc})") from None

    def close(self) -> None:
        self._esys.close()

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
