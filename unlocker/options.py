"""The one table of verbs, arguments and defaults.

argparse's parser (cli.build_parser) and the boot's fast parser (cli.parse_args, for the hooks'
`unlock` lines: argparse's import and construction are start-up time under emulation) are both
built from it. The hooks, the systemd unit and the initqueue job pass only what their image needs
that differs from a default here (`--tries 0` in systemd images: systemd-cryptsetup asks), so the
defaults live in one place; `tpm2_unlocker.tries=` and `tpm2_unlocker.timeout=` on the kernel
command line replace a default in the initrd, in every kind of image.
"""

from __future__ import annotations

from unlocker import TYPE_CHECKING
from unlocker.errors import UsageError
from unlocker.lean.record import record
from unlocker.tpm.policy import DEFAULT_PCRS, PcrSelection

if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_TRIES = 3
DEFAULT_TIMEOUT = 30.0
DEFAULT_TPM_TIMEOUT = 30.0
# PCR 15: reset to zeros at every boot, measured by no firmware, boot loader or kernel, and not
# resettable at locality 0 (16 and 23 are). The boot extends every PCR of LOCK_PCRS whatever the
# headers say (a header is the attacker's to write: a lock PCR named only there could be left out).
DEFAULT_LOCK_PCR = 15
LOCK_PCRS = (DEFAULT_LOCK_PCR,)
NO_LOCK = "none"


def count(option: str) -> Callable[[str], int]:
    """A whole number of 0 or more, for `option`."""
    def convert(text: str) -> int:
        if not text.isdigit():
            raise UsageError(f"{option} takes a whole number of 0 or more, not '{text}'")
        return int(text)
    return convert


# No wait of ours is longer: a value past it (1e300 is finite too) is a typo or an attack.
MAX_SECONDS = 3600.0


def seconds(option: str) -> Callable[[str], float]:
    """A number of seconds from 0 to MAX_SECONDS (never inf or nan: every wait must end)."""
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value <= MAX_SECONDS:  # nan compares false too
            raise UsageError(f"{option} takes a number of seconds from 0 to {MAX_SECONDS:g}, not '{text}'")
        return value
    return convert


def pcr_selection(text: str) -> PcrSelection:
    return PcrSelection.parse(text)


def lock_pcr(text: str) -> int | str:
    """One of LOCK_PCRS, or "none" (no lock PCR)."""
    if text == NO_LOCK:
        return NO_LOCK
    if not text.isdigit() or int(text) not in LOCK_PCRS:
        allowed = ", ".join(str(p) for p in LOCK_PCRS)
        raise UsageError(f"--lock-pcr takes {allowed} (a PCR that nothing else measures and that cannot be reset) "
                         f"or '{NO_LOCK}', not '{text}'")
    return int(text)


@record(frozen=True)
class Arg:
    """One argument of a verb: a positional (`device`) or an option (`--tries`)."""

    name: str
    help: str = ""
    convert: Callable[[str], object] | None = None
    default: object = None
    flag: bool = False  # an option without a value (store_true)
    nargs: str | int | None = None
    metavar: str | tuple[str, ...] | None = None
    # in the initrd, `NAME=VALUE` on the kernel command line replaces the default
    kernel_param: str | None = None
    # read by the boot's fast parser (else such a command line goes to argparse)
    boot: bool = False
    hidden: bool = False

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    @property
    def positional(self) -> bool:
        return not self.name.startswith("-")


@record(frozen=True)
class Verb:
    name: str
    help: str
    args: tuple[Arg, ...]


TCTI = Arg("--tcti", "TPM connection (default: $TPM2_UNLOCKER_TCTI, $TPM2TOOLS_TCTI, device:/dev/tpmrm0, "
           "device:/dev/tpm0)", boot=True)
DEBUG = Arg("--debug", "log commands and show tracebacks", flag=True, boot=True, hidden=True)
UNLOCK_KEY_FILE = "--unlock-key-file"

