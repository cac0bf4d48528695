#!/bin/bash
# build.sh KERNELVERSION MODULEDIR HOOKDIR OUT: a busybox image made by a mkinitcpio install script.
# Sources functions.sh (the add_* API), runs `build` of the install hook, adds the base (busybox,
# ext4, virtio) and packs the image. For tests where mkinitcpio itself is not packaged.
set -eo pipefail
KERNELVERSION=$1
KERNELROOT=$(cd "$2/../../.." && pwd)
HOOKDIR=$3
OUT=$4
HOOKSDIR=$HOOKDIR/hooks
here=$(cd "$(dirname "$0")" && pwd)
BUILDROOT=$(mktemp -d)
trap 'rm -rf "$BUILDROOT"' EXIT
_modules=() _runhooks=() _earlyhooks=()
. "$here/functions.sh"

# the layout of an Arch image: /bin, /sbin, /usr/sbin -> usr/bin; /lib, /lib64 -> usr/lib
for d in /proc /sys /dev /run /tmp /etc /new_root /usr/bin /usr/lib; do add_dir "$d"; done
ln -s usr/bin "$BUILDROOT/bin"; ln -s usr/bin "$BUILDROOT/sbin"; ln -s bin "$BUILDROOT/usr/sbin"
ln -s usr/lib "$BUILDROOT/lib"
ln -s lib "$BUILDROOT/usr/lib64"; ln -s usr/lib "$BUILDROOT/lib64"
add_binary /bin/busybox /usr/bin/busybox
map add_module virtio_pci virtio_blk ext4
# loaded by /init after the early hooks, where udev's coldplug would load them in a real image;
# the hooks' own modules load on demand (modprobe)
base_modules=("${_modules[@]}")

for hook in tpm2-unlocker; do
    _hook_name=$hook
    unset -f build help
    . "$HOOKDIR/install/$hook"
    build
done

add_file "$here/init" /init 755
printf 'COLDPLUG="%s"\nEARLYHOOKS="%s"\nHOOKS="%s"\n' "${base_modules[*]}" "${_earlyhooks[*]}" "${_runhooks[*]}" \
    > "$BUILDROOT/config"
depmod -b "$BUILDROOT" "$KERNELVERSION"
(cd "$BUILDROOT" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -6) > "$OUT"
