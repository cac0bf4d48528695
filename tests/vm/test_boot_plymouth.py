"""The busybox image with plymouth (Debian's plymouth, in the harness's plymouth hook as Arch's
HOOKS=(base udev plymouth ...) has it; details on the serial console: the guest has no display):
the passphrase is asked through plymouth, typed into plymouth, and plymouth's own debug log counts
the request. (Without plymouthd our prompt asks on the console: tests/vm/test_boot.py.)"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from unlocker.boot.prompt import PING_EVERY
from vm.guest import PASSPHRASE, Guest, ImageKind
from vm.images import Artifacts
from vm.initramfs import build_mkinitcpio_busybox

# plymouth's details screen shows the prompt it was given (ours, with its own ':'), and draws it
# again after each key (erase the line, prompt, a '*' per key): the first drawing starts a line
PLYMOUTH_PROMPT = r"\nEnter passphrase for /dev/vda:"


@pytest.fixture(scope="module")
def plymouth_image(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> ImageKind:
    out = tmp_path_factory.mktemp("plymouth") / "initramfs-mkinitcpio-plymouth.img"
    image = build_mkinitcpio_busybox(artifacts.kernel, artifacts.binary, out, hooks=artifacts.source.mkinitcpio,
                                     plymouth=True)
    return ImageKind("mkinitcpio-plymouth", image.path, PLYMOUTH_PROMPT)


def test_busybox_image_asks_through_plymouth_when_plymouthd_runs(enrolled: dict[str, Guest], plymouth_image: ImageKind,
                                                                  tmp_path: Path) -> None:
    guest = replace(enrolled["mkinitcpio"].clone(tmp_path), kind=plymouth_image)
    # another firmware (PCR 0), and another initrd than the enrolment's (OVMF measures it into PCR 4 too);
    # typed after two of our pings' intervals: plymouthd answers them while it asks, and goes on asking
    result = guest.run_boot("plymouth", firmware="2m", answers=[PASSPHRASE], type_after=2 * PING_EVERY + 2)
    assert re.search(r"TPM unlock failed: PCRs? [0-9, ]+ changed since enrolment", result.log)
    assert result.prompted
    assert result.root_uptime is not None, "the passphrase typed into plymouth opened the disk"
    # plymouthd's own log, not ours: asked once, answered, and by our program's client
    assert "TPM2U-PLYMOUTH asked=1 answered=1" in result.log
    assert re.search(r"connection is from pid \d+ \(/usr/bin/plymouth ask-for-password --prompt=Enter passphrase "
                     r"for /dev/vda\) with parent pid \d+ \(/usr/bin/tpm2-unlocker unlock --no-tpm\)", result.log)
    assert "unlocked with the passphrase" in result.log
    # our clients in plymouthd's log (it names a client at each of its messages): the ping that found
    # it, the ask, then pings answered while it asked, between its request and the typed answer
    asked_at, answered_at = (_seconds(re.search(rf"(\S+) \S+ *: got password {what}", result.log))
                             for what in ("request", "answer"))
    clients: dict[str, tuple[str, float]] = {}
    for at, pid, command in re.findall(r"TPM2U-PLYMOUTH-CLIENT (\S+) .*connection is from pid (\d+) "
                                       r"\(/usr/bin/plymouth ([^)]*)\)", result.log):
        clients.setdefault(pid, (command, _seconds(at)))
    commands = [command for command, _ in clients.values()]
    assert commands[:2] == ["--ping", "ask-for-password --prompt=Enter passphrase for /dev/vda"], commands
    assert commands[2:] and set(commands[2:]) == {"--ping"}, commands
    assert any(asked_at < at < answered_at for command, at in list(clients.values())[2:]), (clients, asked_at, answered_at)
    assert PASSPHRASE.decode() not in result.log, "the typed passphrase must not be echoed on the console"


def _seconds(found: re.Match[str] | str | None) -> float:
    """plymouthd's debug-log time stamp (HH:MM:SS.mmm, since it started) in seconds."""
    assert found is not None, "plymouthd's debug log lacks the line"
    hours, minutes, seconds = (found if isinstance(found, str) else found.group(1)).split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
