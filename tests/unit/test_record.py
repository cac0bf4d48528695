"""unlocker.lean.record behaves as dataclasses.dataclass for what the boot path uses; the rest is refused."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from unlocker.lean import record as record_module
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


def test_record_is_not_dataclasses_at_run_time() -> None:
    """The point of the module: at run time nothing of it comes from `dataclasses`."""
    assert record is not dataclasses.dataclass
    assert record_module.FrozenInstanceError is not dataclasses.FrozenInstanceError
    assert issubclass(FrozenInstanceError, AttributeError)
