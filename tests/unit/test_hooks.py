"""The mkinitcpio install script against mkinitcpio's documented API (add_* stubbed, calls recorded),
and the dracut module's shape. Both are booted for real in tests/vm."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from unlocker import options

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "mkinitcpio" / "install" / "tpm2-unlocker"
STUBS = """
for f in add_module add_all_modules add_binary add_file add_dir add_symlink add_runscript add_udev_rule \
         add_full_dir; do
    eval "$f() { printf '%s' $f >>\\"\\$LOG\\"; printf ' %s' \\"\\$@\\" >>\\"\\$LOG\\"; echo >>\\"\\$LOG\\"; }"
done
map() { local f=$1; shift; for a in "$@"; do "$f" "$a"; done; }
# as mkinitcpio's (with $FILES_MUST_EXIST): a file that is not there is an ERROR (the image is still written)
eval "_logged_$(declare -f add_file)"
add_file() {
    [[ -z $FILES_MUST_EXIST || -e $1 ]] || { echo "ERROR: file not found: '$1'"; return 1; }
    _logged_add_file "$@"
}
"""
# What the `systemd` hook's install script defines; a hook after it knows the image is a systemd one.
SYSTEMD_HOOK = "add_systemd_unit() { echo \"add_systemd_unit $*\" >>\"$LOG\"; }\n"
UNITS = {"TPM2_UNLOCKER_UNIT": str(REPO / "dracut" / "90tpm2-unlocker" / "tpm2-unlocker.service"),
         "TPM2_UNLOCKER_LOCK_UNIT": str(REPO / "dracut" / "90tpm2-unlocker" / "tpm2-unlocker-lock.service"),
         "TPM2_UNLOCKER_SKIP_CONF": str(REPO / "dracut" / "90tpm2-unlocker" / "systemd-cryptsetup-skip.conf")}


def run_install(tmp_path: Path, func: str, unpack_rc: int = 0, blob_files: str = "", systemd: bool = False,
                units: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The install script's `func` with the add_* functions stubbed (after the `systemd` hook's, if
    `systemd`; the unit files from `units`, else where the script looks by default), and for the
    binary a script that records its arguments (the real `unpack` is tested on the frozen binary, tests/vm)."""
    log = tmp_path / "calls.log"
    binary = tmp_path / "tpm2-unlocker"
    libraries = subprocess.run([sys.executable, "-m", "unlocker.cli", "unpack", "--libraries"],
                               capture_output=True, text=True, check=True).stdout
    binary.write_text(f'#!/bin/sh\necho "binary $*" >> "$LOG"\n'
                      f'[ "$*" = "unpack --libraries" ] && {{ printf %s "{libraries}"; exit 0; }}\n'
                      f'[ "$*" = "unpack --blob-files" ] && {{ printf %s "$BLOB_FILES"; exit 0; }}\nexit {unpack_rc}\n')
    binary.chmod(0o755)
    stubs = STUBS + (SYSTEMD_HOOK if systemd else "")
    script = f"{stubs}\nerror() {{ echo \"ERROR: $*\"; }}\n. '{INSTALL}'\n{func}\n"
    done = subprocess.run(["bash", "-uc", script], capture_output=True, text=True,
                          env={"LOG": str(log), "PATH": "/usr/bin:/bin", "TPM2_UNLOCKER_BINARY": str(binary),
                               "BLOB_FILES": blob_files, **(UNITS if units is None else units),
                               "FILES_MUST_EXIST": "" if units is None else "1",
                               "BUILDROOT": "/build/root"})
    calls = [line.strip() for line in log.read_text().splitlines()] if log.exists() else []
    return done, calls


