"""The guest's root: busybox, our binary and cryptsetup, an init that prints markers and powers off;
an ext4 image encrypted in place into LUKS2 (no device-mapper needed on the host)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .source import chosen
from .tools import install_program, run

ROOT_MARKER = "TPM2U-ROOT-REACHED"
DONE_MARKER = "TPM2U-ROOT-DONE"

# The root's init: report, then do what the command line asks (enrol/re-seal inside the booted
# guest, so the PCRs are the real boot values), then power off. Passphrases (and with tpm2u.pin=1 the
# enrolment's TPM PIN) are read from the console.
ROOT_INIT = r"""#!/bin/busybox sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
busybox mountpoint -q /proc || busybox mount -t proc proc /proc
busybox mountpoint -q /sys || busybox mount -t sysfs sys /sys
busybox mountpoint -q /dev || busybox mount -t devtmpfs dev /dev
busybox mountpoint -q /run || busybox mount -t tmpfs run /run
read up rest </proc/uptime
echo "@ROOT_MARKER@ uptime=$up"
# securityfs: the firmware's event log (enroll records what it measured, predict reads it)
busybox mkdir -p /sys/kernel/security
busybox mountpoint -q /sys/kernel/security || busybox mount -t securityfs securityfs /sys/kernel/security
# a guest booted through systemd-boot: its ESP (the second disk) at /efi, read-only, and the words the
# host left for this boot there (the kernel command line is measured: it stays the same from boot to boot)
words=$(cat /proc/cmdline)
if [ -d /lib/modules/tpm2u ]; then
  for m in fat vfat nls_cp437 nls_ascii nls_utf8; do busybox insmod /lib/modules/tpm2u/$m.ko 2>/dev/null; done
  busybox mount -t vfat -o ro /dev/vdb1 /efi 2>/dev/null && [ -f /efi/tpm2u-action ] && words="$words $(cat /efi/tpm2u-action)"
fi
action=; store=token; pcrs=sha256:0,2,4,7; recovery=; withpin=; measure=; predict=; hook=; signing=
for w in $words; do
  case "$w" in
    tpm2u.action=*) action=${w#*=} ;;
    tpm2u.store=*) store=${w#*=} ;;
    tpm2u.pcrs=*) pcrs=${w#*=} ;;
    tpm2u.recovery=1) recovery=--recovery-key ;;
    tpm2u.pin=1) withpin=1 ;;
    tpm2u.measure=1) measure=1 ;;
    tpm2u.predict=1) predict=1 ;;
    tpm2u.hook=*) hook=${w#*=} ;;
    # an admin's public key the host staged on the ESP: the enrolment takes it (--signing-key)
    tpm2u.signing=1) signing="--signing-key /efi/staged/signing.pub.pem" ;;
    tpm2u.signing=none) signing="--signing-key none" ;;
    # the root read-write, as an installed system's fstab has it (/var/lib/tpm2-unlocker: the machine key)
    tpm2u.rw=1) busybox mount -o remount,rw / ;;
  esac
done
if [ -n "$measure" ]; then
  # what the firmware logged and what the TPM holds now (read by the kernel, not by us), for the host
  echo "TPM2U-EVENTLOG-BEGIN"
  busybox base64 /sys/kernel/security/tpm0/binary_bios_measurements
  echo "TPM2U-EVENTLOG-END"
  for bank in sha1 sha256 sha384 sha512; do
    [ -d /sys/class/tpm/tpm0/pcr-$bank ] || continue
    for p in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23; do
      echo "TPM2U-PCR $bank $p $(busybox cat /sys/class/tpm/tpm0/pcr-$bank/$p)"
    done
  done
fi
disk=/dev/vda
case "$action" in
  enroll|reseal|remove|prepare-update)
    echo "TPM2U-PASSPHRASE-FOR-$action:"
    read -r pw
    if [ "$action" = enroll ] && [ -n "$withpin" ]; then
      # the PIN after the passphrase, given on fd 3 (stdin carries the passphrase; never in argv)
      echo "TPM2U-PIN-FOR-$action:"
      read -r pin
      printf %s "$pw" | tpm2-unlocker enroll "$disk" --unlock-key-file - --pcrs "$pcrs" --store "$store" $recovery \
        --with-pin --pin-file /proc/self/fd/3 3<<EOF
$pin
EOF
    elif [ "$action" = enroll ]; then
      printf %s "$pw" | tpm2-unlocker enroll "$disk" --unlock-key-file - --pcrs "$pcrs" --store "$store" $recovery \
        $signing
    elif [ "$action" = reseal ]; then
      printf %s "$pw" | tpm2-unlocker reseal "$disk" --unlock-key-file -
    elif [ "$action" = prepare-update ]; then
      printf %s "$pw" | tpm2-unlocker prepare-update --firmware "$disk" --unlock-key-file -
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
if [ "$hook" = postinst ]; then
  # a kernel package's install as Debian runs it: /etc/kernel/postinst.d with the version and the
  # image, here the update the host staged on the ESP (vmlinuz-V and initrd.img-V); its reseal asks for
  # the passphrase on the terminal (cttyhack gives the hook the console as one)
  kver=$(busybox uname -r)
  echo "TPM2U-HOOK-BEGIN"
  TPM2_UNLOCKER_BOOTDIR=/efi/staged busybox setsid busybox cttyhack \
    /etc/kernel/postinst.d/zz-tpm2-unlocker "$kver" "/efi/staged/vmlinuz-$kver"
  echo "TPM2U-HOOK-END rc=$?"
