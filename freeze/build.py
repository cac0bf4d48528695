"""Build the frozen one-file `tpm2-unlocker` with PyInstaller: `python -m freeze.build [--out DIR]`.

Reproducible inputs: this repository, the pinned tpm2-pytss built against Debian's tss2 (of which
only its compiled cffi module is bundled: unlocker/tpm/tss.py loads it by path, PyInstaller cannot see
that), and the TCTI modules tpm2-tss loads with dlopen (bundled explicitly for the same reason). It
unpacks under /run at start; it carries the same program as a one-folder bootloader too, which
`tpm2-unlocker unpack DIR` lays out beside the libraries for an initramfs.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from unlocker.commands.unpack import CONTENTS, LAUNCHER, LEFT_OUT_OF_BUNDLE, LEFT_OUT_OF_IMAGE  # noqa: E402

# Where the one-file binary unpacks at each start: under /run, in a folder of its own. (An initramfs
# carries the program unpacked at image build instead: `tpm2-unlocker unpack`.)
RUNTIME_TMPDIR = "/run/tpm2-unlocker"
TCTIS = ("device", "swtpm", "mssim", "pcap")
# Not on the boot path: keep them out of the bundle (start-up time grows with bundle size).
# cryptography stays in (adopt --from clevis decrypts Clevis's JWE with it, on the installed system);
# `unpack` leaves it out of the initramfs (LEFT_OUT_OF_IMAGE), so the boot carries none of it.
EXCLUDES = ("tpm2_pytss", "tkinter", "unittest", "pydoc", "doctest", "lib2to3", "xmlrpc", "sqlite3",
            "multiprocessing", "asyncio", "curses", "distutils", "setuptools", "pip", "pytest", "pexpect",
            "yaml", "pkg_resources", "ssl", "_ssl", "decimal", "_decimal", "unicodedata", "_multibytecodec",
            "_codecs_jp", "_codecs_kr", "_codecs_tw", "_codecs_cn", "_codecs_hk", "_codecs_iso2022", "bz2", "lzma")


def tss_extension() -> str:
    """tpm2-pytss's compiled cffi module (found without importing the package)."""
    spec = importlib.util.find_spec("tpm2_pytss")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("tpm2-pytss is not installed (./run setup)")
    found = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_libtpm2_pytss*.so"))
    if not found:
        raise SystemExit("tpm2-pytss has no compiled _libtpm2_pytss module")
    return found[0]


def tcti_libraries() -> list[str]:
    found = []
    for name in TCTIS:
        matches = glob.glob(f"/usr/lib/*/libtss2-tcti-{name}.so.0")
        if not matches:
            raise SystemExit(f"libtss2-tcti-{name}.so.0 not found (apt-get install libtss2-dev)")
        found.append(matches[0])
    return found



# pyi_rth_cryptography_openssl points OpenSSL at a modules folder we do not bundle, at every start.
DROPPED_RUNTIME_HOOKS = ("pyi_rth_inspect", "pyi_rth_cryptography_openssl")

UNCOMPRESSED_TYPES = ("EXTENSION", "DATA", "BINARY", "EXECUTABLE", "PYSOURCE", "PYMODULE", "SPLASH", "PYZ", "SYMLINK")


# A fixed str hash seed: Python otherwise reads one from the kernel before it runs a line, and until
# the kernel's random pool is seeded (an initramfs on a machine without a CPU RNG, such as QEMU's
# default CPU) that read waits (docs/boot-path.md). What we hash is ours (argv, the LUKS header's JSON, crypttab):
# randomised hashing guards servers, not this. The secrets still come from the seeded pool
# (unlocker/boot/warmup.py sees to it).
PYTHON_OPTION = "hash_seed=0"

# The same program as PyInstaller's one-folder bootloader (our code and options, no libraries: they
# are the one file's own; none of LEFT_OUT_OF_IMAGE's modules), carried inside the one file;
# `tpm2-unlocker unpack DIR` lays the two out for an initramfs (unlocker/commands/unpack.py).
LAUNCHER_SPEC = f"""launcher = EXE(
    pyz_image,
    a.scripts,
    [({PYTHON_OPTION!r}, None, 'OPTION')],
    exclude_binaries=True,
    name='{LAUNCHER}',
    contents_directory='{CONTENTS}',
    strip=True,
    upx=False,
    console=True,
)
"""


