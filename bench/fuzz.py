"""Fuzz the parsers that read what an attacker can write: `python -m bench.fuzz [--examples N] [TARGET ...]`.

Targets: the token parser (any JSON value, and mutations of a real token), other tools' tokens
(real systemd-tpm2 and Clevis tokens, mutated) and the JWK a Clevis pin seals, the LUKS header reader
(bytes behind a LUKS2 magic, and the tokens of its JSON read as the boot reads them), the kernel
command line (as words, and as the raw bytes of /proc/cmdline) and crypttab parsers, the
sealed-blob unmarshalling, the signed policies' tokens and their TPM structures, the pending
marker and keyslot PBKDF parameters (marker), and the TCG event log (mutations of a log the VM
wrote, and events of any type and content behind a valid header: parsed, replayed, described,
diffed as predict and the boot do). Each input must give either a result or one of our typed errors
(UnlockerError): anything else escaping is a crash that would stop a boot, and fails the run with
the input that caused it. Driven by hypothesis; CI runs a short pass of each (tests/unit/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unlocker.boot.devices import LUKS_MAGIC, boot_targets, from_cmdline, from_crypttab, has_our_token, read_luks_header
from unlocker.commands import others
from unlocker.commands.jwe import jwk_key
from unlocker.errors import UnlockerError
from unlocker.initrd import kernel_words
from unlocker.luks import LuksDevice, kdf_cost_problem
from unlocker.measure import eventlog, events
from unlocker.secret import Secret
from unlocker.signature import parse_signature, signatures_in
from unlocker.token import parse_token, parse_token_text
from unlocker.tpm.seal import SealedObject, sealed_auth_policy, validate_sealed
from unlocker.tpm.signing import unmarshal_public, unmarshal_signature

# A token as `enroll` writes it: the starting point of the mutations.
VALID_TOKEN: dict[str, Any] = {
    "type": "tpm2-unlocker", "keyslots": ["1"], "version": 1, "store": "token", "pcr_bank": "sha256",
    "pcrs": [0, 7], "pcr_values": {"0": "00" * 32, "7": "11" * 32}, "policy_hash": "22" * 32,
    "srk_name": "000b" + "33" * 32, "pin": False, "keyslot_owned": True,
    "tpm2_public": "AAEACwAA", "tpm2_private": "AAIAAAA=", "pcr_events": {"0": ["80000008:9f2c1e0a"], "7": []},
}

# ... and one sealed to two chains (reseal --predict): a further chain and a digest per branch
VALID_BRANCH_TOKEN: dict[str, Any] = {
    **VALID_TOKEN, "lock_pcr": 15,
    "branches": [{"pcrs": [0, 7], "pcr_values": {"0": "00" * 32, "7": "44" * 32}}],
    "branch_policies": ["55" * 32, "66" * 32],
}

# ... and one with prepare-update's grace and a signing key
VALID_GRACE_SIGNED_TOKEN: dict[str, Any] = {
    **VALID_TOKEN, "lock_pcr": 15, "counter": "0x01500030",
    "grace": {"left_out": [0], "counter_name": "000b" + "77" * 32, "count": 5, "reset_limit": 9},
    "signed": {"key": "AAEACwAA", "key_name": "000b" + "88" * 32, "policy_ref": "74706d32", "pcrs": [0, 7],
               "epoch": "0x01500031", "epoch_name": "000b" + "99" * 32},
    "branch_policies": ["55" * 32, "66" * 32, "77" * 32],
}

# Other tools' tokens as systemd-cryptenroll (Debian 12's 252) and `clevis luks bind ... tpm2` wrote them
# against swtpm: what `adopt --from` and `status` read from a header anyone may write.
SYSTEMD_TOKEN: dict[str, Any] = {
    "type": "systemd-tpm2",
    "keyslots": ["1"],
    "tpm2-blob": ("AJ4AIA+E+ld9beZSuxXRdbjBR1GP8rOGAAlyDwdQZqEw+GHNABCicUQcNrC9p1L7Fo5d9tAcHlVfsJrwIRdncCT2h40vIkbe"
        "nKxMy7zbRSwU/2nWnQj5en7aytH18MZlh4R5j8nusFavbCxEI6Wv7aIiHeahY/2IUr23hFXAj9l94IU0qenLvQJEaLwkcNBJ"
        "S9aKXtrNachIpdSUVB/eCABOAAgACwAAABIAIALjZCs+Ke7M//2AMcAKbwoP6+XO6i9u9rAyL+gVmM8xABAAIOoHeUH49SFW"
        "8lbGnPGlwZZOaTd9+rhLNg1uO+6PFuKq"),
    "tpm2-pcrs": [0, 7],
    "tpm2-pcr-bank": "sha256",
    "tpm2-primary-alg": "ecc",
    "tpm2-policy-hash": "02e3642b3e29eeccfffd8031c00a6f0a0febe5ceea2f6ef6b0322fe81598cf31",
    "tpm2-pin": False,
}
CLEVIS_TPM2: dict[str, Any] = {
    "hash": "sha256",
    "jwk_priv": ("AO4AIPqOXjWdCMoeQ8U1GjQ2cRQE-4_NRKzqq30kUvnC0KPMABBnM2ZSBEMrv9CMgvBmQEt3496Za99AUlyT2viU3vwzchxG"
        "Mu_iy9CxmunjCiY1BOn1qxV-j3EP-1rzbv9xIycvLQzptQf2MvVOJ6X1_Oa_ts5lvmwlvPwvxZmDw-WRNEBLJeueYovnG9v4"
        "gzgHuQ2TAGs2Ggvd0szoH-XLzlGkpbdsw5jV5ieC71ppiSilAE_Xac5WcO_VSyDOssaxPv2HmJWVz_BD8WpZ4pfVTOkeBDlR"
        "AzviRaASn7Nr_N_i-iMa3M1HIIYVxRPr"),
    "jwk_pub": ("AE4ACAALAAAEkgAgAuNkKz4p7sz__YAxwApvCg_r5c7qL272sDIv6BWYzzEAEAAgcr0eU5JP4e9tM8rqz4PP6fds3qQjQeid"
        "gScfPjW8Esc"),
    "key": "ecc",
    "pcr_bank": "sha256",
    "pcr_ids": "0,7",
}
CLEVIS_JWE: dict[str, Any] = {
    "ciphertext": "Kzhgb1vU7HF51uIjWcVuMRlPFx_ZIma_kwNIlk1mIsUQ6X0a48GhVOPqikn2bi-kteaXOwfs",
    "encrypted_key": "",
    "iv": "1UOAZrl9rSIFC5qd",
    "tag": "czVa4iWu3QHikbkKFYxGzg",
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)


@st.composite
def mutated_tokens(draw: st.DrawFn) -> dict[str, Any]:
    """A real token with some fields replaced, removed or added: reaches the checks deep inside."""
    base = draw(st.sampled_from([VALID_TOKEN, VALID_BRANCH_TOKEN, VALID_GRACE_SIGNED_TOKEN]))
    token = json.loads(json.dumps(base))
    for inner in ("branches", "grace", "signed"):  # inside the nested objects too
        if inner in token and draw(st.booleans()):
            nested = token[inner][0] if inner == "branches" else token[inner]
            nested[draw(st.sampled_from([*sorted(nested), "extra"]))] = draw(json_values)
    for key in draw(st.lists(st.sampled_from(sorted(base) + ["nv_index", "blob_dir", "extra"]), max_size=4)):
        action = draw(st.sampled_from(["replace", "remove", "text"]))
        if action == "remove":
            token.pop(key, None)
        elif action == "text":
            token[key] = draw(st.text(alphabet="0123456789abcdefxX/-", max_size=70))
        else:
            token[key] = draw(json_values)
    if draw(st.booleans()):
        token["store"] = draw(st.sampled_from(["token", "nv", "file"]))
    return token


def _mutated(draw: st.DrawFn, doc: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """`doc` with some of `keys` replaced by any JSON value or text, removed, or added."""
    doc = dict(doc)
    for key in draw(st.lists(st.sampled_from(keys), max_size=3)):
        action = draw(st.sampled_from(["replace", "remove", "text"]))
        if action == "remove":
            doc.pop(key, None)
        elif action == "text":
            doc[key] = draw(st.text(alphabet="0123456789abcdefxX/-_+=,", max_size=70))
        else:
            doc[key] = draw(json_values)
    return doc


@st.composite
def other_tokens(draw: st.DrawFn) -> dict[str, Any]:
    """systemd-cryptenroll's and Clevis's real tokens, mutated (inside the JWE's protected header too)."""
    if draw(st.booleans()):
        return _mutated(draw, SYSTEMD_TOKEN, [*SYSTEMD_TOKEN, "tpm2_srk", "tpm2_salt", "tpm2_pubkey_pcrs"])
    tpm2 = _mutated(draw, CLEVIS_TPM2, [*CLEVIS_TPM2, "pcr_digest"])
    clevis = _mutated(draw, {"pin": "tpm2", "tpm2": tpm2}, ["pin", "tpm2"])
    header = _mutated(draw, {"alg": "dir", "clevis": clevis, "enc": "A256GCM"}, ["alg", "clevis", "enc", "zip"])
    text = json.dumps(header).encode() if draw(st.booleans()) else draw(st.binary(max_size=80))
    jwe = _mutated(draw, {**CLEVIS_JWE, "protected": base64.urlsafe_b64encode(text).rstrip(b"=").decode()},
                   [*CLEVIS_JWE, "protected"])
    return _mutated(draw, {"type": "clevis", "keyslots": ["1"], "jwe": jwe}, ["keyslots", "jwe"])


def _typed(call: Callable[[], object]) -> None:
    try:
        call()
    except UnlockerError:
        pass


def fuzz_token(doc: object) -> None:
    _typed(lambda: parse_token(doc, 0))


def fuzz_token_text(text: bytes) -> None:
    _typed(lambda: parse_token_text(text, 0))


@dataclass
class _Scratch:
    path: str


_scratch = _Scratch(os.path.join(tempfile.mkdtemp(prefix="tpm2u-fuzz-"), "header.img"))


def luks2_header(json_area: bytes, hdr_size: int, version: int = 2, uuid: bytes = b"1234") -> bytes:
    head = bytearray(4096)
    head[0:6] = LUKS_MAGIC
    head[6:8] = struct.pack(">H", version)
    head[8:16] = struct.pack(">Q", hdr_size)
    head[168:168 + len(uuid[:40])] = uuid[:40]
    return bytes(head) + json_area


def fuzz_header(data: bytes) -> None:
    """The boot's own header read, then the tokens of what it read, as the boot takes them."""
    with open(_scratch.path, "wb") as f:
        f.write(data)
    found = read_luks_header(_scratch.path)
    if found is None:
        return
    uuid, meta = found
    assert isinstance(uuid, str)
    if meta is None:
        return
    has_our_token(meta)
    device = LuksDevice(_scratch.path)
    device.seed_metadata(meta)
    _typed(device.our_tokens)
    _typed(device.keyslots)


headers = st.one_of(
    st.binary(max_size=5000),
    st.builds(lambda area, size, version, uuid: luks2_header(area, size, version, uuid),
              st.binary(max_size=2000), st.integers(0, 2 ** 64 - 1), st.integers(0, 3), st.binary(max_size=48)),
    st.builds(lambda doc: luks2_header(json.dumps(doc).encode() + b"\0", 16384),
              st.fixed_dictionaries({"tokens": st.dictionaries(st.text(max_size=4), mutated_tokens() | json_values,
                                                               max_size=3),
                                     "keyslots": json_values})),
    st.builds(lambda depth: luks2_header(b"[" * depth + b"]" * depth + b"\0", 4096 + 2 * depth + 4096),
              st.integers(1, 200_000)),
)


def fuzz_cmdline(text: str) -> None:
    for target in from_cmdline(text) or []:
        assert isinstance(target.source, str)


def fuzz_cmdline_bytes(data: bytes) -> None:
    """/proc/cmdline as the kernel hands it over: any byte, read as the boot reads it."""
    with open(_scratch.path, "wb") as f:
        f.write(data)
    assert all(isinstance(w, str) for w in kernel_words(_scratch.path))
    boot_targets(_scratch.path, _scratch.path + ".no-crypttab")


def fuzz_crypttab(data: bytes) -> None:
    with open(_scratch.path, "wb") as f:
        f.write(data)
    from_crypttab(_scratch.path)


cmdline_words = st.lists(st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(["rd.luks.uuid", "rd.luks.name", "cryptdevice", "rd.luks",
                                                        "tpm2_unlocker.tries", "tpm2_unlocker.timeout"]),
              st.text(max_size=40)),
), max_size=8).map(" ".join)


