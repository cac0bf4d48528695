from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Swtpm, make_luks_image, write_key_file


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
