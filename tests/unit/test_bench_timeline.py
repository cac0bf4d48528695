"""bench.run's reading of a console log: the samples of the table and the lines --trace prints."""

from __future__ import annotations

from bench.run import cmdline_extra, parse, timeline

BUSYBOX_BOOT = (
    b"[    1.902303] Run /init as init process\r\n"
    b"[    2.100000] input: AT Translated Set 2 keyboard\r\n"
    b"[    3.398041] random: crng init done\r\n"
    b"[    3.509431] virtio_blk virtio0: [vda] 262144 512-byte logical blocks (134 MB/128 MiB)\r\n"
    b"tpm2-unlocker: [    4.091] tpm2-unlocker 0.1.0: unlock --tries 0 --timeout 30\r\n"
    b"tpm2-unlocker: /dev/vda: unlocked with the TPM as root\r\n"
    b"TPM2U-STOPWATCH hooks-done 5.14\r\n"
    b"[    5.300000] EXT4-fs (dm-0): mounted filesystem\r\n"
    b"TPM2U-ROOT-REACHED uptime=5.93\r\n"
)
DRACUT_LINE = b"[    8.121410] tpm2-unlocker[94]: tpm2-unlocker: [    6.822] TPM connected, storage key and session ready\r\n"


def test_trace_prints_the_lines_that_set_the_pace_and_ours_in_order() -> None:
    assert timeline(BUSYBOX_BOOT + DRACUT_LINE) == [
        "[    1.902303] Run /init as init process",
        "[    3.398041] random: crng init done",
        "[    3.509431] virtio_blk virtio0: [vda] 262144 512-byte logical blocks (134 MB/128 MiB)",
        "tpm2-unlocker: [    4.091] tpm2-unlocker 0.1.0: unlock --tries 0 --timeout 30",
        "tpm2-unlocker: /dev/vda: unlocked with the TPM as root",
        "TPM2U-STOPWATCH hooks-done 5.14",
        "TPM2U-ROOT-REACHED uptime=5.93",
        "[    8.121410] tpm2-unlocker[94]: tpm2-unlocker: [    6.822] TPM connected, storage key and session ready",
    ]


def test_the_busybox_window_runs_from_the_kernel_probe_to_the_end_of_the_hooks() -> None:
    sample = parse(BUSYBOX_BOOT)
    assert sample.kernel_window is not None and abs(sample.kernel_window - (5.14 - 3.509431)) < 1e-9
    assert sample.window == sample.kernel_window and sample.unlocked == 5.14 and sample.root == 5.93


def test_trace_turns_on_our_debug_lines_only() -> None:
    assert cmdline_extra("ours-mkinitcpio", trace=True) == "tpm2_unlocker.debug"
    assert cmdline_extra("ours-mkinitcpio") == ""
    assert cmdline_extra("clevis", trace=True) == ""
    assert cmdline_extra("systemd-tpm2", trace=True) == "rd.luks.options=tpm2-device=auto"
