"""bench.run's reading of a console log: the samples of the table and the lines --trace prints."""

from __future__ import annotations

import pytest

from bench.run import Result, Sample, cmdline_extra, parse, report, timeline, to_floor

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
# a systemd image's stopwatch units: the disk's unit, then cryptsetup.target's
DRACUT_BOOT = (
    b"[    9.020000] virtio_blk virtio1: [vda] 262144 512-byte logical blocks (134 MB/128 MiB)\r\n"
    b"TPM2U-STOPWATCH disk 9.45\r\n"
    b"[   10.800000] systemd[1]: Finished systemd-cryptsetup@luks.service.\r\n"
    b"TPM2U-STOPWATCH crypt 11.25\r\n"
    b"TPM2U-ROOT-REACHED uptime=21.5\r\n"
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


def test_floor_opens_the_disk_with_the_key_file_in_its_image() -> None:
    assert cmdline_extra("floor") == cmdline_extra("floor", trace=True) == "rd.luks.key=/etc/tpm2u-floor.key"


def test_a_systemd_window_runs_between_the_stopwatch_units_the_kernel_window_from_the_probe() -> None:
    sample = parse(DRACUT_BOOT)
    assert sample.window == pytest.approx(11.25 - 9.45)
    assert sample.kernel_window == pytest.approx(11.25 - 9.02)
    assert sample.unlocked == 11.25 and sample.root == 21.5


def _result(variant: str, *samples: tuple[float | None, float | None]) -> Result:
    return Result(variant, 50.0, [Sample(w, k, None, None) for w, k in samples])


def test_each_variant_is_divided_by_the_floor_median_by_median_and_missing_medians_give_none() -> None:
    results = {"floor": _result("floor", (2.0, 3.0), (2.4, 3.4), (2.2, 3.2)),
               "ours-dracut": _result("ours-dracut", (3.3, 4.0), (None, 4.8)),
               "clevis": _result("clevis", (None, None))}
    ratios = to_floor(results)
    assert list(ratios) == ["floor", "ours-dracut", "clevis"]
    assert ratios["floor"] == (1.0, 1.0)
    assert ratios["ours-dracut"] == (pytest.approx(3.3 / 2.2), pytest.approx(4.4 / 3.2))  # medians of what was measured
    assert ratios["clevis"] == (None, None)


def test_without_a_floor_or_its_window_there_is_no_ratio() -> None:
    assert to_floor({"ours-dracut": _result("ours-dracut", (3.0, 4.0))}) == {}
    ratios = to_floor({"floor": _result("floor", (None, 3.0)), "passphrase": _result("passphrase", (6.0, 6.0))})
    assert ratios["passphrase"] == (None, 2.0)


def test_report_prints_each_variant_window_and_its_ratio_to_the_floor(capsys: pytest.CaptureFixture[str]) -> None:
    report({"floor": _result("floor", (2.0, 4.0)), "passphrase": _result("passphrase", (5.0, 6.0))})
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].split() == ["medians", "window", "s", "/", "floor", "kernel-probe", "window", "s", "/", "floor"]
    assert lines[-2].split() == ["floor", "2.00", "1.00", "4.00", "1.00"]
    assert lines[-1].split() == ["passphrase", "5.00", "2.50", "6.00", "1.50"]
