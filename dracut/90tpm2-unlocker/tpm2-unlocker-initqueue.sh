#!/bin/sh
# dracut shell initrd (no systemd): runs from initqueue/settled before dracut's cryptroot-ask jobs
# (its name sorts first), opens what the TPM unseals; cryptroot-ask then finds the device open or
# asks for the passphrase itself.
[ -e /tmp/tpm2-unlocker.done ] && exit 0
: > /tmp/tpm2-unlocker.done
# dracut mounts /run noexec; the one-file binary unpacks its libraries under /run/tpm2-unlocker
if ! mountpoint -q /run/tpm2-unlocker && grep -q ' /run [^ ]* [^ ]*noexec' /proc/mounts; then
    mkdir -p /run/tpm2-unlocker
    mount -t tmpfs -o mode=0700,nosuid,nodev tpm2-unlocker /run/tpm2-unlocker
fi
/usr/bin/tpm2-unlocker unlock --tries 0 --timeout 15 || :
