"""`@record`: the part of `dataclasses` the boot path uses, without its start-up cost.

`dataclasses` imports `inspect` (and with it ast, dis, tokenize) and compiles every method it
generates with `exec`. For the boot path's classes that was a large part of an `unlock`'s start on
the host, and more in a boot under emulation, where the compiler's code runs for the first time
(docs/performance.md). `record` gives the same methods as closures over the field list.

Type checkers see `dataclasses.dataclass` itself (the TYPE_CHECKING branch), so fields, defaults and
frozen-ness are checked as for any dataclass. Supported: `@record`, `@record(frozen=True)`, defaults,
`field(default=..., default_factory=..., compare=...)`, `__post_init__`; anything else is refused
when the class is defined. Modules off the boot path use `dataclasses`.
"""

from __future__ import annotations

from unlocker import TYPE_CHECKING

if TYPE_CHECKING:
    from dataclasses import FrozenInstanceError, field
    from dataclasses import dataclass as record
else:
    class FrozenInstanceError(AttributeError):
        """Assignment to a field of a frozen record (as dataclasses.FrozenInstanceError)."""

    _MISSING = object()

    class Field:
        """A field's default (or factory) and whether __eq__/__hash__ compare it."""

        __slots__ = ("default", "default_factory", "compare")

        def __init__(self, default: object = _MISSING, default_factory: object = _MISSING, compare: bool = True) -> None:
            if default is not _MISSING and default_factory is not _MISSING:
                raise ValueError("cannot specify both default and default_factory")
            self.default, self.default_factory, self.compare = default, default_factory, compare

        def has_default(self) -> bool:
            return self.default is not _MISSING or self.default_factory is not _MISSING

        def value(self, name: str) -> object:
            if self.default_factory is not _MISSING:
                return self.default_factory()
            if self.default is _MISSING:
                raise TypeError(f"missing required argument: {name!r}")
            return self.default

    def field(*, default: object = _MISSING, default_factory: object = _MISSING, compare: bool = True) -> Field:
        return Field(default, default_factory, compare)

    def _fields(cls: type) -> dict[str, Field]:
        if any("__record_fields__" in vars(base) for base in cls.__mro__[1:]):
            raise TypeError(f"{cls.__name__}: a record cannot inherit from another record")
        fields: dict[str, Field] = {}
        for name, annotation in vars(cls).get("__annotations__", {}).items():
            if "ClassVar" in str(annotation) or "InitVar" in str(annotation):
                raise TypeError(f"{cls.__name__}.{name}: ClassVar/InitVar are not supported by record")
            value = vars(cls).get(name, _MISSING)
            spec = value if isinstance(value, Field) else Field(default=value)
            if spec.default.__class__.__hash__ is None:
                raise ValueError(f"{cls.__name__}.{name}: mutable default {type(spec.default).__name__}, use default_factory")
            if not spec.has_default() and any(f.has_default() for f in fields.values()):
                raise TypeError(f"{cls.__name__}.{name}: non-default argument follows default argument")
            if spec.default is _MISSING:
                if name in vars(cls):
                    delattr(cls, name)
            else:
                setattr(cls, name, spec.default)
            fields[name] = spec
        return fields

    def _init(fields: dict[str, Field]) -> object:
        names = tuple(fields)

        def __init__(self: object, *args: object, **kwargs: object) -> None:
            if len(args) > len(names):
                raise TypeError(f"{type(self).__name__}() takes {len(names)} arguments, {len(args)} given")
            for name in kwargs:
                if name not in fields:
                    raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}")
            for name, value in zip(names[: len(args)], args, strict=True):
                if name in kwargs:
                    raise TypeError(f"{type(self).__name__}() got multiple values for argument {name!r}")
                object.__setattr__(self, name, value)
            for name in names[len(args):]:
                object.__setattr__(self, name, kwargs[name] if name in kwargs else fields[name].value(name))
            post_init = getattr(self, "__post_init__", None)
            if post_init is not None:
                post_init()
        return __init__

    def _methods(cls: type, fields: dict[str, Field], frozen: bool) -> dict[str, object]:
        names = tuple(fields)
        compared = tuple(name for name, spec in fields.items() if spec.compare)

        def __repr__(self: object) -> str:
            return f"{type(self).__qualname__}(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in names) + ")"

        def __eq__(self: object, other: object) -> bool:
            if other.__class__ is not self.__class__:
                return NotImplemented
            return tuple(getattr(self, n) for n in compared) == tuple(getattr(other, n) for n in compared)

        def __hash__(self: object) -> int:
            return hash(tuple(getattr(self, n) for n in compared))

        def __setattr__(self: object, name: str, value: object) -> None:
            raise FrozenInstanceError(f"cannot assign to field {name!r}")

        def __delattr__(self: object, name: str) -> None:
            raise FrozenInstanceError(f"cannot delete field {name!r}")

        methods: dict[str, object] = {"__init__": _init(fields), "__repr__": __repr__, "__eq__": __eq__}
        # as dataclasses: eq without frozen makes instances unhashable, eq with frozen hashes the fields
        methods["__hash__"] = __hash__ if frozen else None
        if frozen:
            methods["__setattr__"], methods["__delattr__"] = __setattr__, __delattr__
        return methods

    def record(cls: type | None = None, /, *, frozen: bool = False) -> object:
        def wrap(cls: type) -> type:
            fields = _fields(cls)
            for name, method in _methods(cls, fields, frozen).items():
                if name not in vars(cls) or (name == "__hash__" and vars(cls)[name] is None):
                    setattr(cls, name, method)
            cls.__record_fields__ = fields
            return cls
        return wrap if cls is None else wrap(cls)
