"""The only caller of cryptsetup: header metadata, keyslots, tokens, opening.

Keys reach cryptsetup through stdin (`--key-file=-`) or an anonymous pipe (`/dev/fd/N`), never argv.
"""

from __future__ import annotations

import os

from unlocker import TYPE_CHECKING
from unlocker.errors import CorruptError, CryptsetupError, DeviceNotFoundError, UsageError
from unlocker.lean.jsonload import loads
from unlocker.lean.record import record
from unlocker.lean.run import Completed, RunError, Started, run
from unlocker.lean.threads import Background
from unlocker.log import say
from unlocker.secret import Secret
from unlocker.token import TOKEN_TYPE, Token, parse_token

if TYPE_CHECKING:
    from typing import Any

CRYPTSETUP = "cryptsetup"
MAX_KEYSLOTS = 32
MAX_TOKENS = 32
# Every call ends cryptsetup's options with "--": a path or mapping name that starts with '-'
# (a hostile kernel command line's rd.luks.name=UUID=--test-passphrase) is then never an option.
# what cryptsetup may be handed as a key or passphrase (on stdin or through a pipe)
KeyBytes = Secret | bytes | bytearray

# The key is 32 random bytes: PBKDF2 at its minimum, as systemd-cryptenroll does; Argon2 would
# only cost boot time without adding strength to a high-entropy key.
FAST_PBKDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
# ... which the header records as this: the mark of a keyslot we made (commands/keyslots.py)
FAST_KDF = {"type": "pbkdf2", "hash": "sha256", "iterations": 1000}

# The most a keyslot's PBKDF may cost before a key is tried on it. cryptsetup accepts up to 2^32-1
# iterations (and 4 GiB) and runs them without a time limit, so a keyslot written into a hostile
# header could hold the passphrase path for hours. luksFormat aims at 2 s on the machine that formats:
# argon2 at up to 1 GiB, with the passes that take (4-10 on today's machines); PBKDF2 at the
# iterations that take (a few million for SHA-256). The bounds leave a keyslot made on a machine
# several times faster than the one that boots, or with a longer --iter-time, well inside; on a
# slow 2-core machine they cost about a minute.
MAX_ARGON2_WORK_KIB = 32 * 1024 * 1024  # time cost x memory: 32 passes over 1 GiB
MAX_ARGON2_MEMORY_KIB = 4 * 1024 * 1024  # cryptsetup's own maximum
MAX_PBKDF2_ITERATIONS = 100_000_000
# Backstops for what the bounds cannot see (the boot reads the header itself, and cryptsetup may
# read the other copy): a run that reads the header, and one that derives a key (open, a test),
# is killed after this. Both are safe to kill: neither writes the header, and an open maps the
# device only once the key is derived. Header writers (luksAddKey, luksKillSlot, token) have none.
READ_TIMEOUT = 60.0
OPEN_TIMEOUT = 300.0


def kdf_cost_problem(kdf: object) -> str:
    """Why a key must not be tried on a keyslot with this PBKDF ('' when it may): its cost beyond
    the bounds above, or parameters that are no numbers (the header is anyone's to write)."""
    if not isinstance(kdf, dict):
        return "its PBKDF parameters are unreadable"

    def number(name: str) -> int:
        value = kdf.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    kind = kdf.get("type")
    if kind == "pbkdf2":
        iterations = number("iterations")
        if not iterations:
            return "its PBKDF2 iteration count is unreadable"
        if iterations > MAX_PBKDF2_ITERATIONS:
            return f"its PBKDF2 cost ({iterations} iterations) is above {MAX_PBKDF2_ITERATIONS}"
        return ""
    if kind in ("argon2i", "argon2id"):
        time_cost, memory = number("time"), number("memory")
        if not time_cost or not memory:
            return f"its {kind} parameters are unreadable"
        if memory > MAX_ARGON2_MEMORY_KIB or time_cost * memory > MAX_ARGON2_WORK_KIB:
            return (f"its {kind} cost ({time_cost} passes over {memory} KiB) is above "
                    f"{MAX_ARGON2_WORK_KIB // (1024 * 1024)} passes over 1 GiB")
        return ""
    return f"its PBKDF {str(kind)[:20]!r} is unknown"


def _raw(key: KeyBytes | None) -> bytes | bytearray | None:
    return key.data if isinstance(key, Secret) else key


