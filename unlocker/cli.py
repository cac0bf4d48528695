"""Command line: parses arguments, calls one verb, and is the one place errors become exit codes.

Verb modules are imported lazily so `--version` and `--help` never load tpm2_pytss (start-up cost
matters in the initramfs). For the same reason the boot's own command line (`unlock` with the
options the hooks pass) is read without argparse: its import and the parser's construction are
start-up time a boot pays under emulation (docs/performance.md). Any other command line goes through
argparse. Both parsers are built from one table, options.VERBS.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

from unlocker import TYPE_CHECKING, __version__, initrd, options
from unlocker.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, NoTpmError, UnlockerError, UsageError
from unlocker.log import debug_on_cmdline, hint, say, set_debug, trace

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from typing import Any, NoReturn

    from unlocker.commands.reseal import Approval


def verb_enroll(opts: argparse.Namespace) -> int:
    from unlocker.commands.enroll import EnrollOptions, enroll
    from unlocker.store import StoreSpec

    token = enroll(EnrollOptions(opts.device, opts.pcrs, StoreSpec.parse(opts.store), opts.unlock_key_file, opts.tcti,
                                 recovery_key=opts.recovery_key,
                                 lock_pcr=None if opts.lock_pcr == options.NO_LOCK else opts.lock_pcr,
                                 with_pin=opts.with_pin, pin_file=opts.pin_file, signing_key=opts.signing_key))
    pin = " and a PIN" if token.pin else ""
    if token.signed is not None:
        pin += ", or values its signing key approves (sign-policy)"
    say(f"{opts.device}: enrolled keyslot {token.keyslot} sealed to {token.selection}{pin} "
        f"({token.describe_store()}, token {token.token_id}); the passphrase still opens the disk")
    return EXIT_OK


def verb_recovery_key(opts: argparse.Namespace) -> int:
    from unlocker.commands.recovery import recovery_key

    slot = recovery_key(opts.device, opts.unlock_key_file)
    say(f"{opts.device}: recovery key added in keyslot {slot}")
    return EXIT_OK


def verb_unlock(opts: argparse.Namespace) -> int:
    from unlocker.boot.at_boot import BootOptions, unlock_at_boot
    from unlocker.boot.unlock import UnlockRequest, unlock

    if opts.no_tpm and opts.tries == 0:
        raise UsageError("--no-tpm with --tries 0 would open nothing")
    if opts.device is None:
        if opts.test or opts.name:
            raise UsageError("--test and NAME need a DEVICE")
        unlock_at_boot(BootOptions(opts.tries, opts.tcti, opts.timeout, use_tpm=not opts.no_tpm,
                                   defer_lock=opts.defer_lock, tpm_timeout=opts.tpm_timeout,
                                   defer_pin=opts.defer_pin))
    else:
        unlock(UnlockRequest(opts.device, opts.name, test=opts.test, tries=opts.tries, tcti=opts.tcti,
                             use_tpm=not opts.no_tpm, tpm_timeout=opts.tpm_timeout))
    return EXIT_OK


def verb_lock(opts: argparse.Namespace) -> int:
    from unlocker.boot.at_boot import lock_within
    from unlocker.boot.lock import LOCK_EVENT, locked
    from unlocker.options import DEFAULT_TPM_TIMEOUT

    if locked():
        trace("lock: a run of this boot extended the lock PCR already")
        return EXIT_OK
    if not lock_within(None, [LOCK_EVENT], opts.tcti, DEFAULT_TPM_TIMEOUT):
        raise NoTpmError("the lock PCR was not extended").as_said()
    say("the lock PCR is extended: no key unseals until the next boot")
    return EXIT_OK


def verb_reseal(opts: argparse.Namespace) -> int:
    from unlocker.commands.prediction import Prediction
    from unlocker.commands.reseal import KEEP, Approval, ResealOptions, reseal

    lock = KEEP if opts.lock_pcr is None else None if opts.lock_pcr == options.NO_LOCK else opts.lock_pcr
    if opts.with_pin and opts.without_pin:
        raise UsageError("--with-pin and --without-pin exclude each other")
    if opts.without_pin and opts.pin_file is not None:
        raise UsageError("--pin-file gives a PIN to seal with; --without-pin seals without one")
    with_pin = True if opts.with_pin or opts.pin_file is not None else False if opts.without_pin else None
    components = {a.dest: getattr(opts, a.dest) for a in options.PREDICT_ARGS}
    if not opts.predict and any(v is not None for v in components.values()):
        raise UsageError("--kernel, --bootloader, --initrd and --cmdline go with --predict")
    prediction = Prediction(**components) if opts.predict else None
    for token in reseal(ResealOptions(opts.device, opts.pcrs, opts.unlock_key_file, opts.tcti, lock_pcr=lock,
                                      with_pin=with_pin, pin_file=opts.pin_file, predict=prediction)):
        if isinstance(token, Approval):
            _say_approval(opts.device, token)
            continue
        pin = " and a PIN" if token.pin else ""
        more = len(token.more_branches)
        chains = f" and {more} further chain{'s' if more > 1 else ''} (PolicyOR)" if more else ""
        say(f"{opts.device}: re-sealed keyslot {token.keyslot} to the current values of {token.selection}{chains}{pin} "
            f"({token.describe_store()}, token {token.token_id})")
    return EXIT_OK


def _say_approval(device: str, approval: Approval) -> None:
    signatures = approval.signatures
    ids = ", ".join(str(s.token_id) for s in signatures)
    what = "the current chain and the next boot's" if len(signatures) > 1 else "the current chain (the next boot's is the same)"
    say(f"{device}: approved {what} with the machine key, no re-seal (token {approval.token.token_id}: "
        f"signature token{'s' if len(signatures) > 1 else ''} {ids}, epoch {signatures[0].epoch}); older approvals "
        "are retired")


def verb_prepare_update(opts: argparse.Namespace) -> int:
    from unlocker.commands.prepare_update import PrepareOptions, prepare_update

    for device, token in prepare_update(PrepareOptions(opts.device, opts.firmware, opts.secure_boot, opts.boots,
                                                       opts.unlock_key_file, opts.tcti, opts.pin_file)):
        grace = token.grace
        assert grace is not None
        left = ", ".join(str(p) for p in grace.left_out)
        say(f"{device}: ready for the firmware update: the next boot may change PCR {left} once (within "
            f"{opts.boots} boot(s)); it then re-seals to the new values (token {token.token_id})")
    return EXIT_OK


def verb_sign_policy(opts: argparse.Namespace) -> int:
    from unlocker.commands.prediction import Prediction
    from unlocker.commands.sign_policy import SignOptions, sign_policy

    if opts.key is None:
        raise UsageError("sign-policy needs --key PRIV.pem (the private half of the enrolment's --signing-key)")
    components = {a.dest: getattr(opts, a.dest) for a in options.PREDICT_ARGS}
    if not opts.predict and any(v is not None for v in components.values()):
        raise UsageError("--kernel, --bootloader, --initrd and --cmdline go with --predict")
    prediction = Prediction(**components) if opts.predict else None
    for device, signature in sign_policy(SignOptions(opts.device, opts.key, opts.tcti, opts.pcrs, prediction,
                                                     opts.retire_older)):
        retired = "; older signatures are retired" if opts.retire_older else ""
        say(f"{device}: approved the values of {signature.selection} (signature token {signature.token_id}, "
            f"epoch {signature.epoch}){retired}")
    return EXIT_OK


def verb_status(opts: argparse.Namespace) -> int:
    from unlocker.commands.status import render, status

    result = status(opts.device, opts.tcti)
    if opts.json:
        import json

        print(json.dumps(result.to_json(), indent=2))
    else:
        from unlocker.log import printable_lines

        print(printable_lines(render(result)))  # it quotes header text: no escape reaches the terminal
    return EXIT_OK


def verb_predict(opts: argparse.Namespace) -> int:
    from unlocker.commands.predict import PredictOptions, predict, render

    result = predict(PredictOptions(opts.pcrs, kernel=opts.kernel, bootloader=opts.bootloader, initrd=opts.initrd,
                                    cmdline=opts.cmdline, eventlog=opts.eventlog, tcti=opts.tcti))
    if opts.json:
        import json

        print(json.dumps(result.to_json(), indent=2))
    else:
        print(render(result))
    return EXIT_OK


def verb_remove(opts: argparse.Namespace) -> int:
    from unlocker.commands.remove import RemoveOptions, remove

    count = remove(RemoveOptions(opts.device, opts.unlock_key_file, opts.tcti, recovery_key=opts.recovery_key))
    say(f"{opts.device}: removed {count} enrolment(s); the passphrase opens the disk")
    return EXIT_OK


def verb_adopt(opts: argparse.Namespace) -> int:
    from unlocker.commands.adopt import AdoptOptions, adopt
    from unlocker.token import parse_nv_index

    if getattr(opts, "from") is not None:
        return _adopt_from(opts)
    if opts.replace or opts.pin_file is not None:
        raise UsageError("--replace and --pin-file go with --from systemd|clevis")
    if (opts.blob is None) == (opts.nv is None):
        raise UsageError("adopt takes one of --blob PUB PRIV or --nv INDEX")
    if opts.pcrs is None:
        raise UsageError("adopt needs --pcrs: the PCR list the object was sealed to (e.g. sha256:0,2,3,7)")
    nv_index = parse_nv_index(opts.nv) if opts.nv is not None else None
    blob = (opts.blob[0], opts.blob[1]) if opts.blob else None
    token = adopt(AdoptOptions(opts.device, opts.pcrs, blob, nv_index, opts.tcti))
    say(f"{opts.device}: adopted {token.describe_store()} for keyslot {token.keyslot} (token {token.token_id})")
    return EXIT_OK


def _adopt_from(opts: argparse.Namespace) -> int:
    from unlocker.commands.adopt_from import ENROLLED_BY, AdoptFromOptions, adopt_from

    tool = getattr(opts, "from")
    if opts.blob is not None or opts.nv is not None:
        raise UsageError("--from takes over another tool's enrolment: give it without --blob or --nv")
    done = adopt_from(AdoptFromOptions(opts.device, tool, opts.replace, opts.pcrs, opts.pin_file, opts.tcti))
    token, theirs = done.token, f"{ENROLLED_BY[tool]}'s token {done.other_token_id} and keyslot {done.other_keyslot}"
    pin = " and its PIN" if token.pin else ""
    say(f"{opts.device}: adopted {tool}'s enrolment: enrolled keyslot {token.keyslot} sealed to {token.selection}{pin} "
        f"({token.describe_store()}, token {token.token_id}); "
        + (f"removed {theirs}" if done.replaced else f"{theirs} stay (remove them later with {done.retire_command})")
        + f"; {done.remaining_text}")
    return EXIT_OK


def verb_unpack(opts: argparse.Namespace) -> int:
    from pathlib import Path

    from unlocker.commands.unpack import SYSTEM_LIBRARIES, blob_files, unpack

    if opts.libraries:
        print("\n".join(SYSTEM_LIBRARIES))
        return EXIT_OK
    if opts.blob_files:
        for file in blob_files():
            print(file)
        return EXIT_OK
    if opts.dir is None:
        raise UsageError("unpack needs DIR (or --libraries, --blob-files)")
    done = unpack(Path(opts.dir))
    if done.checked:
        say(f"unpacked into {opts.dir}: run {done.program}")
    else:
        say(f"unpacked into {opts.dir} (not started to check it: {opts.dir} is on a noexec mount)")
    return EXIT_OK


VERB_FUNCTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "enroll": verb_enroll, "recovery-key": verb_recovery_key, "unlock": verb_unlock, "lock": verb_lock,
    "reseal": verb_reseal, "prepare-update": verb_prepare_update, "sign-policy": verb_sign_policy,
    "status": verb_status,
    "remove": verb_remove, "adopt": verb_adopt, "unpack": verb_unpack,
    "predict": verb_predict,
}


def build_parser() -> argparse.ArgumentParser:
    """argparse's parser, built from the option table (options.VERBS)."""
    import argparse

    from unlocker.argparser import Parser

    parser = Parser(prog="tpm2-unlocker", description="Unlock LUKS2 disks with a key sealed by the TPM 2.0.")
    parser.add_argument("--version", action="version", version=f"tpm2-unlocker {__version__}")
    parser.add_argument("--debug", action="store_true", help="log commands and show tracebacks")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=Parser)
    for verb in options.VERBS:
        p = verbs.add_parser(verb.name, help=verb.help, description=verb.help)
        p.set_defaults(func=VERB_FUNCTIONS[verb.name])
        for arg in verb.args:
            kwargs: dict[str, Any] = {"help": argparse.SUPPRESS if arg.hidden else (arg.help or None)}
            if arg.flag:
                kwargs["action"] = "store_true"
            else:
                if arg.convert is not None:  # its UsageError passes through argparse with our message
                    kwargs["type"] = arg.convert
                # an argument with a kernel parameter stays None here: options.kernel_defaults decides
                if not arg.positional or arg.nargs == "?":
                    kwargs["default"] = None if arg.kernel_param else arg.default
                if arg.nargs is not None:
                    kwargs["nargs"] = arg.nargs
                if arg.metavar is not None:
                    kwargs["metavar"] = arg.metavar
            p.add_argument(arg.name, **kwargs)
    return parser