# A pending marker as reseal writes it (commands/pending.py): the starting point of its mutations.
VALID_MARKER: dict[str, Any] = {
    "type": "tpm2-unlocker-pending", "keyslots": [], "verb": "reseal", "keyslot": "2", "committed": False,
    "new": {"store": "nv", "nv_index": "0x01500017"},
    "old": {"store": "file", "blob_dir": "/etc/tpm2-unlocker/x", "blob_name": "key", "token": "0", "keyslot": "1"},
}


@st.composite
def mutated_markers(draw: st.DrawFn) -> dict[str, Any]:
    marker = json.loads(json.dumps(VALID_MARKER))
    for key in draw(st.lists(st.sampled_from(sorted(VALID_MARKER) + ["new.store", "old.token", "old.blob_dir"]),
                             max_size=3)):
        outer, _, inner = key.partition(".")
        where = marker.get(outer) if inner else marker
        if not isinstance(where, dict):
            continue
        where[inner or outer] = draw(json_values | st.text(alphabet="0123456789abcdefx/.-", max_size=12))
    return marker


def fuzz_marker(doc: object) -> None:
    """A pending marker (header data like any token), and a keyslot's PBKDF parameters as the cost
    bounds read them (which must always say something, never raise)."""
    from unlocker.commands.pending import parse_marker

    _typed(lambda: parse_marker(doc, 0))
    assert isinstance(kdf_cost_problem(doc), str)


