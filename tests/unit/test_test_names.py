"""pytest imports every test file by its base name (rootdir mode, no __init__.py in tests/): two
files of one name in different folders stop the whole run at collection. Said here by name, in the
unit suite that every developer runs first."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def test_no_two_test_files_share_a_base_name() -> None:
    names = Counter(path.name for path in TESTS.rglob("*.py") if path.name != "conftest.py")
    twice = sorted(name for name, n in names.items() if n > 1)
    assert not twice, f"test files that share a base name (rename one): {twice}"
