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
# prepare-update --boots: an unused grace ends after this many TPM resets (the firmware's update reboots count)
DEFAULT_GRACE_BOOTS = 3
PCRS_METAVAR = "BANK:LIST"


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


ADOPT_FROM = ("systemd", "clevis")


def from_tool(text: str) -> str:
    """The other tool `adopt --from` takes over."""
    if text not in ADOPT_FROM:
        raise UsageError(f"--from takes {' or '.join(ADOPT_FROM)}, not '{text}'")
    return text


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
DEVICE = Arg("device", "the LUKS2 device (or image file)", metavar="DEVICE")
PIN_FILE = Arg("--pin-file", "file holding the TPM PIN ('-' for stdin; one trailing newline is dropped); "
               "without it the PIN is asked on the terminal, twice", metavar="FILE")

# the boot components a prediction puts in place of the current ones (reseal --predict, predict, sign-policy)
PREDICT_ARGS = (
    Arg("--kernel", "the kernel EFI image (or UKI) the next boot runs: its Authenticode digest in PCR 4",
        metavar="FILE"),
    Arg("--bootloader", "the boot loader EFI image the next boot runs: its Authenticode digest in PCR 4",
        metavar="FILE"),
    Arg("--initrd", "the initramfs the next boot loads: its digest in PCR 9", metavar="FILE"),
    Arg("--cmdline", "the kernel command line of the next boot, as /proc/cmdline will show it (PCRs 9 and 12; "
        "systemd-boot puts initrd=PATH first)", metavar="S"),
)

# The stores `--store` takes, and what each is (the man page's STORES section).
STORES: tuple[tuple[str, str], ...] = (
    ("token", "the sealed object (TPM2B_PUBLIC and TPM2B_PRIVATE) in a LUKS2 token of type tpm2-unlocker: it "
     "travels with the disk, and a re-seal needs no initramfs rebuild (the default)"),
    ("nv[=INDEX]", "the key in a TPM NV index (default 0x1500016), written once with the owner's authorization, "
     "write-locked, and read only through the PCR policy; the token records the index"),
    ("file=DIR", "DIR/key.pub and DIR/key.priv as tpm2_create --public/--private writes them (a re-seal writes "
     "key.2.*); the hooks carry them into the image only from a DIR under /etc/tpm2-unlocker/ (rebuild the "
     "image after enroll and reseal)"),
)
STORE_HELP = "where the sealed key lives: " + ", ".join(name for name, _ in STORES) + " (default token)"

