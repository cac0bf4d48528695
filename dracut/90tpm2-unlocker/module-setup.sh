#!/bin/bash
# dracut module for tpm2-unlocker: the binary, the TPM drivers, and the hook that runs it
# (a systemd unit before cryptsetup-pre.target, or an initqueue job in a shell initrd).

# Where the binary comes from on the build host (tests point this at a fresh build).
TPM2_UNLOCKER_BINARY=${TPM2_UNLOCKER_BINARY:-/usr/bin/tpm2-unlocker}

check() {
    require_binaries cryptsetup "$TPM2_UNLOCKER_BINARY" || return 1
    # 255: never picked by hostonly detection, only when asked for (--add tpm2-unlocker, or a
    # dracut.conf.d add_dracutmodules+=)
    return 255
}

depends() {
    echo crypt dm
    return 0
}

installkernel() {
    hostonly='' instmods tpm_tis tpm_crb tpm_tis_core dm_crypt
}

install() {
    # the program unpacked (its bootloader and libraries in /usr/lib/tpm2-unlocker): the one file
    # would copy them out to /run and start twice at every boot
    if ! "$TPM2_UNLOCKER_BINARY" unpack "$initdir/usr/lib/tpm2-unlocker"; then
        derror "tpm2-unlocker: could not unpack $TPM2_UNLOCKER_BINARY into the image"
        return 1
    fi
    ln_r /usr/lib/tpm2-unlocker/tpm2-unlocker /usr/bin/tpm2-unlocker
    # systemd initrds carry systemd-cryptsetup only; we open devices with cryptsetup itself
    inst_multiple cryptsetup
    # what the program takes from the system (the one list, shared with the mkinitcpio hook)
    local libs
    if ! libs=$("$TPM2_UNLOCKER_BINARY" unpack --libraries); then
        derror "tpm2-unlocker: $TPM2_UNLOCKER_BINARY could not list its libraries"
        return 1
    fi
    # shellcheck disable=SC2086
    inst_libdir_file $libs
    # file-store enrolments under /etc/tpm2-unlocker: the boot reads their sealed key where the
    # token says (one file a line, taken whole: no word splitting, no globbing)
    local blob
    while IFS= read -r blob; do
        [[ -n $blob ]] && inst_simple "$blob"
    done < <("$TPM2_UNLOCKER_BINARY" unpack --blob-files)
    if dracut_module_included "systemd"; then
        # a TPM PIN is asked through systemd's agents there (console, plymouth)
        inst_multiple -o systemd-ask-password
        inst_simple "$moddir/tpm2-unlocker.service" "$systemdsystemunitdir/tpm2-unlocker.service"
        mkdir -p "$initdir$systemdsystemunitdir/sysinit.target.wants"
        ln_r "$systemdsystemunitdir/tpm2-unlocker.service" \
            "$systemdsystemunitdir/sysinit.target.wants/tpm2-unlocker.service"
        inst_simple "$moddir/systemd-cryptsetup-skip.conf" \
            "$systemdsystemunitdir/systemd-cryptsetup@.service.d/tpm2-unlocker.conf"
        inst_simple "$moddir/tpm2-unlocker-lock.service" "$systemdsystemunitdir/tpm2-unlocker-lock.service"
        mkdir -p "$initdir$systemdsystemunitdir/initrd-switch-root.target.wants" \
            "$initdir$systemdsystemunitdir/emergency.target.wants" \
            "$initdir$systemdsystemunitdir/dracut-emergency.service.wants"
        ln_r "$systemdsystemunitdir/tpm2-unlocker-lock.service" \
            "$systemdsystemunitdir/initrd-switch-root.target.wants/tpm2-unlocker-lock.service"
        # systemd's emergency and rescue shells come by emergency.target: locked before them too
        ln_r "$systemdsystemunitdir/tpm2-unlocker-lock.service" \
            "$systemdsystemunitdir/emergency.target.wants/tpm2-unlocker-lock.service"
        # dracut's own break shells (rd.break=...) come by dracut-emergency.service
        ln_r "$systemdsystemunitdir/tpm2-unlocker-lock.service" \
            "$systemdsystemunitdir/dracut-emergency.service.wants/tpm2-unlocker-lock.service"
    else
        inst_hook initqueue/settled 10 "$moddir/tpm2-unlocker-initqueue.sh"
        inst_hook pre-pivot 90 "$moddir/tpm2-unlocker-lock.sh"
        inst_hook emergency 10 "$moddir/tpm2-unlocker-lock.sh"
    fi
}
