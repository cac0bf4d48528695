#!/bin/sh
# dracut shell initrd, pre-pivot: extend the lock PCR unless a run of ours did (dracut's own
# cryptroot-ask may have opened the disk after our initqueue job): nothing from the root unseals after it.
[ -e /run/tpm2-unlocker/locked ] || /usr/bin/tpm2-unlocker lock || :
