"""The boot path's stand-ins for the standard library: record (dataclasses), jsonload (json),
threads (threading), run (subprocess).

Every module the boot imports is start-up time in an initramfs under emulation, where Python runs
each line for the first time (docs/performance.md). The rule: the boot path (cli's `unlock` line,
boot/, tpm/, luks, token, store and what they import) imports only the package's own modules
outside commands/ and argparser, these stand-ins, and the standard or C modules named in
BOOT_PATH_MODULES below. tests/unit/test_cli.py::test_boot_path_imports_only_what_the_rule_allows
enforces it: a new import there fails that test until it is added here, with its reason.
"""

# Beyond what a bare `python -S` has loaded. os, stat, posixpath and importlib's parts come with
# any program (PyInstaller's bootstrap loads them before ours); the rest are C modules, or small
# pure ones that import nothing further.
BOOT_PATH_MODULES = frozenset({
    "os", "os.path", "posixpath", "genericpath", "stat", "_stat", "_collections_abc",
    "importlib", "importlib._bootstrap", "importlib._bootstrap_external", "importlib.machinery",
    "__future__",  # `from __future__ import annotations` (annotations stay strings: typing never loads)
    "types",  # SimpleNamespace for the boot's parsed command line
    "warnings",  # cffi's
    "_cffi_backend", "tpm2_pytss._libtpm2_pytss", "tpm2_pytss._libtpm2_pytss.lib",  # tpm2-tss through cffi
    "_json",  # jsonload: json's own C scanner
    "_socket",  # the warm-up's AF_ALG bind (socket.py would build enums at import)
    "_struct", "struct",  # LUKS header fields, TPM commands
    "binascii",  # token fields (base64 imports re)
    "fcntl",  # RNDADDENTROPY
    "select",  # run: pipes read with poll
    "termios",  # the passphrase prompt without echo
})
