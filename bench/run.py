"""Side-by-side benchmark: `python -m bench.run [--boots N] [--variants a,b,...] [--host-only]`.

In one run, on the same kernel, root image contents and swtpm state, boot N times each:
  floor            the passphrase variant's image plus a key file for the disk (rd.luks.key=): no TPM
                   used, no prompt; the least any unlocker can take
  passphrase       dracut systemd image, passphrase typed (the baseline)
  ours-dracut      dracut systemd image + our module
  ours-mkinitcpio  busybox image built by our mkinitcpio install script (vm/minicpio)
  ours-policyor    ours-dracut's image; the key sealed to PolicyOR over two chains (another value of the
                   PCR, then the one it has: the boot reads the PCRs, asserts the second branch, then PolicyOR),
                   as after `reseal --predict` and a boot on the predicted chain
  ours-signed      ours-dracut's image; an enrolment with a signing key whose sealed chain is another value
                   of the PCR, and a signature in the header approving the one it has: the boot reads the
                   PCRs, verifies the signature with the TPM and unseals through PolicyAuthorize (as after
                   a kernel update the machine key or an admin approved)
  systemd-tpm2     dracut systemd image + tpm2-tss; a systemd-tpm2 token (systemd-cryptenroll)
  clevis           dracut systemd image + clevis + clevis-pin-tpm2; `clevis luks bind ... tpm2`

Every key is sealed to the same PCR selection, sha256:16 (the debug PCR: zero after every TPM reset,
on the host and in the guest alike), so every variant can be enrolled from the host against the one
swtpm state. Every dracut image is built from one explicit module list plus what its unlocker needs.

The unlock window is guest uptime from the disk's appearance (a unit after dev-vda.device) to
cryptsetup.target (a unit after it), the same stopwatch in every systemd image. The busybox image has
no units: its window runs from the kernel's `[vda]` probe line to the end of the runtime hooks, and
the kernel-probe window is printed for every variant too. The guest uptime at that end mark ("unlocked
at") is printed as well: a window can shrink because work moved before the disk appeared, and only
this absolute figure shows whether the boot as a whole got there sooner. Each variant's windows are also
printed divided by the floor's: what an unlocker costs beyond opening the disk with a key at hand (for
the busybox image, whose window starts at the kernel's probe, the kernel-probe ratio is the one that
compares like with like). Between boots the TPM's dictionary-attack counter is cleared from the host
(the forced power-offs would lock the systemd token out).
Also on the host: frozen binary cold start, unseal + open-test against tpm2-tools and Clevis.

`--trace` boots our variants with `tpm2_unlocker.debug` and prints each boot's timeline (`/init`, the
random pool seeded, the disk probed, each step of ours with its uptime, the end marks): where the
window goes. The extra console output costs time, so its medians are not the benchmark's.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vm.guest import PASSPHRASE, Guest, ImageKind
from vm.images import source_binary
from vm.initramfs import DRACUT_DRIVERS, Initramfs, build_dracut, build_mkinitcpio_busybox
from vm.kernel import Kernel, fetch_kernel
from vm.rootfs import RootImage, build_root_image
from vm.source import FROM_ENV, Source, chosen
from vm.swtpm import SRK_ATTRS, Swtpm
from vm.tools import run

REPO = Path(__file__).resolve().parent.parent
STOPWATCH = REPO / "bench" / "dracut" / "99tpm2u-stopwatch"
PCRS = "sha256:16"
LOCKED_PCRS = "sha256:15,16"  # what our enrolments bind: PCRS and the lock PCR
VARIANTS = ("floor", "passphrase", "ours-dracut", "ours-mkinitcpio", "ours-policyor", "ours-signed", "systemd-tpm2",
            "clevis")
# the variants that boot ours-dracut's image (only the token differs)
SAME_IMAGE = ("ours-policyor", "ours-signed")
# The floor's key file inside its image. Named without a UUID, systemd-cryptsetup-generator takes it for
# every rd.luks.uuid= disk (`rd.luks.key=UUID-OF-DISK=PATH` would name one); the TPM stays attached, as
# in every variant, so the machine is the same and only the unlocker differs.
FLOOR_KEY = "/etc/tpm2u-floor.key"
CLEVIS_PACKAGES = ("clevis", "clevis-tpm2", "clevis-luks", "clevis-dracut")
VDA = re.compile(rb"\[\s*([0-9.]+)\] virtio_blk virtio\d+: \[vda\]")
MARK = re.compile(rb"TPM2U-STOPWATCH (disk|crypt|hooks-done) ([0-9.]+)")
ROOT = re.compile(rb"TPM2U-ROOT-REACHED uptime=([0-9.]+)")
# what --trace shows of a console log: the kernel's lines that set the pace, ours, the end marks
TIMELINE = re.compile(r"Run /init|random: crng init done|\[vda\]|tpm2-unlocker(\[\d+\])?: |TPM2U-(STOPWATCH|ROOT-REACHED)")


@dataclass
class Sample:
    window: float | None  # unit stopwatch (systemd) or kernel probe -> hooks done (busybox)
    kernel_window: float | None  # kernel [vda] probe -> end mark, for every variant
    unlocked: float | None  # guest uptime at the end mark (cryptsetup.target, or end of the hooks)
    root: float | None


@dataclass
class Result:
    variant: str
    image_mb: float
    samples: list[Sample] = field(default_factory=list)

    def stat(self, attr: str) -> tuple[float, float, float] | None:
        values = [getattr(s, attr) for s in self.samples if getattr(s, attr) is not None]
        if not values:
            return None
        return statistics.median(values), min(values), max(values)

    def median(self, attr: str) -> float | None:
        stat = self.stat(attr)
        return stat[0] if stat else None


def parse(log: bytes) -> Sample:
    marks = {m.group(1).decode(): float(m.group(2)) for m in MARK.finditer(log)}
    vda = VDA.search(log)
    root = ROOT.search(log)
    end = marks.get("crypt", marks.get("hooks-done"))
    start = marks.get("disk", float(vda.group(1)) if vda else None)
    window = end - start if end is not None and start is not None else None
    kernel_window = end - float(vda.group(1)) if end is not None and vda else None
    return Sample(window, kernel_window, end, float(root.group(1)) if root else None)


def ensure_clevis() -> None:
    missing = [p for p in CLEVIS_PACKAGES if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode]
    if missing:
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            env={"DEBIAN_FRONTEND": "noninteractive"})


def floor_key(work: Path) -> Path:
    """The floor's key file on the host: random bytes, made once per run, for its image and its keyslot."""
    key = work / "floor.key"
    if not key.exists():
        key.touch(mode=0o600)
        key.write_bytes(os.urandom(32))
    return key


