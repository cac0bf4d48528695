"""unlock: unseal the key through the device's tokens and open it; else say why and ask the passphrase."""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import store
from .errors import CorruptError, DeviceNotFoundError, NoTpmError, PolicyError, UnlockerError, UsageError, WrongPassphraseError
from .log import hint, say, trace
from .luks import LuksDevice
from .policy import changed_pcrs
from .prompt import ask_passphrase
from .secret import Secret
from .token import Token
from .tpm import Tpm, resolve_tcti


@dataclass(frozen=True)
class UnlockOptions:
    device: str
    name: str | None
    test: bool
    tries: int
    tcti: str | None
    # LUKS2 metadata already read from the header (at boot): spares a `cryptsetup luksDump`
    metadata: dict | None = None
    # seconds to wait for the TPM's device node (at boot, its driver may still be loading)
    tpm_wait: float = 0
    # False: straight to the passphrase (a first run tried the TPM and said why it failed)
    use_tpm: bool = True


def explain_policy_failure(tpm: Tpm, token: Token, exc: PolicyError) -> PolicyError:
    """Name the PCRs whose values differ from those recorded at sealing."""
    try:
        current = tpm.read_pcrs(token.selection)
    except UnlockerError:
        return exc
    changed = changed_pcrs(token.pcr_values, current)
    if not changed:
        return PolicyError("the TPM refused the PCR policy although the PCR values match the enrolment")
    names = ", ".join(str(p) for p in changed)
    plural = "s" if len(changed) > 1 else ""
    return PolicyError(f"PCR{plural} {names} changed since enrolment ({token.selection.bank} bank)",
                       changed_pcrs=changed,
                       hint="after an intended update, run 'tpm2-unlocker reseal' once booted")


def unseal_any(device: LuksDevice, tcti: str | None, tpm_wait: float = 0) -> tuple[Secret, Token]:
    """The key of the first token that unseals, or the most telling error of why none did."""
    tokens = device.our_tokens()
    if not tokens:
        raise UsageError(f"{device.path} has no tpm2-unlocker enrolment (run 'tpm2-unlocker enroll' first)")
    reasons: list[UnlockerError] = [t for _, t in tokens if isinstance(t, CorruptError)]
    good = [t for _, t in tokens if isinstance(t, Token)]
    if good:
        with Tpm(resolve_tcti(tcti, tpm_wait)) as tpm:
            trace("TPM connected")
            for token in good:
                try:
                    key = store.take(tpm, token)
                    trace(f"token {token.token_id}: unsealed")
                    return key, token
                except PolicyError as exc:
                    reasons.append(explain_policy_failure(tpm, token, exc))
                except NoTpmError as exc:
                    reasons.append(exc)
                    break
                except UnlockerError as exc:
                    reasons.append(exc)
    # A corrupt token matters less than what the TPM said about a good one.
    reasons.sort(key=lambda e: isinstance(e, CorruptError) and len(good) > 0)
    raise reasons[0]


def open_or_test(device: LuksDevice, key: Secret, name: str, slot: int | None, test: bool) -> bool:
    """Open the mapping (or only test the key with `test`); False if the key opens no such slot."""
    return device.test_key(key, slot) if test else device.open(key, name, slot)


def unlock(opts: UnlockOptions) -> None:
    """Open the device with the TPM, else with a passphrase asked up to opts.tries times."""
    device = LuksDevice(opts.device)
    if opts.metadata is not None:
        device.seed_metadata(opts.metadata)
    device.metadata()
    name = opts.name or f"luks-{device.uuid()}"
    # what a failure exits with when no passphrase opens the disk either: the TPM's reason, if any
    failure: type[UnlockerError] = WrongPassphraseError
    if opts.use_tpm:
        try:
            key, token = unseal_any(device, opts.tcti, opts.tpm_wait)
            with key:
                if not open_or_test(device, key, name, token.keyslot, opts.test):
                    raise CorruptError(f"the unsealed key does not open keyslot {token.keyslot}")
            say(f"{opts.device}: unlocked with the TPM" + (" (test only)" if opts.test else f" as {name}"))
            return
        except UnlockerError as exc:
            failure = type(exc)
            say(f"{opts.device}: TPM unlock failed: {exc}")
            if exc.hint:
                hint(exc.hint)
        if opts.tries == 0:
            # TPM only: the line above said why; the device stays closed for whoever asks next
            raise failure(f"{opts.device}: not unlocked").as_said()
    for attempt in range(opts.tries):
        passphrase = ask_passphrase(f"Enter passphrase for {opts.device}: ")
        if passphrase is None:
            # Nobody can answer: exit with the TPM failure's own code (its line was said above).
            raise failure(f"{opts.device}: not unlocked (no passphrase given)")
        with passphrase:
            ok = open_or_test(device, passphrase, name, None, opts.test)
        if ok:
            say(f"{opts.device}: unlocked with the passphrase" + (" (test only)" if opts.test else f" as {name}"))
            return
        say(f"wrong passphrase ({attempt + 1} of {opts.tries})")
    raise WrongPassphraseError(f"{opts.device}: no passphrase opened the disk after {opts.tries} tries")


@dataclass(frozen=True)
class BootOptions:
    tries: int
    tcti: str | None
    timeout: float
    use_tpm: bool = True


def unlock_at_boot(opts: BootOptions) -> int:
    """Open every device the boot asks for (cmdline, crypttab, else every device with our token).

    Returns how many were opened; raises the first failure after trying them all.
    """
    from . import warmup
    from .devices import boot_targets, read_luks_header, wait_for

    targets = boot_targets()
    trace("boot targets: " + (", ".join(t.source for t in targets) or "none"))
    if not targets:
        say("no LUKS device to open (none on the command line, in crypttab, or with a tpm2-unlocker token)")
        return 0
    warmup.start()
    failures: list[UnlockerError] = []
    opened = 0
    for target in targets:
        path = wait_for(target.source, opts.timeout)
        if path is None:
            failures.append(DeviceNotFoundError(f"{target.source}: no such device after {opts.timeout:g} s"))
            say(failures[-1].message)
            continue
        trace(f"{target.source}: found at {path}")
        header = read_luks_header(path)
        name = target.name
        if name is None:
            name = f"luks-{header[0]}" if header else os.path.basename(path)
        if os.path.exists(f"/dev/mapper/{name}"):
            say(f"{path}: already open as {name}")
            continue
        try:
            unlock(UnlockOptions(path, name, False, opts.tries, opts.tcti, header[1] if header else None,
                                 tpm_wait=opts.timeout, use_tpm=opts.use_tpm))
            opened += 1
        except UnlockerError as exc:
            if not exc.said:
                say(exc.message)
            failures.append(exc)
    if len(failures) == 1 and len(targets) == 1:
        raise failures[0].as_said()
    if failures:
        # each failure was said above; the exit code is the first one's
        raise type(failures[0])(f"{len(failures)} of {len(targets)} device(s) not opened")
    return opened
