"""SIGKILL at every step of enroll, reseal and remove, driven from outside the program (tests/sigkill.py:
a cryptsetup that kills its caller after the Nth call, a proxy in front of swtpm that kills it once the
TPM answered its Nth command). After every kill: the passphrase opens the disk, the old or the new TPM
enrolment unlocks, `status` (text and --json) names every leftover, and running the verb again leaves
nothing behind.

Each N starts from the same disk and TPM state. A kill after a step that changed nothing leaves the
state a kill at an earlier N left: the state (keyslots, tokens, NV indexes, blob files) is compared
and the slower checks (status, the unlock, the verb again) run once per state seen.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import PASSPHRASE, Swtpm, luks_json, make_luks_image, opens, run_cli
from helpers import enroll_or_fail as enroll
from sigkill import KillingCryptsetup, KillingTpmProxy, flush_what_the_dead_left, run_to_be_killed

pytestmark = pytest.mark.tpm

OURS, RECOVERY, PENDING = "tpm2-unlocker", "tpm2-unlocker-recovery", "tpm2-unlocker-pending"
NV_FIRST = 0x01500016


def nv_indexes(tpm: Swtpm) -> set[int]:
    """The NV indexes defined near ours (the default index and those a re-seal moves to)."""
    out = tpm.tools("tpm2_getcap", "handles-nv-index").stdout.decode()
    return {int(line.strip("- \n"), 16) for line in out.splitlines() if line.strip("- \n")} \
        & set(range(NV_FIRST, NV_FIRST + 64))


@dataclass
class Bench:
    """One verb's loop: the disk and TPM state every N starts from."""

    tpm: Swtpm
    disk: Path
    key_file: Path
    work: Path
    before: Callable[[], None] = lambda: None  # after the state is restored, before the verb runs

    def snapshot(self) -> None:
        shutil.copy(self.disk, self.work / "template.img")
        self.tpm.stop()
        shutil.copy(self.tpm.state_dir / "tpm2-00.permall", self.work / "template.permall")
        self.tpm.start()

    def restore(self) -> None:
        shutil.copy(self.work / "template.img", self.disk)
        self.tpm.stop()
        shutil.copy(self.work / "template.permall", self.tpm.state_dir / "tpm2-00.permall")
        self.tpm.start()
        self.before()

    def state(self) -> str:
        """What a kill left, up to the random key material: keyslots, tokens, NV indexes."""
        meta = luks_json(self.disk)
        tokens = sorted((tid, t.get("type"), t.get("keyslots"), t.get("verb"), t.get("committed"), t.get("keyslot"),
                         t.get("store"), t.get("nv_index")) for tid, t in meta["tokens"].items())
        return json.dumps([sorted(meta["keyslots"]), tokens, sorted(nv_indexes(self.tpm))])