def build_images(kernel: Kernel, binary: Path, work: Path, variants: list[str], source: Source) -> dict[str, Initramfs]:
    extra = {"floor": "", "passphrase": "", "ours-dracut": "", "ours-policyor": "", "ours-signed": "",
             "systemd-tpm2": "tpm2-tss",
             "clevis": "clevis clevis-pin-tpm2"}
    images: dict[str, Initramfs] = {}
    for v in variants:
        out = work / f"{v}.img"
        if v in SAME_IMAGE and "ours-dracut" in images:
            images[v] = images["ours-dracut"]  # the same image: only the token differs
            continue
        if v == "ours-mkinitcpio":
            images[v] = build_mkinitcpio_busybox(kernel, binary, out, hooks=source.mkinitcpio)
        else:
            images[v] = build_dracut(kernel, binary, out, with_ours=v in ("ours-dracut", *SAME_IMAGE),
                                     module=source.dracut_module,
                                     extra_modules=f"tpm2u-stopwatch {extra[v]}".strip(),
                                     extra_module_dirs=(STOPWATCH,),
                                     include=((floor_key(work), FLOOR_KEY),) if v == "floor" else ())
        print(f"  {v}: {images[v].size_mb:.1f} MB, built in {images[v].build_seconds:.0f} s", flush=True)
    return images


def add_floor_key(disk: Path, key: Path) -> None:
    """The floor's keyslot, added on the host (luksAddKey needs no device-mapper). A random key needs no
    costly key derivation: the same cheap PBKDF as the TPM variants' keyslots."""
    run(["cryptsetup", "luksAddKey", "--batch-mode", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
         "--key-file=-", disk, key], input=PASSPHRASE)


def enroll(variant: str, disk: Path, tpm: Swtpm, binary: Path) -> None:
    if variant in ("ours-dracut", "ours-mkinitcpio"):
        run([binary, "enroll", disk, "--pcrs", PCRS, "--unlock-key-file", "-", "--tcti", tpm.tcti], input=PASSPHRASE)
    elif variant == "ours-policyor":
        enroll_two_chains(disk, tpm)
    elif variant == "ours-signed":
        enroll_signed(disk, tpm, disk.parent)
    elif variant == "systemd-tpm2":
        # systemd-cryptenroll (v252) reads the existing passphrase from $PASSWORD
        run(["systemd-cryptenroll", f"--tpm2-device=swtpm:host=127.0.0.1,port={tpm.port}",
             f"--tpm2-pcrs={PCRS.split(':')[1]}", disk], env={"PASSWORD": PASSPHRASE.decode()})
    elif variant == "clevis":
        run(["clevis", "luks", "bind", "-y", "-k", "-", "-d", disk, "tpm2",
             '{"pcr_bank":"sha256","pcr_ids":"16"}'], input=PASSPHRASE, env={"TPM2TOOLS_TCTI": tpm.tcti})


