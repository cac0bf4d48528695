"""tpm2-unlocker(8) from the tables in the code: `python -m docgen.manpage OUT`.

argparse-manpage renders the verbs and options of cli.build_parser() (built from options.VERBS);
the sections argparse knows nothing of come from the code's own tables too: STORES and
kernel_params() (unlocker/options.py), EXIT_CODES (unlocker/errors.py). FILES and ENVIRONMENT are
the install layout (the Makefile) and the TCTI lookup, listed here once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from argparse_manpage.manpage import Manpage

from unlocker import __version__, options
from unlocker.cli import build_parser
from unlocker.errors import EXIT_CODES

SUMMARY = "unlock LUKS2 disks at boot with a key sealed by the TPM 2.0"
DESCRIPTION = (
    "tpm2-unlocker adds a random key to a new LUKS2 keyslot beside the passphrase and seals it to the "
    "TPM 2.0 under a PCR policy. At boot, a mkinitcpio hook or a dracut module runs "
    r"\fBtpm2-unlocker unlock\fR in the initramfs: when the machine is in the state it was enrolled in the "
    "disk opens with no prompt; when the TPM says no (PCRs changed, no TPM, lockout, corrupt token) it says "
    "why in one line and the passphrase is asked. Then it extends the lock PCR, so that nothing unseals the "
    "key again until the next boot. The passphrase keyslot is never touched."
)

# (path, what it is): every path `make install` puts files under, and the ones the program uses
FILES: tuple[tuple[str, str], ...] = (
    ("/usr/bin/tpm2-unlocker", "the program: one frozen file, also the one the images carry (unpacked)"),
    ("/usr/lib/dracut/modules.d/90tpm2-unlocker/", "the dracut module (build with --add tpm2-unlocker, or "
     r"\fBadd_dracutmodules+=\(dq tpm2-unlocker \(dq\fR in a dracut.conf.d file)"),
    ("/usr/lib/initcpio/install/tpm2-unlocker", "the mkinitcpio install hook: put tpm2-unlocker in HOOKS "
     "where encrypt was (busybox image) or before sd-encrypt (systemd image)"),
    ("/usr/lib/initcpio/hooks/tpm2-unlocker", "the mkinitcpio runtime hook (busybox image)"),
    ("/usr/lib/systemd/system/tpm2-unlocker.service", "the unit that unlocks in a systemd initramfs "
     "(mkinitcpio's systemd image; dracut carries its own copy)"),
    ("/usr/lib/systemd/system/tpm2-unlocker-lock.service", "extends the lock PCR before the switch to the "
     "root and before emergency shells, should no run have done it"),
    ("/usr/lib/tpm2-unlocker/systemd-cryptsetup-skip.conf", "the drop-in that skips systemd-cryptsetup for "
     "a volume already open (put into the systemd image only)"),
    ("/usr/lib/tpm2-unlocker/reseal-predict", "what the hooks below run when a kernel or initramfs is "
     "installed or rebuilt: reseal --predict with the new files for every disk carrying a tpm2-unlocker token; "
     "an error is a warning (the next boot asks for the passphrase once), never a failed build"),
    ("/usr/lib/kernel/install.d/90-tpm2-unlocker.install", "the kernel-install plugin (systemd-boot: the "
     "entry's kernel and initrd, and the command line systemd-boot will measure)"),
    ("/usr/lib/initcpio/post/tpm2-unlocker", "the mkinitcpio post hook (the kernel and image, or the UKI)"),
    ("/etc/kernel/postinst.d/zz-tpm2-unlocker", "Debian: after a kernel package is installed"),
    ("/etc/initramfs/post-update.d/tpm2-unlocker", "Debian: after update-initramfs built an image"),
    ("/usr/share/man/man8/tpm2-unlocker.8", "this page"),
    ("/usr/share/bash-completion/completions/tpm2-unlocker", "bash completion"),
    ("/usr/share/zsh/vendor-completions/_tpm2-unlocker", "zsh completion (Debian; "
     "/usr/share/zsh/site-functions/ on Arch)"),
    ("/etc/tpm2-unlocker/", "file-store enrolments (--store file=DIR) the hooks carry into the image"),
    ("/run/tpm2-unlocker/locked", "left by the run that extended the lock PCR in this boot"),
    ("/var/lib/tpm2-unlocker/policy-key.pem", "the machine key (ECC P-256, mode 0600): the signing key enroll "
     "takes when this directory is on dm-crypt (--signing-key machine), with which reseal --predict approves "
     "kernel and initramfs updates with no passphrase; remove it to stop that"),
)

ENVIRONMENT: tuple[tuple[str, str], ...] = (
    ("TPM2_UNLOCKER_TCTI", "the TPM connection when --tcti is not given (e.g. device:/dev/tpmrm0)"),
    ("TPM2TOOLS_TCTI", "the same, as tpm2-tools reads it, when TPM2_UNLOCKER_TCTI is not set"),
    ("TPM2_UNLOCKER_EVENTLOG", "the event log predict, status and enroll read instead of the kernel's "
     "(/sys/kernel/security/tpm0/binary_bios_measurements)"),
    ("TPM2_UNLOCKER_STATE_DIR", "the machine key's directory instead of /var/lib/tpm2-unlocker"),
)

SEE_ALSO = r"\fBcryptsetup\fR(8), \fBsystemd-cryptenroll\fR(1), \fBdracut\fR(8), \fBmkinitcpio\fR(8), \fBcrypttab\fR(5)"


def roff(text: str) -> str:
    """Plain text for a roff line: backslashes, leading dots and quotes and hyphens kept as written."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text[:1] in (".", "'") else text