def check_after_kill(bench: Bench, verb: list[str], *, unlocks: bool) -> None:
    """The state a kill left: the TPM enrolment unlocks (`unlocks`: the old or the new one must), status
    names every leftover, the verb run again leaves none. Then the state is the verb's result."""
    disk, tpm = bench.disk, bench.tpm
    meta = luks_json(disk)
    tokens = meta["tokens"]
    ours = {tid: t for tid, t in tokens.items() if t["type"] == OURS and t["keyslots"]}
    if unlocks or (ours and verb[0] == "enroll"):  # a removal half-done may unlock or not
        tpm.reboot()  # the next boot: the lock PCR back at its reset value
        done = run_cli("unlock", str(disk), "--test", "--tries", "0", tpm=tpm)
        assert done.returncode == 0, f"no TPM enrolment unlocks: {done.stderr.decode()}"
    # every leftover, by a reading of the header and TPM of our own
    markers = {int(tid) for tid, t in tokens.items() if t["type"] == PENDING}
    without_keyslot = {int(tid) for tid, t in tokens.items() if t["type"] in (OURS, RECOVERY) and not t["keyslots"]}
    named = {s for t in tokens.values() for s in t["keyslots"]}
    orphan_keyslots = {int(s) for s in meta["keyslots"]} - {int(s) for s in named} - {0}
    named_nv = {int(t["nv_index"], 16) for t in ours.values() if t.get("store") == "nv"}
    defined = nv_indexes(tpm)
    orphan_nv = defined - named_nv
    sealed_key_gone = {int(tid) for tid, t in ours.items() if t.get("store") == "nv" and int(t["nv_index"], 16) not in defined}
    status = run_cli("status", str(disk), "--json", tpm=tpm)
    assert status.returncode == 0, status.stderr.decode()
    left = json.loads(status.stdout)["leftovers"]
    by_kind: dict[str, list[dict]] = {}
    for entry in left:
        by_kind.setdefault(entry["kind"], []).append(entry)
    assert {e["token_id"] for e in by_kind.get("pending", [])} == markers, left
    assert {e["token_id"] for e in by_kind.get("keyslot-gone", [])} == without_keyslot, left
    assert {e["keyslot"] for e in by_kind.get("orphan-keyslot", [])} == orphan_keyslots, left
    assert {e["token_id"] for e in by_kind.get("sealed-key-gone", [])} == sealed_key_gone, left
    for index in orphan_nv:
        assert any(f"NV index 0x{index:08x}" in e["what"] for e in by_kind.get("orphan-nv-index", [])), left
    text = run_cli("status", str(disk), tpm=tpm).stdout.decode()
    assert text.count(": LEFTOVER: ") == len(left), text
    for entry in left:
        assert f"LEFTOVER: {entry['what']}" in text
    # the verb again: it cleans up what was left, then does its work (or says it was done)
    again = run_cli(*verb, tpm=tpm)
    if again.returncode != 0:
        done_already = not left and ((verb[0] == "enroll" and b"is already enrolled" in again.stderr)
                                     or (verb[0] == "remove" and b"has no tpm2-unlocker enrolment" in again.stderr))
        assert done_already, again.stderr.decode()
    after = json.loads(run_cli("status", str(disk), "--json", tpm=tpm).stdout)
    assert after["leftovers"] == [], after["leftovers"]
    meta = luks_json(disk)
    assert not [t for t in meta["tokens"].values() if t["type"] == PENDING]
    ours = {tid: t for tid, t in meta["tokens"].items() if t["type"] == OURS}
    if verb[0] == "remove":
        assert ours == {} and sorted(meta["keyslots"]) == ["0"] and nv_indexes(tpm) == set()
    else:
        [token] = ours.values()
        assert sorted(meta["keyslots"]) == sorted({"0", *token["keyslots"]})
        assert nv_indexes(tpm) == ({int(token["nv_index"], 16)} if token["store"] == "nv" else set())
        assert [e["policy_satisfied"] for e in after["enrolments"]] == [True]


def every_kill(bench: Bench, verb: list[str], arm: Callable[[int | None], None], count: Callable[[], int], *,
               tcti: str, env: dict[str, str] | None = None, proxy: KillingTpmProxy | None = None,
               unlocks: bool) -> Iterator[int]:
    """Run the verb once whole to count its steps, then once per step, killed after it; check each."""
    bench.restore()
    arm(None)
    whole = run_to_be_killed(verb, tcti=tcti, env=env, proxy=proxy)
    assert whole.returncode == 0, whole.stderr.decode()
    total = count()
    assert total > 0
    checked: set[str] = set()
    for n in range(1, total + 1):
        bench.restore()
        arm(n)
        done = run_to_be_killed(verb, tcti=tcti, env=env, proxy=proxy)
        assert done.returncode == -9, f"step {n} of {total}: not killed ({done.stderr.decode()})"
        flush_what_the_dead_left(bench.tpm)
        assert opens(bench.disk, PASSPHRASE), f"step {n} of {total}: the passphrase no longer opens the disk"
        state = bench.state()
        if state not in checked:
            checked.add(state)
            check_after_kill(bench, verb, unlocks=unlocks)
        yield n
    assert len(checked) >= 3, "the kills should have left several states"