def _enrol_by_hand(disk: Path, tpm: Swtpm, branches: Callable[..., dict[str, Any]],
                   after: Callable[..., object] | None = None) -> None:
    """Our enrolment made with the package's own functions (the binary in the image reads the same
    token): its first chain a value of PCRS the PCR does not have, `branches(tpm, selection, now, undo)`
    the token's other branches (what boots), `after(tpm, device, token, now)` a step once it is written."""
    import hashlib

    from unlocker.commands.enroll import prove
    from unlocker.commands.undo import Undo
    from unlocker.luks import LuksDevice
    from unlocker.secret import Secret
    from unlocker.token import Token
    from unlocker.tpm.client import Tpm
    from unlocker.tpm.policy import PcrSelection

    selection = PcrSelection.parse(PCRS)
    with Tpm(tpm.tcti) as t, Secret.random(32) as key, Undo("bench enrolment") as undo:
        now = t.read_pcrs(selection)
        other = {p: hashlib.sha256(v + b"\x01" * len(v)).digest() for p, v in now.items()}
        device = LuksDevice(str(disk))
        slot = device.free_keyslot()
        device.add_key(PASSPHRASE, key, slot)
        token = Token(keyslot=slot, store="token", selection=selection, pcr_values=other, policy_hash=b"",
                      srk_name=t.srk_name(), srk_public=t.srk_public(), lock_pcr=15,
                      **branches(t, selection, now, undo))
        token.compute_policy()
        sealed = t.seal(key, token.policy_hash)
        token.public, token.private = sealed.public, sealed.private
        device.import_token(token)
        if after is not None:
            after(t, device, token, now)
        prove(t, device, token, key)


def enroll_two_chains(disk: Path, tpm: Swtpm) -> None:
    """PolicyOR over two chains of PCRS: a value the PCR does not have, then the one it has at every
    boot (what `reseal --predict` seals, then the boot on the predicted chain: the boot asserts the
    second branch)."""
    from unlocker.token import PcrBranch

    _enrol_by_hand(disk, tpm, lambda t, selection, now, undo: {"more_branches": [PcrBranch(selection, now)]})


