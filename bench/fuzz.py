"""Fuzz the parsers that read what an attacker can write: `python -m bench.fuzz [--examples N] [TARGET ...]`.

Targets: the token parser (any JSON value, and mutations of a real token), the LUKS header reader
(bytes behind a LUKS2 magic, and the tokens of its JSON read as the boot reads them), the kernel
command line (as words, and as the raw bytes of /proc/cmdline) and crypttab parsers, and the
sealed-blob unmarshalling. Each input must give either a result or one of our typed errors
(UnlockerError): anything else escaping is a crash that would stop a boot, and fails the run with
the input that caused it. Driven by hypothesis; CI runs a
short pass of each (tests/unit/test_fuzz.py).
"""

from __future__ import annotations

import argparse
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
from unlocker.errors import UnlockerError
from unlocker.initrd import kernel_words
from unlocker.luks import LuksDevice
from unlocker.token import parse_token, parse_token_text
from unlocker.tpm.seal import SealedObject, sealed_auth_policy, validate_sealed

# A token as `enroll` writes it: the starting point of the mutations.
VALID_TOKEN: dict[str, Any] = {
    "type": "tpm2-unlocker", "keyslots": ["1"], "version": 1, "store": "token", "pcr_bank": "sha256",
    "pcrs": [0, 7], "pcr_values": {"0": "00" * 32, "7": "11" * 32}, "policy_hash": "22" * 32,
    "srk_name": "000b" + "33" * 32, "pin": False, "keyslot_owned": True,
    "tpm2_public": "AAEACwAA", "tpm2_private": "AAIAAAA=",
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)


@st.composite
def mutated_tokens(draw: st.DrawFn) -> dict[str, Any]:
    """A real token with some fields replaced, removed or added: reaches the checks deep inside."""
    token = dict(VALID_TOKEN)
    for key in draw(st.lists(st.sampled_from(sorted(VALID_TOKEN) + ["nv_index", "blob_dir", "extra"]), max_size=4)):
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


def fuzz_blob(parts: tuple[bytes, bytes]) -> None:
    sealed = SealedObject(*parts)
    _typed(lambda: validate_sealed(sealed))
    _typed(lambda: sealed_auth_policy(sealed))


TARGETS: dict[str, tuple[Callable[[Any], None], st.SearchStrategy[Any]]] = {
    "token": (fuzz_token, json_values | mutated_tokens()),
    "token-text": (fuzz_token_text, st.binary(max_size=300) | mutated_tokens().map(lambda d: json.dumps(d).encode())),
    "header": (fuzz_header, headers),
    "cmdline": (fuzz_cmdline, cmdline_words),
    "cmdline-bytes": (fuzz_cmdline_bytes, st.binary(max_size=300) | cmdline_words.map(str.encode)),
    "crypttab": (fuzz_crypttab, st.binary(max_size=300) | st.text(max_size=300).map(str.encode)),
    "blob": (fuzz_blob, st.tuples(st.binary(max_size=600), st.binary(max_size=600))),
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