def fuzz_blob(parts: tuple[bytes, bytes]) -> None:
    sealed = SealedObject(*parts)
    _typed(lambda: validate_sealed(sealed))
    _typed(lambda: sealed_auth_policy(sealed))


EVENTLOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "eventlog",
                        "systemd-boot-ovmf4m.bin")
with open(EVENTLOG, "rb") as _f:
    REAL_LOG = _f.read()
# the real log's Spec ID event (its header declares sha1, sha256, sha384 and sha512)
SPEC_ID_END = 32 + struct.unpack_from("<I", REAL_LOG, 28)[0]
DIGESTS = b"".join(struct.pack("<H", alg) + bytes(size) for alg, size in ((4, 20), (0xB, 32), (0xC, 48), (0xD, 64)))


def fuzz_eventlog(data: bytes) -> None:
    """The log as predict and the boot read it: parsed, replayed in each bank, each event described,
    an enrolment's record of it diffed against it."""
    try:
        log = eventlog.parse(data)
    except UnlockerError:
        return
    record = events.record(log, "sha256", tuple(range(24))) if "sha256" in log.banks else {}
    for bank in log.banks:
        _typed(lambda bank=bank: eventlog.replay(log, bank, range(24)))  # type: ignore[misc]
    roles = events.roles(log)
    for event in log.events:
        assert isinstance(events.describe(event, roles.get(event.number)), str)
    for pcr, entries in record.items():
        events.changed_events(entries[1:], log, pcr, "sha256")


