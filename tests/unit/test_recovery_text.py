"""The recovery key's text: modhex, eight groups of eight; typed another way, found again."""

from __future__ import annotations

import pytest

from unlocker import recovery
from unlocker.secret import Secret


def test_a_recovery_key_is_64_modhex_characters_in_eight_groups() -> None:
    keys = {bytes(recovery.generate().data) for _ in range(20)}
    assert len(keys) == 20
    for key in keys:
        groups = key.decode().split("-")
        assert len(groups) == 8 and all(len(g) == 8 and not g.strip(recovery.MODHEX) for g in groups)


@pytest.mark.parametrize("typed", [
    lambda k: k.replace("-", ""), lambda k: k.replace("-", " "), lambda k: k.upper(), lambda k: " " + k + " ",
])
def test_a_recovery_key_typed_another_way_is_found_again(typed) -> None:  # type: ignore[no-untyped-def]
    key = recovery.generate()
    again = recovery.normalize(Secret(bytearray(typed(key.data.decode()).encode())))
    assert again is not None and again.data == key.data


@pytest.mark.parametrize("typed", [b"my passphrase", b"c" * 63, b"c" * 65, b"a" * 64, b""])
def test_what_is_no_recovery_key_is_left_alone(typed: bytes) -> None:
    assert recovery.normalize(Secret(bytearray(typed))) is None