VERBS: tuple[Verb, ...] = (
    Verb("enroll", "add a TPM-sealed key in a new keyslot beside the passphrase", (
        DEVICE,
        Arg("--pcrs", f"PCR bank and indexes to seal to (default {DEFAULT_PCRS})", pcr_selection,
            PcrSelection.parse(DEFAULT_PCRS), metavar=PCRS_METAVAR),
        Arg("--store", STORE_HELP, default="token", metavar="STORE"),
        Arg(UNLOCK_KEY_FILE, "existing passphrase/key file ('-' for stdin)", metavar="FILE"),
        Arg("--recovery-key", "also add a recovery key (shown once) in a keyslot of its own", flag=True),
        Arg("--lock-pcr", f"PCR the initramfs extends once the disks are open, bound to its reset value: no "
            f"unseal after that in this boot (default {DEFAULT_LOCK_PCR}; '{NO_LOCK}': no lock)", lock_pcr,
            DEFAULT_LOCK_PCR, metavar="N"),
        Arg("--with-pin", "the TPM also asks for a PIN at boot (PolicyAuthValue; the TPM's dictionary-attack "
            "lockout guards it)", flag=True),
        PIN_FILE,
        Arg("--signing-key", "PCR values a key signs unlock too (PolicyAuthorize), with no re-seal: PUB.pem, a PEM "
            "public key (RSA-2048 or ECC P-256) whose private half signs with 'sign-policy'; 'machine', the "
            "machine's own key ($TPM2_UNLOCKER_STATE_DIR/policy-key.pem, default /var/lib/tpm2-unlocker; made if "
            "need be, refused unless on dm-crypt) with which 'reseal --predict' approves kernel and initramfs "
            "updates with no passphrase; 'none', no signing key. Default: 'machine' when that directory is on "
            "dm-crypt, else none", metavar="PUB.pem|machine|none"),
        TCTI, DEBUG)),
    Verb("recovery-key", "add a recovery key (shown once, as text and QR code) in a keyslot of its own: it "
         "opens the disk at the passphrase prompt when the TPM cannot", (
             DEVICE,
             Arg(UNLOCK_KEY_FILE, "existing passphrase/key file ('-' for stdin)", metavar="FILE"),
             DEBUG)),
    Verb("unlock", "unseal the key and open the disk; else ask for the passphrase. Without DEVICE (at boot): "
         "every device named by rd.luks.uuid=/rd.luks.name=/cryptdevice=, else in /etc/crypttab, else every "
         "LUKS2 device with a tpm2-unlocker token", (
             Arg("device", "the LUKS2 device (or image file); without it, the boot's devices", nargs="?",
                 metavar="DEVICE"),
             Arg("name", "mapping name (default luks-UUID)", nargs="?", metavar="NAME"),
             Arg("--test", "only prove the key opens its keyslot; map nothing", flag=True),
             Arg("--tries", f"passphrase attempts after a TPM failure (default {DEFAULT_TRIES}; 0: TPM only, "
                 "leave the device closed for systemd-cryptsetup)", count("--tries"), DEFAULT_TRIES,
                 metavar="N", kernel_param="tpm2_unlocker.tries", boot=True),
             Arg("--timeout", f"seconds to wait for boot devices (default {DEFAULT_TIMEOUT:g})",
                 seconds("--timeout"), DEFAULT_TIMEOUT, metavar="S", kernel_param="tpm2_unlocker.timeout", boot=True),
             Arg("--no-tpm", "ask for the passphrase without trying the TPM (a first run with --tries 0 tried "
                 "it and said why it failed)", flag=True, boot=True),
             Arg("--tpm-timeout", f"seconds the TPM may take to answer before it counts as gone and the "
                 f"passphrase is asked (default {DEFAULT_TPM_TIMEOUT:g})", seconds("--tpm-timeout"), DEFAULT_TPM_TIMEOUT,
                 metavar="S", boot=True),
             Arg("--defer-pin", "leave enrolments with a PIN to the next run (the busybox hook's early run, "
                 "which cannot ask: its second run asks)", flag=True, boot=True),
             Arg("--defer-lock", "when a device is not there yet, leave extending the lock PCR to the next run "
                 "(the busybox hook's early run: its second run locks)", flag=True, boot=True),
             TCTI, DEBUG)),
    Verb("lock", "extend the lock PCR now, unless a run of this boot did: nothing unseals after it until the "
         "next boot (the images' last step before the root)", (TCTI, DEBUG)),
    Verb("reseal", "seal the key to the current PCR values (after an update), and to the next boot's with --predict; "
         "chains sealed before the current one are dropped", (
        DEVICE,
        Arg("--pcrs", "new PCR selection (default: keep the enrolled one)", pcr_selection,
            metavar=PCRS_METAVAR),
        Arg(UNLOCK_KEY_FILE, "passphrase/key file, if the old key fails", metavar="FILE"),
        Arg("--lock-pcr", f"new lock PCR, or '{NO_LOCK}' (default: keep the enrolled one; an enrolment without "
            f"one gains PCR {DEFAULT_LOCK_PCR})", lock_pcr, metavar="N"),
        Arg("--with-pin", "seal with a (new) TPM PIN", flag=True),
        Arg("--without-pin", "seal without a PIN", flag=True),
        PIN_FILE,
        Arg("--predict", "also seal to the chain the next boot will have, with the components given below in "
            "place of the current ones (PolicyOR: both boot)", flag=True),
        *PREDICT_ARGS,
        TCTI, DEBUG)),
    Verb("prepare-update", "before a firmware update: add a grace branch without the firmware's PCRs (0, 2), valid "
         "for one boot (an NV counter and the TPM's reset count in its policy); that boot re-seals to the new "
         "values by itself", (
             Arg("device", "the LUKS2 device (default: every LUKS2 device with a tpm2-unlocker enrolment)",
                 nargs="?", metavar="DEVICE"),
             Arg("--firmware", "the update is the firmware's (UEFI capsule, fwupd)", flag=True),
             Arg("--secure-boot", "it changes Secure Boot's keys too (db, dbx): leave out PCR 7 as well", flag=True),
             Arg("--boots", "TPM resets (boots) an unused grace lasts, the firmware's own update reboots among them "
                 f"(default {DEFAULT_GRACE_BOOTS})", count("--boots"), DEFAULT_GRACE_BOOTS, metavar="N"),
             Arg(UNLOCK_KEY_FILE, "passphrase/key file, if the old key fails (a booted system's lock)", metavar="FILE"),
             PIN_FILE,
             TCTI, DEBUG)),
    Verb("sign-policy", "approve PCR values for enrolments with a signing key: a signature in the disk's header "
         "that the boot checks with the TPM (PolicyAuthorize); no re-seal, no passphrase", (
             Arg("device", "the LUKS2 device (default: every LUKS2 device with a tpm2-unlocker enrolment)",
                 nargs="?", metavar="DEVICE"),
             Arg("--key", "the PEM private key whose public half the enrolment took (--signing-key)",
                 metavar="PRIV.pem"),
             Arg("--pcrs", "the PCRs to approve, a value given as N=HEX (default: the enrolment's, at their "
                 "current or --predict values)", metavar="BANK:N[=HEX],..."),
             Arg("--predict", "approve the values the next boot will have with the components given below",
                 flag=True),
             *PREDICT_ARGS,
             Arg("--retire-older", "sign for a new epoch and advance the enrolment's epoch counter: every older "
                 "signature stops working", flag=True),
             TCTI, DEBUG)),
    Verb("status", "TPM facts and whether each enrolment's policy holds now", (
        Arg("device", "only this LUKS2 device (or image file)", nargs="?", metavar="DEVICE"),
        Arg("--json", "machine-readable output", flag=True),
        TCTI, DEBUG)),
    Verb("remove", "remove our keyslot, token and NV index (never the last other keyslot)", (
        DEVICE,
        Arg(UNLOCK_KEY_FILE, "passphrase/key file of a keyslot that stays", metavar="FILE"),
        Arg("--recovery-key", "also remove the recovery key (kept otherwise)", flag=True),
        TCTI, DEBUG)),
    Verb("adopt", "take over an object or NV index sealed with tpm2-tools (ArchWiki recipe), or another tool's "
         "TPM enrolment (--from): no passphrase needed", (
        DEVICE,
        Arg("--blob", "tpm2_create --public/--private files", nargs=2, metavar=("PUB", "PRIV")),
        Arg("--nv", "NV index defined with tpm2_nvdefine (e.g. 0x1500016)", metavar="INDEX"),
        Arg("--pcrs", "the PCRs it was sealed to, e.g. sha256:0,2,3,7 (with --from: the PCRs the new enrolment "
            "seals to; default the other tool's)", pcr_selection, metavar=PCRS_METAVAR),
        Arg("--from", "enrol ours in a new keyslot, authorised by another tool's TPM enrolment: systemd "
            "(systemd-cryptenroll's systemd-tpm2 token) or clevis (a Clevis tpm2 pin)", from_tool,
            metavar="systemd|clevis"),
        Arg("--replace", "with --from: then remove the other tool's token and keyslot (only once ours is proven)",
            flag=True),
        Arg("--pin-file", "with --from systemd: file holding that enrolment's TPM PIN ('-' for stdin; one trailing "
            "newline is dropped); without it the PIN is asked on the terminal", metavar="FILE"),
        TCTI, DEBUG)),
    Verb("predict", "the PCR values the next boot will have when the given files replace the current boot "
         "loader, kernel, initrd or command line (from this boot's event log, checked against the TPM)", (
             *PREDICT_ARGS,
             Arg("--pcrs", "PCR bank and indexes (default: sha256 and every PCR the event log measures)",
                 pcr_selection),
             Arg("--eventlog", "the current boot's event log (default: the kernel's, in securityfs)", metavar="FILE"),
             Arg("--json", "machine-readable output", flag=True),
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


@record(frozen=True)
class KernelParam:
    """A word of the kernel command line the boot reads: `NAME[=VALUE]` as a user writes it."""

    syntax: str
    help: str


# What the initrd reads from the kernel command line besides the options' own kernel_param
# (kernel_params() adds those): the devices to open (unlocker/boot/devices.py) and the trace switch
# (unlocker/log.py). The man page and the mkinitcpio hook's help list them all.
KERNEL_PARAMS: tuple[KernelParam, ...] = (
    KernelParam("rd.luks.uuid=UUID", "open that LUKS device as /dev/mapper/luks-UUID"),
    KernelParam("rd.luks.name=UUID=NAME", "open it as /dev/mapper/NAME"),
    KernelParam("cryptdevice=DEVICE:NAME[:OPTIONS]", "as for mkinitcpio's encrypt hook: DEVICE is /dev/..., UUID=..., "
                "LABEL=... or PARTUUID=..., NAME the /dev/mapper name"),
    KernelParam("rd.luks=0", "open nothing"),
    KernelParam("tpm2_unlocker.debug", "print each step with the uptime (for a slow or failing boot)"),
)


def kernel_params() -> tuple[KernelParam, ...]:
    """Every kernel command line word the boot reads: KERNEL_PARAMS, then each option's kernel_param."""
    from_options = []
    for v in VERBS:
        for arg in v.args:
            if arg.kernel_param is not None:
                from_options.append(KernelParam(f"{arg.kernel_param}={arg.metavar}", f"{arg.help}; in the initrd, "
                                                f"for a run not given {arg.name}"))
    return (*KERNEL_PARAMS[:-1], *from_options, KERNEL_PARAMS[-1])


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
