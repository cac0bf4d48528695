"""unlocker.lean.record behaves as dataclasses.dataclass for what the boot path uses; the rest is refused."""

from __future__ import annotations

import ast
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


# What type checkers accept on a record (they see a dataclass) and what fails at run time.
DATACLASSES_HELPERS = ("replace", "asdict", "astuple", "fields")
FIELD_KEYWORDS = ("default", "default_factory", "compare")
PACKAGE = REPO / "unlocker"


@pytest.mark.parametrize("helper", DATACLASSES_HELPERS)
def test_dataclasses_helpers_fail_on_a_record_at_run_time(helper: str) -> None:
    """Why record_misuse() exists: each of these passes mypy on a record and raises at run time."""
    Point = point_class(record, frozen=True)
    with pytest.raises(TypeError):
        getattr(dataclasses, helper)(Point(1))


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.rsplit(".", node.level - 1)[0]
    return f"{base}.{node.module}" if node.module else base


def record_misuse(package: Path) -> list[str]:
    """Uses of `record` that type checkers accept and that fail at run time, in every module of
    `package` (a directory named as the package). Three rules, each true of the code today:
    a module importing unlocker.lean.record imports nothing from dataclasses (so no dataclasses
    helper, and no dataclasses.field, meets a record there); record's `field` gets only the keywords
    it takes; elsewhere (commands/ use dataclasses for their own classes, and hold records: Token,
    PcrSelection), replace/asdict/astuple/fields are called only on a @dataclass class of the module
    or on `self` in one of its methods: what the scan cannot prove is no record, it refuses."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent)
        package_name = ".".join(rel.with_suffix("").parts[:-1])  # of x.py and of x/__init__.py alike
        problems += _module_misuse(ast.parse(path.read_text(), str(rel)), str(rel), package_name)
    return problems


def _module_misuse(tree: ast.Module, rel: str, package_name: str) -> list[str]:
    problems = []
    record_fields, helpers, dataclass_names = set(), set(), set()
    record_import = dataclasses_import = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "dataclasses":
                    dataclasses_import = dataclasses_import or node
                    local = alias.asname or "dataclasses"
                    helpers |= {f"{local}.{h}" for h in DATACLASSES_HELPERS}
                    dataclass_names.add(f"{local}.dataclass")
                elif alias.name == "unlocker.lean.record":
                    record_import = record_import or node
                    record_fields.add(f"{alias.asname}.field" if alias.asname else "unlocker.lean.record.field")
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, package_name)
            for alias in node.names:
                local = alias.asname or alias.name
                if source == "dataclasses":
                    dataclasses_import = dataclasses_import or node
                    if alias.name in DATACLASSES_HELPERS:
                        helpers.add(local)
                    elif alias.name == "dataclass":
                        dataclass_names.add(local)
                elif source == "unlocker.lean.record":
                    record_import = record_import or node
                    if alias.name == "field":
                        record_fields.add(local)
                elif source == "unlocker.lean" and alias.name == "record":
                    record_import = record_import or node
                    record_fields.add(f"{local}.field")
    if record_import is not None and dataclasses_import is not None:
        problems.append(f"{rel}:{dataclasses_import.lineno}: imports dataclasses beside unlocker.lean.record "
                        f"(line {record_import.lineno}): its helpers and field options fail on a record")

    def is_dataclass(node: ast.ClassDef) -> bool:
        return any(ast.unparse(d.func if isinstance(d, ast.Call) else d) in dataclass_names for d in node.decorator_list)

    local_dataclasses = {n.name for n in tree.body if isinstance(n, ast.ClassDef) and is_dataclass(n)}

    def visit(node: ast.AST, enclosing: ast.ClassDef | None) -> None:
        if isinstance(node, ast.Call):
            called = ast.unparse(node.func)
            if called in record_fields:
                bad = [ast.unparse(a) for a in node.args]
                bad += [f"{k.arg}=" if k.arg else f"**{ast.unparse(k.value)}" for k in node.keywords
                        if k.arg not in FIELD_KEYWORDS]
                if bad:
                    problems.append(f"{rel}:{node.lineno}: record's field() takes only "
                                    f"{', '.join(FIELD_KEYWORDS)} as keywords, not {', '.join(bad)}")
            if called in helpers:
                first = ast.unparse(node.args[0]) if node.args else ""
                on_self = first == "self" and enclosing is not None and is_dataclass(enclosing)
                if not on_self and first not in local_dataclasses:
                    problems.append(f"{rel}:{node.lineno}: {called}({first}, ...) on what may be a record: "
                                    "only on a @dataclass class of this module, or on self in its methods")
        for child in ast.iter_child_nodes(node):
            visit(child, node if isinstance(node, ast.ClassDef) else enclosing)

    visit(tree, None)
    return problems


def test_no_module_uses_dataclasses_helpers_or_field_options_on_records() -> None:
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") == \
        ["boot", "commands", "lean", "measure", "tpm"]  # the scan below reaches into every one of them
    assert record_misuse(PACKAGE) == []


PLANTED = {
    "both.py": """\
import dataclasses
from unlocker.lean.record import record


@record
class Point:
    x: int


moved = dataclasses.replace(Point(1), x=2)
""",
    "boot/options.py": """\
from unlocker.lean.record import field, record


@record
class Options:
    tries: int = field(default=3, repr=False)
    names: list[str] = field(default_factory=list, compare=False)
    late: int = field(0)
""",
    "lean/aliased.py": """\
from . import record as r
from .record import field as f

x = r.field(default=1, kw_only=True)
y = f(**{"default": 1})
""",
    "commands/bump.py": """\
from dataclasses import dataclass, replace
from dataclasses import asdict as as_dict

from unlocker.token import Token


@dataclass(frozen=True)
class Plan:
    token: Token

    def as_json(self) -> dict:
        return as_dict(self)


def bump(token: Token) -> Token:
    return replace(token, keyslot=token.keyslot + 1)
""",
    "commands/fine.py": """\
import dataclasses as dc
from dataclasses import asdict, dataclass, field


@dataclass
class Report:
    lines: list[str] = field(default_factory=list, repr=False)

    def to_json(self) -> dict:
        return asdict(self)


names = [f.name for f in dc.fields(Report)]
""",
}


def test_record_misuse_finds_each_planted_mistake(tmp_path: Path) -> None:
    """The scan, on a copy of the package's shape with one mistake of each kind planted (and
    dataclasses used the way commands/ use it, which must pass)."""
    package = tmp_path / "unlocker"
    for name, text in PLANTED.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    assert record_misuse(package) == [
        "unlocker/boot/options.py:6: record's field() takes only default, default_factory, compare as keywords, not repr=",
        "unlocker/boot/options.py:8: record's field() takes only default, default_factory, compare as keywords, not 0",
        "unlocker/both.py:1: imports dataclasses beside unlocker.lean.record (line 2): its helpers and field options "
        "fail on a record",
        "unlocker/both.py:10: dataclasses.replace(Point(1), ...) on what may be a record: only on a @dataclass class "
        "of this module, or on self in its methods",
        "unlocker/commands/bump.py:16: replace(token, ...) on what may be a record: only on a @dataclass class of this "
        "module, or on self in its methods",
        "unlocker/lean/aliased.py:4: record's field() takes only default, default_factory, compare as keywords, "
        "not kw_only=",
        "unlocker/lean/aliased.py:5: record's field() takes only default, default_factory, compare as keywords, "
        "not **{'default': 1}",
    ]
