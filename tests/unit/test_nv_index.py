"""One NV index parser with tpm2-tools' meaning, for `--store nv=INDEX` and `adopt --nv INDEX`."""

from __future__ import annotations

import pytest

from unlocker.errors import UsageError
from unlocker.store import StoreSpec
from unlocker.token import parse_nv_index


@pytest.mark.parametrize(("text", "index"), [
    ("0x1500016", 0x01500016), ("1500016", 0x01500016), ("0x01500016", 0x01500016),
    ("0x2000A", 0x0102000A), ("2000a", 0x0102000A), ("0x1ffffff", 0x01FFFFFF), ("0", 0x01000000),
])
def test_an_index_means_what_tpm2_tools_makes_of_it(text: str, index: int) -> None:
    assert parse_nv_index(text) == index
    assert StoreSpec.parse(f"nv={text}").nv_index == index


@pytest.mark.parametrize("text", ["", "0x", "zz", "0x2000g", "-1", "0x1500016 ", "0x123456789", "0x2000000", "1e3x"])
def test_what_is_no_owner_index_is_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_nv_index(text)
    with pytest.raises(UsageError):
        StoreSpec.parse(f"nv={text}")