def test_build_adds_binary_cryptsetup_modules_rules_runscript_and_unit(tmp_path: Path) -> None:
    done, calls = run_install(tmp_path, "build", systemd=True)
    assert done.returncode == 0, done.stdout + done.stderr
    # the program goes in unpacked: no copy-out to /run and second start at each boot
    assert calls[calls.index("binary unpack /build/root/usr/lib/tpm2-unlocker") + 1] == \
        "add_symlink /usr/bin/tpm2-unlocker /usr/lib/tpm2-unlocker/tpm2-unlocker"
    assert "add_binary cryptsetup" in calls and "add_binary dmsetup" in calls
    assert "add_module dm-crypt" in calls and "add_module tpm_crb?" in calls and "add_module tpm_tis?" in calls
    assert "add_all_modules /crypto/" in calls
    for rule in ("10-dm.rules", "13-dm-disk.rules", "95-dm-notify.rules"):
        assert f"add_udev_rule {rule}" in calls
    # systemd image: the unit, enabled, before cryptsetup-pre.target (no runtime hook: nothing runs it)
    assert "add_runscript" not in calls
    assert f"add_file {UNITS['TPM2_UNLOCKER_UNIT']} /usr/lib/systemd/system/tpm2-unlocker.service" in calls
    assert ("add_symlink /usr/lib/systemd/system/sysinit.target.wants/tpm2-unlocker.service "
            "../tpm2-unlocker.service") in calls
    assert (f"add_file {UNITS['TPM2_UNLOCKER_SKIP_CONF']} "
            "/usr/lib/systemd/system/systemd-cryptsetup@.service.d/tpm2-unlocker.conf") in calls
    assert "add_binary /usr/lib/x86_64-linux-gnu/libresolv.so.2" in calls
    # as `encrypt` adds them, wherever the system keeps its libraries (Arch: /usr/lib)
    assert any(c.startswith("add_binary /usr/lib") and c.endswith("/libgcc_s.so.1") for c in calls)
    assert any(c.startswith("add_binary /usr/lib") and c.endswith("/ossl-modules/legacy.so") for c in calls)
    assert not any("11-dm-initramfs" in c for c in calls)  # Arch's device-mapper file only where it exists


def test_busybox_image_needs_no_systemd_unit_on_the_host(tmp_path: Path) -> None:
    missing = {name: str(tmp_path / "not-installed" / Path(path).name) for name, path in UNITS.items()}
    # the stubbed add_file says ERROR for a missing file, as mkinitcpio's does: in a systemd image
    done, calls = run_install(tmp_path, "build", systemd=True, units=missing)
    assert "ERROR: file not found" in done.stdout
    # a busybox image (no `systemd` hook before ours) takes no unit, and so says no ERROR
    (tmp_path / "calls.log").unlink()
    done, calls = run_install(tmp_path, "build", units=missing)
    assert done.returncode == 0
    assert "ERROR" not in done.stdout + done.stderr
    assert "add_runscript" in calls
    assert not any(".service" in c or "cryptsetup-skip" in c for c in calls)


def test_build_fails_with_one_line_when_the_binary_cannot_unpack(tmp_path: Path) -> None:
    done, calls = run_install(tmp_path, "build", unpack_rc=1)
    assert done.returncode == 1
    assert f"ERROR: tpm2-unlocker: could not unpack {tmp_path / 'tpm2-unlocker'} into the image" in done.stdout
    assert not any(c.startswith("add_symlink /usr/bin/tpm2-unlocker") for c in calls)


def test_help_documents_every_kernel_parameter(tmp_path: Path) -> None:
    text = run_install(tmp_path, "help")[0].stdout
    for parameter in options.kernel_params():  # the table the man page lists
        name, equals, value = parameter.syntax.partition("=")
        assert name + equals + ("0" if value == "0" else "") in text, parameter.syntax


FAKE_BINARY = """#!/bin/sh
echo "$*" >>"$CALLS"
n=$(wc -l <"$CALLS")
eval "sleep \\${SLEEP_$n:-0}"
eval "exit \\${RC_$n:-0}"
"""


