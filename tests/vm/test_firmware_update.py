"""Real boots across updates, with the images' own initramfs doing the work: a firmware update
(another OVMF build: PCR 0) after `prepare-update --firmware` boots with no prompt, that boot's
initramfs re-seals to the new values, and the old firmware is then a stranger (prompt).

Four boots per image kind after the shared enrolment: prepare, the update's boot, the new firmware
again, the old one."""

from __future__ import annotations

import pytest
from helpers import our_tokens

from vm.guest import PASSPHRASE, Guest

KINDS = ["dracut", "mkinitcpio"]


@pytest.mark.parametrize("kind", KINDS)
def test_firmware_update_after_prepare_update_boots_unattended_then_binds_the_new_firmware(
        kind: str, guest_of) -> None:  # type: ignore[no-untyped-def]
    guest: Guest = guest_of(kind)
    prepared = guest.run_boot("prepare", extra="tpm2u.action=prepare-update", action_passphrase=PASSPHRASE)
    assert not prepared.prompted and "TPM2U-ACTION-RC=0" in prepared.log, prepared.log[-2000:]
    assert "ready for the firmware update: the next boot may change PCR 0, 2 once" in prepared.log
    (token,) = our_tokens(guest.root.path).values()
    assert token["grace"]["left_out"] == [0, 2]
    updated = guest.run_boot("firmware-update", firmware="2m")
    assert not updated.prompted, "the grace opens the disk on the new firmware's first boot"
    assert updated.root_uptime is not None
    assert "re-sealed to this boot's PCR values of sha256:0,2,4,7 (the firmware update's one-boot grace is spent)" \
        in updated.log
    (token,) = our_tokens(guest.root.path).values()
    assert "grace" not in token and "branches" not in token
    again = guest.run_boot("new-firmware-again", firmware="2m")
    assert not again.prompted and again.root_uptime is not None, "bound to the new firmware's values"
    old = guest.run_boot("old-firmware", answers=[PASSPHRASE])
    assert old.prompted and "TPM unlock failed: PCR 0 changed since enrolment" in old.log
    assert old.root_uptime is not None