def _boot_unlock(args: list[str]) -> SimpleNamespace | None:
    """`unlock` without DEVICE and with only the table's `boot` options: the namespace argparse
    would make. None for anything else (argparse then parses it or says why not): another verb or
    option, a DEVICE, a value that starts with '-'. A value the option's converter refuses raises
    its UsageError, as argparse would let it through."""
    if args[:1] != ["unlock"]:
        return None
    verb = options.verb("unlock")
    opts: dict[str, object] = {"verb": "unlock", "func": VERB_FUNCTIONS["unlock"]}
    for arg in verb.args:
        opts[arg.dest] = False if arg.flag else (None if arg.kernel_param else arg.default)
    boot = {arg.name: arg for arg in verb.args if arg.boot}
    rest = args[1:]
    while rest:
        option, equals, value = rest.pop(0).partition("=")
        given = boot.get(option)
        if given is None:
            return None
        if given.flag:
            if equals:
                return None
            opts[given.dest] = True
            continue
        if not equals:
            if not rest:
                return None
            value = rest.pop(0)
        if value.startswith("-"):
            return None
        opts[given.dest] = given.convert(value) if given.convert is not None else value
    return SimpleNamespace(**opts)


def parse_args(args: list[str], kernel_words: list[str] | None = None) -> argparse.Namespace | SimpleNamespace:
    """The boot's command line directly, any other through argparse (which imports it); then the
    kernel command line's values (in the initrd) for what was not given."""
    fast = _boot_unlock(args)
    opts: argparse.Namespace | SimpleNamespace = fast if fast is not None else build_parser().parse_args(args)
    if opts.verb is not None:
        if kernel_words is None:
            kernel_words = initrd.kernel_words() if initrd.in_initrd() else []
        options.kernel_defaults(vars(opts), options.verb(opts.verb), kernel_words, say)
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or debug_on_cmdline()
    set_debug(debug)
    trace(f"tpm2-unlocker {__version__}: {' '.join(args)}")
    try:
        opts = parse_args(args)
        if opts.verb is None:
            raise UsageError(f"no verb given ({', '.join(v.name for v in options.VERBS)}; see --help)")
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
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # our reader went away (`status --json | head`): nothing left to say to it
        return EXIT_OK
    except Exception as exc:  # a bug: one line unless --debug, and a code of its own
        if debug:
            import traceback

            traceback.print_exc()
        say(f"internal error: {type(exc).__name__}: {exc} (run with --debug for details)")
        return EXIT_INTERNAL


def entry() -> NoReturn:
    code = main()
    # Exit without the interpreter's teardown (modules, garbage collection: time a boot under
    # emulation pays on the way from "unlocked" to the next hook, docs/performance.md). Nothing of ours waits for it: output
    # is flushed here, keys are wiped where they are used, no atexit handlers, no non-daemon threads.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe (`... | head`): what was not read is lost anyway
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