VERBS: tuple[Verb, ...] = (
    Verb("enroll", "add a TPM-sealed key in a new keyslot beside the passphrase", (
        Arg("device"),
        Arg("--pcrs", f"PCR bank and indexes to seal to (default {DEFAULT_PCRS})", pcr_selection,
            PcrSelection.parse(DEFAULT_PCRS)),
        Arg("--store", "token (default), nv[=INDEX] or file=DIR", default="token"),
        Arg(UNLOCK_KEY_FILE, "existing passphrase/key file ('-' for stdin)", metavar="FILE"),
        Arg("--recovery-key", "also add a recovery key (shown once) in a keyslot of its own", flag=True),
        Arg("--lock-pcr", f"PCR the initramfs extends once the disks are open, bound to its reset value: no "
            f"unseal after that in this boot (default {DEFAULT_LOCK_PCR}; '{NO_LOCK}': no lock)", lock_pcr,
            DEFAULT_LOCK_PCR, metavar="N"),
        TCTI, DEBUG)),
    Verb("recovery-key", "add a recovery key (shown once, as text and QR code) in a keyslot of its own: it "
         "opens the disk at the passphrase prompt when the TPM cannot", (
             Arg("device"),
             Arg(UNLOCK_KEY_FILE, "existing passphrase/key file ('-' for stdin)", metavar="FILE"),
             DEBUG)),
    Verb("unlock", "unseal the key and open the disk; else ask for the passphrase. Without DEVICE (at boot): "
         "every device named by rd.luks.uuid=/rd.luks.name=/cryptdevice=, else in /etc/crypttab, else every "
         "LUKS2 device with a tpm2-unlocker token", (
             Arg("device", nargs="?"),
             Arg("name", "mapping name (default luks-UUID)", nargs="?"),
             Arg("--test", "only prove the key opens its keyslot; map nothing", flag=True),
             Arg("--tries", f"passphrase attempts after a TPM failure (default {DEFAULT_TRIES}; 0: TPM only, "
                 "leave the device closed for systemd-cryptsetup)", count("--tries"), DEFAULT_TRIES,
                 kernel_param="tpm2_unlocker.tries", boot=True),
             Arg("--timeout", f"seconds to wait for boot devices (default {DEFAULT_TIMEOUT:g})",
                 seconds("--timeout"), DEFAULT_TIMEOUT, kernel_param="tpm2_unlocker.timeout", boot=True),
             Arg("--no-tpm", "ask for the passphrase without trying the TPM (a first run with --tries 0 tried "
                 "it and said why it failed)", flag=True, boot=True),
             Arg("--tpm-timeout", f"seconds the TPM may take to answer before it counts as gone and the "
                 f"passphrase is asked (default {DEFAULT_TPM_TIMEOUT:g})", seconds("--tpm-timeout"), DEFAULT_TPM_TIMEOUT,
                 boot=True),
             Arg("--defer-lock", "when a device is not there yet, leave extending the lock PCR to the next run "
                 "(the busybox hook's early run: its second run locks)", flag=True, boot=True),
             TCTI, DEBUG)),
    Verb("lock", "extend the lock PCR now, unless a run of this boot did: nothing unseals after it until the "
         "next boot (the images' last step before the root)", (TCTI, DEBUG)),
    Verb("reseal", "seal the key to the current PCR values (after an update)", (
        Arg("device"),
        Arg("--pcrs", "new PCR selection (default: keep the enrolled one)", pcr_selection),
        Arg(UNLOCK_KEY_FILE, "passphrase/key file, if the old key fails", metavar="FILE"),
        Arg("--lock-pcr", f"new lock PCR, or '{NO_LOCK}' (default: keep the enrolled one; an enrolment without "
            f"one gains PCR {DEFAULT_LOCK_PCR})", lock_pcr, metavar="N"),
        TCTI, DEBUG)),
    Verb("status", "TPM facts and whether each enrolment's policy holds now", (
        Arg("device", nargs="?"),
        Arg("--json", "machine-readable output", flag=True),
        TCTI, DEBUG)),
    Verb("remove", "remove our keyslot, token and NV index (never the last other keyslot)", (
        Arg("device"),
        Arg(UNLOCK_KEY_FILE, "passphrase/key file of a keyslot that stays", metavar="FILE"),
        Arg("--recovery-key", "also remove the recovery key (kept otherwise)", flag=True),
        TCTI, DEBUG)),
    Verb("adopt", "take over an object or NV index sealed with tpm2-tools (ArchWiki recipe)", (
        Arg("device"),
        Arg("--blob", "tpm2_create --public/--private files", nargs=2, metavar=("PUB", "PRIV")),
        Arg("--nv", "NV index defined with tpm2_nvdefine (e.g. 0x1500016)", metavar="INDEX"),
        Arg("--pcrs", "the PCRs it was sealed to, e.g. sha256:0,2,3,7", pcr_selection),
        TCTI, DEBUG)),
    Verb("unpack", "lay the program out unpacked in DIR, for an initramfs (the hooks run it at image build: "
         "no copy-out to /run and second start at every boot)", (
             Arg("dir", "an empty or new directory", nargs="?", metavar="DIR"),
             Arg("--libraries", "print the system libraries the program needs in an image, one per line "
                 "(the hooks install them)", flag=True),
             Arg("--blob-files", "print the sealed-key files of this machine's file-store enrolments under "
                 "/etc/tpm2-unlocker/, one per line (the hooks put them into the image: the boot reads them)",
                 flag=True),
             DEBUG)),
)


def verb(name: str) -> Verb:
    for v in VERBS:
        if v.name == name:
            return v
    raise KeyError(name)


def kernel_defaults(args: dict[str, object], of: Verb, words: list[str], say: Callable[[str], None]) -> None:
    """Fill in, from the kernel command line `words`, each argument of `of` that has a kernel
    parameter and was not given (None in `args`); else its default. A value that does not convert
    is said in one line and the default stands: a typo on the kernel command line must not stop a boot."""
    from unlocker.initrd import kernel_param

    for arg in of.args:
        if arg.kernel_param is None or args.get(arg.dest) is not None:
            continue
        value = arg.default
        text = kernel_param(arg.kernel_param, words)
        if text is not None and arg.convert is not None:
            try:
                value = arg.convert(text)
            except UsageError as exc:
                say(f"ignoring {arg.kernel_param}={text} ({exc}); using {arg.default}")
        args[arg.dest] = value
