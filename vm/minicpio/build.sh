#!/bin/bash
# build.sh KERNELVERSION MODULEDIR HOOKDIR OUT [udev|bare|plymouth]: a busybox image made by a
# mkinitcpio install script. Sources functions.sh (the add_* API), runs `build` of the harness's udev
# hook (as in Arch's default HOOKS; `bare` leaves it out; `plymouth` adds the harness's plymouth hook
# after it, as Arch's HOOKS=(base udev plymouth ...)) and of our install hook, adds the base (busybox,
# ext4, virtio) and packs the image. For tests where mkinitcpio itself is not packaged.
set -eo pipefail
KERNELVERSION=$1
KERNELROOT=$(cd "$2/../../.." && pwd)
HOOKDIR=$3
OUT=$4
FLAVOUR=${5:-udev}
here=$(cd "$(dirname "$0")" && pwd)
BUILDROOT=$(mktemp -d)
trap 'rm -rf "$BUILDROOT"' EXIT
_modules=() _runhooks=() _earlyhooks=() _cleanuphooks=()
. "$here/functions.sh"

# the layout of an Arch image: /bin, /sbin, /usr/sbin -> usr/bin; /lib, /lib64 -> usr/lib
for d in /proc /sys /dev /run /tmp /etc /new_root /usr/bin /usr/lib; do add_dir "$d"; done
ln -s usr/bin "$BUILDROOT/bin"; ln -s usr/bin "$BUILDROOT/sbin"; ln -s bin "$BUILDROOT/usr/sbin"
ln -s usr/lib "$BUILDROOT/lib"
ln -s lib "$BUILDROOT/usr/lib64"; ln -s usr/lib "$BUILDROOT/lib64"
add_binary /bin/busybox /usr/bin/busybox
# as mkinitcpio's base hook: kmod behind modprobe & co. (the kernel runs /sbin/modprobe for every
# module it requests itself, e.g. each piece of a cipher; busybox's applet reads the text indexes)
add_binary kmod /usr/bin/kmod
for applet in depmod insmod rmmod lsmod modprobe modinfo; do add_symlink "/usr/bin/$applet" kmod; done
map add_module virtio_pci virtio_blk ext4
# loaded by /init after the early hooks, where udev's coldplug would load them in a real image;
# the hooks' own modules load on demand (modprobe)
base_modules=("${_modules[@]}")

hooks=("tpm2-unlocker:$HOOKDIR")
[[ $FLAVOUR == plymouth ]] && hooks=("plymouth:$here" "${hooks[@]}")
[[ $FLAVOUR == udev || $FLAVOUR == plymouth ]] && hooks=("udev:$here" "${hooks[@]}")
for entry in "${hooks[@]}"; do
    _hook_name=${entry%%:*}
    HOOKSDIR=${entry#*:}/hooks
    unset -f build help
    . "${entry#*:}/install/$_hook_name"
    build
done

add_file "$here/init" /init 755
# without udev, /init loads the disk's modules itself where udev's coldplug would
coldplug=("${base_modules[@]}")
[[ $FLAVOUR == bare ]] || coldplug=()
printf 'COLDPLUG="%s"\nEARLYHOOKS="%s"\nHOOKS="%s"\nCLEANUPHOOKS="%s"\nEMERGENCYHOOKS="%s"\n' "${coldplug[*]}" \
    "${_earlyhooks[*]}" "${_runhooks[*]}" "${_cleanuphooks[*]}" "${_emergencyhooks[*]}" > "$BUILDROOT/config"
depmod -b "$BUILDROOT" "$KERNELVERSION"
(cd "$BUILDROOT" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -6) > "$OUT"