def write_spec(work: Path) -> Path:
    """pyi-makespec with our options, then the one change the CLI cannot make: store the archive
    uncompressed. Unpacking zlib at every start was a large part of the boot under TCG; the initramfs is
    compressed as a whole anyway."""
    args = [sys.executable, "-m", "PyInstaller.utils.cliutils.makespec", "--onefile", "--log-level", "WARN",
            "--name", "tpm2-unlocker", "--runtime-tmpdir", RUNTIME_TMPDIR, "--strip",
            "--specpath", str(work), "--paths", str(ROOT),
            "--python-option", PYTHON_OPTION]
    for lib in tcti_libraries():
        args += ["--add-binary", f"{lib}:."]
    args += ["--add-binary", f"{tss_extension()}:tpm2_pytss", "--hidden-import", "_cffi_backend"]
    for module in EXCLUDES:
        args += ["--exclude-module", module]
    args.append(str(ROOT / "freeze" / "entry.py"))
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    spec = work / "tpm2-unlocker.spec"
    text = spec.read_text()
    marker = "    name='tpm2-unlocker',\n"
    if "exe = EXE(" not in text or marker not in text:
        raise SystemExit("unexpected spec layout from pyi-makespec")
    cdict = ", ".join(f"{t!r}: False" for t in UNCOMPRESSED_TYPES)
    text = text.replace(marker, marker + f"    cdict={{{cdict}}},\n")
    if "pyz = PYZ(a.pure)" not in text:
        raise SystemExit("unexpected spec layout from pyi-makespec")
    # PyInstaller's runtime hook for `inspect` imports zipfile (and pathlib, urllib, ...) and reads
    # base_library.zip's directory at every start, to fix inspect.getsourcefile for tracebacks the
    # boot never prints: start-up time in the TCG guest (docs/performance.md).
    text = text.replace("pyz = PYZ(a.pure)", f"a.binaries = [b for b in a.binaries if b[0] not in {LEFT_OUT_OF_BUNDLE!r}]\n"
                        f"a.scripts = [s for s in a.scripts if s[0] not in {DROPPED_RUNTIME_HOOKS!r}]\n"
                        "pyz = PYZ(a.pure)\n"
                        # the launcher goes into the image: without the modules of what unpack leaves out
                        f"pyz_image = PYZ([m for m in a.pure if m[0].split('.')[0] not in {LEFT_OUT_OF_IMAGE!r}])\n"
                        + LAUNCHER_SPEC)
    datas = "    a.datas,\n"
    if text.count(datas) != 1:
        raise SystemExit("unexpected spec layout from pyi-makespec")
    text = text.replace(datas, f"    a.datas + [({LAUNCHER!r}, launcher.name, 'DATA')],\n")
    spec.write_text(text)
    return spec


def build(out: Path) -> Path:
    work = ROOT / "build" / "pyinstaller"
    work.mkdir(parents=True, exist_ok=True)
    spec = write_spec(work)
    started = time.monotonic()
    # PYZ entries are zlib streams whatever cdict says; level 0 makes each import's inflate a copy
    env = {**os.environ, "PYINSTALLER_ZLIB_COMPRESSION_LEVEL": "0"}
    subprocess.run([sys.executable, "-m", "PyInstaller", "--noconfirm", "--clean", "--log-level", "WARN",
                    "--distpath", str(out), "--workpath", str(work), str(spec)], check=True, cwd=ROOT, env=env)
    binary = out / "tpm2-unlocker"
    print(f"built {binary}: {binary.stat().st_size / 1e6:.1f} MB in {time.monotonic() - started:.0f} s")
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "dist")
    opts = parser.parse_args()
    if shutil.which("strip") is None:
        raise SystemExit("strip not found (apt-get install binutils)")
    os.makedirs(opts.out, exist_ok=True)
    build(opts.out)


if __name__ == "__main__":
    main()
