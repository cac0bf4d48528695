"""unlocker.lean.record behaves as dataclasses.dataclass for what the boot path uses; the rest is refused."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from unlocker.lean.record import FrozenInstanceError, field, record

Decorator = Callable[..., object]
BOTH = pytest.mark.parametrize("make", [dataclasses.dataclass, record], ids=["dataclasses", "record"])


def point_class(make: Decorator, frozen: bool) -> type:
    @make(frozen=frozen)
    class Point:
        x: int
        y: int = 2
        tags: list[str] = (dataclasses.field if make is dataclasses.dataclass else field)(default_factory=list)
        note: str = (dataclasses.field if make is dataclasses.dataclass else field)(default="", compare=False)
    return Point


@BOTH
@pytest.mark.parametrize("frozen", [False, True])
def test_construction_repr_and_equality_match_dataclasses(make: Decorator, frozen: bool) -> None:
    reference = point_class(dataclasses.dataclass, frozen)
    ours = point_class(make, frozen)
    for args, kwargs in [((1,), {}), ((1, 5), {}), ((), {"x": 3, "note": "n"}), ((1,), {"tags": ["a"], "y": 0})]:
        expected, got = reference(*args, **kwargs), ours(*args, **kwargs)
        assert repr(got) == repr(expected)
        assert (got.x, got.y, got.tags, got.note) == (expected.x, expected.y, expected.tags, expected.note)
    assert ours(1) == ours(1, 2)
    assert ours(1) != ours(1, 3)
    assert ours(1, note="a") == ours(1, note="b")  # compare=False
    assert ours(1) != reference(1)  # another class: not equal
    assert ours(1).tags is not ours(1).tags  # default_factory called per instance
    assert ours.y == 2  # a default stays readable on the class, as dataclasses leaves it


@BOTH
def test_frozen_records_hash_and_refuse_assignment(make: Decorator) -> None:
    Point = point_class(make, frozen=True)
    p = Point(1, tags=())
    assert hash(p) == hash(Point(1, tags=(), note="other"))
    assert {p, Point(1, tags=())} == {p}
    with pytest.raises(AttributeError):
        p.x = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del p.x
    if make is record:
        with pytest.raises(FrozenInstanceError):
            p.y = 0  # type: ignore[misc]


@BOTH
def test_mutable_records_are_unhashable_and_assignable(make: Decorator) -> None:
    Point = point_class(make, frozen=False)
    p = Point(1)
    p.x = 7
    assert p == Point(7)
    with pytest.raises(TypeError):
        hash(p)


@BOTH
def test_post_init_runs_after_the_fields_are_set(make: Decorator) -> None:
    @make
    class Sized:
        text: str
        size: int = 0

        def __post_init__(self) -> None:
            self.size = len(self.text)

    assert Sized("abc").size == 3


@BOTH
def test_methods_the_class_defines_are_kept(make: Decorator) -> None:
    @make(frozen=True)
    class Named:
        name: str

        def __repr__(self) -> str:
            return f"<{self.name}>"

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Named) and self.name.lower() == other.name.lower()

    assert repr(Named("a")) == "<a>"
    assert Named("A") == Named("a")
    hash(Named("a"))  # frozen + eq: hashable, as dataclasses makes it


@BOTH
@pytest.mark.parametrize("args, kwargs", [((), {}), ((1, 2, [], "", 5), {}), ((1,), {"x": 2}), ((1,), {"z": 0})],
                         ids=["missing", "too-many", "twice", "unknown"])
def test_bad_arguments_raise_type_error(make: Decorator, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    Point = point_class(make, frozen=False)
    with pytest.raises(TypeError):
        Point(*args, **kwargs)


@BOTH
def test_bad_class_definitions_are_refused(make: Decorator) -> None:
    with pytest.raises(TypeError):
        @make
        class DefaultFirst:
            a: int = 0
            b: int
    with pytest.raises(ValueError):
        @make
        class MutableDefault:
            a: list[int] = []  # noqa: RUF012


def test_options_record_does_not_implement_are_refused() -> None:
    for options in ({"eq": False}, {"order": True}, {"slots": True}):
        with pytest.raises(TypeError):
            record(**options)  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        field(repr=False)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        field(default=1, default_factory=list)

    @record
    class Base:
        a: int
    with pytest.raises(TypeError):
        @record
        class Child(Base):
            b: int


REPO = Path(__file__).resolve().parents[2]


def test_at_run_time_record_is_our_decorator_and_dataclasses_is_not_imported() -> None:
    """The point of the module: the boot path gets `record` without importing `dataclasses` (and
    with it inspect, ast, dis, tokenize). A fresh interpreter, -S as in the frozen binary (the
    venv's .pth files import modules of their own), imports it and defines a record."""
    code = ("import sys\n"
            "from unlocker.lean.record import FrozenInstanceError, field, record\n"
            "@record(frozen=True)\n"
            "class Point:\n"
            "    x: int\n"
            "    y: int = field(default=0)\n"
            "print(record.__module__, field.__module__, FrozenInstanceError.__module__,\n"
            "      '__dataclass_fields__' in vars(Point), sorted({'dataclasses', 'inspect'} & set(sys.modules)))\n")
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["unlocker.lean.record"] * 3 + ["False", "[]"]


PROBE = """\
from unlocker.lean.record import FrozenInstanceError, field, record


@record(frozen=True)
class Point:
    x: int
    tags: list[str] = field(default_factory=list)


reveal_type(record)
reveal_type(FrozenInstanceError)
Point(x="not an int")
Point(1).x = 2
"""


def test_type_checkers_see_dataclasses_dataclass(tmp_path: Path) -> None:
    """mypy (pyproject's configuration) reads the TYPE_CHECKING branch: `record` is
    dataclasses.dataclass, so a record's fields, their types and frozen-ness are checked as a dataclass's."""
    pytest.importorskip("mypy", reason="mypy is not installed in this environment")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", str(tmp_path / "cache"),
                           "--no-error-summary", "--show-error-codes", "--hide-error-context", str(probe)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = done.stdout.splitlines()
    assert all(line.startswith(f"{probe}:") for line in lines), done.stdout + done.stderr  # nothing in record.py
    said = {int(number): text.strip() for number, text in (line[len(f"{probe}:"):].split(":", 1) for line in lines)}
    assert sorted(said) == [10, 11, 12, 13], done.stdout + done.stderr
    # dataclasses.dataclass's overloads, with the options record refuses at run time (slots, order...)
    assert said[10].startswith("note: Revealed type is") and "frozen: bool =" in said[10] and "slots: bool =" in said[10]
    assert said[11].startswith("note: Revealed type is") and said[11].endswith('-> dataclasses.FrozenInstanceError"')
    assert said[12] == 'error: Argument "x" to "Point" has incompatible type "str"; expected "int"  [arg-type]'
    assert said[13] == 'error: Property "x" defined in "Point" is read-only  [misc]'