def tagged(items: tuple[tuple[str, str], ...] | list[tuple[str, str]], *, raw: bool = False) -> str:
    """A .TP list: each tag in bold, its text below. `raw`: the texts are roff already."""
    lines = []
    for tag, text in items:
        lines += [".TP", f"\\fB{roff(tag)}\\fR", text if raw else roff(text)]
    return "\n".join(lines)


def render() -> str:
    # argparse wraps help at the terminal's width and breaks at hyphens; the man page's lines are
    # joined again with spaces ("dictionary- attack"): one line per help text, man wraps it
    os.environ["COLUMNS"] = "10000"
    parser = build_parser()
    parser.description = None  # DESCRIPTION says it at length
    parser._positionals.title = "commands"  # the verbs are argparse's positionals
    page = Manpage(parser, _data={"project_name": "tpm2-unlocker", "version": __version__, "manual_section": 8,
                                  "manual_title": "System Administration", "description": SUMMARY})
    page.add_section("description", "=", DESCRIPTION)
    page.add_section("stores", "=", "Where the sealed key lives (\\fB\\-\\-store\\fR of \\fBenroll\\fR). Every store "
                     "has a LUKS2 token naming its keyslot, PCRs, lock PCR and storage key; it is parsed as hostile input.\n"
                     + tagged(options.STORES))
    page.add_section("kernel parameters", "=", "Read in the initramfs; a bad value is said in one line and the "
                     "default stands. With none of rd.luks.uuid=, rd.luks.name=, cryptdevice=, every device in the "
                     "image's /etc/crypttab, else every LUKS2 device carrying a tpm2\\-unlocker token, is opened.\n"
                     + tagged([(p.syntax, p.help) for p in options.kernel_params()]))
    page.add_section("exit status", "=", tagged([(str(code), text) for code, text in EXIT_CODES]))
    page.add_section("environment", "=", tagged(ENVIRONMENT))
    page.add_section("files", "=", tagged([(path, text) for path, text in FILES], raw=True))
    page.add_section("see also", "=", SEE_ALSO)
    return str(page)


def main() -> None:
    out = Path(sys.argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())


if __name__ == "__main__":
    main()
