from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Swtpm, make_luks_image, write_key_file


@pytest.fixture(scope="session", autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """STATE_DIR (the machine key's directory) in a temporary folder and an empty sysfs for its storage
    check, for the CLI runs and the tests' own calls alike: on a host whose disk is on dm-crypt an
    enrolment would otherwise make a machine key and change what every enrolment seals. With no
    block device in that sysfs, STATE_DIR counts as not encrypted: no machine key unless a test
    makes one."""
    path = tmp_path_factory.mktemp("state")
    (path / "sys").mkdir()
    values = {"TPM2_UNLOCKER_STATE_DIR": str(path / "tpm2-unlocker"), "TPM2_UNLOCKER_SYSFS": str(path / "sys")}
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    yield path
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    if shutil.which("swtpm") is None:
        pytest.fail("swtpm is not installed (run .ci/run or the README's set-up command)")
    tpm = Swtpm(tmp_path_factory.mktemp("swtpm-state"))
    tpm.start()
    yield tpm
    tpm.stop()


@pytest.fixture
def tpm(swtpm: Swtpm) -> Iterator[Swtpm]:
    """The session's swtpm, 'rebooted' and cleared for each test: PCRs reset, no lockout, no NV
    indexes or persistent keys left by another test (TPM2_Clear through the platform hierarchy)."""
    if swtpm.proc is None:
        swtpm.start()
    swtpm.reboot()
    swtpm.clear_lockout()
    swtpm.tools("tpm2_clear", "-c", "p")
    yield swtpm
    if swtpm.proc is None:
        swtpm.start()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return make_luks_image(tmp_path / "disk.img")


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return write_key_file(tmp_path)


def pytest_report_header(config: pytest.Config) -> str:
    """Which copy of tpm2-unlocker the QEMU boots use ($TPM2_UNLOCKER_FROM, vm/source.py)."""
    from vm.source import chosen

    return f"tpm2-unlocker: the VM images use {chosen().describe()}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # again at the end: `-q` (CI's) leaves out the header
    terminalreporter.write_line(pytest_report_header(terminalreporter.config))
