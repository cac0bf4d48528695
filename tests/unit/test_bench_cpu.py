"""bench.cpu's reading of a traced boot: CPU seconds per program on each side of the disk's probe."""

from __future__ import annotations

import pytest

from bench.cpu import parse, report


def _switch(at: float, comm: str, pid: int, to: str, to_pid: int) -> str:
    return (f"   {comm}-{pid}  [000] d..2.  {at:.6f}: sched_switch: prev_comm={comm} prev_pid={pid} "
            f"prev_prio=120 prev_state=S ==> next_comm={to} next_pid={to_pid} next_prio=120")


LOG = "\n".join([
    "[    1.000000] Run /init as init process",
    "[    2.000000] virtio_blk virtio0: [vda] 262144 512-byte logical blocks (134 MB/128 MiB)",
    "TPM2U-STOPWATCH hooks-done 3.05",
    "TPM2U-TRACE-BEGIN",
    "# tracer: nop",
    _switch(0.900, "swapper/0", 0, "init", 1),
    "            init-1     [000] .....     1.000100: sched_process_exec: filename=/init pid=1 old_pid=1",
    _switch(1.500, "init", 1, "tpm2-unlocker", 94),  # init ran 0.9-1.5, counted from /init on: 0.5
    "   tpm2-unlocker-94  [000] .....  1.600000: module_load: dm_crypt ",
    "   tpm2-unlocker-94  [000] .....  1.700000: module_request: crypto-xts(aes) wait=1 call_site=crypto_alg_mod_lookup",
    _switch(2.500, "tpm2-unlocker", 94, "tpm2-unlocker", 95),  # 1.5-2.5: 0.5 before the probe, 0.5 after
    _switch(2.700, "tpm2-unlocker", 95, "cryptsetup", 96),  # another thread of ours: 0.2 after
    _switch(3.100, "cryptsetup", 96, "init", 1),  # 2.7-3.0 (the trace's hooks-done mark): 0.3
    "            init-1     [000] .....     3.000000: tracing_mark_write: hooks-done",
    "TPM2U-TRACE-END",
])


def test_cpu_seconds_are_split_at_the_disk_probe_and_end_at_the_trace_mark() -> None:
    p = parse(LOG)
    assert (p.init, p.disk, p.done) == (1.0, 2.0, 3.0)  # the trace's own mark, not /proc/uptime's 3.05
    assert p.programs["init"] == pytest.approx([0.5, 0.0])
    assert p.programs["tpm2-unlocker"] == pytest.approx([0.5, 0.7])
    assert p.programs["cryptsetup"] == pytest.approx([0.0, 0.3])
    assert p.ours[94][:2] == pytest.approx([0.5, 0.5]) and p.ours[95][:2] == pytest.approx([0.0, 0.2])
    assert p.started == [(1.0001, "/init"), (1.6, "module dm_crypt"), (1.7, "request crypto-xts(aes)")]
    text = report(p)
    assert "disk probed +1.000 s, hooks done +2.000 s" in text
    assert "total" in text and "module dm_crypt" in text


def test_a_log_without_the_trace_is_refused() -> None:
    with pytest.raises(ValueError, match="no /init"):
        parse(LOG.split("TPM2U-TRACE-BEGIN")[0])
