"""A short pass of every fuzz target (`python -m bench.fuzz` runs the long one): only our typed errors escape."""

from __future__ import annotations

import pytest

from bench import fuzz


@pytest.mark.parametrize("target", sorted(fuzz.TARGETS))
def test_fuzz_target_short_pass(target: str) -> None:
    fuzz.run(target, examples=400)


def test_the_harness_catches_a_crash() -> None:
    """A target whose parser raises anything but our typed errors fails the run."""
    def crashes(data: bytes) -> None:
        fuzz._typed(lambda: (_ for _ in ()).throw(ValueError("not ours")))

    fuzz.TARGETS["planted"] = (crashes, fuzz.st.binary(max_size=4))
    try:
        with pytest.raises(ValueError, match="not ours"):
            fuzz.run("planted", examples=5)
    finally:
        del fuzz.TARGETS["planted"]
