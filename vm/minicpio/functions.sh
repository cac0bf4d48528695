#!/bin/bash
# mkinitcpio's install-script API (add_module, add_binary, add_file, add_runscript, ...), implemented
# for the test harness on machines without mkinitcpio. Same names and arguments as mkinitcpio v41's
# `functions`; each really copies into $BUILDROOT. Not a copy of mkinitcpio's code.

msg() { printf '==> %s\n' "$*" >&2; }
msg2() { printf '  -> %s\n' "$*" >&2; }
warning() { printf '==> WARNING: %s\n' "$*" >&2; }
error() { printf '==> ERROR: %s\n' "$*" >&2; return 1; }
quiet() { :; }
plain() { printf '    %s\n' "$*" >&2; }

map() {
    local r=0 arg
    for arg in "${@:2}"; do "$1" "$arg" || r=1; done
    return "$r"
}

add_dir() {
    [[ -n $1 && $1 == /* ]] || return 1
    mkdir -p "$BUILDROOT$1"
    [[ -n $2 ]] && chmod "$2" "$BUILDROOT$1"
    return 0
}

add_symlink() {
    # add_symlink NAME [TARGET]
    local name=$1 target=${2:-$1}
    [[ $target == "$name" ]] && target=$(readlink -f "$name")
    mkdir -p "$BUILDROOT${name%/*}"
    ln -sfn "$target" "$BUILDROOT$name"
}

add_file() {
    # add_file SRC [DEST] [MODE]
    local src=$1 dest=${2:-$1} mode=$3
    [[ -f $src ]] || { error "file not found: '$src'"; return 1; }
    [[ -e $BUILDROOT$dest ]] && return 0
    mkdir -p "$BUILDROOT${dest%/*}"
    cp -L "$src" "$BUILDROOT$dest"
    [[ -n $mode ]] && chmod "$mode" "$BUILDROOT$dest"
    return 0
}

add_binary() {
    # add_binary SRC [DEST]: the program or library and every library it links
    local src=$1 dest=${2:-} path lib
    if [[ $src != */* ]]; then
        path=$(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin type -P "$src") || {
            error "binary not found: '$src'"; return 1; }
        src=$path
    fi
    [[ -f $src ]] || { error "binary not found: '$src'"; return 1; }
    add_file "$src" "${dest:-$src}" 755
    while read -r lib; do
        add_file "$lib" "$lib" 755
        add_file "$lib" "${lib/#\/lib\//\/usr\/lib\/}" 755
    done < <(ldd "$src" 2>/dev/null | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (0x.*/\1/p')
    return 0
}

add_module() {
    # add_module NAME: a kernel module and its dependencies; a trailing '?' makes it optional
    local name=${1%\?} optional= line ko
    [[ $1 == *\? ]] && optional=1
    if ! out=$(modprobe -d "$KERNELROOT" -S "$KERNELVERSION" --show-depends "$name" 2>/dev/null); then
        [[ -n $optional ]] && return 0
        error "module not found: '$name'"
        return 1
    fi
    while read -r line; do
        case $line in
            insmod\ *)
                ko=${line#insmod }; ko=${ko%% *}
                add_file "$ko" "/usr/lib/modules/${ko#"$KERNELROOT"/lib/modules/}"
                _modules+=("$(basename "${ko%.ko*}")")
                ;;
        esac
    done <<< "$out"
    return 0
}

add_all_modules() {
    # add_all_modules PATTERN: every module under kernel/ whose path matches
    local ko
    while read -r ko; do
        add_module "$(basename "${ko%.ko*}")"
    done < <(find "$KERNELROOT/lib/modules/$KERNELVERSION/kernel" -name '*.ko*' | grep -E "$1")
}

add_checked_modules() {
    # without autodetect (as here) mkinitcpio's add_checked_modules adds what add_all_modules does
    add_all_modules "$@"
}

# Arch's names of the device-mapper rules (what install scripts ask for) -> Debian's
declare -A _debian_rules=([10-dm.rules]=55-dm.rules [13-dm-disk.rules]=60-persistent-storage-dm.rules)

add_udev_rule() {
    local rule=$1 path name
    for name in "$rule" "${_debian_rules[$rule]:-}"; do
        [[ -n $name ]] || continue
        for path in "$name" "/usr/lib/udev/rules.d/$name" "/lib/udev/rules.d/$name"; do
            if [[ -f $path ]]; then
                add_file "$path" "/usr/lib/udev/rules.d/${name##*/}"
                return 0
            fi
        done
    done
    error "udev rule not found: '$rule'"  # as mkinitcpio: a missing rule is an error
}

add_runscript() {
    # as mkinitcpio does: the hook's run_earlyhook/run_hook functions put it in EARLYHOOKS/HOOKS
    local name=${1:-${_hook_name}} fn
    add_file "$HOOKSDIR/$name" "/hooks/$name" 755
    for fn in $(grep -oE '^[[:space:]]*run_(early|cleanup|emergency)?hook\b' "$HOOKSDIR/$name"); do
        case $fn in
            run_earlyhook) _earlyhooks+=("$name") ;;
            run_hook) _runhooks+=("$name") ;;
            run_cleanuphook) _cleanuphooks=("$name" "${_cleanuphooks[@]}") ;;
            run_emergencyhook) _emergencyhooks+=("$name") ;;
        esac
    done
}

add_full_dir() {
    [[ -d $1 ]] || return 0
    local f
    while read -r f; do add_file "$f"; done < <(find "$1" -type f)
}
