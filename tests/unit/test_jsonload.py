"""unlocker.lean.jsonload.loads gives what json.loads gives: the same document, or a ValueError."""

from __future__ import annotations

import json
import math

import pytest

from unlocker.lean.jsonload import loads

DOCUMENTS = [
    '{"tokens": {"0": {"type": "tpm2-unlocker", "keyslots": ["1"]}}, "config": {"json_size": "12288"}}',
    '  \n\t[1, 2.5, -3e2, true, false, null, "\\u00e9\\n", {"a": []}]\r\n',
    '"just a string"', "0", "[]", "{}",
    '{"a": 1, "a": 2}',  # duplicate keys: the last wins, as in json
    '["\\ud83d\\ude00", "caf\u00e9"]',
]
BAD = ["", " ", "{", '{"a": 1,}', "[1] [2]", "{'a': 1}", '"\\x"', "tru", '{"a": 1} x', "\ufeff{}", "[1,]",
       '"control \x01 char"', "01"]


@pytest.mark.parametrize("text", DOCUMENTS)
def test_documents_parse_as_json_parses_them(text: str) -> None:
    assert loads(text) == json.loads(text)
    assert loads(text.encode()) == json.loads(text.encode())
    assert loads(bytearray(text.encode())) == json.loads(text.encode())


def test_constants_and_big_numbers_as_json() -> None:
    value = loads('[NaN, Infinity, -Infinity, 123456789012345678901234567890, 1.5e400]')
    assert math.isnan(value[0]) and value[1:3] == [math.inf, -math.inf]
    assert value[3] == 123456789012345678901234567890 and value[4] == math.inf


@pytest.mark.parametrize("text", BAD)
def test_what_json_refuses_raises_its_value_error(text: str) -> None:
    with pytest.raises(ValueError) as ours:
        loads(text)
    with pytest.raises(ValueError) as theirs:
        json.loads(text)
    assert str(ours.value) == str(theirs.value)


def test_bytes_that_are_not_utf8_raise_value_error() -> None:
    with pytest.raises(ValueError):
        loads(b'{"a": "\xff"}')


def test_other_encodings_json_detects_still_parse() -> None:
    assert loads('{"a": 1}'.encode("utf-16")) == {"a": 1}
    assert loads(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}  # UTF-8 with a BOM, as json.loads(bytes)


def test_a_real_luks2_header_parses_as_json(tmp_path: object) -> None:
    import subprocess

    image = f"{tmp_path}/disk.img"
    subprocess.run(["truncate", "-s", "20M", image], check=True)
    subprocess.run(["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", image, "-"], input=b"pass", check=True)
    text = subprocess.run(["cryptsetup", "luksDump", "--dump-json-metadata", image], capture_output=True,
                          check=True).stdout
    assert loads(text) == json.loads(text) and "keyslots" in loads(text)


@pytest.mark.parametrize("doc", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000])
def test_a_document_nested_too_deeply_is_a_value_error(doc: bytes) -> None:
    """A hostile LUKS header (an attacker's USB stick at boot) must be a malformed document, not a crash."""
    with pytest.raises(ValueError, match="nested too deeply"):
        loads(doc)
