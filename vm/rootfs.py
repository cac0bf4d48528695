"""The guest's root: busybox, our binary and cryptsetup, an init that prints markers and powers off;
an ext4 image encrypted in place into LUKS2 (no device-mapper needed on the host)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .tools import install_program, run

ROOT_MARKER = "TPM2U-ROOT-REACHED"
DONE_MARKER = "TPM2U-ROOT-DONE"

# The root's init: report, then do what the command line asks (enrol/re-seal inside the booted
# guest, so the PCRs are the real boot values), then power off. Passphrases are read from the console.
ROOT_INIT = r"""#!/bin/busybox sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
busybox mountpoint -q /proc || busybox mount -t proc proc /proc
busybox mountpoint -q /sys || busybox mount -t sysfs sys /sys
busybox mountpoint -q /dev || busybox mount -t devtmpfs dev /dev
busybox mountpoint -q /run || busybox mount -t tmpfs run /run
read up rest </proc/uptime
echo "@ROOT_MARKER@ uptime=$up"
action=; store=token; pcrs=sha256:0,2,4,7; recovery=
for w in $(cat /proc/cmdline); do
  case "$w" in
    tpm2u.action=*) action=${w#*=} ;;
    tpm2u.store=*) store=${w#*=} ;;
    tpm2u.pcrs=*) pcrs=${w#*=} ;;
    tpm2u.recovery=1) recovery=--recovery-key ;;
  esac
done
disk=/dev/vda
case "$action" in
  enroll|reseal|remove)
    echo "TPM2U-PASSPHRASE-FOR-$action:"
    read -r pw
    if [ "$action" = enroll ]; then
      printf %s "$pw" | tpm2-unlocker enroll "$disk" --unlock-key-file - --pcrs "$pcrs" --store "$store" $recovery
    elif [ "$action" = reseal ]; then
      printf %s "$pw" | tpm2-unlocker reseal "$disk" --unlock-key-file -
    else
      printf %s "$pw" | tpm2-unlocker remove "$disk" --unlock-key-file -
    fi
    echo "TPM2U-ACTION-RC=$?"
    ;;
  status) tpm2-unlocker status "$disk" ;;
  unlock-test)  # what anything in the booted root could try: unseal the disk's key again
    tpm2-unlocker unlock "$disk" --test --tries 0
    echo "TPM2U-ACTION-RC=$?"
    tpm2-unlocker status "$disk" ;;
esac
echo "@DONE_MARKER@"
busybox sync
busybox poweroff -f
"""


@dataclass(frozen=True)
class RootImage:
    path: Path
    uuid: str
    passphrase: bytes


def build_root_dir(root: Path, binary: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    for d in ("proc", "sys", "dev", "run", "tmp", "etc", "bin", "sbin", "usr/bin", "usr/sbin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    install_program(Path("/bin/busybox"), root, "/bin/busybox")
    for applet in ("sh", "mount", "mountpoint", "sync", "poweroff", "cat", "echo"):
        (root / "bin" / applet).symlink_to("busybox")
    cryptsetup = shutil.which("cryptsetup")
    assert cryptsetup is not None
    install_program(Path(cryptsetup), root, "/usr/sbin/cryptsetup")
    install_program(binary, root, "/usr/bin/tpm2-unlocker")
    init = ROOT_INIT.replace("@ROOT_MARKER@", ROOT_MARKER).replace("@DONE_MARKER@", DONE_MARKER)
    (root / "sbin" / "init").write_text(init)
    (root / "sbin" / "init").chmod(0o755)
    # a systemd initrd switches only into a root that has os-release
    (root / "etc" / "os-release").write_text('NAME="tpm2-unlocker test root"\nID=tpm2u\n')


def build_root_image(work: Path, binary: Path, passphrase: bytes) -> RootImage:
    """ext4 of the root dir in a 96 MiB file, encrypted in place to LUKS2 (reencrypt, offline)."""
    rootdir = work / "rootdir"
    build_root_dir(rootdir, binary)
    image = work / "root.img"
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(128 * 1024 * 1024)
    run(["mkfs.ext4", "-q", "-F", "-d", rootdir, image, "96M"])
    run(["cryptsetup", "reencrypt", "--encrypt", "--type", "luks2", "--reduce-device-size", "32M",
         "--batch-mode", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file=-", image],
        input=passphrase)
    uuid = run(["cryptsetup", "luksUUID", image]).stdout.decode().strip()
    return RootImage(image, uuid, passphrase)
