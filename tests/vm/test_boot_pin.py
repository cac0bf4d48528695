"""Real boots of a TPM+PIN enrolment (PolicyPCR + PolicyAuthValue, DA-protected): the initramfs asks
for the PIN before unsealing; a wrong one says how many tries the TPM leaves and asks again; at the
TPM's dictionary-attack lockout the passphrase follows; an empty PIN goes to the passphrase at once.

Each scenario boots its own copy of a guest enrolled with a PIN, so the TPM's DA counter one of them
moves is not the next one's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import opens, our_tokens

from vm.guest import PASSPHRASE, Guest
from vm.images import Artifacts
from vm.rootfs import build_root_image

KINDS = ["dracut", "mkinitcpio"]
PIN = b"2718 2818 28"
WRONG = [b"wrong-pin-one", b"wrong-pin-two", b"wrong-pin-three"]
LOCKED_OUT = re.compile(r"the TPM is locked out \(\d+ ?s\)")


class _PinGolden(dict):
    """Per image kind, a fresh root enrolled with --with-pin inside its own first boot, made on first use."""

    def __init__(self, artifacts: Artifacts, factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.artifacts, self.factory = artifacts, factory

    def __missing__(self, kind: str) -> Guest:
        work = self.factory.mktemp(f"pin-golden-{kind}")
        root = build_root_image(work, self.artifacts.binary, PASSPHRASE)
        guest = Guest(self.artifacts.kernel, self.artifacts.kind(kind), root, work / "tpm", work)
        guest.enroll(pin=PIN)
        [token] = our_tokens(root.path).values()
        assert token.get("pin") is True, f"the enrolment's token should record the PIN: {token}"
        self[kind] = guest
        return guest


@pytest.fixture(scope="module")
def pin_enrolled(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Guest]:
    return _PinGolden(artifacts, tmp_path_factory)


@pytest.fixture
def pin_guest_of(pin_enrolled: dict[str, Guest], tmp_path: Path):  # type: ignore[no-untyped-def]
    """A scenario's own copy (disk and TPM state) of the PIN-enrolled guest of a kind."""
    return lambda kind: pin_enrolled[kind].clone(tmp_path)


def _no_secret_echoed(log: str, *secrets: bytes) -> None:
    for secret in secrets:
        assert secret.decode() not in log, f"{secret!r} was echoed on the console"


@pytest.mark.parametrize("kind", KINDS)
def test_right_pin_unlocks_with_no_passphrase_prompt(kind: str, pin_guest_of) -> None:  # type: ignore[no-untyped-def]
    guest: Guest = pin_guest_of(kind)
    result = guest.run_boot("pin-right", pins=[PIN])
    assert result.pin_prompts == 1, "the PIN is asked once"
    assert not result.prompted, "no passphrase prompt after the right PIN"
    assert result.root_uptime is not None
    assert "unlocked with the TPM" in result.log
    assert "wrong TPM PIN" not in result.log
    _no_secret_echoed(result.log, PIN, PASSPHRASE)


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_pin_says_the_tries_left_and_the_right_one_then_unlocks(kind: str, pin_guest_of) -> None:  # type: ignore[no-untyped-def]
    guest: Guest = pin_guest_of(kind)
    result = guest.run_boot("pin-wrong-right", pins=[WRONG[0], PIN])
    assert result.pin_prompts == 2, "asked again after the wrong PIN"
    assert "wrong TPM PIN (2 tries left before the TPM locks out)" in result.log
    assert not result.prompted, "no passphrase prompt: the second PIN was right"
    assert result.root_uptime is not None
    assert "unlocked with the TPM" in result.log
    assert result.log.index("wrong TPM PIN (2 tries left") < result.log.index("unlocked with the TPM")
    assert not LOCKED_OUT.search(result.log)
    _no_secret_echoed(result.log, PIN, WRONG[0])


@pytest.mark.parametrize("kind", KINDS)
def test_three_wrong_pins_lock_the_tpm_out_and_the_passphrase_opens(kind: str, pin_guest_of) -> None:  # type: ignore[no-untyped-def]
    guest: Guest = pin_guest_of(kind)
    before = our_tokens(guest.root.path)
    result = guest.run_boot("pin-lockout", pins=list(WRONG), answers=[PASSPHRASE])
    assert result.pin_prompts == 3, "three PIN tries, then no more"
    assert "wrong TPM PIN (2 tries left before the TPM locks out)" in result.log
    assert "wrong TPM PIN (1 try left before the TPM locks out)" in result.log
    locked = LOCKED_OUT.search(result.log)
    assert locked, "the lockout is said in one line"
    assert result.prompted, "the passphrase is asked at lockout"
    prompts = [m.start() for m in re.finditer(guest.kind.prompt, result.log)]
    assert prompts and locked.start() < prompts[-1], "the lockout is said before the passphrase prompt"
    assert result.root_uptime is not None, "the typed passphrase boots"
    assert "unlocked with the TPM" not in result.log
    _no_secret_echoed(result.log, *WRONG, PASSPHRASE)
    # nothing on the disk changed: the passphrase still opens it, the token is the same
    assert our_tokens(guest.root.path) == before
    assert opens(guest.root.path, PASSPHRASE)
    # the next boot, still in lockout: no PIN asked for nothing, the passphrase at once
    again = guest.run_boot("pin-still-locked", answers=[PASSPHRASE])
    assert again.pin_prompts == 0, "no PIN prompt while the TPM is locked out"
    assert LOCKED_OUT.search(again.log)
    assert again.prompted and again.root_uptime is not None


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_pin_goes_to_the_passphrase(kind: str, pin_guest_of) -> None:  # type: ignore[no-untyped-def]
    guest: Guest = pin_guest_of(kind)
    result = guest.run_boot("pin-empty", pins=[b""], answers=[PASSPHRASE])
    assert result.pin_prompts == 1, "an empty PIN is not asked again"
    assert result.prompted and result.root_uptime is not None
    assert "wrong TPM PIN" not in result.log, "an empty PIN is no try against the TPM"
    assert not LOCKED_OUT.search(result.log)
    assert "unlocked with the TPM" not in result.log