def run_runtime_hook(tmp_path: Path, rc_first: int, rc_second: int = 0, under: tuple[str, ...] = (),
                     hang_first: bool = False) -> tuple[str, list[str]]:
    """mkinitcpio's init sequence for our hook (source, run_earlyhook, source again, run_hook) in
    busybox sh (run by the command `under`, if given), with a fake binary that records its arguments
    and a modprobe that does nothing."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "tpm2-unlocker"
    fake.write_text(FAKE_BINARY)
    (bindir / "modprobe").write_text("#!/bin/sh\nexit 0\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    calls = tmp_path / "calls"
    calls.touch()
    hook = REPO / "mkinitcpio" / "hooks" / "tpm2-unlocker"
    script = (f"err() {{ echo \"ERROR: $*\"; }}\n. '{hook}'\nrun_earlyhook\nunset -f run_hook\n"
              f". '{hook}'\nrun_hook\n")
    done = subprocess.run([*under, "busybox", "sh", "-c", script], capture_output=True, text=True, timeout=60,
                          env={"PATH": f"{bindir}:/usr/bin:/bin", "TPM2_UNLOCKER_BIN": str(fake),
                               "CALLS": str(calls), "RC_1": str(rc_first), "RC_2": str(rc_second),
                               "SLEEP_1": "600" if hang_first else "0", "TPM2_UNLOCKER_EARLY_LIMIT": "2"})
    assert done.returncode == 0, done.stderr
    return done.stdout, calls.read_text().splitlines()


def test_runtime_hook_tpm_success_in_the_background_needs_no_second_run(tmp_path: Path) -> None:
    out, calls = run_runtime_hook(tmp_path, rc_first=0)
    assert calls == ["unlock --tries 0 --defer-lock --defer-pin"]
    assert "ERROR" not in out


def test_runtime_hook_starts_no_reader_of_the_random_pool(tmp_path: Path) -> None:
    """A reader that waits for the kernel's pool makes the kernel spin on timer jitter until it is
    seeded: on one CPU that is time taken from udev and the binary. The binary seeds the pool from
    the TPM when it has to (unlocker/boot/entropy.py); the hook must not start that spin beside it.
    Every process of the hook's runs is traced until it ends (what it starts in the background too):
    none opens /dev/random or calls getrandom() without GRND_NONBLOCK, either of which waits."""
    assert "/dev/random" not in (REPO / "mkinitcpio" / "hooks" / "tpm2-unlocker").read_text()  # branches not run here
    try:
        subprocess.run(["strace", "-V"], capture_output=True, check=True)
    except FileNotFoundError:
        raise AssertionError("strace is not installed (apt-get install strace)") from None
    trace = tmp_path / "trace"
    trace.mkdir()
    run_runtime_hook(tmp_path, rc_first=3, under=("strace", "-f", "-ff", "-qq", "-e", "trace=execve,open,openat,getrandom",
                                                  "-o", str(trace / "process")))
    calls = [line for f in trace.iterdir() for line in f.read_text().splitlines()]
    started = [c.split('"')[1] for c in calls if c.startswith("execve(") and c.endswith(" = 0")]
    # the trace followed the hook into what it starts: modprobe, and the binary for both runs
    assert started.count(str(tmp_path / "bin" / "modprobe")) == 1, started
    assert started.count(str(tmp_path / "bin" / "tpm2-unlocker")) == 2, started
    waits = [c for c in calls if '"/dev/random"' in c
             or (c.startswith("getrandom(") and "GRND_NONBLOCK" not in c and "GRND_INSECURE" not in c)]
    assert waits == []


def test_runtime_hook_asks_in_the_foreground_after_a_tpm_failure(tmp_path: Path) -> None:
    out, calls = run_runtime_hook(tmp_path, rc_first=3, rc_second=0)
    assert calls == ["unlock --tries 0 --defer-lock --defer-pin", "unlock --no-tpm"]
    assert "ERROR" not in out


def test_runtime_hook_tries_the_tpm_again_for_a_device_that_came_late(tmp_path: Path) -> None:
    out, calls = run_runtime_hook(tmp_path, rc_first=8, rc_second=0)  # 8: device not found in time
    assert calls == ["unlock --tries 0 --defer-lock --defer-pin", "unlock"]
    assert "ERROR" not in out


def test_runtime_hook_tries_the_tpm_again_for_a_key_that_needs_the_pin(tmp_path: Path) -> None:
    out, calls = run_runtime_hook(tmp_path, rc_first=10, rc_second=0)  # 10: the early run cannot ask the PIN
    assert calls == ["unlock --tries 0 --defer-lock --defer-pin", "unlock"]
    assert "ERROR" not in out


def test_runtime_hook_reports_when_nothing_opens_the_disk(tmp_path: Path) -> None:
    out, calls = run_runtime_hook(tmp_path, rc_first=4, rc_second=6)
    assert len(calls) == 2
    assert "ERROR: tpm2-unlocker: the LUKS device(s) could not be opened" in out


def test_systemd_unit_runs_before_cryptsetup_pre_and_only_tries_the_tpm() -> None:
    unit = (REPO / "dracut" / "90tpm2-unlocker" / "tpm2-unlocker.service").read_text()
    assert "Before=cryptsetup-pre.target cryptsetup.target" in unit
    assert "ExecStart=/usr/bin/tpm2-unlocker unlock --tries 0" in unit
    assert "DefaultDependencies=no" in unit


# dracut's require_binaries (dracut-init.sh) as it behaves: each argument looked for (a path: an
# executable there; a name: in PATH), the return value the number not found
REQUIRE_BINARIES = """
require_binaries() {
    local cmd missing=0
    for cmd in "$@"; do
        echo "$cmd" >>"$LOG"
        if [[ $cmd == */* ]]; then [[ -x $cmd ]] || missing=$((missing + 1))
        else command -v "$cmd" >/dev/null || missing=$((missing + 1)); fi
    done
    return $missing
}
"""


def test_dracut_check_needs_cryptsetup_and_the_binary_and_is_only_used_when_asked_for(tmp_path: Path) -> None:
    """module-setup.sh sourced in bash as dracut sources it, with require_binaries: it defines
    dracut's four functions, and check() returns 255 (never picked by hostonly detection, included
    when asked for) when cryptsetup and the binary are there, 1 (not installable) when either is not."""
    setup = REPO / "dracut" / "90tpm2-unlocker" / "module-setup.sh"
    for present, status in [({"cryptsetup", "tpm2-unlocker"}, 255), ({"cryptsetup"}, 1), ({"tpm2-unlocker"}, 1)]:
        case = tmp_path / "-".join(sorted(present))
        (case / "bin").mkdir(parents=True)
        for name in present:
            (case / "bin" / name).write_text("#!/bin/sh\n")
            (case / "bin" / name).chmod(0o755)
        binary = case / "bin" / "tpm2-unlocker"
        script = (f"PATH='{case / 'bin'}'\n{REQUIRE_BINARIES}\n. '{setup}'\n"
                  "declare -F check depends installkernel install >/dev/null || exit 100\ncheck\n")
        done = subprocess.run(["bash", "-uc", script], capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "LOG": str(case / "required"),
                                   "TPM2_UNLOCKER_BINARY": str(binary)})
        assert (done.returncode, done.stderr) == (status, ""), present
        assert (case / "required").read_text().split() == ["cryptsetup", str(binary)], present


def test_both_hooks_install_the_one_library_list(tmp_path: Path) -> None:
    """mkinitcpio's build() adds every library `unpack --libraries` names, and the dracut module
    asks the binary for the same list (no list of its own)."""
    from unlocker.commands.unpack import SYSTEM_LIBRARIES

    done, calls = run_install(tmp_path, "build")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "binary unpack --libraries" in calls
    for lib in SYSTEM_LIBRARIES:
        assert any(c.startswith("add_binary /usr/lib") and c.endswith("/" + lib) for c in calls), lib
    setup = (REPO / "dracut" / "90tpm2-unlocker" / "module-setup.sh").read_text()
    assert '"$TPM2_UNLOCKER_BINARY" unpack --libraries' in setup
    assert not any(lib in setup for lib in SYSTEM_LIBRARIES)


def test_no_hook_repeats_a_default_of_the_option_table() -> None:
    """The hooks, the unit and the initqueue job pass only `--tries 0` (systemd-cryptsetup or the
    second run asks), never a --timeout or --tries N of their own: the defaults live in options.py."""
    texts = [(REPO / "mkinitcpio" / "hooks" / "tpm2-unlocker").read_text()]
    texts += [(REPO / "dracut" / "90tpm2-unlocker" / name).read_text()
              for name in ("tpm2-unlocker.service", "tpm2-unlocker-initqueue.sh")]
    for text in texts:
        assert "--timeout" not in text
        for line in text.splitlines():
            if " unlock" in line and "--tries" in line:
                assert "--tries 0" in line, line


def test_the_unit_counts_a_usage_error_or_a_bug_as_failure() -> None:
    unit = (REPO / "dracut" / "90tpm2-unlocker" / "tpm2-unlocker.service").read_text()
    [line] = [line for line in unit.splitlines() if line.startswith("SuccessExitStatus=")]
    codes = set(line.split("=", 1)[1].split())
    assert codes == {"2", "3", "4", "5", "6", "7", "8", "10"}  # TPM refusals, no PIN: systemd-cryptsetup asks next


def test_the_image_carries_exactly_the_blob_files_the_binary_names(tmp_path: Path) -> None:
    """One file a line, taken whole: a name with a space or a glob is one file, never split or expanded."""
    names = "/etc/tpm2-unlocker/a/key.pub\n/etc/tpm2-unlocker/b c/key.priv\n/etc/tpm2-unlocker/*/key.pub\n"
    done, calls = run_install(tmp_path, "build", blob_files=names)
    assert done.returncode == 0, done.stdout + done.stderr
    carried = [c for c in calls if c.startswith("add_file /etc/tpm2-unlocker/")]
    assert carried == ["add_file /etc/tpm2-unlocker/a/key.pub", "add_file /etc/tpm2-unlocker/b c/key.priv",
                       "add_file /etc/tpm2-unlocker/*/key.pub"]
    assert not any(c.startswith("add_full_dir") for c in calls)
    setup = (REPO / "dracut" / "90tpm2-unlocker" / "module-setup.sh").read_text()
    assert '"$TPM2_UNLOCKER_BINARY" unpack --blob-files' in setup and "IFS= read -r blob" in setup


@pytest.mark.parametrize("locked", [True, False])
def test_the_cleanup_hook_locks_only_when_no_run_did(locked: bool, tmp_path: Path) -> None:
    """run_cleanuphook (before switch_root): `lock` when no run of this boot left the marker."""
    fake = tmp_path / "tpm2-unlocker"
    fake.write_text('#!/bin/sh\necho "$*" >>"$CALLS"\n')
    fake.chmod(0o755)
    marker = tmp_path / "locked"
    if locked:
        marker.touch()
    calls = tmp_path / "calls"
    calls.touch()
    hook = REPO / "mkinitcpio" / "hooks" / "tpm2-unlocker"
    done = subprocess.run(["busybox", "sh", "-c", f". '{hook}'\nrun_cleanuphook\n"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "TPM2_UNLOCKER_BIN": str(fake), "CALLS": str(calls),
                               "TPM2_UNLOCKER_LOCKED": str(marker)}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().splitlines() == ([] if locked else ["lock"])


def test_systemd_images_lock_before_the_switch_to_the_root_and_before_a_break_shell(tmp_path: Path) -> None:
    unit = (REPO / "dracut" / "90tpm2-unlocker" / "tpm2-unlocker-lock.service").read_text()
    assert "ExecStart=/usr/bin/tpm2-unlocker lock" in unit
    assert "ConditionPathExists=!/run/tpm2-unlocker/locked" in unit
    assert "Before=initrd-switch-root.target initrd-switch-root.service emergency.service rescue.service" in unit
    done, calls = run_install(tmp_path, "build", systemd=True)
    assert done.returncode == 0, done.stdout + done.stderr
    for target in ("initrd-switch-root.target", "emergency.target"):
        assert (f"add_symlink /usr/lib/systemd/system/{target}.wants/tpm2-unlocker-lock.service "
                "../tpm2-unlocker-lock.service") in calls
    setup = (REPO / "dracut" / "90tpm2-unlocker" / "module-setup.sh").read_text()
    assert "initrd-switch-root.target.wants/tpm2-unlocker-lock.service" in setup
    assert "dracut-emergency.service.wants/tpm2-unlocker-lock.service" in setup
    assert "Before=dracut-emergency.service" in unit
    assert 'inst_hook pre-pivot 90 "$moddir/tpm2-unlocker-lock.sh"' in setup


def test_an_early_run_that_hangs_is_killed_and_the_passphrase_asked(tmp_path: Path) -> None:
    """A TPM (or anything) that never answers: the background run is bounded, run_hook asks."""
    started = time.monotonic()
    out, calls = run_runtime_hook(tmp_path, rc_first=0, hang_first=True)
    assert time.monotonic() - started < 30
    assert calls == ["unlock --tries 0 --defer-lock --defer-pin", "unlock --no-tpm"]
