"""An update's new files, made from the ones a guest boots: another build of the kernel and of the boot
loader (other bytes, still bootable), an initrd with one more file, for the update scenarios
(tests/vm/test_update.py).

- kernel: Debian's signed image without its signature (pesign -r: the Authenticode digest stays) and
  with bytes appended after its sections, which the firmware hashes (Authenticode's trailing data)
  and the loader ignores: a kernel image no earlier boot measured.
- boot loader: systemd-boot with bytes appended, likewise.
- initrd: the image with one more cpio archive behind it (the kernel unpacks concatenated archives:
  a rebuild that added a file). Raw cpio starts at a 4-byte boundary; zeros before it are skipped.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .tools import run

PADDING = b"tpm2-unlocker update " * 200


def new_kernel(vmlinuz: Path, out: Path, generation: int = 2) -> Path:
    """Generation 3 and later: yet another build (more bytes appended), so two updates differ."""
    unsigned = out.with_suffix(".unsigned")
    unsigned.unlink(missing_ok=True)
    run(["pesign", "--remove-signature", "--signature-number", "0", "--in", vmlinuz, "--out", unsigned])
    out.write_bytes(unsigned.read_bytes() + PADDING * (generation - 1))
    unsigned.unlink()
    return out


def new_boot_loader(loader: Path, out: Path) -> Path:
    out.write_bytes(loader.read_bytes() + PADDING)
    return out


def new_initrd(initrd: Path, out: Path, work: Path) -> Path:
    extra = work / "initrd-extra"
    if extra.exists():
        shutil.rmtree(extra)
    (extra / "etc").mkdir(parents=True)
    (extra / "etc" / "tpm2u-update").write_text("generation 2\n")
    archive = run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=extra, input=b"etc\netc/tpm2u-update\n").stdout
    data = initrd.read_bytes()
    out.write_bytes(data + bytes(-len(data) % 4) + archive)
    return out