@pytest.fixture
def proxy(tpm: Swtpm) -> Iterator[KillingTpmProxy]:
    killing = KillingTpmProxy(tpm)
    yield killing
    killing.close()


def _enrolled(tpm: Swtpm, tmp_path: Path, key_file: Path, store: str, lock: bool) -> Bench:
    disk = make_luks_image(tmp_path / "disk.img")
    enroll(disk, key_file, tpm, "--store", store)
    # reseal of a key locked for this boot (the lock PCR extended) puts a new key in a new keyslot
    bench = Bench(tpm, disk, key_file, tmp_path, before=(lambda: tpm.extend(15)) if lock else (lambda: None))
    bench.snapshot()
    return bench


def test_sigkill_after_any_cryptsetup_call_of_enroll(tpm: Swtpm, tmp_path: Path, key_file: Path) -> None:
    bench = Bench(tpm, make_luks_image(tmp_path / "disk.img"), key_file, tmp_path)
    bench.snapshot()
    killer = KillingCryptsetup(tmp_path)
    verb = ["enroll", str(bench.disk), "--unlock-key-file", str(key_file)]
    steps = list(every_kill(bench, verb, killer.arm, lambda: killer.calls, tcti=tpm.tcti, env=killer.env(),
                            unlocks=False))
    assert len(steps) >= 8


def test_sigkill_after_any_cryptsetup_call_of_reseal(tpm: Swtpm, tmp_path: Path, key_file: Path) -> None:
    bench = _enrolled(tpm, tmp_path, key_file, "nv", lock=True)
    killer = KillingCryptsetup(tmp_path)
    verb = ["reseal", str(bench.disk), "--unlock-key-file", str(key_file)]
    steps = list(every_kill(bench, verb, killer.arm, lambda: killer.calls, tcti=tpm.tcti, env=killer.env(),
                            unlocks=True))
    assert len(steps) >= 12


def test_sigkill_after_any_cryptsetup_call_of_remove(tpm: Swtpm, tmp_path: Path, key_file: Path) -> None:
    bench = _enrolled(tpm, tmp_path, key_file, "nv", lock=False)
    killer = KillingCryptsetup(tmp_path)
    verb = ["remove", str(bench.disk), "--unlock-key-file", str(key_file)]
    steps = list(every_kill(bench, verb, killer.arm, lambda: killer.calls, tcti=tpm.tcti, env=killer.env(),
                            unlocks=False))
    assert len(steps) >= 5


def test_sigkill_after_any_tpm_command_of_enroll(tpm: Swtpm, proxy: KillingTpmProxy, tmp_path: Path,
                                                 key_file: Path) -> None:
    bench = Bench(tpm, make_luks_image(tmp_path / "disk.img"), key_file, tmp_path)
    bench.snapshot()
    verb = ["enroll", str(bench.disk), "--unlock-key-file", str(key_file), "--store", "nv"]
    steps = list(every_kill(bench, verb, proxy.arm, lambda: proxy.count, tcti=proxy.tcti, proxy=proxy,
                            unlocks=False))
    assert len(steps) >= 15


def test_sigkill_after_any_tpm_command_of_reseal(tpm: Swtpm, proxy: KillingTpmProxy, tmp_path: Path,
                                                 key_file: Path) -> None:
    bench = _enrolled(tpm, tmp_path, key_file, "nv", lock=True)
    verb = ["reseal", str(bench.disk), "--unlock-key-file", str(key_file)]
    steps = list(every_kill(bench, verb, proxy.arm, lambda: proxy.count, tcti=proxy.tcti, proxy=proxy,
                            unlocks=True))
    assert len(steps) >= 25


