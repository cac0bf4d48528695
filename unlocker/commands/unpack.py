"""`tpm2-unlocker unpack DIR`: lay the program out unpacked, for the initramfs generators' hooks.

The one-file binary copies the libraries it carries out to /run and starts itself a second time,
at every start: at boot that is time on the path to the unlocked disk (docs/performance.md). So
the mkinitcpio and dracut hooks run this at image-build time instead, and the image carries
DIR/tpm2-unlocker (PyInstaller's bootloader in its one-folder mode, with the same Python code and
options, built beside the one file and carried inside it) and DIR/_internal (the libraries the one
file carries). The distributable stays the one file.

`unpack --libraries` lists what the unpacked program takes from the system, and `unpack --blob-files`
the sealed-key files of file stores the image must carry, for both hooks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from unlocker import __version__
from unlocker.errors import UsageError
from unlocker.lean.run import run

LAUNCHER = "tpm2-unlocker-launcher"  # in the one file's bundle: the one-folder bootloader + our code
CONTENTS = "_internal"  # where the one-folder bootloader looks for its libraries (PyInstaller's default)
PROGRAM = "tpm2-unlocker"
# Left out of the bundle, loaded from the system: every image with cryptsetup has them (libcryptsetup
# links libcrypto and libz; cryptography's extension, below, brings libgcc_s), and a one-file binary
# copies each bundled byte out at every start (freeze/build.py).
LEFT_OUT_OF_BUNDLE = ("libcrypto.so.3", "libz.so.1", "libgcc_s.so.1")
# In the one file, out of the image: cryptography (its Rust extension alone is a third of the one
# file) serves `adopt --from clevis` on the installed system; the boot never imports it.
LEFT_OUT_OF_IMAGE = ("cryptography",)
# What an image must carry for the unpacked program: the above; what PyInstaller's bootloader and
# libpython link; and, as mkinitcpio's `encrypt` adds them for cryptsetup, libgcc_s (its
# pthread_cancel dlopen()s it) and OpenSSL's legacy provider (whirlpool hashes). Paths are relative
# to the system's library directory.
SYSTEM_LIBRARIES = (*LEFT_OUT_OF_BUNDLE, "libm.so.6", "libresolv.so.2", "libdl.so.2", "libpthread.so.0",
                    "librt.so.1", "libutil.so.1", "ossl-modules/legacy.so")


def bundle_home() -> Path:
    """Where the running one-file binary unpacked its bundle; UsageError when not frozen that way."""
    home = getattr(sys, "_MEIPASS", None)
    if not getattr(sys, "frozen", False) or not home or not (Path(home) / LAUNCHER).is_file():
        raise UsageError("unpack works on the frozen one-file binary only",
                         hint="build it with ./run binary and run dist/tpm2-unlocker unpack DIR")
    return Path(home)


@dataclass(frozen=True)
class Unpacked:
    """Where the program went, and whether it was started to check it (not on a noexec mount)."""

    program: Path
    checked: bool


def unpack(dest: Path) -> Unpacked:
    """Write DIR/tpm2-unlocker and DIR/_internal, and check that the program starts.

    Image builders stage the image under /tmp or /var/tmp, which hardened systems mount noexec:
    there nothing can be started, and the copy stands unchecked (`checked` False) rather than
    failing the image build; at boot it runs from the initramfs.
    """
    home = bundle_home()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"{dest} exists and is not an empty directory")
    program = dest / PROGRAM
    try:
        try:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copytree(home, dest / CONTENTS, symlinks=True,
                            ignore=lambda folder, names: _left_out(names) if Path(folder) == home else [])
            (dest / CONTENTS).chmod(0o755)  # copied from the bundle's private (0700) unpack folder
            shutil.copyfile(home / LAUNCHER, program)
            program.chmod(0o755)
        except OSError as exc:
            raise UsageError(f"cannot unpack into {dest}: {exc.strerror or exc}") from None
        if os.statvfs(dest).f_flag & os.ST_NOEXEC:
            return Unpacked(program, checked=False)
        result = run([str(program), "--version"])
        if result.returncode != 0 or result.stdout.decode(errors="replace").strip() != f"tpm2-unlocker {__version__}":
            raise UsageError(f"the unpacked program in {dest} does not start "
                             f"({result.stderr_text or 'exit ' + str(result.returncode)})")
    except UsageError:
        # leave nothing half-written in the image being built
        shutil.rmtree(dest / CONTENTS, ignore_errors=True)
        with contextlib.suppress(OSError):  # nothing there to remove, or no directory to remove it from
            program.unlink()
        raise
    return Unpacked(program, checked=True)


# The only file stores an image carries: the hooks copy what tokens name, and a token is anyone's to
# write who holds a disk (a USB stick at image-build time among them): only the pair files a token
# names in a directory under here are copied, never a directory as such.
CARRIED_STORES = "/etc/tpm2-unlocker/"


def _left_out(names: list[str]) -> list[str]:
    """What of the bundle's top folder the image does not carry: the launcher (copied on its own) and
    LEFT_OUT_OF_IMAGE's packages with their metadata."""
    return [name for name in names if name == LAUNCHER
            or any(name == package or name.startswith(package + "-") for package in LEFT_OUT_OF_IMAGE)]


def blob_files(devices: list[str] | None = None) -> list[str]:
    """The sealed-key files of the file-store enrolments on `devices` (default: every block device)
    whose directory is under CARRIED_STORES: an initramfs must carry them to unseal those keys at
    boot (both hooks add them). Only regular files, never a link; a header or token that cannot be
    read is passed over."""
    import stat

    from unlocker.boot.devices import block_devices, read_luks_header
    from unlocker.errors import UnlockerError
    from unlocker.luks import LuksDevice
    from unlocker.store import blob_paths
    from unlocker.token import Token

    found: set[str] = set()
    for path in block_devices() if devices is None else devices:
        header = read_luks_header(path)
        if header is None or header[1] is None:
            continue
        try:
            device = LuksDevice(path)
            device.seed_metadata(header[1])
            tokens = device.our_tokens()
        except UnlockerError:
            continue
        for _, token in tokens:
            if not isinstance(token, Token) or token.store != "file":
                continue
            if not os.path.normpath(token.blob_dir).startswith(CARRIED_STORES.rstrip("/") + "/"):
                continue
            for file in blob_paths(token.blob_dir, token.blob_name):
                try:
                    if stat.S_ISREG(os.lstat(file).st_mode):
                        found.add(file)
                except OSError:
                    pass
    return sorted(found)