fi
if [ "$hook" = post-update ]; then
  # an initramfs rebuilt by update-initramfs, which runs /etc/initramfs/post-update.d with the version
  # and the new image (staged by the host as initrd.img-V)
  kver=$(busybox uname -r)
  echo "TPM2U-HOOK-BEGIN"
  TPM2_UNLOCKER_BOOTDIR=/efi/staged busybox setsid busybox cttyhack \
    /etc/initramfs/post-update.d/tpm2-unlocker "$kver" "/efi/staged/initrd.img-$kver"
  echo "TPM2U-HOOK-END rc=$?"
fi
if [ -n "$predict" ]; then
  # the PCRs of a boot with what the host staged on the ESP (the update's new files and command line)
  kver=$(busybox uname -r)
  set --
  for f in linux "vmlinuz-$kver"; do [ -f "/efi/staged/$f" ] && set -- "$@" --kernel "/efi/staged/$f"; done
  [ -f /efi/staged/BOOTX64.EFI ] && set -- "$@" --bootloader /efi/staged/BOOTX64.EFI
  for f in initrd "initrd.img-$kver"; do [ -f "/efi/staged/$f" ] && set -- "$@" --initrd "/efi/staged/$f"; done
  [ -f /efi/staged/cmdline ] && set -- "$@" --cmdline "$(cat /efi/staged/cmdline)"
  echo "TPM2U-PREDICT-BEGIN"
  tpm2-unlocker predict --pcrs sha256:0,1,2,3,4,5,6,7,8,9,12,14,15 "$@" --json
  echo "TPM2U-PREDICT-END rc=$?"
fi
echo "@DONE_MARKER@"
busybox sync
busybox poweroff -f
"""


@dataclass(frozen=True)
class RootImage:
    path: Path
    uuid: str
    passphrase: bytes


# what the root needs to mount the ESP read-only (a guest booted through systemd-boot)
FAT_MODULES = ("fs/fat/fat.ko", "fs/fat/vfat.ko", "fs/nls/nls_cp437.ko", "fs/nls/nls_ascii.ko", "fs/nls/nls_utf8.ko")


def build_root_dir(root: Path, binary: Path, moddir: Path | None = None) -> None:
    if root.exists():
        shutil.rmtree(root)
    for d in ("proc", "sys", "dev", "run", "tmp", "etc", "bin", "sbin", "usr/bin", "usr/sbin", "efi"):
        (root / d).mkdir(parents=True, exist_ok=True)
    install_program(Path("/bin/busybox"), root, "/bin/busybox")
    # the applets the generators' hooks use too (update-hooks/, run by tpm2u.hook=)
    for applet in ("sh", "mount", "mountpoint", "sync", "poweroff", "cat", "echo", "grep", "sed", "tr", "uname",
                   "setsid", "cttyhack", "readlink"):
        (root / "bin" / applet).symlink_to("busybox")
    cryptsetup = shutil.which("cryptsetup")
    assert cryptsetup is not None
    install_program(Path(cryptsetup), root, "/usr/sbin/cryptsetup")
    # the Debian kernel hook and its shared part, as installed (README, Install), with util-linux's blkid
    blkid = shutil.which("blkid")
    assert blkid is not None
    install_program(Path(blkid), root, "/usr/sbin/blkid")
    source = chosen()  # the checkout's or the installed package's (vm/source.py)
    for hook, dest in ((source.reseal_predict, "usr/lib/tpm2-unlocker/reseal-predict"),
                       (source.kernel_postinst, "etc/kernel/postinst.d/zz-tpm2-unlocker"),
                       (source.initramfs_post_update, "etc/initramfs/post-update.d/tpm2-unlocker")):
        (root / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(hook, root / dest)
    install_program(binary, root, "/usr/bin/tpm2-unlocker")
    # as on any installed system (Debian's libgcc-s1 is required): the binary's cryptography
    # (sign-policy, enroll --signing-key) loads it from the system (LEFT_OUT_OF_BUNDLE)
    libgcc = sorted(Path("/usr/lib").glob("*/libgcc_s.so.1")) + sorted(Path("/lib").glob("*/libgcc_s.so.1"))
    assert libgcc, "libgcc_s.so.1 not found"
    install_program(libgcc[0], root)
    if moddir is not None:
        (root / "lib" / "modules" / "tpm2u").mkdir(parents=True, exist_ok=True)
        for module in FAT_MODULES:
            shutil.copy(moddir / "kernel" / module, root / "lib" / "modules" / "tpm2u" / Path(module).name)
    init = ROOT_INIT.replace("@ROOT_MARKER@", ROOT_MARKER).replace("@DONE_MARKER@", DONE_MARKER)
    (root / "sbin" / "init").write_text(init)
    (root / "sbin" / "init").chmod(0o755)
    # a systemd initrd switches only into a root that has os-release
    (root / "etc" / "os-release").write_text('NAME="tpm2-unlocker test root"\nID=tpm2u\n')


def build_root_image(work: Path, binary: Path, passphrase: bytes, moddir: Path | None = None) -> RootImage:
    """ext4 of the root dir in a 96 MiB file, encrypted in place to LUKS2 (reencrypt, offline).
    `moddir`: the kernel's modules, of which the root gets what mounting the ESP needs."""
    rootdir = work / "rootdir"
    build_root_dir(rootdir, binary, moddir)
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
