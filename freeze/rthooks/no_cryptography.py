"""PyInstaller runtime hook of the boot binary: `cryptography` is left out of the bundle.

tpm2-pytss imports it at import time for key conversions we never use (the ESAPI calls we make do
their crypto in tss2-esys/libcrypto). Its Rust extension is 14 MB, the largest part of the bundle,
and a one-file binary pays for every byte at each start. This finder answers every `cryptography.*`
import with a placeholder whose use raises a clear error.
"""

import importlib.machinery
import sys
import types


class _Missing:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> "_Missing":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{self._name} is not in the tpm2-unlocker binary (built without cryptography)")


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str) -> _Missing:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self.__name__}.{attr}")


# Plain classes, not importlib.abc's: that module pulls in importlib.resources, tempfile, shutil
# and typing at every start, before our code runs (measured with -X importtime).
class _StubFinder:
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name == "cryptography" or name.startswith("cryptography."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return _StubModule(spec.name)

    def exec_module(self, module):  # type: ignore[no-untyped-def]
        module.__path__ = []


sys.meta_path.insert(0, _StubFinder())
