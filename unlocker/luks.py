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


def _raw(key: KeyBytes | None) -> bytes | bytearray | None:
    return key.data if isinstance(key, Secret) else key


def _cryptsetup(args: list[str], *, input: KeyBytes | None = None, pass_fds: tuple[int, ...] = (),
                check: bool = False) -> Completed:
    try:
        return run([CRYPTSETUP, *args], input=_raw(input), pass_fds=pass_fds, check=check)
    except FileNotFoundError:
        raise CryptsetupError("cryptsetup is not installed") from None


@record
class LuksDevice:
    """One LUKS2 device (or image file), its header read once and kept."""

    path: str

    def __post_init__(self) -> None:
        if not os.path.exists(self.path):
            raise DeviceNotFoundError(f"{self.path}: no such device or file")
        self._meta: dict[str, Any] | None = None

    def _must(self, args: list[str], doing: str, *, input: KeyBytes | None = None, pass_fds: tuple[int, ...] = (),
              wrong_key: str | None = None) -> Completed:
        """cryptsetup that must succeed. Its exit code 2 (the key given opens no keyslot it may
        use) is a UsageError saying `wrong_key`, when given; any other failure a CryptsetupError
        naming what was `doing`, with cryptsetup's own words."""
        try:
            return _cryptsetup(args, input=input, pass_fds=pass_fds, check=True)
        except RunError as exc:
            if wrong_key is not None and exc.done.returncode == 2:
                raise UsageError(f"{self.path}: {wrong_key}") from None
            raise CryptsetupError(f"{self.path}: {doing} failed: {exc.done.stderr_text}") from None

    # --- metadata -------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """The LUKS2 JSON header. Raises UsageError for LUKS1 or non-LUKS devices."""
        if self._meta is None:
            done = _cryptsetup(["luksDump", "--dump-json-metadata", "--", self.path])
            if done.returncode != 0:
                if _cryptsetup(["isLuks", "--", self.path]).returncode == 0:
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

    def uuid(self) -> str:
        try:
            done = _cryptsetup(["luksUUID", "--", self.path], check=True)
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

    def free_token_id(self) -> int:
        used = set(self.raw_tokens())
        for tid in range(MAX_TOKENS):
            if tid not in used:
                return tid
        raise CryptsetupError(f"{self.path}: no free token id")

    # --- keys -----------------------------------------------------------------------------------
    def add_key(self, existing: KeyBytes, new_key: KeyBytes, slot: int) -> None:
        """Add `new_key` in keyslot `slot`, authorised by `existing` (a passphrase of another slot)."""
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

    def _test_args(self, slot: int | None) -> list[str]:
        args = ["open", "--test-passphrase", "--key-file=-", "--", self.path]
        if slot is not None:
            args[1:1] = ["--key-slot", str(slot)]
        return args

    def test_key(self, key: KeyBytes, slot: int | None = None) -> bool:
        """True if `key` opens `slot` (any slot when None). Creates no mapping."""
        return _cryptsetup(self._test_args(slot), input=key).returncode == 0

    def slot_of_key(self, key: KeyBytes) -> int | None:
        """Which keyslot `key` opens, or None."""
        for slot in self.keyslots():
            if self.test_key(key, slot):
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
        """Create the /dev/mapper/NAME mapping with `key`; False if the key opens no (such) slot."""
        return self._opened(_cryptsetup(self._open_args(name, slot), input=key))

    def start_open(self, name: str, slot: int, *, test: bool = False) -> PendingOpen:
        """`cryptsetup open` (`--test-passphrase` with `test`) started now, its key to follow: it
        execs, loads its libraries and reads the header, then waits on stdin, while the key is
        still being unsealed."""
        args = self._test_args(slot) if test else self._open_args(name, slot)
        try:
            started = Started([CRYPTSETUP, *args])
        except FileNotFoundError:
            raise CryptsetupError("cryptsetup is not installed") from None
        return PendingOpen(self, slot, test, started)

    def kill_slot(self, slot: int, remaining: KeyBytes) -> None:
        """Wipe `slot`, authorised by `remaining`, a passphrase of another slot (never --batch-mode)."""
        try:
            self._must(["luksKillSlot", "--key-file=-", "--", self.path, str(slot)], f"removing keyslot {slot}",
                       input=remaining, wrong_key=f"the passphrase given does not open a keyslot other than {slot}")
        finally:
            self._meta = None

    # --- tokens ---------------------------------------------------------------------------------
    def import_token(self, token: Token) -> int:
        """Write `token` under a free token id and return the id."""
        token.token_id = self.import_document(token.to_json())
        return token.token_id

    def import_document(self, document: dict[str, Any]) -> int:
        """Write a token's JSON object under a free token id and return the id."""
        import json  # enrolment only: not imported on the boot path

        tid = self.free_token_id()
        doc = json.dumps(document, separators=(",", ":")).encode()
        try:
            self._must(["token", "import", "--json-file", "-", "--token-id", str(tid), "--", self.path],
                       "writing the LUKS2 token", input=doc)
        finally:
            self._meta = None
        return tid

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
        done = self.started.finish(_raw(key) or b"")
        return done.returncode == 0 if self.test else self.device._opened(done)

    def cancel(self) -> None:
        """No key after all: it is killed while it waits for one (it has mapped nothing)."""
        self.started.cancel()
