"""recovery-key: a keyslot of its own that opens the disk when the TPM cannot, with a key that is
shown once and never stored by us.

The keyslot takes the fast PBKDF (the key is high-entropy, as the TPM's is); a LUKS2 token of type
tpm2-unlocker-recovery names it, so that `status` shows it and `remove` leaves it unless asked.
"""

from __future__ import annotations

import os
import sys

from unlocker import recovery
from unlocker.commands import pending
from unlocker.commands.pending import RECOVERY_TOKEN_TYPE
from unlocker.commands.undo import Undo
from unlocker.errors import UsageError
from unlocker.lean.run import run
from unlocker.log import say
from unlocker.luks import LuksDevice
from unlocker.secret import Secret, SecretBuffer

QRENCODE = "/usr/bin/qrencode"


def recovery_slots(device: LuksDevice) -> list[tuple[int, int]]:
    """(token id, keyslot) of each recovery key the header names."""
    found = []
    for tid, doc in sorted(device.raw_tokens().items()):
        if isinstance(doc, dict) and doc.get("type") == RECOVERY_TOKEN_TYPE:
            slots = doc.get("keyslots")
            if isinstance(slots, list) and len(slots) == 1 and isinstance(slots[0], str) and slots[0].isdigit():
                found.append((tid, int(slots[0])))
    return found


def add_recovery_key(device: LuksDevice, passphrase: Secret, undo: Undo) -> tuple[int, Secret]:
    """A new recovery key in a keyslot of its own, named by its token; (keyslot, the key's text)."""
    if recovery_slots(device):
        raise UsageError(f"{device.path} has a recovery key already (remove --recovery-key first)")
    key = recovery.generate()
    undo.push("forget the recovery key", key.wipe)
    slot = device.free_keyslot()
    marker = pending.begin(device, pending.Marker("recovery-key", slot, pending.Place("token")), undo)
    device.add_key(passphrase, key, slot)
    undo.push(f"remove keyslot {slot}", lambda: device.kill_slot(slot, passphrase))
    tid = device.import_document({"type": RECOVERY_TOKEN_TYPE, "keyslots": [str(slot)]})
    undo.push(f"remove token {tid}", lambda: device.remove_token(tid))
    if not device.test_key(key, slot):
        raise UsageError(f"{device.path}: the new recovery key does not open keyslot {slot}")
    pending.end(device, marker)
    return slot, key


def show(device: str, slot: int, key: Secret) -> None:
    """The key, once, on stdout (never in a log): in groups to type, and as a QR code when qrencode
    is installed (it reads the key on stdin; its picture is read into a buffer we wipe)."""
    out = sys.stdout.fileno()
    sys.stdout.flush()
    os.write(out, f"Recovery key for {device} (keyslot {slot}). Write it down or scan it: it is shown only "
                  "this once, and opens the disk at the passphrase prompt.\n\n    ".encode())
    os.write(out, key.data)
    os.write(out, b"\n\n")
    if not os.isatty(out):
        say("the recovery key went to standard output, which is not a terminal: keep what received it safe")
    program = QRENCODE if os.access(QRENCODE, os.X_OK) else None  # not from $PATH: it is handed the key
    if program is None:
        return
    picture = SecretBuffer(8192)
    try:
        done = run([program, "--type=UTF8", "--output=-"], input=key.data, stdout_into=picture)
        if done.returncode == 0:
            with picture.take() as taken:
                os.write(out, taken.data)
    finally:
        picture.wipe()


def recovery_key(device_path: str, unlock_key_file: str | None) -> int:
    """The `recovery-key` verb: add one, show it; the keyslot it took."""
    from unlocker.commands.passphrase import existing_passphrase

    device = LuksDevice(device_path)
    device.metadata()
    with existing_passphrase(device, unlock_key_file) as passphrase:
        pending.clean_up(device, lambda: passphrase, None)
        with Undo("adding the recovery key") as undo:
            slot, key = add_recovery_key(device, passphrase, undo)
    with key:
        show(device_path, slot, key)
    return slot
