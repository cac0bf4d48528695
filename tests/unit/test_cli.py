"""Bad command lines and bad devices: one clear line and the exit code of the table, never a traceback."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import run_cli


@pytest.mark.parametrize("args,code,message", [
    ([], 1, b"no verb given"),
    (["frobnicate"], 1, b"invalid choice"),
    (["enroll"], 1, b"the following arguments are required: DEVICE"),
    (["enroll", "/nonexistent/disk", "--pcrs", "sha256:99"], 1, b"PCR 99 is out of range"),
    (["enroll", "/nonexistent/disk", "--store", "cloud"], 1, b"unknown store 'cloud'"),
    (["enroll", "/nonexistent/disk"], 8, b"no such device"),
    (["unlock", "/nonexistent/disk"], 8, b"no such device"),
    (["unlock", "/dev/null", "--tries", "-1"], 1, b"--tries takes a whole number of 0 or more, not '-1'"),
    (["unlock", "--tries", "x"], 1, b"--tries takes a whole number of 0 or more, not 'x'"),
    (["unlock", "--timeout", "inf"], 1, b"--timeout takes a number of seconds from 0 to 3600, not 'inf'"),
    (["unlock", "--timeout", "1e300"], 1, b"--timeout takes a number of seconds from 0 to 3600, not '1e300'"),
    (["unlock", "--tpm-timeout", "nan"], 1, b"--tpm-timeout takes a number of seconds from 0 to 3600, not 'nan'"),
    (["unlock", "--timeout=nan"], 1, b"--timeout takes a number of seconds from 0 to 3600, not 'nan'"),
    (["unlock", "/dev/null", "--timeout", "-3"], 1, b"--timeout takes a number of seconds from 0 to 3600"),
    (["adopt", "/dev/null", "--pcrs", "sha256:7"], 1, b"one of --blob PUB PRIV or --nv INDEX"),
    (["adopt", "/dev/null", "--nv", "0x1500016"], 1, b"adopt needs --pcrs"),
    (["unpack"], 1, b"unpack needs DIR (or --libraries, --blob-files)"),
])
def test_bad_command_lines(args: list[str], code: int, message: bytes) -> None:
    done = run_cli(*args)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert b"Traceback" not in done.stderr


def test_not_a_luks_device(tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(4 << 20))
    done = run_cli("unlock", str(plain), "--test")
    assert done.returncode == 1
    assert b"is not a LUKS device" in done.stderr


def test_unlock_of_a_disk_without_enrolment(disk: Path) -> None:
    done = run_cli("unlock", str(disk), "--test", "--tries", "0")
    assert done.returncode == 1
    assert b"has no tpm2-unlocker enrolment" in done.stderr


def test_version_needs_no_tpm() -> None:
    done = run_cli("--version")
    assert done.returncode == 0 and done.stdout.startswith(b"tpm2-unlocker ")


def test_unpack_needs_the_frozen_binary(tmp_path: Path) -> None:
    """Under plain Python there is no one-file bundle to lay out: one line and a hint, nothing written."""
    done = subprocess.run([sys.executable, "-m", "unlocker.cli", "unpack", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == ("tpm2-unlocker: unpack works on the frozen one-file binary only\n"
                           "tpm2-unlocker: hint: build it with ./run binary and run dist/tpm2-unlocker unpack DIR\n")
    assert not (tmp_path / "out").exists()


# The boot's command lines (the hooks' and the unit's), and variants a user may type.
BOOT_LINES = [
    ["unlock"],
    ["unlock", "--tries", "0", "--timeout", "30"],
    ["unlock", "--tries", "3", "--timeout", "15", "--no-tpm"],
    ["unlock", "--tries=0", "--timeout=2.5", "--tcti", "swtpm:port=2321", "--debug"],
    ["unlock", "--no-tpm", "--tries", "1", "--tries", "2"],
    ["unlock", "--tcti=", "--timeout", "1e1"],
]


@pytest.mark.parametrize("args", BOOT_LINES)
def test_boot_command_line_parses_as_argparse_would(args: list[str]) -> None:
    from unlocker import cli

    fast = cli._boot_unlock(args)
    assert fast is not None
    assert vars(fast) == vars(cli.build_parser().parse_args(args))


@pytest.mark.parametrize("args", [
    [], ["status"], ["--debug", "unlock"], ["unlock", "/dev/vda"], ["unlock", "--test"], ["unlock", "--tries"],
    ["unlock", "--tries", "-1"], ["unlock", "--timeout", "--no-tpm"],
    ["unlock", "--no-tpm=1"], ["unlock", "--tri", "0"], ["unlock", "--", "/dev/vda"],
])
def test_other_command_lines_go_to_argparse(args: list[str]) -> None:
    from unlocker import cli

    assert cli._boot_unlock(args) is None


# Standard modules the boot does not need, each measured as start-up time in the initramfs
# (dataclasses: `inspect` and an `exec` per generated method, unlocker/lean/record.py stands in; json:
# `re`, unlocker/lean/jsonload.py runs the same C scanner; subprocess: `enum`, `re`, unlocker/lean/run.py
# spawns with os.posix_spawn; threading, contextlib: functools and collections, unlocker/lean/threads.py).
NOT_ON_BOOT_PATH = ("argparse", "typing", "shutil", "dataclasses", "inspect", "json", "re", "enum", "subprocess",
                    "threading", "contextlib", "functools", "collections", "math", "hashlib")


def _boot_path_modules() -> set[str]:
    """What the boot path imports beyond a bare `python -S` (no site, as in the frozen binary: the
    venv's .pth files import pathlib, and with it re; _MEIPASS: tss.py finds its C module as in the
    frozen binary's folder)."""
    purelib = sysconfig.get_paths()["purelib"]
    code = (f"import sys\nbase = set(sys.modules)\nsys.path.append({purelib!r})\nsys._MEIPASS = {purelib!r}\n"
            "from unlocker import cli\nfrom unlocker.boot import warmup\n"
            "import unlocker.boot.unlock, unlocker.boot.at_boot, unlocker.boot.devices, unlocker.boot.prompt\n"
            "import unlocker.store, unlocker.tpm.client\n"
            "import unlocker.boot.measured  # imported when the policy fails: names the events behind it\n"
            "cli.parse_args(['unlock', '--tries', '0', '--timeout', '30'])\n"
            "print(' '.join(sorted(set(sys.modules) - base)))")
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_boot_path_imports_only_what_the_rule_allows() -> None:
    """unlocker/lean/__init__.py's rule: our modules outside commands/ and argparser, and the
    standard or C modules it lists, each with its reason."""
    from unlocker.lean import BOOT_PATH_MODULES

    loaded = _boot_path_modules()
    ours = {m for m in loaded if m == "unlocker" or m.startswith("unlocker.")}
    assert not {m for m in ours if m.startswith("unlocker.commands") or m == "unlocker.argparser"}
    assert sorted(loaded - ours - BOOT_PATH_MODULES) == []


def test_boot_path_imports_none_of_the_slow_standard_modules() -> None:
    """The ones measured as slow, named: also a check that the allowed list never takes them in."""
    from unlocker.lean import BOOT_PATH_MODULES

    assert not set(NOT_ON_BOOT_PATH) & (_boot_path_modules() | BOOT_PATH_MODULES)


def test_which_finds_programs_as_children_would(tmp_path: Path) -> None:
    from unlocker.lean.run import which

    assert which("cryptsetup") in ("/usr/sbin/cryptsetup", "/sbin/cryptsetup")
    assert which("/usr/sbin/cryptsetup") == "/usr/sbin/cryptsetup"
    assert which("no-such-program-here") is None
    plain = tmp_path / "plain"
    plain.write_text("")
    assert which(str(plain)) is None  # not executable
    assert which(str(tmp_path)) is None  # a directory


def test_the_dracut_hooks_command_lines_take_the_fast_path() -> None:
    """The unit's and the initqueue job's `unlock` lines are read without argparse (start-up time)."""
    from unlocker import cli

    module = Path(__file__).resolve().parents[2] / "dracut" / "90tpm2-unlocker"
    lines = [line.split("/usr/bin/tpm2-unlocker ", 1)[1].split("||")[0].split()
             for name in ("tpm2-unlocker.service", "tpm2-unlocker-initqueue.sh")
             for line in (module / name).read_text().splitlines()
             if "/usr/bin/tpm2-unlocker unlock" in line]
    assert len(lines) == 2
    for args in lines:
        assert cli._boot_unlock(args) is not None, args


@pytest.mark.parametrize("args", [["unlock", "--tries", "x"], ["unlock", "--timeout=inf"], ["unlock", "--timeout", "nan"]])
def test_a_bad_boot_value_is_the_same_usage_error_in_both_parsers(args: list[str]) -> None:
    from unlocker import cli
    from unlocker.errors import UsageError

    with pytest.raises(UsageError) as fast:
        cli._boot_unlock(args)
    with pytest.raises(UsageError) as slow:
        cli.build_parser().parse_args(args)
    assert fast.value.message == slow.value.message


@pytest.mark.parametrize(("args", "words", "tries", "timeout"), [
    (["unlock"], [], 3, 30.0),
    (["unlock"], ["quiet", "tpm2_unlocker.tries=5", "tpm2_unlocker.timeout=7.5"], 5, 7.5),
    (["unlock", "--tries", "0"], ["tpm2_unlocker.tries=5"], 0, 30.0),  # the command line wins
    (["unlock", "--timeout", "2"], ["tpm2_unlocker.timeout=9"], 3, 2.0),
    (["unlock", "--no-tpm"], ["tpm2_unlocker.tries=1", "tpm2_unlocker.tries=2"], 2, 30.0),  # the last one counts
    (["unlock", "/dev/vda", "--test"], ["tpm2_unlocker.tries=4"], 4, 30.0),  # argparse's lines too
])
def test_kernel_parameters_replace_the_tables_defaults(args: list[str], words: list[str], tries: int,
                                                       timeout: float) -> None:
    from unlocker import cli

    opts = cli.parse_args(args, kernel_words=words)
    assert (opts.tries, opts.timeout) == (tries, timeout)


@pytest.mark.parametrize(("word", "said"), [
    ("tpm2_unlocker.tries=lots", "ignoring tpm2_unlocker.tries=lots (--tries takes a whole number of 0 or more, "
                                 "not 'lots'); using 3"),
    ("tpm2_unlocker.timeout=inf", "ignoring tpm2_unlocker.timeout=inf (--timeout takes a number of seconds "
                                  "from 0 to 3600, not 'inf'); using 30.0"),
])
def test_a_bad_kernel_parameter_is_said_once_and_the_default_stands(
        word: str, said: str, capsys: pytest.CaptureFixture[str]) -> None:
    from unlocker import cli

    opts = cli.parse_args(["unlock"], kernel_words=[word])
    assert (opts.tries, opts.timeout) == (3, 30.0)
    assert capsys.readouterr().err == f"tpm2-unlocker: {said}\n"


def test_a_bug_has_an_exit_code_of_its_own(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An exception no code path expected: one line, exit 9 (never 1, a usage error, nor success)."""
    from unlocker import cli
    from unlocker.errors import EXIT_INTERNAL, EXIT_USAGE

    def broken(opts: object) -> int:
        raise KeyError("a bug")

    monkeypatch.setitem(cli.VERB_FUNCTIONS, "status", broken)
    assert cli.main(["status"]) == EXIT_INTERNAL != EXIT_USAGE
    assert capsys.readouterr().err == "tpm2-unlocker: internal error: KeyError: 'a bug' (run with --debug for details)\n"


def test_status_json_into_a_closed_pipe_exits_quietly() -> None:
    """`status --json | true`: the reader is gone before we write; no "internal error", exit 0."""
    command = " ".join([*unlocker_command_text(), "status", "--json", "--tcti", "none-such:x"])
    done = subprocess.run(["bash", "-c", f"(sleep 0.2; {command}; echo rc=$? >&2) | true"],
                          capture_output=True, text=True, timeout=60)
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr
    assert "rc=0" in done.stderr


def unlocker_command_text() -> list[str]:
    from helpers import unlocker_command

    return [f"'{part}'" for part in unlocker_command()]