def _event(pcr: int, kind: int, data: bytes) -> bytes:
    return struct.pack("<III", pcr, kind, 4) + DIGESTS + struct.pack("<I", len(data)) + data


eventlogs = st.one_of(
    st.binary(max_size=400),
    # a real log with a slice replaced: reaches every field of every event
    st.builds(lambda at, cut, new: REAL_LOG[:at] + new + REAL_LOG[at + cut:],
              st.integers(0, len(REAL_LOG)), st.integers(0, 64), st.binary(max_size=16)),
    # the real header, then events of any type and content (what describe() reads from event data)
    st.builds(lambda evs: REAL_LOG[:SPEC_ID_END] + b"".join(_event(*e) for e in evs),
              st.lists(st.tuples(st.integers(0, 23), st.sampled_from(sorted(eventlog.EVENT_TYPES)), st.binary(max_size=80)),
                       max_size=6)),
)


VALID_SIGNATURE: dict[str, Any] = {
    "type": "tpm2-unlocker-signature", "keyslots": [], "version": 1, "key_name": "000b" + "33" * 32,
    "policy_ref": "74706d32", "pcr_bank": "sha256", "pcrs": [4], "pcr_values": {"4": "44" * 32}, "epoch": 3,
    "approved": "55" * 32, "signed_digest": "66" * 32,
    "signature": "ABgACwAgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAEAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAC",
}