def test_a_hostile_pending_marker_costs_nothing_that_is_not_ours(tpm: Swtpm, tmp_path: Path, key_file: Path) -> None:
    """Markers are header data, anyone's to write: one naming the passphrase's keyslot (made by
    luksFormat: argon2id), one naming the recovery key's and an NV index someone else defined, one that
    does not parse. The next verb removes the markers and nothing else."""
    from helpers import CHEAP_ARGON2ID, replace_token

    disk = make_luks_image(tmp_path / "disk.img", pbkdf=CHEAP_ARGON2ID)
    done = run_cli("recovery-key", str(disk), "--unlock-key-file", str(key_file))
    assert done.returncode == 0, done.stderr.decode()
    [recovery_slot] = [t["keyslots"][0] for t in luks_json(disk)["tokens"].values() if t["type"] == RECOVERY]
    tpm.tools("tpm2_nvdefine", "--size", "8", "--attributes=ownerread|ownerwrite", f"0x{NV_FIRST:x}")
    markers = {
        "20": {"type": PENDING, "keyslots": [], "verb": "enroll", "keyslot": "0", "new": {"store": "token"},
               "committed": False},
        "21": {"type": PENDING, "keyslots": [], "verb": "enroll", "keyslot": recovery_slot,
               "new": {"store": "nv", "nv_index": f"0x{NV_FIRST:08x}"}, "committed": False},
        "22": {"type": PENDING, "keyslots": [], "verb": "enroll", "keyslot": "0",
               "new": {"store": "file", "blob_dir": "/etc", "blob_name": "passwd"}, "committed": False},
    }
    for tid, marker in markers.items():
        replace_token(disk, tid, marker)
    before = luks_json(disk)
    status = json.loads(run_cli("status", str(disk), "--json", tpm=tpm).stdout)
    kinds = sorted((e["kind"], e["token_id"]) for e in status["leftovers"])
    assert kinds == [("corrupt-marker", 22), ("pending", 20), ("pending", 21)], kinds
    done = enroll(disk, key_file, tpm)
    said = done.stderr.decode()
    assert "keyslot 0, which an interrupted run added, stays: it is not a keyslot tpm2-unlocker made" in said
    assert f"keyslot {recovery_slot}, which an interrupted run added, stays: token" in said
    assert "token 22 is a pending marker that cannot be read (pending marker: blob_dir or blob_name is not a plain path)" \
        in said
    after = luks_json(disk)
    assert set(before["keyslots"]) <= set(after["keyslots"])
    assert not [t for t in after["tokens"].values() if t["type"] == PENDING]
    assert nv_indexes(tpm) == {NV_FIRST}, "the NV index someone else defined stays"
    assert opens(disk, PASSPHRASE, slot=0) and Path("/etc/passwd").exists()
    tpm.tools("tpm2_nvundefine", f"0x{NV_FIRST:x}")


def test_an_undo_that_fails_keeps_the_marker_for_the_next_run(tpm: Swtpm, tmp_path: Path, key_file: Path) -> None:
    """enroll fails after luksAddKey (the TPM goes away) and its undo cannot remove the keyslot (a
    luksKillSlot that fails): the marker stays, status names the keyslot, the next enroll removes it."""
    import os
    import stat

    real = shutil.which("cryptsetup")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "cryptsetup"
    script.write_text(f"""#!/bin/sh
case "$1" in luksKillSlot) echo "refused by the test" >&2; exit 1 ;; esac
{real} "$@"; rc=$?
case "$1" in luksAddKey) swtpm_ioctl --tcp 127.0.0.1:{tpm.port + 1} -s >/dev/null 2>&1 ;; esac
exit $rc
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    disk = make_luks_image(tmp_path / "disk.img")
    done = enroll(disk, key_file, tpm, env={"PATH": f"{bindir}:{os.environ['PATH']}"}, status=2)
    assert b"could not undo: remove keyslot 1" in done.stderr
    tpm.proc.wait()  # type: ignore[union-attr]
    tpm.proc = None
    tpm.start()
    left = json.loads(run_cli("status", str(disk), "--json", tpm=tpm).stdout)["leftovers"]
    assert sorted((e["kind"], e["keyslot"]) for e in left) == [("orphan-keyslot", 1), ("pending", 1)], left
    assert opens(disk, PASSPHRASE)
    again = enroll(disk, key_file, tpm)
    assert b"removed keyslot 1, which an interrupted run added" in again.stderr
    assert json.loads(run_cli("status", str(disk), "--json", tpm=tpm).stdout)["leftovers"] == []