def enroll_signed(disk: Path, tpm: Swtpm, work: Path) -> None:
    """A signing key (ECC P-256, made here) beside a chain the PCR does not have, and a signature
    approving the value it has at every boot (epoch 0 of its counter): the boot takes the signed branch."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from unlocker.commands.keys import PrivateKey
    from unlocker.commands.sign_policy import approve, new_signed

    pem = work / "bench-signing.pem"
    pem.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    signing = PrivateKey(str(pem))
    _enrol_by_hand(disk, tpm, lambda t, selection, now, undo: {"signed": new_signed(t, signing.public, selection, undo)},
                   lambda t, device, token, now: approve(t, device, token, signing, token.selection, now,
                                                         t.counter_read(token.signed.epoch)))


def cmdline_extra(variant: str, trace: bool = False) -> str:
    if variant == "systemd-tpm2":
        return "rd.luks.options=tpm2-device=auto"
    if variant == "floor":
        return f"rd.luks.key={FLOOR_KEY}"
    return "tpm2_unlocker.debug" if trace and variant.startswith("ours-") else ""



def timeline(log: bytes) -> list[str]:
    """The console lines of a boot that --trace prints, in order."""
    text = log.decode(errors="replace").replace("\r", "")
    return [line.strip() for line in text.split("\n") if TIMELINE.search(line)]


def boot_variant(kernel: Kernel, image: Initramfs, variant: str, root: RootImage, state: Path, work: Path,
                 name: str, cpus: int = 1, trace: bool = False) -> Sample:
    # Clevis answers the systemd prompt itself: for it, a prompt is not a failure to react to.
    prompt = "TPM2U-NO-PROMPT-EXPECTED" if variant == "clevis" else \
        r"Enter passphrase for /dev/vda: |Please enter passphrase for disk"
    kind = ImageKind("mkinitcpio" if variant == "ours-mkinitcpio" else "dracut", image.path, prompt)
    guest = Guest(kernel, kind, root, state, work, cpus)
    answers = [PASSPHRASE] if variant == "passphrase" else []
    result = guest.run_boot(name, answers=answers, extra=cmdline_extra(variant, trace))
    if variant != "passphrase" and result.prompted:
        print(f"    {name}: asked for a passphrase (its unlocker failed); see {work / (name + '.console.log')}")
    log = (work / f"{name}.console.log").read_bytes()
    if trace and variant.startswith("ours-"):
        for line in timeline(log):
            print(f"      {line}")
    return parse(log)


def clear_lockout(state: Path) -> None:
    with Swtpm(state) as tpm:
        tpm.clear_lockout()


def fmt(stat: tuple[float, float, float] | None) -> str:
    return "n/a" if stat is None else f"{stat[0]:6.2f} ({stat[1]:.2f}-{stat[2]:.2f})"


def to_floor(results: dict[str, Result]) -> dict[str, tuple[float | None, float | None]]:
    """Per variant, its median unlock window and kernel-probe window divided by the floor's (None where
    either median is missing); empty without a floor."""
    floor = results.get("floor")
    if floor is None:
        return {}

    def ratio(r: Result, attr: str) -> float | None:
        ours, base = r.median(attr), floor.median(attr)
        return ours / base if ours is not None and base else None
    return {v: (ratio(r, "window"), ratio(r, "kernel_window")) for v, r in results.items()}


def report(results: dict[str, Result]) -> None:
    print("\nvariant           image MB   window median (min-max) s   kernel-probe window s       "
          "unlocked at (uptime) s      root init s")
    for r in results.values():
        print(f"{r.variant:16s} {r.image_mb:8.1f}   {fmt(r.stat('window')):26s}  {fmt(r.stat('kernel_window')):26s}"
              f"  {fmt(r.stat('unlocked')):26s}  {fmt(r.stat('root'))}")
    ours = results.get("ours-dracut")
    for other in ("systemd-tpm2", "clevis", "ours-mkinitcpio"):
        if ours and other in results and ours.stat("window") and results[other].stat("window"):
            a, b = ours.stat("window")[0], results[other].stat("window")[0]  # type: ignore[index]
            print(f"ratio ours-dracut / {other}: {a / b:.2f} (unlock window medians)")
    if "ours-mkinitcpio" in results and ours and ours.stat("kernel_window"):
        a = results["ours-mkinitcpio"].stat("kernel_window")
        b = ours.stat("kernel_window")
        if a and b:
            print(f"ratio ours-mkinitcpio / ours-dracut: {a[0] / b[0]:.2f} (kernel-probe window medians)")
    ratios = to_floor(results)
    if ratios:
        row = "{:16s} {:>9s} {:>9s}   {:>22s} {:>9s}"
        print("\n" + row.format("medians", "window s", "/ floor", "kernel-probe window s", "/ floor"))
        for v, (window, kernel_window) in ratios.items():
            r = results[v]
            print(row.format(v, _num(r.median("window")), _num(window), _num(r.median("kernel_window")),
                             _num(kernel_window)))


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def time_command(argv: list[str], input: bytes | None = None, n: int = 10, env: dict[str, str] | None = None) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(argv, input=input, capture_output=True, check=True, env={**os.environ, **(env or {})})
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def host_bench(binary: Path, work: Path) -> None:
    """Cold start and unseal + open-test on the host, against tpm2-tools and Clevis."""
    print("\nhost (medians of 10):", flush=True)
    print(f"  frozen binary --version: {time_command([str(binary), '--version']) * 1000:.0f} ms; "
          f"python -m unlocker.cli --version: "
          f"{time_command([sys.executable, '-m', 'unlocker.cli', '--version']) * 1000:.0f} ms")
    with Swtpm(work / "host-tpm") as tpm:
        disk = work / "host.img"
        run(["truncate", "-s", "20M", disk])
        run(["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf", "pbkdf2",
             "--pbkdf-force-iterations", "1000", "--key-file=-", disk], input=PASSPHRASE)
        blob = work / "blob"
        run([binary, "enroll", disk, "--pcrs", PCRS, "--store", f"file={blob}", "--unlock-key-file", "-",
             "--tcti", tpm.tcti], input=PASSPHRASE)
        ours = time_command([str(binary), "unlock", str(disk), "--test", "--tries", "0", "--tcti", tpm.tcti])
        ours_py = time_command([sys.executable, "-m", "unlocker.cli", "unlock", str(disk), "--test", "--tries", "0",
                                "--tcti", tpm.tcti])
        # our key binds the lock PCR too (15, at its reset value): the chain's policy names it
        chain = (f"set -o pipefail; tpm2_createprimary -Q -C o -G ecc -a '{SRK_ATTRS}' -c {work}/p.ctx && "
                 f"tpm2_load -Q -C {work}/p.ctx -u {blob}/key.pub -r {blob}/key.priv -c {work}/k.ctx && "
                 f"tpm2_flushcontext -t && tpm2_unseal -c {work}/k.ctx -p pcr:{LOCKED_PCRS} | "
                 f"cryptsetup open --test-passphrase --key-slot 1 --key-file=- {disk}; rc=$?; tpm2_flushcontext -t; "
                 "exit $rc")
        run(["bash", "-c", chain], env={"TPM2TOOLS_TCTI": tpm.tcti})  # it must open the slot, else the figure lies
        tools = time_command(["bash", "-c", chain], env={"TPM2TOOLS_TCTI": tpm.tcti})
        print(f"  unseal + open-test: ours frozen {ours * 1000:.0f} ms, ours under python {ours_py * 1000:.0f} ms, "
              f"tpm2-tools chain {tools * 1000:.0f} ms", flush=True)
        if shutil.which("clevis"):
            cdisk = work / "clevis.img"
            shutil.copy(disk, cdisk)
            run(["clevis", "luks", "bind", "-y", "-k", "-", "-d", cdisk, "tpm2", '{"pcr_bank":"sha256","pcr_ids":"16"}'],
                input=PASSPHRASE, env={"TPM2TOOLS_TCTI": tpm.tcti})
            clevis = time_command(["bash", "-c", f"clevis luks pass -d {cdisk} -s 2 | cryptsetup open --test-passphrase "
                                   f"--key-slot 2 --key-file=- {cdisk}"], env={"TPM2TOOLS_TCTI": tpm.tcti})
            print(f"  clevis luks pass + open-test: {clevis * 1000:.0f} ms; ratio ours/clevis {ours / clevis:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boots", type=int, default=7)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--work", type=Path)
    parser.add_argument("--host-only", action="store_true")
    parser.add_argument("--cpus", type=int, default=1,
                        help="emulated CPUs per guest (default 1; TCG runs them on host threads)")
    parser.add_argument("--trace", action="store_true",
                        help="boot ours with tpm2_unlocker.debug and print each boot's timeline (slower: not for the medians)")
    opts = parser.parse_args()
    variants = [v for v in opts.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants: {', '.join(sorted(unknown))} (choose from {', '.join(VARIANTS)})")
    work = opts.work or Path(tempfile.mkdtemp(prefix="tpm2-unlocker-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if "clevis" in variants:
        ensure_clevis()
    source = chosen()
    print(f"using {source.describe()} ({FROM_ENV}=checkout|installed chooses)", flush=True)
    binary = source_binary(source, work)
    print(f"frozen binary: {binary.stat().st_size / 1e6:.1f} MB", flush=True)
    host_bench(binary, work)
    if opts.host_only:
        return
    kernel = fetch_kernel()
    print(f"building images ({DRACUT_DRIVERS}) ...", flush=True)
    images = build_images(kernel, binary, work, variants, source)
    state = work / "tpm"
    golden = build_root_image(work / "golden", binary, PASSPHRASE)
    results: dict[str, Result] = {}
    for v in variants:
        vwork = work / v
        vwork.mkdir(exist_ok=True)
        disk = vwork / "root.img"
        shutil.copy(golden.path, disk)
        if v == "floor":
            add_floor_key(disk, floor_key(work))
        elif v != "passphrase":
            with Swtpm(state) as tpm:
                enroll(v, disk, tpm, binary)
        results[v] = Result(v, images[v].size_mb)
    for i in range(opts.boots):  # interleaved, so drift in machine load spreads over every variant
        for v in variants:
            clear_lockout(state)
            root = RootImage(work / v / "root.img", golden.uuid, PASSPHRASE)
            sample = boot_variant(kernel, images[v], v, root, state, work / v, f"boot{i}", opts.cpus, opts.trace)
            results[v].samples.append(sample)
            print(f"  boot {i + 1}/{opts.boots} {v}: window {sample.window}, kernel-probe window "
                  f"{sample.kernel_window}, unlocked at {sample.unlocked}, root {sample.root}", flush=True)
    report(results)
    print(f"\nconsole logs in {work}")


if __name__ == "__main__":
    main()
