"""A TPM that stops answering costs bounded time, then the passphrase opens the disk."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pexpect
import pytest
from helpers import PASSPHRASE, Swtpm, cli_env, unlocker_command
from helpers import enroll_or_fail as enroll

pytestmark = pytest.mark.tpm


@pytest.mark.parametrize("when", ["before the run", "after the connection"])
def test_a_tpm_that_stops_answering_ends_in_the_prompt(when: str, disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    assert tpm.proc is not None
    cmd = unlocker_command()
    started = time.monotonic()
    if when == "before the run":
        os.kill(tpm.proc.pid, signal.SIGSTOP)
    child = pexpect.spawn(cmd[0], [*cmd[1:], "unlock", str(disk), "--test", "--tries", "1", "--tpm-timeout", "3",
                                   "--debug"], env=cli_env(tpm.tcti), timeout=60)
    try:
        if when == "after the connection":  # stopped while the key is asked for
            child.expect("TPM connected, storage key and session ready")
            os.kill(tpm.proc.pid, signal.SIGSTOP)
        child.expect("TPM unlock failed: the TPM did not answer within 3 s")
        child.expect("Enter passphrase for ")
        child.sendline(PASSPHRASE)
        child.expect("unlocked with the passphrase")
        child.expect(pexpect.EOF)
        child.close()
    finally:
        os.kill(tpm.proc.pid, signal.SIGCONT)
    assert child.exitstatus == 0
    assert time.monotonic() - started < 30
