"""Real boots of the security scenarios: after the initramfs, nothing unseals a key again (the lock
PCR), the filesystem-confusion attack, break shells; the recovery key at the prompt."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import Swtpm, our_tokens, run_cli

from vm.guest import PASSPHRASE, Guest
from vm.images import Artifacts
from vm.rootfs import build_root_image
from vm.tools import run

KINDS = ["dracut", "mkinitcpio"]
LOCKED = "the key is locked for this boot (lock PCR 15 was extended once the disks were opened)"
ATTACKER = b"the attacker's own passphrase"
RECOVERY_KEY = re.compile(r"^    ((?:[cbdefghijklnrtuv]{8}-){7}[cbdefghijklnrtuv]{8})\r*$", re.M)


@pytest.mark.parametrize("kind", KINDS)
def test_after_an_unattended_boot_the_booted_root_cannot_unseal(kind: str, guest_of) -> None:  # type: ignore[no-untyped-def]
    guest: Guest = guest_of(kind)
    result = guest.run_boot("locked", extra="tpm2u.action=unlock-test")
    assert not result.prompted and result.root_uptime is not None
    assert "unlocked with the TPM" in result.log
    assert "TPM2U-ACTION-RC=3" in result.log and LOCKED in result.log
    assert "lock PCR 15 extended (locked until the next boot)" in result.log
    again = guest.run_boot("next-boot")  # the next boot unseals as before
    assert not again.prompted and again.root_uptime is not None


@pytest.mark.parametrize("kind", KINDS)
def test_a_passphrase_boot_locks_too(kind: str, guest_of) -> None:  # type: ignore[no-untyped-def]
    guest: Guest = guest_of(kind)
    result = guest.run_boot("pass-locked", firmware="2m", extra="tpm2u.action=unlock-test", answers=[PASSPHRASE])
    assert result.prompted and result.root_uptime is not None
    assert "TPM2U-ACTION-RC=3" in result.log
    assert "lock PCR 15 extended (locked until the next boot)" in result.log


def _attackers_disk(guest: Guest, work: Path, binary: Path) -> Path:
    """The filesystem-confusion attack: a volume of the attacker's with the enrolled disk's UUID and
    a copy of its token (the keyslot the token names holds the attacker's passphrase too)."""
    attacker = build_root_image(work, binary, ATTACKER)
    run(["cryptsetup", "luksUUID", "--batch-mode", "--uuid", guest.root.uuid, attacker.path])
    second = work / "second.key"  # the attacker's, for the keyslot the copied token names
    second.write_bytes(ATTACKER + b" 2")
    run(["cryptsetup", "luksAddKey", "--key-file=-", "--new-key-slot", "1", "--pbkdf", "pbkdf2",
         "--pbkdf-force-iterations", "1000", attacker.path, second], input=ATTACKER)
    (tid, token), = our_tokens(guest.root.path).items()
    run(["cryptsetup", "token", "import", "--json-file", "-", "--token-id", tid, attacker.path],
        input=json.dumps(token).encode())
    return attacker.path


@pytest.mark.parametrize("kind", KINDS)
def test_filesystem_confusion_the_attackers_root_cannot_unseal_the_real_key(
        kind: str, guest_of, artifacts: Artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    guest: Guest = guest_of(kind)
    disk = _attackers_disk(guest, tmp_path / "attacker", artifacts.binary)
    shutil.copy(disk, guest.root.path)  # the attacker swapped the disk; the TPM is the machine's own
    result = guest.run_boot("confusion", extra="tpm2u.action=unlock-test", answers=[ATTACKER])
    assert result.prompted, "the real key opens no keyslot of the attacker's volume: the prompt"
    assert result.root_uptime is not None, "the attacker's passphrase boots the attacker's root"
    # ... where the copied token unseals nothing: the lock PCR was extended before that root ran
    assert "TPM2U-ACTION-RC=3" in result.log and LOCKED in result.log


@pytest.mark.parametrize("moment", ["premount", "postmount"])
def test_a_break_shell_in_the_busybox_image_cannot_unseal(moment: str, guest_of) -> None:  # type: ignore[no-untyped-def]
    guest: Guest = guest_of("mkinitcpio")
    with guest.boot(f"break-{moment}", extra=f"break={moment}") as b:
        b.expect(f"{moment.capitalize().replace('mount', '-mount')} break requested", timeout=240)
        b.type_line(b"tpm2-unlocker unlock /dev/vda --test --tries 0; echo TPM2U-SHELL-RC=$?")
        b.expect(r"TPM2U-SHELL-RC=(\d+)", timeout=120)
        rc = int(b.console.match.group(1))
        b.type_line(b"poweroff -f")
        b.wait_for_poweroff()
    log = (guest.work / f"break-{moment}.console.log").read_text(errors="replace")
    assert "unlocked with the TPM" in log  # the boot itself did
    assert rc == 3 and LOCKED in log


@pytest.fixture(scope="module")
def dracut_break_guest(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Guest:
    """A guest of the dracut-break image (the systemd one plus dracut-systemd), enrolled from the host
    against its TPM state with PCR 16, which nothing measures at boot (as bench.run enrols): no boot
    of its own to enrol in."""
    work = tmp_path_factory.mktemp("dracut-break")
    root = build_root_image(work, artifacts.binary, PASSPHRASE)
    guest = Guest(artifacts.kernel, artifacts.kind("dracut-break"), root, work / "tpm", work)
    with Swtpm(guest.tpm_state) as tpm:
        done = run_cli("enroll", str(root.path), "--pcrs", "sha256:16", "--unlock-key-file", "-", tpm=tpm,
                       input=PASSPHRASE)
    assert done.returncode == 0, done.stderr.decode()
    return guest


@pytest.mark.parametrize("who", ["our unit", "the lock unit"])
def test_a_dracut_break_shell_cannot_unseal(who: str, dracut_break_guest: Guest, tmp_path: Path) -> None:
    """rd.break=pre-mount in a systemd initrd with dracut-systemd (which implements the break points):
    its shell comes by dracut-emergency.service. Our unit locked on its way (it unlocked with the TPM);
    or, with our unit masked and the passphrase typed, the lock unit that dracut-emergency.service wants."""
    guest = dracut_break_guest.clone(tmp_path)
    masked = who == "the lock unit"
    name = f"rd-break-{'masked' if masked else 'unit'}"
    extra = "rd.break=pre-mount" + (" rd.systemd.mask=tpm2-unlocker.service" if masked else "")
    with guest.boot(name, extra=extra) as b:
        if masked:
            b.expect(guest.kind.prompt, timeout=240)
            b.type_line(PASSPHRASE)
        b.expect("Entering emergency mode", timeout=240)
        b.type_line(b"")  # sulogin's "Press Enter for maintenance"
        b.type_line(b"tpm2-unlocker unlock /dev/vda --test --tries 0; echo TPM2U-SHELL-RC=$?")
        b.expect(r"TPM2U-SHELL-RC=(\d+)", timeout=120)
        rc = int(b.console.match.group(1))
        b.type_line(b"poweroff -f")
        b.wait_for_poweroff()
    log = (guest.work / f"{name}.console.log").read_text(errors="replace")
    assert "Break before pre-mount" in log
    if masked:
        assert "unlocked with the TPM" not in log
        assert "the lock PCR is extended: no key unseals until the next boot" in log
    else:
        assert "unlocked with the TPM" in log
    assert rc == 3 and LOCKED in log


@pytest.mark.parametrize("kind", KINDS)
def test_the_tpm_fails_and_the_recovery_key_typed_boots(kind: str, artifacts: Artifacts, tmp_path: Path) -> None:
    root = build_root_image(tmp_path, artifacts.binary, PASSPHRASE)
    guest = Guest(artifacts.kernel, artifacts.kind(kind), root, tmp_path / "tpm", tmp_path)
    enrolment = guest.enroll(recovery_key=True)
    [key] = RECOVERY_KEY.findall(enrolment.log)
    result = guest.run_boot("recovery", firmware="2m", answers=[key.encode()])
    assert result.prompted and "PCR 0 changed since enrolment" in result.log
    assert result.root_uptime is not None

