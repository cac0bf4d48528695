#!/bin/sh
# dracut shell initrd (no systemd): runs from initqueue/settled before dracut's cryptroot-ask jobs
# (its name sorts first), opens what the TPM unseals; cryptroot-ask then finds the device open or
# asks for the passphrase itself.
[ -e /tmp/tpm2-unlocker.done ] && exit 0
: > /tmp/tpm2-unlocker.done
/usr/bin/tpm2-unlocker unlock --tries 0 || :