@st.composite
def mutated_signatures(draw: st.DrawFn) -> dict[str, Any]:
    doc = json.loads(json.dumps(VALID_SIGNATURE))
    for key in draw(st.lists(st.sampled_from(sorted(VALID_SIGNATURE) + ["extra"]), max_size=3)):
        if draw(st.booleans()):
            doc.pop(key, None)
        else:
            doc[key] = draw(json_values)
    return doc


def fuzz_signature(doc: object) -> None:
    """A signature token as the boot reads it: parsed, then its signature unmarshalled for the TPM."""
    found = signatures_in({0: doc})
    _typed(lambda: parse_signature(doc, 0))
    for signature in found:
        _typed(lambda data=signature.signature: unmarshal_signature(data))


def fuzz_signature_bytes(parts: tuple[bytes, bytes]) -> None:
    _typed(lambda: unmarshal_signature(parts[0]))
    _typed(lambda: unmarshal_public(parts[1]))


def fuzz_other_token(doc: dict[str, Any]) -> None:
    """adopt --from reads it (our typed errors only); status describes it whatever it holds."""
    _typed(lambda: others.parse(doc, 0))
    others.describe(0, doc, None)


def fuzz_jwk(data: bytes) -> None:
    """The JSON a Clevis tpm2 pin seals, as adopt reads its key in place."""
    _typed(lambda: jwk_key(Secret(bytearray(data))))


_JWK = b'{"alg":"A256GCM","k":"MMn274RH01JOJqLthAvP8seSEkDydp2h6K41vtIPmcU","key_ops":["encrypt","decrypt"],"kty":"oct"}'
jwks = st.binary(max_size=200) | st.tuples(st.integers(0, len(_JWK)), st.integers(0, len(_JWK)), st.binary(max_size=8)).map(
    lambda cut: _JWK[:cut[0]] + cut[2] + _JWK[cut[1]:])

TARGETS: dict[str, tuple[Callable[[Any], None], st.SearchStrategy[Any]]] = {
    "token": (fuzz_token, json_values | mutated_tokens()),
    "token-text": (fuzz_token_text, st.binary(max_size=300) | mutated_tokens().map(lambda d: json.dumps(d).encode())),
    "header": (fuzz_header, headers),
    "cmdline": (fuzz_cmdline, cmdline_words),
    "cmdline-bytes": (fuzz_cmdline_bytes, st.binary(max_size=300) | cmdline_words.map(str.encode)),
    "crypttab": (fuzz_crypttab, st.binary(max_size=300) | st.text(max_size=300).map(str.encode)),
    "blob": (fuzz_blob, st.tuples(st.binary(max_size=600), st.binary(max_size=600))),
    "signature": (fuzz_signature, json_values | mutated_signatures()),
    "signature-bytes": (fuzz_signature_bytes, st.tuples(st.binary(max_size=600), st.binary(max_size=600))),
    "eventlog": (fuzz_eventlog, eventlogs),
    "other-token": (fuzz_other_token, other_tokens()),
    "jwk": (fuzz_jwk, jwks),
    "marker": (fuzz_marker, json_values | mutated_markers() | st.fixed_dictionaries(
        {"type": st.sampled_from(["pbkdf2", "argon2id", "argon2i"]), "time": json_values, "memory": json_values,
         "iterations": json_values})),
}


def run(name: str, examples: int) -> float:
    """Run one target on `examples` inputs; the seconds it took. A crash raises with its input."""
    function, strategy = TARGETS[name]
    test = settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck))(given(strategy)(function))
    started = time.monotonic()
    test()
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=100_000, help="inputs per target (default 100000)")
    parser.add_argument("targets", nargs="*", choices=[[], *TARGETS], default=[], metavar="TARGET",
                        help=f"any of {', '.join(TARGETS)} (default: all)")
    opts = parser.parse_args()
    sys.setrecursionlimit(1000)  # the interpreter's default, as at boot
    for name in opts.targets or list(TARGETS):
        seconds = run(name, opts.examples)
        print(f"{name}: {opts.examples} inputs, no crash ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