def _cryptsetup(args: list[str], *, input: KeyBytes | None = None, pass_fds: tuple[int, ...] = (),
                check: bool = False, timeout: float | None = None) -> Completed:
    try:
        done = run([CRYPTSETUP, *args], input=_raw(input), pass_fds=pass_fds, check=check, timeout=timeout)
    except FileNotFoundError:
        raise CryptsetupError("cryptsetup is not installed") from None
    except RunError as exc:
        _timed_out(exc.done, timeout)
        raise
    _timed_out(done, timeout)
    return done


def _timed_out(done: Completed, timeout: float | None) -> None:
    """A run killed at its timeout is said as such, not as a wrong key (nor retried as one)."""
    if timeout is not None and done.returncode == -9:
        raise CryptsetupError(f"cryptsetup {done.argv[1]} did not finish within {timeout:.0f} s and was stopped")


def _unlocked_slot(done: Completed) -> int | None:
    """The keyslot `cryptsetup -v` says it unlocked ("Key slot N unlocked.")."""
    for line in (done.stdout + done.stderr).decode(errors="replace").splitlines():
        words = line.split()
        if len(words) == 4 and words[:2] == ["Key", "slot"] and words[3] == "unlocked." and words[2].isdigit():
            return int(words[2])
    return None


@record
class LuksDevice:
    """One LUKS2 device (or image file), its header read once and kept."""

    path: str

    def __post_init__(self) -> None:
        if not os.path.exists(self.path):
            raise DeviceNotFoundError(f"{self.path}: no such device or file")
        self._meta: dict[str, Any] | None = None
        self._seeded = False  # the metadata is the boot's own read of the header, not cryptsetup's
        self._skips_said = False
        # the keyslot each key was seen to open (by identity): luksAddKey is told it
        self._opens: list[tuple[KeyBytes, int]] = []

    def _must(self, args: list[str], doing: str, *, input: KeyBytes | None = None, pass_fds: tuple[int, ...] = (),
              wrong_key: str | None = None, timeout: float | None = None) -> Completed:
        """cryptsetup that must succeed. Its exit code 2 (the key given opens no keyslot it may
        use) is a UsageError saying `wrong_key`, when given; any other failure a CryptsetupError
        naming what was `doing`, with cryptsetup's own words."""
        try:
            return _cryptsetup(args, input=input, pass_fds=pass_fds, check=True, timeout=timeout)
        except RunError as exc:
            if wrong_key is not None and exc.done.returncode == 2:
                raise UsageError(f"{self.path}: {wrong_key}") from None
            raise CryptsetupError(f"{self.path}: {doing} failed: {exc.done.stderr_text}") from None

    # --- metadata -------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """The LUKS2 JSON header. Raises UsageError for LUKS1 or non-LUKS devices."""
        if self._meta is None:
            done = _cryptsetup(["luksDump", "--dump-json-metadata", "--", self.path], timeout=READ_TIMEOUT)
            if done.returncode != 0:
                if _cryptsetup(["isLuks", "--", self.path], timeout=READ_TIMEOUT).returncode == 0:
                    raise UsageError(f"{self.path} is LUKS1: tokens need LUKS2 (cryptsetup convert --type luks2)")
                raise UsageError(f"{self.path} is not a LUKS device")
            try:
                self._meta = loads(done.stdout)
            except ValueError:
                raise CorruptError(f"{self.path}: cryptsetup returned unreadable header metadata") from None
        assert self._meta is not None
        return self._meta

    def seed_metadata(self, meta: dict[str, Any]) -> None:
        """Use LUKS2 metadata already read from the header instead of asking cryptsetup.

        Only for reading tokens at boot: whatever they say, `cryptsetup open` checks the key.
        """
        self._meta = meta
        self._seeded = True

    def use_cryptsetups_view(self) -> None:
        """Read the header through cryptsetup from now on, if it was the boot's own read: which
        keyslots a passphrase is tried on is decided on the header cryptsetup itself will use (a
        hostile disk may carry another in its second copy)."""
        if self._seeded:
            self._meta, self._seeded, self._skips_said = None, False, False

    def uuid(self) -> str:
        try:
            done = _cryptsetup(["luksUUID", "--", self.path], check=True, timeout=READ_TIMEOUT)
        except RunError:
            raise UsageError(f"{self.path} is not a LUKS device") from None
        return done.stdout.decode().strip()

    def _section(self, name: str) -> dict[int, Any]:
        """A numbered section of the header ("keyslots", "tokens"), its ids as numbers. At boot the
        header is read without cryptsetup's checks and is the attacker's to write: anything but an
        object with decimal ids is a CorruptError, never a crash."""
        section = self.metadata().get(name, {})
        if not isinstance(section, dict) or not all(
                isinstance(k, str) and k.isdigit() and len(k) <= 3 and k.isascii() for k in section):
            raise CorruptError(f"{self.path}: the LUKS2 header's {name} are malformed")
        return {int(k): v for k, v in section.items()}

    def keyslots(self) -> list[int]:
        return sorted(self._section("keyslots"))

    def keyslot_kdf(self, slot: int) -> Any:
        """The keyslot's "kdf" object as the header has it (anything: check before use), or None."""
        keyslot = self._section("keyslots").get(slot)
        return keyslot.get("kdf") if isinstance(keyslot, dict) else None

    def key_plan(self) -> tuple[list[int], list[tuple[int, str]]]:
        """Which keyslots a key may be tried on, in the order cryptsetup tries them (priority
        "prefer" first; "ignore" never, as cryptsetup without --key-slot), and the others with why not."""
        tried: list[tuple[int, int]] = []
        skipped: list[tuple[int, str]] = []
        try:
            keyslots = self._section("keyslots")
        except CorruptError:  # the boot's own read of a malformed header: cryptsetup decides (bounded in time)
            return [], []
        for slot, keyslot in sorted(keyslots.items()):
            if not isinstance(keyslot, dict) or keyslot.get("type") != "luks2":
                continue  # no passphrase keyslot (a reencryption's): cryptsetup tries none
            problem = kdf_cost_problem(keyslot.get("kdf"))
            if problem:
                skipped.append((slot, problem))
                continue
            priority = keyslot.get("priority", "1")
            if priority != "0":
                tried.append((0 if priority == "2" else 1, slot))
        return [slot for _, slot in sorted(tried)], skipped

    def _say_skips(self, skipped: list[tuple[int, str]]) -> None:
        if skipped and not self._skips_said:
            self._skips_said = True
            say(f"{self.path}: not trying keyslot " + "; keyslot ".join(f"{slot}: {why}" for slot, why in skipped)
                + " (a cost a hostile header can set to stall the unlock)")

    def _may_try(self, slot: int) -> bool:
        """A key may be tried on this keyslot when named: unless its PBKDF cost is beyond the bounds."""
        _, skipped = self.key_plan()
        mine = [(s, why) for s, why in skipped if s == slot]
        self._say_skips(mine)
        return not mine

    def opening_keyslots(self) -> list[int]:
        """The keyslots that can open the disk: of type luks2 and bound, through a digest, to a data
        segment. An unbound keyslot (luksAddKey --unbound) holds a key that opens nothing, and a
        reencryption keyslot holds no key at all."""
        slots = self._section("keyslots")
        bound: set[int] = set()
        for digest in self._section("digests").values():
            if not isinstance(digest, dict) or not digest.get("segments") or not isinstance(digest.get("keyslots"), list):
                continue
            for slot in digest["keyslots"]:
                if isinstance(slot, str) and slot.isascii() and slot.isdigit() and len(slot) <= 3 \
                        and isinstance(slots.get(int(slot)), dict) \
                        and slots[int(slot)].get("type") == "luks2":
                    bound.add(int(slot))
        return sorted(bound)

    def raw_tokens(self) -> dict[int, Any]:
        return self._section("tokens")

    def our_tokens(self) -> list[tuple[int, Token | CorruptError]]:
        """Every token of our type, parsed; a malformed one comes back as its CorruptError."""
        found: list[tuple[int, Token | CorruptError]] = []
        for tid, doc in sorted(self.raw_tokens().items()):
            if not isinstance(doc, dict) or doc.get("type") != TOKEN_TYPE:
                continue
            try:
                found.append((tid, parse_token(doc, tid)))
            except CorruptError as exc:
                found.append((tid, exc))
        return found

    def free_keyslot(self) -> int:
        used = set(self.keyslots())
        for slot in range(MAX_KEYSLOTS):
            if slot not in used:
                return slot
        raise CryptsetupError(f"{self.path}: no free keyslot")

    def free_token_id(self, highest: bool = False) -> int:
        used = set(self.raw_tokens())
        for tid in range(MAX_TOKENS - 1, -1, -1) if highest else range(MAX_TOKENS):
            if tid not in used:
                return tid
        raise CryptsetupError(f"{self.path}: no free token id")

    # --- keys -----------------------------------------------------------------------------------
    def add_key(self, existing: KeyBytes, new_key: KeyBytes, slot: int) -> None:
        """Add `new_key` in keyslot `slot`, authorised by `existing` (a passphrase of another slot)."""
        # cryptsetup (2.6) tries `existing` on every keyslot in its own order until one opens: never
        # when one beyond the PBKDF cost bounds comes first
        self._refuse_stall(existing, self._any_slot_order(), "adding a keyslot")
        read_fd, write_fd = os.pipe()
        # The new key goes through a pipe the child reads as /proc/self/fd/N (no /dev/fd without
        # udev); a thread writes it so that a large key can never dead-lock against the pipe buffer.
        key = new_key.data if isinstance(new_key, Secret) else new_key
        writer = Background(lambda: _write_and_close(write_fd, key), "key writer")
        try:
            self._must(["luksAddKey", "--key-file=-", "--new-key-slot", str(slot), *FAST_PBKDF, "--", self.path,
                        f"/proc/self/fd/{read_fd}"], "adding a keyslot", input=existing, pass_fds=(read_fd,),
                       wrong_key="the passphrase given does not open any keyslot")
        finally:
            os.close(read_fd)
            writer.join()
            self._meta = None

    def _any_slot_order(self) -> list[int]:
        """The keyslots in the order cryptsetup tries a key on when none is named: priority "prefer"
        first, then "normal", each by number ("ignore" never)."""
        order = [((0 if ks.get("priority") == "2" else 1), slot) for slot, ks in self._section("keyslots").items()
                 if isinstance(ks, dict) and ks.get("type") == "luks2" and ks.get("priority") != "0"]
        return [slot for _, slot in sorted(order)]

    def _refuse_stall(self, key: KeyBytes, order: list[int], doing: str) -> None:
        """CryptsetupError when cryptsetup, trying `key` on keyslots in `order`, would meet one
        beyond the PBKDF cost bounds before the key's own (it has no time limit of its own there)."""
        opens = self.slot_of_key(key)
        costly = {slot for slot, _ in self.key_plan()[1]}
        for slot in order:
            if slot == opens:
                return
            if slot in costly:
                raise CryptsetupError(f"{self.path}: {doing} is not tried: cryptsetup would first try the passphrase on "
                                      f"keyslot {slot}, whose PBKDF cost is beyond the bounds",
                                      hint=f"remove it (cryptsetup luksKillSlot {self.path} {slot}), then run this again")

    def _test_args(self, slot: int | None) -> list[str]:
        args = ["open", "--test-passphrase", "-v", "--key-file=-", "--", self.path]
        if slot is not None:
            args[1:1] = ["--key-slot", str(slot)]
        return args

    def _remember(self, key: KeyBytes, slot: int | None) -> None:
        if slot is not None and not any(k is key for k, _ in self._opens):
            self._opens.append((key, slot))

    def _test_one(self, key: KeyBytes, slot: int | None) -> int | None:
        done = _cryptsetup(self._test_args(slot), input=key, timeout=OPEN_TIMEOUT)
        if done.returncode != 0:
            return None
        opened = _unlocked_slot(done) if slot is None else slot
        self._remember(key, opened)
        return opened if opened is not None else -1

    def test_key(self, key: KeyBytes, slot: int | None = None) -> bool:
        """True if `key` opens `slot` (any slot when None). Creates no mapping. Only keyslots within
        the PBKDF cost bounds are tried (the others are named once, with why)."""
        return self.slot_of_key(key) is not None if slot is None else \
            (self._may_try(slot) and self._test_one(key, slot) is not None)

    def slot_of_key(self, key: KeyBytes) -> int | None:
        """Which keyslot `key` opens, or None (only keyslots within the PBKDF cost bounds are tried)."""
        for known, slot in self._opens:
            if known is key:
                return slot
        tried, skipped = self.key_plan()
        self._say_skips(skipped)
        if not skipped:  # one run, cryptsetup's own order (it names the keyslot that opened)
            opened = self._test_one(key, None)
            if opened is None or opened >= 0:
                return opened
        for slot in tried:
            if self._test_one(key, slot) is not None:
                return slot
        return None

    def _open_args(self, name: str, slot: int | None) -> list[str]:
        args = ["open", "--type", "luks2", "--key-file=-", "--", self.path, name]
        if slot is not None:
            args[1:1] = ["--key-slot", str(slot)]
        return args

    def _opened(self, done: Completed) -> bool:
        if done.returncode == 2:
            return False
        if done.returncode != 0:
            raise CryptsetupError(f"{self.path}: cryptsetup open failed: {done.stderr_text}")
        return True

    def open(self, key: KeyBytes, name: str, slot: int | None = None) -> bool:
        """Create the /dev/mapper/NAME mapping with `key`; False if the key opens no (such) slot.
        Only keyslots within the PBKDF cost bounds are tried (the others are named once, with why)."""
        if slot is not None:
            return self._may_try(slot) and self._opened(_cryptsetup(self._open_args(name, slot), input=key,
                                                                      timeout=OPEN_TIMEOUT))
        tried, skipped = self.key_plan()
        self._say_skips(skipped)
        if not skipped:
            return self._opened(_cryptsetup(self._open_args(name, None), input=key, timeout=OPEN_TIMEOUT))
        return any(self._opened(_cryptsetup(self._open_args(name, s), input=key, timeout=OPEN_TIMEOUT)) for s in tried)

    def start_open(self, name: str, slot: int, *, test: bool = False) -> PendingOpen:
        """`cryptsetup open` (`--test-passphrase` with `test`) started now, its key to follow: it
        execs, loads its libraries and reads the header, then waits on stdin, while the key is
        still being unsealed."""
        if not self._may_try(slot):
            raise CryptsetupError(f"{self.path}: keyslot {slot} is not tried (its PBKDF cost)")
        args = self._test_args(slot) if test else self._open_args(name, slot)
        try:
            started = Started([CRYPTSETUP, *args])
        except FileNotFoundError:
            raise CryptsetupError("cryptsetup is not installed") from None
        return PendingOpen(self, slot, test, started)

    def kill_slot(self, slot: int, remaining: KeyBytes) -> None:
        """Wipe `slot`, authorised by `remaining`, a passphrase of another slot (never --batch-mode)."""
        # luksKillSlot tries the key on every other keyslot in turn, by number, until one opens
        self._refuse_stall(remaining, [s for s in self.keyslots() if s != slot], f"removing keyslot {slot}")
        try:
            self._must(["luksKillSlot", "--key-file=-", "--", self.path, str(slot)], f"removing keyslot {slot}",
                       input=remaining, wrong_key=f"the passphrase given does not open a keyslot other than {slot}")
        finally:
            self._meta = None
            self._opens = [(k, s) for k, s in self._opens if s != slot]

    # --- tokens ---------------------------------------------------------------------------------
    def import_token(self, token: Token) -> int:
        """Write `token` under a free token id and return the id."""
        token.token_id = self.import_document(token.to_json())
        return token.token_id

    def import_document(self, document: dict[str, Any], highest: bool = False) -> int:
        """Write a token's JSON object under a free token id (the highest one with `highest`) and return the id."""
        import json  # enrolment only: not imported on the boot path

        tid = self.free_token_id(highest)
        doc = json.dumps(document, separators=(",", ":")).encode()
        try:
            self._must(["token", "import", "--json-file", "-", "--token-id", str(tid), "--", self.path],
                       "writing the LUKS2 token", input=doc)
        finally:
            self._meta = None
        return tid

    def replace_document(self, token_id: int, document: dict[str, Any]) -> None:
        """Write a token's JSON object over token `token_id`."""
        import json  # enrolment only: not imported on the boot path

        doc = json.dumps(document, separators=(",", ":")).encode()
        try:
            self._must(["token", "import", "--token-replace", "--json-file", "-", "--token-id", str(token_id), "--",
                        self.path], "rewriting the LUKS2 token", input=doc)
        finally:
            self._meta = None

    def remove_token(self, token_id: int) -> None:
        try:
            self._must(["token", "remove", "--token-id", str(token_id), "--", self.path], f"removing token {token_id}")
        finally:
            self._meta = None


def _write_and_close(fd: int, data: bytes | bytearray) -> None:
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    except BrokenPipeError:
        pass
    finally:
        os.close(fd)


@record
class PendingOpen:
    """A `cryptsetup open` of one keyslot, started before its key exists (LuksDevice.start_open)."""

    device: LuksDevice
    slot: int
    test: bool
    started: Started

    def finish(self, key: KeyBytes) -> bool:
        """Hand it the key: as LuksDevice.open (or test_key), False if the key opens no such slot."""
        done = self.started.finish(_raw(key) or b"", OPEN_TIMEOUT)
        _timed_out(done, OPEN_TIMEOUT)
        return done.returncode == 0 if self.test else self.device._opened(done)

    def cancel(self) -> None:
        """No key after all: it is killed while it waits for one (it has mapped nothing)."""
        self.started.cancel()
