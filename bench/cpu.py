"""Where the busybox boot's CPU goes: `python -m bench.cpu [--boots N] [--cpus N] [--work DIR]`.

Boots the busybox image (vm/minicpio, as `bench.run` builds it) with the kernel's scheduler and
module trace events on; its /init prints the trace buffer once the hooks are done (`tpm2u.ftrace`).
From the context switches this sums the CPU seconds of each program from `/init` to the disk's probe
(the kernel's `[vda]` line) and from there to the end of the hooks (the kernel-probe window of
`bench.run`), shows each of our threads, and lists the programs started, the modules the kernel
asked for and the modules loaded, with their uptime. With one emulated CPU a window is a queue: this
says who is in it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from bench.run import VDA, clear_lockout, enroll
from vm.guest import PASSPHRASE, Guest, ImageKind
from vm.images import source_binary
from vm.initramfs import build_mkinitcpio_busybox
from vm.kernel import fetch_kernel
from vm.rootfs import RootImage, build_root_image
from vm.source import FROM_ENV, chosen
from vm.swtpm import Swtpm

EVENTS = ("sched:sched_switch", "sched:sched_process_exec", "module:module_load", "module:module_request")
CMDLINE = f"trace_event={','.join(EVENTS)} trace_buf_size=8M tpm2u.ftrace"
OURS = "tpm2-unlocker"
INIT = re.compile(r"\[\s*([0-9.]+)\] Run /init")
DISK = re.compile(VDA.pattern.decode())  # the kernel's probe of the disk, as bench.run finds it
DONE = re.compile(r"TPM2U-STOPWATCH hooks-done ([0-9.]+)")
# "comm-pid [cpu] flags timestamp: event: details"
EVENT = re.compile(r"^\s*(.+?)-(\d+)\s+\[\d+\]\s+\S+\s+([0-9.]+): (\w+): (.*)$")
MARK = re.compile(r"([0-9.]+): tracing_mark_write: hooks-done")
SWITCH = re.compile(r"prev_comm=(.+?) prev_pid=(\d+) .*next_comm=")


@dataclass
class Profile:
    init: float
    disk: float
    done: float
    # CPU seconds per program (comm): [from /init to the disk's probe, from the probe to the hooks' end]
    programs: dict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0]))
    # the same per thread of ours (pid), with the first and last moment it ran
    ours: dict[int, list[float]] = field(default_factory=dict)
    started: list[tuple[float, str]] = field(default_factory=list)  # programs exec'd, modules loaded


def parse(log: str) -> Profile:
    """A console log of a `tpm2u.ftrace` boot: what ran on the CPU, in which part of the boot."""
    found = [pattern.search(log) for pattern in (INIT, DISK, DONE)]
    if not all(found) or "TPM2U-TRACE-BEGIN" not in log:
        raise ValueError("no /init, disk probe, end of the hooks or trace in this console log")
    init, disk, done = (float(m.group(1)) for m in found)  # type: ignore[union-attr]
    body = log.split("TPM2U-TRACE-BEGIN", 1)[1].split("TPM2U-TRACE-END", 1)[0]
    # /init's mark is /proc/uptime (CLOCK_BOOTTIME); the kernel's lines and the trace are stamped by
    # its local clock, tens of ms apart: the copy /init writes into the trace is on the trace's clock
    marked = MARK.search(body)
    profile = Profile(init, disk, float(marked.group(1)) if marked else done)
    last = None
    for line in body.replace("\r", "").split("\n"):
        m = EVENT.match(line)
        if not m:
            continue
        at, name, details = float(m.group(3)), m.group(4), m.group(5)
        if name == "sched_process_exec":
            profile.started.append((at, details.split()[0].removeprefix("filename=")))
        elif name == "module_load":
            profile.started.append((at, f"module {details.split()[0]}"))
        elif name == "module_request":  # the kernel asking modprobe for a module by alias
            profile.started.append((at, f"request {details.split()[0]}"))
        elif name == "sched_switch" and (s := SWITCH.search(details)):
            if last is not None:
                _account(profile, s.group(1), int(s.group(2)), max(last, init), at)
            last = at
    return profile


def _account(profile: Profile, comm: str, pid: int, start: float, end: float) -> None:
    """The CPU time of `comm` from start to end, split at the disk's probe; nothing after the hooks."""
    for part, (lo, hi) in enumerate(((profile.init, profile.disk), (profile.disk, profile.done))):
        seconds = min(end, hi) - max(start, lo)
        if seconds > 0:
            profile.programs[comm][part] += seconds
            if comm == OURS:
                thread = profile.ours.setdefault(pid, [0.0, 0.0, start, end])
                thread[part] += seconds
                thread[2], thread[3] = min(thread[2], start), max(thread[3], end)


def report(profile: Profile) -> str:
    p = profile
    lines = [f"/init {p.init:.3f} s, disk probed +{p.disk - p.init:.3f} s, hooks done +{p.done - p.init:.3f} s",
             "CPU seconds   before the disk   after (kernel-probe window)"]
    for comm, (before, after) in sorted(p.programs.items(), key=lambda kv: -sum(kv[1])):
        if before + after >= 0.005:
            lines.append(f"  {comm:16s}  {before:6.3f}            {after:6.3f}")
    lines.append(f"  {'total':16s}  {sum(v[0] for v in p.programs.values()):6.3f}            "
                 f"{sum(v[1] for v in p.programs.values()):6.3f}")
    lines.append(f"threads of {OURS} (pid: before, after, ran from-to):")
    for pid, (before, after, first, last) in sorted(p.ours.items(), key=lambda kv: kv[1][2]):
        lines.append(f"  {pid:5d}: {before:.3f} {after:.3f}  {first:.3f}-{last:.3f}")
    lines.append("started (uptime, +from /init):")
    lines += [f"  {at:8.3f} {at - p.init:+7.3f}  {what}" for at, what in p.started if p.init <= at <= p.done]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boots", type=int, default=1)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--work", type=Path)
    opts = parser.parse_args()
    work = opts.work or Path(tempfile.mkdtemp(prefix="tpm2-unlocker-cpu-"))
    work.mkdir(parents=True, exist_ok=True)
    source = chosen()
    print(f"using {source.describe()} ({FROM_ENV}=checkout|installed chooses)", flush=True)
    binary = source_binary(source, work)
    kernel = fetch_kernel()
    image = build_mkinitcpio_busybox(kernel, binary, work / "busybox.img", hooks=source.mkinitcpio)
    golden = build_root_image(work / "golden", binary, PASSPHRASE)
    disk = work / "root.img"
    shutil.copy(golden.path, disk)
    state = work / "tpm"
    with Swtpm(state) as tpm:
        enroll("ours-mkinitcpio", disk, tpm, binary)
    kind = ImageKind("mkinitcpio", image.path, r"Enter passphrase for /dev/vda: ")
    for i in range(opts.boots):
        clear_lockout(state)
        guest = Guest(kernel, kind, RootImage(disk, golden.uuid, PASSPHRASE), state, work, opts.cpus)
        result = guest.run_boot(f"boot{i}", extra=CMDLINE)
        print(f"\nboot {i + 1}/{opts.boots}" + (" (asked for the passphrase: the TPM path failed)" if result.prompted else ""))
        print(report(parse(result.log)), flush=True)
    print(f"\nconsole logs in {work}")


if __name__ == "__main__":
    main()
