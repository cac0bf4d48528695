"""What a guest's root printed about its measured boot (tpm2u.measure=1, tpm2u.predict=1), read back
on the host; and `python -m vm.measured OUT` captures the event-log fixtures of tests/fixtures/eventlog.

The capture boots one guest (busybox image, passphrase typed) through each boot chain (systemd-boot from
an ESP, and OVMF's direct kernel boot) on each OVMF build, and writes per boot the firmware's event log
(NAME.bin) and the PCR values the guest's kernel read from the TPM (NAME.pcrs.json), every bank.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

EVENTLOG = re.compile(r"TPM2U-EVENTLOG-BEGIN\s*(.*?)TPM2U-EVENTLOG-END", re.S)
PCR_LINE = re.compile(r"TPM2U-PCR (\w+) (\d+) ([0-9A-Fa-f]+)")
PREDICTION = re.compile(r"TPM2U-PREDICT-BEGIN\s*(.*?)TPM2U-PREDICT-END rc=(\d+)", re.S)


@dataclass
class Measurement:
    eventlog: bytes
    pcrs: dict[str, dict[int, bytes]]  # bank -> PCR -> value, as the guest's kernel read them


def measurement(console: str) -> Measurement:
    """The event log and PCR values a boot with tpm2u.measure=1 printed."""
    found = EVENTLOG.search(console)
    if found is None:
        raise AssertionError("the guest printed no event log (was tpm2u.measure=1 given?)")
    pcrs: dict[str, dict[int, bytes]] = {}
    for bank, pcr, value in PCR_LINE.findall(console):
        pcrs.setdefault(bank, {})[int(pcr)] = bytes.fromhex(value)
    return Measurement(base64.b64decode("".join(found.group(1).split())), pcrs)


def prediction(console: str) -> tuple[int, str]:
    """What `tpm2-unlocker predict --json` printed in a boot with tpm2u.predict=1: (exit status, its output)."""
    found = PREDICTION.search(console)
    if found is None:
        raise AssertionError("the guest ran no prediction (was tpm2u.predict=1 given?)")
    return int(found.group(2)), found.group(1).replace("\r", "")


def predicted_values(output: str) -> dict[int, bytes]:
    doc = json.loads(output[output.index("{"):output.rindex("}") + 1])
    return {int(p): bytes.fromhex(row["predicted"]) for p, row in doc["pcrs"].items()}


def write_fixture(out: Path, name: str, m: Measurement) -> None:
    (out / f"{name}.bin").write_bytes(m.eventlog)
    doc = {bank: {str(p): v.hex() for p, v in sorted(values.items())} for bank, values in m.pcrs.items()}
    (out / f"{name}.pcrs.json").write_text(json.dumps(doc, indent=1) + "\n")


def main() -> None:
    from .esp import build_esp
    from .guest import PASSPHRASE, PROMPTS, Guest, ImageKind
    from .images import build_binary
    from .initramfs import build_mkinitcpio_busybox
    from .kernel import fetch_kernel
    from .rootfs import build_root_image

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--work", type=Path, default=None)
    opts = parser.parse_args()
    work = opts.work or Path(tempfile.mkdtemp(prefix="tpm2u-capture-"))
    opts.out.mkdir(parents=True, exist_ok=True)
    kernel = fetch_kernel()
    binary = build_binary(work / "dist")
    image = build_mkinitcpio_busybox(kernel, binary, work / "initramfs.img")
    kind = ImageKind("mkinitcpio", image.path, PROMPTS["mkinitcpio"])
    root = build_root_image(work, binary, PASSPHRASE, kernel.moddir)
    esp = build_esp(work / "esp.img", kernel.version, kernel.vmlinuz, image.path, "")
    for loader in ("systemd-boot", "direct"):
        guest = Guest(kernel, kind, root, work / f"tpm-{loader}", work / loader,
                      esp=esp if loader == "systemd-boot" else None)
        for firmware in ("4m", "2m"):
            result = guest.run_boot(f"{loader}-{firmware}", firmware=firmware, extra="tpm2u.measure=1",
                                    answers=[PASSPHRASE])
            name = f"{loader}-ovmf{firmware}"
            write_fixture(opts.out, name, measurement(result.log))
            print(f"{name}: written", flush=True)


if __name__ == "__main__":
    main()
