"""Real boots: a Debian kernel under QEMU (TCG, OVMF measured boot), an initramfs built by our dracut
module or our mkinitcpio hook, a LUKS2 root and a swtpm. Every scenario for both paths."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import opens, our_tokens, replace_token

from vm.guest import PASSPHRASE, Guest
from vm.images import Artifacts
from vm.rootfs import build_root_image

KINDS = ["dracut", "mkinitcpio"]
# dracut's shell initrd (no systemd): the initqueue hook, then dracut's own passphrase prompt; a
# busybox image without udev (libdevmapper makes the /dev/mapper nodes itself)
ALL_KINDS = [*KINDS, "dracut-shell", "mkinitcpio-bare"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_unlocks_from_the_tpm_with_no_prompt(kind: str, guest_of) -> None:  # type: ignore[no-untyped-def]
    guest: Guest = guest_of(kind)
    result = guest.run_boot("auto", extra="tpm2_unlocker.debug")
    assert not result.prompted, "no passphrase prompt when the PCRs are those of the enrolment"
    assert result.root_uptime is not None
    assert "unlocked with the TPM" in result.log
    # QEMU's default CPU has no RDRAND and Linux turns the TPM's hwrng off for it (AMD vendor): the
    # kernel's pool is not seeded when we start, and the warm-up seeds it from the TPM instead of
    # having the kernel spin on timer jitter for a second beside udev and us
    assert "warm-up: the kernel's random pool is seeded from the TPM" in result.log
    assert "warm-up: the cipher is loaded" in result.log  # AF_ALG in the guest (this host has none)
    # one vCPU: `cryptsetup open` is not started before the unseal (the two would only take turns;
    # with a second CPU it is, tests/tpm/test_enroll_unlock.py)
    assert "run (started, input to follow)" not in result.log
    assert result.log.index("token 0: unsealed") < result.log.index("run: cryptsetup open")


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_firmware_change_says_pcr0_changed_and_typed_passphrase_boots(kind: str, guest_of) -> None:  # type: ignore[no-untyped-def]
    guest: Guest = guest_of(kind)
    result = guest.run_boot("pcr-change", firmware="2m", answers=[PASSPHRASE])
    assert result.prompted
    assert "TPM unlock failed: PCR 0 changed since enrolment" in result.log
    assert result.root_uptime is not None
    assert PASSPHRASE.decode() not in result.log, "the typed passphrase must not be echoed on the console"


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_passphrase_three_times_fails_cleanly_and_disk_stays_intact(kind: str, guest_of) -> None:  # type: ignore[no-untyped-def]
    guest: Guest = guest_of(kind)
    before = our_tokens(guest.root.path)
    result = guest.run_boot("wrong", firmware="2m", answers=[b"wrong 1", b"wrong 2", b"wrong 3"])
    assert result.root_uptime is None, "a wrong passphrase must never reach the root"
    if kind == "mkinitcpio":
        assert "no passphrase opened the disk after 3 tries" in result.log
        assert "TPM2U-INITRAMFS-FAILED" in result.log
    else:  # systemd-cryptsetup asked three times, then gave up
        assert result.log.count("Please enter passphrase for disk") == 3
        assert re.search(r"Failed to start \S*systemd-cr", result.log)
    assert our_tokens(guest.root.path) == before
    assert opens(guest.root.path, PASSPHRASE)
    assert guest.run_boot("after-wrong").root_uptime is not None, "the TPM still unlocks the same disk"


@pytest.mark.parametrize("kind", KINDS)
def test_no_tpm_device_says_so_and_asks_for_the_passphrase(kind: str, guest_of) -> None:  # type: ignore[no-untyped-def]
    guest: Guest = guest_of(kind)
    result = guest.run_boot("no-tpm", tpm=False, answers=[PASSPHRASE])
    assert result.prompted
    assert "TPM unlock failed: no TPM found" in result.log
    assert result.root_uptime is not None


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_token_says_so_and_asks_for_the_passphrase(kind: str, guest_of) -> None:  # type: ignore[no-untyped-def]
    guest: Guest = guest_of(kind)
    (tid, token), = our_tokens(guest.root.path).items()
    token["tpm2_private"] = "AAAA"  # a 3-byte TPM2B_PRIVATE: impossible
    replace_token(guest.root.path, tid, token)
    result = guest.run_boot("corrupt", answers=[PASSPHRASE])
    assert result.prompted
    assert "TPM unlock failed: the sealed object has trailing bytes" in result.log
    assert result.root_uptime is not None


@pytest.mark.parametrize("kind", KINDS)
def test_nv_index_store_unlocks_with_no_prompt(kind: str, artifacts: Artifacts, tmp_path: Path) -> None:
    root = build_root_image(tmp_path, artifacts.binary, PASSPHRASE)
    guest = Guest(artifacts.kernel, artifacts.kind(kind), root, tmp_path / "tpm", tmp_path)
    enrolment = guest.enroll(store="nv")
    assert "nv index 0x01500016" in enrolment.log
    result = guest.run_boot("nv-auto")
    assert not result.prompted and result.root_uptime is not None


@pytest.mark.parametrize("kind", KINDS)
def test_reseal_after_firmware_update_then_next_boot_is_unattended(kind: str, guest_of) -> None:  # type: ignore[no-untyped-def]
    guest: Guest = guest_of(kind)
    update = guest.run_boot("reseal", firmware="2m", extra="tpm2u.action=reseal", answers=[PASSPHRASE],
                            action_passphrase=PASSPHRASE)
    assert "PCR 0 changed since enrolment" in update.log
    assert "TPM2U-ACTION-RC=0" in update.log and "re-sealed keyslot" in update.log
    after = guest.run_boot("after-reseal", firmware="2m")
    assert not after.prompted, "after the re-seal the new firmware unlocks unattended"
    assert after.root_uptime is not None
