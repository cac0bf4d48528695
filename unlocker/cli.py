"""Command line: parses arguments, calls one verb, and is the one place errors become exit codes.

Verb modules are imported lazily so `--version` and `--help` never load tpm2_pytss (start-up cost
matters in the initramfs). For the same reason the boot's own command line (`unlock` with the
options the hooks pass) is read without argparse: its import and the parser's construction were
~0.1 s of a boot under emulation. Any other command line goes through argparse.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

from unlocker import TYPE_CHECKING, __version__
from unlocker.errors import EXIT_OK, EXIT_USAGE, UnlockerError, UsageError
from unlocker.log import debug_on_cmdline, hint, say, set_debug, trace
from unlocker.tpm.policy import DEFAULT_PCRS, PcrSelection

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from typing import NoReturn

DEFAULT_TRIES = 3
DEFAULT_TIMEOUT = 30


def _selection(text: str) -> PcrSelection:
    return PcrSelection.parse(text)


def verb_enroll(opts: argparse.Namespace) -> int:
    from unlocker.commands.enroll import EnrollOptions, enroll
    from unlocker.store import StoreSpec

    token = enroll(EnrollOptions(opts.device, opts.pcrs, StoreSpec.parse(opts.store), opts.unlock_key_file, opts.tcti))
    say(f"{opts.device}: enrolled keyslot {token.keyslot} sealed to {token.selection} "
        f"({token.describe_store()}, token {token.token_id}); the passphrase still opens the disk")
    return EXIT_OK


def verb_unlock(opts: argparse.Namespace) -> int:
    from unlocker.boot.unlock import BootOptions, UnlockOptions, unlock, unlock_at_boot

    if opts.tries < 0:
        raise UsageError("--tries must be 0 or more")
    if opts.no_tpm and opts.tries == 0:
        raise UsageError("--no-tpm with --tries 0 would open nothing")
    if opts.device is None:
        if opts.test or opts.name:
            raise UsageError("--test and NAME need a DEVICE")
        unlock_at_boot(BootOptions(opts.tries, opts.tcti, opts.timeout, use_tpm=not opts.no_tpm))
    else:
        unlock(UnlockOptions(opts.device, opts.name, opts.test, opts.tries, opts.tcti, use_tpm=not opts.no_tpm))
    return EXIT_OK


def verb_reseal(opts: argparse.Namespace) -> int:
    from unlocker.commands.reseal import ResealOptions, reseal

    for token in reseal(ResealOptions(opts.device, opts.pcrs, opts.unlock_key_file, opts.tcti)):
        say(f"{opts.device}: re-sealed keyslot {token.keyslot} to the current values of {token.selection} "
            f"({token.describe_store()}, token {token.token_id})")
    return EXIT_OK


def verb_status(opts: argparse.Namespace) -> int:
    from unlocker.commands.status import render, status

    result = status(opts.device, opts.tcti)
    if opts.json:
        import json

        print(json.dumps(result.to_json(), indent=2))
    else:
        print(render(result))
    return EXIT_OK


def verb_remove(opts: argparse.Namespace) -> int:
    from unlocker.commands.remove import RemoveOptions, remove

    count = remove(RemoveOptions(opts.device, opts.unlock_key_file, opts.tcti))
    say(f"{opts.device}: removed {count} enrolment(s); the passphrase opens the disk")
    return EXIT_OK


def verb_adopt(opts: argparse.Namespace) -> int:
    from unlocker.commands.adopt import AdoptOptions, adopt
    from unlocker.token import parse_nv_index

    if (opts.blob is None) == (opts.nv is None):
        raise UsageError("adopt takes one of --blob PUB PRIV or --nv INDEX")
    if opts.pcrs is None:
        raise UsageError("adopt needs --pcrs: the PCR list the object was sealed to (e.g. sha256:0,2,3,7)")
    nv_index = parse_nv_index(opts.nv) if opts.nv is not None else None
    blob = (opts.blob[0], opts.blob[1]) if opts.blob else None
    token = adopt(AdoptOptions(opts.device, opts.pcrs, blob, nv_index, opts.tcti))
    say(f"{opts.device}: adopted {token.describe_store()} for keyslot {token.keyslot} (token {token.token_id})")
    return EXIT_OK


def verb_unpack(opts: argparse.Namespace) -> int:
    from pathlib import Path

    from unlocker.commands.unpack import unpack

    done = unpack(Path(opts.dir))
    if done.checked:
        say(f"unpacked into {opts.dir}: run {done.program}")
    else:
        say(f"unpacked into {opts.dir} (not started to check it: {opts.dir} is on a noexec mount)")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    import argparse

    from unlocker.argparser import Parser

    parser = Parser(prog="tpm2-unlocker", description="Unlock LUKS2 disks with a key sealed by the TPM 2.0.")
    parser.add_argument("--version", action="version", version=f"tpm2-unlocker {__version__}")
    parser.add_argument("--debug", action="store_true", help="log commands and show tracebacks")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)

    def verb(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--tcti", help="TPM connection (default: $TPM2_UNLOCKER_TCTI, $TPM2TOOLS_TCTI, "
                                      "device:/dev/tpmrm0, device:/dev/tpm0)")
        p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
        return p

    p = verb("enroll", verb_enroll, "add a TPM-sealed key in a new keyslot beside the passphrase")
    p.add_argument("device")
    p.add_argument("--pcrs", type=_selection, default=PcrSelection.parse(DEFAULT_PCRS),
                   help=f"PCR bank and indexes to seal to (default {DEFAULT_PCRS})")
    p.add_argument("--store", default="token", help="token (default), nv[=INDEX] or file=DIR")
    p.add_argument("--unlock-key-file", metavar="FILE", help="existing passphrase/key file ('-' for stdin)")

    p = verb("unlock", verb_unlock, "unseal the key and open the disk; else ask for the passphrase. Without "
             "DEVICE (at boot): every device named by rd.luks.uuid=/rd.luks.name=/cryptdevice=, else in "
             "/etc/crypttab, else every LUKS2 device with a tpm2-unlocker token")
    p.add_argument("device", nargs="?")
    p.add_argument("name", nargs="?", help="mapping name (default luks-UUID)")
    p.add_argument("--test", action="store_true", help="only prove the key opens its keyslot; map nothing")
    p.add_argument("--tries", type=int, default=DEFAULT_TRIES,
                   help=f"passphrase attempts after a TPM failure (default {DEFAULT_TRIES}; "
                   "0: TPM only, leave the device closed for systemd-cryptsetup)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for boot devices (default {DEFAULT_TIMEOUT})")
    p.add_argument("--no-tpm", action="store_true", help="ask for the passphrase without trying the TPM "
                   "(a first run with --tries 0 tried it and said why it failed)")

    p = verb("reseal", verb_reseal, "seal the key to the current PCR values (after an update)")
    p.add_argument("device")
    p.add_argument("--pcrs", type=_selection, help="new PCR selection (default: keep the enrolled one)")
    p.add_argument("--unlock-key-file", metavar="FILE", help="passphrase/key file, if the old key fails")

    p = verb("status", verb_status, "TPM facts and whether each enrolment's policy holds now")
    p.add_argument("device", nargs="?")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = verb("remove", verb_remove, "remove our keyslot, token and NV index (never the last other keyslot)")
    p.add_argument("device")
    p.add_argument("--unlock-key-file", metavar="FILE", help="passphrase/key file of a keyslot that stays")

    p = verb("adopt", verb_adopt, "take over an object or NV index sealed with tpm2-tools (ArchWiki recipe)")
    p.add_argument("device")
    p.add_argument("--blob", nargs=2, metavar=("PUB", "PRIV"), help="tpm2_create --public/--private files")
    p.add_argument("--nv", metavar="INDEX", help="NV index defined with tpm2_nvdefine (e.g. 0x1500016)")
    p.add_argument("--pcrs", type=_selection, help="the PCRs it was sealed to, e.g. sha256:0,2,3,7")

    help = ("lay the program out unpacked in DIR, for an initramfs (the hooks run it at image build: "
            "no copy-out to /run and second start at every boot)")
    p = verbs.add_parser("unpack", help=help, description=help)
    p.set_defaults(func=verb_unpack)
    p.add_argument("dir", metavar="DIR", help="an empty or new directory")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


# The options of `unlock` the boot passes (`_boot_unlock`): value options and their types, flags.
_BOOT_VALUES: dict[str, Callable[[str], object]] = {"--tries": int, "--timeout": float, "--tcti": str}
_BOOT_FLAGS = ("--no-tpm", "--debug")


def _boot_unlock(args: list[str]) -> SimpleNamespace | None:
    """`unlock` without DEVICE and with only the options in _BOOT_VALUES/_BOOT_FLAGS: the same
    namespace argparse would make. None for anything else (argparse then parses it or says why not):
    another verb or option, a DEVICE, a value that starts with '-' or that int()/float() refuse."""
    if args[:1] != ["unlock"]:
        return None
    opts: dict[str, object] = {"verb": "unlock", "func": verb_unlock, "device": None, "name": None, "test": False,
                               "tries": DEFAULT_TRIES, "timeout": DEFAULT_TIMEOUT, "no_tpm": False, "tcti": None,
                               "debug": False}
    rest = args[1:]
    while rest:
        option, equals, value = rest.pop(0).partition("=")
        if option in _BOOT_FLAGS and not equals:
            opts[option[2:].replace("-", "_")] = True
        elif option in _BOOT_VALUES:
            if not equals:
                if not rest:
                    return None
                value = rest.pop(0)
            if value.startswith("-"):
                return None
            try:
                opts[option[2:]] = _BOOT_VALUES[option](value)
            except ValueError:
                return None
        else:
            return None
    return SimpleNamespace(**opts)


def parse_args(args: list[str]) -> argparse.Namespace | SimpleNamespace:
    """The boot's command line directly, any other through argparse (which imports it)."""
    boot = _boot_unlock(args)
    return boot if boot is not None else build_parser().parse_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or debug_on_cmdline()
    set_debug(debug)
    trace(f"tpm2-unlocker {__version__}: {' '.join(args)}")
    try:
        opts = parse_args(args)
        if opts.verb is None:
            raise UsageError("no verb given (enroll, unlock, reseal, status, remove, adopt, unpack; see --help)")
        return int(opts.func(opts))
    except UnlockerError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        if not exc.said:
            say(exc.message)
            if exc.hint:
                hint(exc.hint)
        return exc.exit_code
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception as exc:  # a bug: one line unless --debug
        if debug:
            import traceback

            traceback.print_exc()
        say(f"internal error: {type(exc).__name__}: {exc} (run with --debug for details)")
        return EXIT_USAGE


def entry() -> NoReturn:
    code = main()
    # Exit without the interpreter's teardown (modules, garbage collection: ~0.06 s of a boot under
    # emulation, on the way from "unlocked" to the next hook). Nothing of ours waits for it: output
    # is flushed here, keys are wiped where they are used, no atexit handlers, no non-daemon threads.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe (`... | head`): what was not read is lost anyway
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
