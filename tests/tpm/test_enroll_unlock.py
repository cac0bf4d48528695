"""enrol + unlock for each store, against a real swtpm and real LUKS2 images."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import PASSPHRASE, Swtpm, luks_json, opens, our_tokens, run_cli, tpm2_tools_unseal
from helpers import enroll_or_fail as enroll

pytestmark = pytest.mark.tpm


@pytest.mark.parametrize("store", ["token", "nv", "file"])
def test_enroll_then_unlock_with_no_prompt(store: str, disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    spec = {"token": "token", "nv": "nv", "file": f"file={tmp_path / 'blob'}"}[store]
    done = enroll(disk, key_file, tpm, "--store", spec)
    assert f"{disk}: enrolled keyslot 1 sealed to sha256:0,2,4,7".encode() in done.stderr
    tokens = our_tokens(disk)
    assert len(tokens) == 1
    token = next(iter(tokens.values()))
    assert token["store"] == store and token["keyslots"] == ["1"]
    assert sorted(luks_json(disk)["keyslots"]) == ["0", "1"]
    assert opens(disk, PASSPHRASE, slot=0), "the passphrase keyslot must still open the disk"
    done = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
    assert done.returncode == 0, done.stderr.decode()
    assert b"unlocked with the TPM" in done.stderr
    if store == "nv":
        assert token["nv_index"] == "0x01500016"
        public = tpm.tools("tpm2_nvreadpublic", "0x1500016").stdout.decode()
        for attribute in ("policyread", "ownerwrite", "writedefine", "writelocked", "no_da"):
            assert attribute in public, public
        assert "authwrite" not in public and "authread" not in public and "ownerread" not in public
    if store == "file":
        assert (tmp_path / "blob" / "key.pub").stat().st_size > 0
        assert (tmp_path / "blob" / "key.priv").stat().st_size > 0


def test_file_store_blob_is_read_by_tpm2_tools(disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    """Our key.pub/key.priv are tpm2_create's format: tpm2_load + tpm2_unseal give the keyslot's key."""
    blob = tmp_path / "blob"
    enroll(disk, key_file, tpm, "--store", f"file={blob}", "--pcrs", "sha256:0,7")
    key = tpm2_tools_unseal(tpm, blob, "sha256:0,7,15", tmp_path / "ctx")
    assert len(key) == 32
    assert opens(disk, key, slot=1)


def test_enroll_twice_is_refused(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm)
    done = enroll(disk, key_file, tpm, status=1)
    assert b"already enrolled" in done.stderr
    assert len(our_tokens(disk)) == 1


def test_enroll_with_wrong_key_file_changes_nothing(disk: Path, tpm: Swtpm, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(b"not the passphrase")
    before = luks_json(disk)
    done = enroll(disk, wrong, tpm, status=6)
    assert b"does not open any keyslot" in done.stderr
    assert luks_json(disk) == before


def test_enroll_asks_passphrase_on_terminal(disk: Path, tpm: Swtpm) -> None:
    import os

    import pexpect
    from helpers import unlocker_command
    cmd = unlocker_command()
    env = dict(os.environ, TPM2_UNLOCKER_TCTI=tpm.tcti)
    child = pexpect.spawn(cmd[0], [*cmd[1:], "enroll", str(disk)], env=env, timeout=60)
    child.expect("Passphrase for ")
    child.sendline(b"wrong one")
    child.expect("does not open the disk")
    child.expect("Passphrase for ")
    child.sendline(PASSPHRASE)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    assert len(our_tokens(disk)) == 1


def test_enroll_with_pcrs_of_sha1_and_sha384_banks(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    enroll(disk, key_file, tpm, "--pcrs", "sha384:0,1,2,3,4,5,6,7,8,9")
    assert run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm).returncode == 0
    token = next(iter(our_tokens(disk).values()))
    assert token["pcr_bank"] == "sha384" and len(token["pcr_values"]) == 10


def test_boot_reads_the_tokens_from_the_header_itself(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    """At boot the tokens come from our own header reader, not `cryptsetup luksDump`: the same
    metadata, and it unlocks (in-process, so the metadata handed over is the one used)."""
    from unlocker.boot.devices import read_luks_header
    from unlocker.boot.unlock import UnlockRequest, unlock

    enroll(disk, key_file, tpm)
    header = read_luks_header(str(disk))
    assert header is not None and header[1] is not None
    uuid, meta = header
    luks_uuid = subprocess.run(["cryptsetup", "luksUUID", str(disk)], capture_output=True, check=True)
    assert uuid == luks_uuid.stdout.decode().strip()
    assert meta["tokens"] == luks_json(disk)["tokens"]
    assert meta["keyslots"] == luks_json(disk)["keyslots"]
    unlock(UnlockRequest(str(disk), "unused", test=True, tries=0, tcti=tpm.tcti), metadata=meta)


def test_one_tpm_connection_serves_every_device_at_boot(disk: Path, key_file: Path, tpm: Swtpm,
                                                        tmp_path: Path) -> None:
    """At boot the TPM is opened once, before the disks appear, and every device unseals through it."""
    from helpers import make_luks_image

    from unlocker.boot.connection import TpmConnection
    from unlocker.boot.unlock import BootContext, UnlockRequest, unlock

    second = make_luks_image(tmp_path / "second.img")
    enroll(disk, key_file, tpm)
    enroll(second, key_file, tpm, "--store", "nv")
    connection = TpmConnection(tpm.tcti)
    connection.connect()
    opened = connection.get()
    try:
        for image in (disk, second):
            unlock(UnlockRequest(str(image), "unused", test=True, tries=0), BootContext(tpm=connection))
        assert connection.get() is opened  # still the one connection, not closed by a device
    finally:
        connection.close()


def test_the_boot_connection_has_the_policy_session_ready_before_the_disk(disk: Path, key_file: Path, tpm: Swtpm,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """connect() (before the disk appears) starts the salted policy session; the unseal takes it
    instead of starting one, and nothing is left loaded in the TPM afterwards."""
    from unlocker.boot.connection import TpmConnection
    from unlocker.boot.unlock import BootContext, UnlockRequest, unlock
    from unlocker.tpm.client import Tpm

    loaded_sessions = 0x02000000  # TPM_HT_LOADED_SESSION << 24: sessions held in the TPM
    enroll(disk, key_file, tpm)
    connection = TpmConnection(tpm.tcti)
    connection.connect()
    opened = connection.get()
    assert len(opened._handles(loaded_sessions, 8)[0]) == 1
    started: list[int] = []
    real_start = Tpm._start_session

    def counting_start(self: Tpm, session_type: int, salted: bool) -> int:
        started.append(session_type)
        return real_start(self, session_type, salted)

    monkeypatch.setattr(Tpm, "_start_session", counting_start)
    try:
        unlock(UnlockRequest(str(disk), "unused", test=True, tries=0), BootContext(tpm=connection))
        assert started == [], "the unseal started a session of its own"
        assert opened._handles(loaded_sessions, 8)[0] == []
        unlock(UnlockRequest(str(disk), "unused", test=True, tries=0), BootContext(tpm=connection))
        assert len(started) == 1, "a second device starts its own session"
    finally:
        connection.close()


def test_boot_waits_for_what_cryptsetup_open_needs_after_the_unseal(disk: Path, key_file: Path, tpm: Swtpm,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """`before_open` (at boot: the warm-up's modprobe of dm-crypt) runs once the key is unsealed
    and before cryptsetup opens; never for a key test. This host has no device-mapper, so the real
    `cryptsetup open` that follows fails, which shows it ran after the wait."""
    from unlocker.boot.unlock import BootContext, UnlockRequest, unlock
    from unlocker.errors import CryptsetupError

    enroll(disk, key_file, tpm)
    waited: list[str] = []
    with pytest.raises(CryptsetupError):
        unlock(UnlockRequest(str(disk), "tpm2u-test", tries=0, tcti=tpm.tcti),
               BootContext(before_open=lambda: waited.append("dm-crypt")))
    err = capfd.readouterr().err
    assert waited == ["dm-crypt"]
    assert f"tpm2-unlocker: {disk}: TPM unlock failed: {disk}: cryptsetup open failed" in err
    unlock(UnlockRequest(str(disk), "unused", test=True, tries=0, tcti=tpm.tcti),
           BootContext(before_open=lambda: waited.append("again")))
    assert waited == ["dm-crypt"], "a key test opens nothing: nothing to wait for"


@pytest.mark.parametrize("background", [False, True], ids=["connect", "connect-in-background"])
def test_an_unreachable_tpm_fails_each_device_with_its_reason(background: bool, disk: Path, key_file: Path,
                                                              tpm: Swtpm, capfd: pytest.CaptureFixture[str]) -> None:
    """At boot the connection is opened in a thread: its failure reaches each device all the same,
    as one line (no traceback from the thread)."""
    from unlocker.boot.connection import TpmConnection
    from unlocker.boot.unlock import BootContext, UnlockRequest, unlock
    from unlocker.errors import NoTpmError

    enroll(disk, key_file, tpm)
    capfd.readouterr()
    connection = TpmConnection("swtpm:host=127.0.0.1,port=1")
    # either keeps the failure for whoever asks; neither raises itself
    if background:
        connection.connect_in_background()
    else:
        connection.connect()
    for _ in range(2):
        with pytest.raises(NoTpmError) as failed:
            unlock(UnlockRequest(str(disk), "unused", test=True, tries=0), BootContext(tpm=connection))
        assert failed.value.message == f"{disk}: not unlocked"
        err = capfd.readouterr().err
        assert f"tpm2-unlocker: {disk}: TPM unlock failed: cannot reach the TPM at 'swtpm:host=127.0.0.1,port=1'" in err
        assert "Traceback" not in err
    connection.close()


def _spy_on_started_opens(monkeypatch: pytest.MonkeyPatch, events: list[str]) -> list:  # type: ignore[type-arg]
    """The real LuksDevice.start_open and store.take_branch, with the order they ran in recorded."""
    from unlocker import luks, store
    from unlocker.boot import unlock

    pendings: list[luks.PendingOpen] = []
    real_start, real_take, real_finish = luks.LuksDevice.start_open, store.take_branch, luks.PendingOpen.finish

    def start_open(self: luks.LuksDevice, *args: object, **kwargs: object) -> luks.PendingOpen:
        pendings.append(real_start(self, *args, **kwargs))  # type: ignore[arg-type]
        events.append("cryptsetup started")
        return pendings[-1]

    def take(*args: object) -> object:
        key = real_take(*args)  # type: ignore[arg-type]
        events.append("unsealed")
        return key

    def finish(self: luks.PendingOpen, key: object) -> bool:
        events.append("key handed over")
        return real_finish(self, key)  # type: ignore[arg-type]

    monkeypatch.setattr(luks.LuksDevice, "start_open", start_open)
    monkeypatch.setattr(unlock.store, "take_branch", take)
    monkeypatch.setattr(luks.PendingOpen, "finish", finish)
    return pendings


def test_at_boot_cryptsetup_starts_before_the_unseal_and_gets_the_key_after_it(
        disk: Path, key_file: Path, tpm: Swtpm, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    """`cryptsetup open` execs and reads the header while the TPM unseals; the key then goes to it
    on stdin. (A key test here: this host has no device-mapper to map with.)"""
    from unlocker.boot.unlock import BootContext, UnlockRequest, unlock

    enroll(disk, key_file, tpm)
    events: list[str] = []
    pendings = _spy_on_started_opens(monkeypatch, events)
    unlock(UnlockRequest(str(disk), None, test=True, tries=0, tcti=tpm.tcti), BootContext(open_early=True))
    assert events == ["cryptsetup started", "unsealed", "key handed over"]
    assert pendings[0].slot == 1 and pendings[0].started.argv[:4] == ["cryptsetup", "open", "--key-slot", "1"]
    assert f"{disk}: unlocked with the TPM (test only)" in capfd.readouterr().err


def test_a_started_cryptsetup_is_killed_when_the_tpm_says_no(disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    """The PCRs changed: the `cryptsetup open` waiting for a key gets none; it is killed while it
    waits (it has mapped nothing) and reaped, and the TPM's reason is the one line said."""
    from unlocker.boot import unlock as unlock_module
    from unlocker.boot.unlock import BootContext, UnlockRequest, unlock
    from unlocker.errors import PolicyError

    enroll(disk, key_file, tpm, "--pcrs", "sha256:7")
    tpm.extend(7)
    control = tmp_path / "control"
    control.touch()  # as if device-mapper were loaded: the real open is started
    monkeypatch.setattr(unlock_module, "DM_CONTROL", str(control))
    events: list[str] = []
    pendings = _spy_on_started_opens(monkeypatch, events)
    with pytest.raises(PolicyError):
        unlock(UnlockRequest(str(disk), "tpm2u-test", tries=0, tcti=tpm.tcti), BootContext(open_early=True))
    assert events == ["cryptsetup started"]
    assert pendings[0].started._child.returncode == -signal.SIGKILL
    assert f"{disk}: TPM unlock failed: PCR 7 changed since enrolment" in capfd.readouterr().err


def test_no_device_mapper_yet_means_the_open_waits_for_the_key(disk: Path, key_file: Path, tpm: Swtpm,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """cryptsetup checks for device-mapper before it reads the key: without it loaded, the open is
    not started early (it would fail) but runs after the unseal, as it always did."""
    from unlocker.boot import unlock as unlock_module
    from unlocker.boot.unlock import start_open
    from unlocker.luks import LuksDevice

    enroll(disk, key_file, tpm)
    monkeypatch.setattr(unlock_module, "DM_CONTROL", "/nonexistent/mapper/control")
    device = LuksDevice(str(disk))
    assert start_open(device, device.our_tokens(), "tpm2u-test", test=False) is None


def test_on_one_cpu_the_open_waits_for_the_key(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    """Started early on a single CPU, cryptsetup only takes turns with the unseal (measured slower
    in the one-CPU guest): this process pinned to one CPU starts nothing early."""
    from unlocker.boot.unlock import spare_cpu, start_open
    from unlocker.luks import LuksDevice

    enroll(disk, key_file, tpm)
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        pytest.fail("this test needs a machine with two CPUs (CI has two)")
    assert spare_cpu()
    try:
        os.sched_setaffinity(0, {min(cpus)})
        assert not spare_cpu()
        device = LuksDevice(str(disk))
        assert start_open(device, device.our_tokens(), "unused", test=True) is None
    finally:
        os.sched_setaffinity(0, cpus)
