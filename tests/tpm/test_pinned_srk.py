"""The session that carries the key is salted with the SRK the token pinned, never with a key the
TPM (or something between us and it) reports unchecked."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from helpers import PASSPHRASE, Swtpm, our_tokens, run_cli, tpm_messages, unlock_with_prompt
from helpers import enroll_or_fail as enroll

from unlocker.tpm.srk import srk_name_of

pytestmark = pytest.mark.tpm

TPM_CC_START_AUTH_SESSION, TPM_CC_LOAD, TPM_CC_UNSEAL, TPM_CC_NV_READ = 0x176, 0x157, 0x15E, 0x14E
PERSISTENT_SRK = 0x81000001


def _handle(message: bytes, at: int = 10) -> int:
    return struct.unpack_from(">I", message, at)[0]


def _sessions_of(pcap: Path) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    """From a capture: the tpmKey of every session started; each Load's (parent, object); for each
    Unseal and NV_Read, the tpmKey that salted the session it ran in (the TPM reuses session
    handles, so each is resolved when it is used)."""
    salted_by: dict[int, int] = {}
    salts: list[int] = []
    loads: list[tuple[int, int]] = []
    secret_salts: list[int] = []
    messages = tpm_messages(pcap)
    for (kind, command), (_, response) in zip(messages[0::2], messages[1::2], strict=True):
        assert kind == "command"
        code, rc = _handle(command, 6), _handle(response, 6)
        if rc != 0:
            continue
        if code == TPM_CC_START_AUTH_SESSION:
            salted_by[_handle(response)] = _handle(command)  # tpmKey is its first handle
            salts.append(_handle(command))
        elif code == TPM_CC_LOAD:
            loads.append((_handle(command), _handle(response)))
        elif code in (TPM_CC_UNSEAL, TPM_CC_NV_READ):
            handles = 1 if code == TPM_CC_UNSEAL else 2
            secret_salts.append(salted_by[_handle(command, 10 + 4 * handles + 4)])  # after the handles, authSize
    return salts, loads, secret_salts


def _plant_persistent_primary(tpm: Swtpm, work: Path) -> None:
    """What an attacker with the owner's (empty) password can do after enrolment: a noDA storage key
    of another name at 0x81000001, where the boot looks first for an SRK."""
    tpm.tools("tpm2_createprimary", "-C", "o", "--key-algorithm=rsa2048",
              "--attributes=restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
              f"--key-context={work / 'planted.ctx'}")
    tpm.tools("tpm2_evictcontrol", "-C", "o", f"--object-context={work / 'planted.ctx'}", hex(PERSISTENT_SRK))
    tpm.tools("tpm2_flushcontext", "-t")


@pytest.mark.parametrize("store", ["token", "nv"])
def test_a_planted_srk_never_salts_the_session_and_the_unlock_still_works(
        store: str, disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    enroll(disk, key_file, tpm, "--store", store, "--pcrs", "sha256:7")
    _plant_persistent_primary(tpm, tmp_path)
    pcap = tmp_path / "unlock.pcap"
    done = run_cli("unlock", str(disk), "--test", "--tries", "0", "--tcti", f"pcap:{tpm.tcti}",
                   env={"TCTI_PCAP_FILE": str(pcap)})
    assert done.returncode == 0, done.stderr.decode()
    salts, loads, secret_salts = _sessions_of(pcap)
    # the contrast: the head start did salt a session with the planted key (else this proves nothing)
    assert PERSISTENT_SRK in salts
    [salt] = secret_salts
    assert salt != PERSISTENT_SRK
    if store == "token":
        [(parent, _)] = loads
        assert salt == parent  # the SRK the token pinned loaded the key and salted its session


def test_the_token_pins_the_srks_public_area(disk: Path, key_file: Path, tpm: Swtpm) -> None:
    import base64

    enroll(disk, key_file, tpm)
    [token] = our_tokens(disk).values()
    public = base64.b64decode(token["srk_public"])
    assert srk_name_of(public).hex() == token["srk_name"]


def test_a_swapped_tpm_says_tpm_identity_changed_and_the_passphrase_opens(
        disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    enroll(disk, key_file, tpm)
    other = Swtpm(tmp_path / "other-state")
    other.start()
    try:
        assert unlock_with_prompt(disk, other.tcti, "TPM identity changed", PASSPHRASE) == 0
        done = run_cli("unlock", str(disk), "--test", tpm=other)
    finally:
        other.stop()
    assert done.returncode == 2
    assert b"TPM identity changed: this TPM's storage root key is not the one the key was sealed under" in done.stderr


def _plant_key_the_tpm_did_not_make(tpm: Swtpm, work: Path) -> str:
    """A noDA storage key without fixedTPM/fixedParent (the attributes any imported key, one whose
    private part an attacker knows, must have) persisted at 0x81000001; its name."""
    tpm.tools("tpm2_createprimary", "-C", "o", "--key-algorithm=ecc", f"--key-context={work / 'parent.ctx'}")
    tpm.tools("tpm2_flushcontext", "-t")
    tpm.tools("tpm2_create", f"--parent-context={work / 'parent.ctx'}", "--key-algorithm=ecc",
              "--attributes=restricted|decrypt|sensitivedataorigin|userwithauth|noda",
              f"--public={work / 'k.pub'}", f"--private={work / 'k.priv'}")
    tpm.tools("tpm2_flushcontext", "-t")
    tpm.tools("tpm2_load", f"--parent-context={work / 'parent.ctx'}", f"--public={work / 'k.pub'}",
              f"--private={work / 'k.priv'}", f"--key-context={work / 'k.ctx'}")
    tpm.tools("tpm2_evictcontrol", "-C", "o", f"--object-context={work / 'k.ctx'}", hex(PERSISTENT_SRK))
    tpm.tools("tpm2_flushcontext", "-t")
    out = tpm.tools("tpm2_readpublic", f"--object-context={hex(PERSISTENT_SRK)}").stdout.decode()
    return next(line.split()[-1] for line in out.splitlines() if line.startswith("name:"))


@pytest.mark.parametrize("store", ["token", "nv"])
def test_a_key_the_tpm_did_not_make_is_never_the_srk_even_when_the_token_names_it(
        store: str, disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path) -> None:
    """The reviewer's evil maid: a key of hers at 0x81000001 before enrolment (trusted on first use
    otherwise), then its name written into the token (the header is hers to write)."""
    planted = _plant_key_the_tpm_did_not_make(tpm, tmp_path)
    enroll(disk, key_file, tpm, "--store", store, "--pcrs", "sha256:7")
    (tid, token), = our_tokens(disk).items()
    assert token["srk_name"] != planted  # enrolment took our own primary, not hers
    from helpers import replace_token

    token["srk_name"] = planted
    token.pop("srk_public", None)
    replace_token(disk, tid, token)
    pcap = tmp_path / "rewritten.pcap"
    done = run_cli("unlock", str(disk), "--test", "--tries", "0", "--tcti", f"pcap:{tpm.tcti}",
                   env={"TCTI_PCAP_FILE": str(pcap)})
    assert done.returncode == 2
    assert b"TPM identity changed" in done.stderr
    _, _, secret_salts = _sessions_of(pcap)
    assert secret_salts == []  # no unseal, no NV read ran at all


TPM_CC_PCR_EVENT, TPM_RS_PW = 0x13C, 0x40000009


@pytest.mark.parametrize("after_unseal", [True, False])
def test_the_lock_after_an_unseal_runs_in_a_session_salted_with_the_pinned_srk(
        after_unseal: bool, disk: Path, key_file: Path, tpm: Swtpm, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock's TPM2_PCR_Event after an unseal is authorised by an HMAC session salted with the SRK
    the token pinned (the TPM's answer is then HMAC'd with a key only it and we know); without an
    unseal (no SRK selected) it is sent with the password session, as before."""
    from unlocker import store
    from unlocker.token import parse_token
    from unlocker.tpm.client import Tpm

    enroll(disk, key_file, tpm, "--pcrs", "sha256:7")
    (tid, doc), = our_tokens(disk).items()
    pcap = tmp_path / "lock.pcap"
    monkeypatch.setenv("TCTI_PCAP_FILE", str(pcap))
    with Tpm(f"pcap:{tpm.tcti}") as client:
        if after_unseal:
            store.take(client, parse_token(doc, int(tid))).wipe()
        client.pcr_event(15, b"tpm2-unlocker test lock")
    salted_by: dict[int, int] = {}
    loads: list[int] = []
    events: list[int] = []
    messages = tpm_messages(pcap)
    for (_, command), (_, response) in zip(messages[0::2], messages[1::2], strict=True):
        code = _handle(command, 6)
        assert _handle(response, 6) == 0, hex(code)
        if code == TPM_CC_START_AUTH_SESSION:
            salted_by[_handle(response)] = _handle(command)
        elif code == TPM_CC_LOAD:
            loads.append(_handle(command))
        elif code == TPM_CC_PCR_EVENT:
            events.append(_handle(command, 10 + 4 + 4))  # after pcrHandle and authSize: the session
    [session] = events
    if after_unseal:
        [parent] = loads
        assert session >> 24 == 0x02 and salted_by[session] == parent
    else:
        assert session == TPM_RS_PW
