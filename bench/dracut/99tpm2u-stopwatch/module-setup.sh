#!/bin/bash
# Benchmark stopwatch for dracut systemd images: prints guest uptime when the LUKS disk appears
# (after dev-vda.device) and when cryptsetup.target is reached. The same in every variant.
check() { return 255; }
depends() { echo systemd; }
install() {
    inst_multiple sh
    local unit
    for unit in tpm2u-stopwatch-disk.service tpm2u-stopwatch-crypt.service; do
        inst_simple "$moddir/$unit" "$systemdsystemunitdir/$unit"
    done
    mkdir -p "$initdir$systemdsystemunitdir/sysinit.target.wants" "$initdir$systemdsystemunitdir/initrd.target.wants"
    ln_r "$systemdsystemunitdir/tpm2u-stopwatch-disk.service" \
        "$systemdsystemunitdir/sysinit.target.wants/tpm2u-stopwatch-disk.service"
    ln_r "$systemdsystemunitdir/tpm2u-stopwatch-crypt.service" \
        "$systemdsystemunitdir/initrd.target.wants/tpm2u-stopwatch-crypt.service"
}
