"""bash and zsh completion from the option table: `python -m docgen.completion bash|zsh OUT`.

shtab turns cli.build_parser() (built from options.VERBS) into the scripts; what each argument
completes to is read off the same table: a DEVICE to the LUKS devices lsblk sees, a PCR selection to
`BANK:LIST` for each bank the TPM has (else each bank we know), a FILE or blob to files, a DIR to
directories, --store and --lock-pcr to their forms.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

import shtab

from unlocker import options
from unlocker.cli import build_parser
from unlocker.tpm.policy import BANKS, DEFAULT_PCRS

DEFAULT_LIST = DEFAULT_PCRS.partition(":")[2]
KNOWN_BANKS = " ".join(BANKS)
STORE_FORMS = "token nv nv= file="
LOCK_FORMS = " ".join([*(str(p) for p in options.LOCK_PCRS), options.NO_LOCK])

# Each completer: a bash function (called with the word typed so far, prints candidates one a
# line), a zsh function (adds them with compadd), and the name shtab puts in the scripts.
LUKS_DEVICES: Mapping[str, object] = {
    "bash": "_tpm2_unlocker_luks_devices",
    "zsh": "_tpm2_unlocker_luks_devices",
    "preamble": {
        "bash": r"""
# the block devices whose signature is LUKS (lsblk reads udev's database: no root needed)
_tpm2_unlocker_luks_device_list() {
  local device fstype
  lsblk -nrpo PATH,FSTYPE 2>/dev/null | while read -r device fstype; do
    [[ $fstype == crypto_LUKS ]] && printf '%s\n' "$device"
  done
}
_tpm2_unlocker_luks_devices() {
  compgen -W "$(_tpm2_unlocker_luks_device_list)" -- "$1"
}""",
        "zsh": r"""
# (not `path`: zsh ties it to PATH)
_tpm2_unlocker_luks_devices() {
  local -a devices
  local device fstype
  lsblk -nrpo PATH,FSTYPE 2>/dev/null | while read -r device fstype; do
    [[ $fstype == crypto_LUKS ]] && devices+=("$device")
  done
  compadd -a devices
}""",
    },
}

PCR_SELECTIONS: Mapping[str, object] = {
    "bash": "_tpm2_unlocker_pcr_selections",
    "zsh": "_tpm2_unlocker_pcr_selections",
    "preamble": {
        "bash": rf"""
# BANK:{DEFAULT_LIST} for each PCR bank the TPM has (the kernel lists them), else each bank we know
_tpm2_unlocker_pcr_banks() {{
  local dir bank found=
  for dir in /sys/class/tpm/tpm0/pcr-*/; do
    [[ -d $dir ]] || continue
    dir=${{dir%/}}; bank=${{dir##*/pcr-}}
    [[ " {KNOWN_BANKS} " == *" $bank "* ]] && printf '%s\n' "$bank" && found=1
  done
  [[ -n $found ]] || printf '%s\n' {KNOWN_BANKS}
}}
_tpm2_unlocker_pcr_selections() {{
  local bank
  compgen -W "$(for bank in $(_tpm2_unlocker_pcr_banks); do printf '%s:{DEFAULT_LIST} ' "$bank"; done)" -- "$1"
}}""",
        "zsh": rf"""
_tpm2_unlocker_pcr_selections() {{
  local -a banks selections
  local dir
  for dir in /sys/class/tpm/tpm0/pcr-*(N/); do
    [[ " {KNOWN_BANKS} " == *" ${{dir##*/pcr-}} "* ]] && banks+=("${{dir##*/pcr-}}")
  done
  (( $#banks )) || banks=({KNOWN_BANKS})
  selections=("${{^banks[@]}}:{DEFAULT_LIST}")
  compadd -a selections
}}""",
    },
}


def words(name: str, candidates: str) -> Mapping[str, object]:
    """A completer offering fixed `candidates` (space-separated)."""
    return {
        "bash": f"_tpm2_unlocker_{name}",
        "zsh": f"_tpm2_unlocker_{name}",
        "preamble": {
            "bash": f'_tpm2_unlocker_{name}() {{\n  compgen -W "{candidates}" -- "$1"\n}}',
            "zsh": f"_tpm2_unlocker_{name}() {{\n  compadd -- {candidates}\n}}",
        },
    }


def completer(arg: options.Arg) -> Mapping[str, object] | None:
    """What `arg` completes to, read off the table; None: no candidates (a number, a TCTI)."""
    if arg.positional and arg.dest == "device":
        return LUKS_DEVICES
    if arg.convert is options.pcr_selection:
        return PCR_SELECTIONS
    if arg.convert is options.lock_pcr:
        return words("lock_pcrs", LOCK_FORMS)
    if arg.name == "--store":
        return words("stores", STORE_FORMS)
    metavars = arg.metavar if isinstance(arg.metavar, tuple) else (arg.metavar,)
    if "DIR" in metavars:
        return shtab.DIRECTORY
    if "FILE" in metavars or "PUB" in metavars:
        return shtab.FILE
    return None


def annotated_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for verb in options.VERBS:
        sub = verbs.choices[verb.name]
        by_dest = {a.dest: a for a in sub._actions}
        for arg in verb.args:
            complete = completer(arg)
            if complete is not None:
                by_dest[arg.dest].complete = complete  # type: ignore[attr-defined]
    return parser


def render(shell: str) -> str:
    return shtab.complete(annotated_parser(), shell).rstrip("\n") + "\n"


def main() -> None:
    shell, out = sys.argv[1], Path(sys.argv[2])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(shell))


if __name__ == "__main__":
    main()
