"""The tpm2-tss C libraries (ESAPI, marshalling, TCTI loader), called through cffi.

We use tpm2-pytss for its compiled cffi module only: its Python layer (ESAPI.py, types.py,
constants.py and what they import) costs more at start-up than everything else on the boot path
(measured in the TCG guest: docs/performance.md, the change log). The module
is loaded straight from its file, without running the tpm2_pytss package's __init__.

Outputs the ESAPI allocates are released with `free`; a secret's buffer is zeroed first.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys

from unlocker import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

    # a cffi pointer or structure (cffi has no static types for them)
    CData = Any

MODULE = "tpm2_pytss._libtpm2_pytss"


def _extension_path() -> str:
    """The compiled module: beside the frozen binary's files, else in the installed tpm2_pytss."""
    frozen = getattr(sys, "_MEIPASS", None)
    if frozen:
        folder = os.path.join(frozen, "tpm2_pytss")
    else:
        import importlib.util  # not in the frozen binary: importlib.util imports contextlib, functools, ...

        spec = importlib.util.find_spec("tpm2_pytss")  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("tpm2-pytss is not installed")
        folder = list(spec.submodule_search_locations)[0]
    for name in sorted(os.listdir(folder)):
        if name.startswith("_libtpm2_pytss") and name.endswith(".so"):
            return os.path.join(folder, name)
    raise ImportError(f"no _libtpm2_pytss module in {folder}")


def _load() -> Any:
    loaded = sys.modules.get(MODULE)
    if loaded is not None:
        return loaded
    path = _extension_path()
    loader = importlib.machinery.ExtensionFileLoader(MODULE, path)
    spec = importlib.machinery.ModuleSpec(MODULE, loader, origin=path)
    module = loader.create_module(spec)
    module.__spec__, module.__loader__ = spec, loader
    loader.exec_module(module)
    # registered, so that an `import tpm2_pytss` later in the same process shares it
    sys.modules[MODULE] = module
    return module


_module = _load()
ffi: Any = _module.ffi
lib: Any = _module.lib

NONE = lib.ESYS_TR_NONE
PASSWORD = lib.ESYS_TR_PASSWORD


class TssError(Exception):
    """A non-zero TSS2_RC. `error` is the TPM error with handle/parameter/session number stripped."""

    def __init__(self, rc: int) -> None:
        self.rc = rc
        self.error = lib.TPM2_RC_FMT1 + (rc & 0x3F) if rc & lib.TPM2_RC_FMT1 else rc
        super().__init__(ffi.string(lib.Tss2_RC_Decode(rc)).decode(errors="replace"))


def check(rc: int) -> None:
    if rc != 0:
        raise TssError(rc)


def new(ctype: str, init: Any = None) -> Any:
    return ffi.new(ctype, init)


def free(pointer: Any, secret: bool = False) -> None:
    """Release what the ESAPI returned; with `secret`, zero the TPM2B's bytes first."""
    if pointer == ffi.NULL:
        return
    if secret:
        wipe(pointer)
    lib.Esys_Free(pointer)


def wipe(tpm2b: Any) -> None:
    """Zero a TPM2B we filled with a secret."""
    ffi.memmove(tpm2b.buffer, bytes(len(tpm2b.buffer)), len(tpm2b.buffer))
    tpm2b.size = 0


def tpm2b_bytes(pointer: Any) -> bytes:
    """The bytes of a TPM2B (not for secrets: use secret_bytes). TPM2B_NAME calls its array `name`."""
    data = pointer.name if ffi.typeof(pointer) is ffi.typeof("TPM2B_NAME *") else pointer.buffer
    return bytes(ffi.buffer(data, pointer.size))


def secret_bytes(pointer: Any) -> bytearray:
    return bytearray(ffi.buffer(pointer.buffer, pointer.size))


def fill_tpm2b(target: Any, data: bytes | bytearray) -> None:
    """Copy `data` into a TPM2B (its buffer must be large enough: the TPM type's limit)."""
    if len(data) > len(target.buffer):
        raise ValueError(f"{len(data)} bytes do not fit a TPM2B of {len(target.buffer)}")
    target.size = len(data)
    ffi.memmove(target.buffer, data, len(data))


def marshal(kind: str, value: Any) -> bytes:
    """Tss2_MU_<kind>_Marshal of a pointer to the structure."""
    buffer = ffi.new("uint8_t[]", 4096)
    offset = ffi.new("size_t *")
    check(getattr(lib, f"Tss2_MU_{kind}_Marshal")(value, buffer, 4096, offset))
    return bytes(ffi.buffer(buffer, offset[0]))


def unmarshal(kind: str, data: bytes) -> tuple[Any, int]:
    """A new structure from `data`, and how many bytes it took. Raises TssError when malformed."""
    value = ffi.new(f"{kind} *")
    offset = ffi.new("size_t *")
    check(getattr(lib, f"Tss2_MU_{kind}_Unmarshal")(data, len(data), offset, value))
    return value, offset[0]


class Esys:
    """One ESAPI context over a TCTI given as 'name:conf' (device:/dev/tpmrm0, swtpm:port=2321)."""

    def __init__(self, tcti: str) -> None:
        self._tcti = ffi.new("TSS2_TCTI_CONTEXT **")
        check(lib.Tss2_TctiLdr_Initialize(tcti.encode(), self._tcti))
        self._ctx = ffi.new("ESYS_CONTEXT **")
        try:
            check(lib.Esys_Initialize(self._ctx, self._tcti[0], ffi.NULL))
        except TssError:
            lib.Tss2_TctiLdr_Finalize(self._tcti)
            raise

    def close(self) -> None:
        if self._ctx[0] != ffi.NULL:
            lib.Esys_Finalize(self._ctx)
        if self._tcti[0] != ffi.NULL:
            lib.Tss2_TctiLdr_Finalize(self._tcti)

    def call(self, name: str, *args: Any) -> None:
        """Esys_<name>(ctx, *args); raises TssError."""
        check(getattr(lib, f"Esys_{name}")(self._ctx[0], *args))

    def flush(self, handle: int) -> None:
        """Flush a transient object or session; an error here changes nothing for the caller."""
        lib.Esys_FlushContext(self._ctx[0], handle)

    def tr_close(self, handle: int) -> None:
        h = ffi.new("ESYS_TR *", handle)
        lib.Esys_TR_Close(self._ctx[0], h)

    def name(self, handle: int) -> bytes:
        out = ffi.new("TPM2B_NAME **")
        self.call("TR_GetName", handle, out)
        try:
            return tpm2b_bytes(out[0])
        finally:
            free(out[0])
