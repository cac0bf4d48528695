"""The demo: build everything, then boot a VM three times and show its console.

1. first boot: the disk opens with the passphrase (typed by this script); the root enrols the TPM key
2. second boot: unlocked from the TPM, no prompt
3. third boot, after a firmware update (another OVMF build: PCR 0 changes): the reason, then the
   passphrase prompt; the typed passphrase boots

`python -m vm.demo [--kind dracut|mkinitcpio] [--work DIR]`
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from .guest import PASSPHRASE, BootResult, Guest
from .images import build_artifacts
from .rootfs import build_root_image
from .source import FROM_ENV, chosen

SHOW = re.compile(r"tpm2-unlocker|TPM2U|passphrase|Passphrase|PCR", re.I)
ANSI = re.compile(r"\x1b\[[0-9;=?]*[A-Za-z]")


def show(title: str, result: BootResult, seconds: float) -> None:
    print(f"\n=== {title} ({seconds:.1f} s on the host" +
          (f", root reached at {result.root_uptime:.1f} s guest uptime)" if result.root_uptime else ")"))
    for line in ANSI.sub("", result.log).splitlines():
        line = line.strip()
        if SHOW.search(line) and "Command line" not in line and "Kernel command line" not in line:
            print("  | " + line[:160], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("dracut", "mkinitcpio"), default="dracut")
    parser.add_argument("--work", type=Path, default=None)
    opts = parser.parse_args()
    work = opts.work or Path(tempfile.mkdtemp(prefix="tpm2-unlocker-demo-"))
    started = time.monotonic()
    source = chosen()
    print(f"using {source.describe()} ({FROM_ENV}=checkout|installed chooses)", flush=True)
    print(f"building the binary, the kernel and the {opts.kind} initramfs in {work} ...", flush=True)
    artifacts = build_artifacts(work / "build", (opts.kind,), source)
    image = artifacts.images[opts.kind]
    print(f"  binary {artifacts.binary.stat().st_size / 1e6:.1f} MB; initramfs {image.size_mb:.1f} MB "
          f"built in {image.build_seconds:.0f} s; kernel {artifacts.kernel.version}")
    root = build_root_image(work, artifacts.binary, PASSPHRASE)
    guest = Guest(artifacts.kernel, artifacts.kind(opts.kind), root, work / "tpm", work)

    t = time.monotonic()
    first = guest.enroll()
    show("boot 1: no TPM key yet -> passphrase typed; the root runs 'tpm2-unlocker enroll'", first, time.monotonic() - t)

    t = time.monotonic()
    second = guest.run_boot("boot2-tpm")
    show("boot 2: unlocked from the TPM, no prompt", second, time.monotonic() - t)
    if second.prompted or second.root_uptime is None:
        raise SystemExit("demo failed: boot 2 did not unlock from the TPM")

    t = time.monotonic()
    third = guest.run_boot("boot3-firmware-update", firmware="2m", answers=[PASSPHRASE])
    show("boot 3: firmware swapped (PCR 0 changes) -> reason + passphrase prompt, typed", third,
         time.monotonic() - t)
    if not third.prompted or third.root_uptime is None:
        raise SystemExit("demo failed: boot 3 did not fall back to the passphrase")
    print(f"\ndemo done in {time.monotonic() - started:.0f} s; console logs in {work}")


if __name__ == "__main__":
    main()
