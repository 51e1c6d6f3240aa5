"""Frozen records: classes of typed, defaulted fields that cannot be changed after construction.

What `@dataclass(frozen=True, eq=False, repr=False)` gave config.py, without its cost on every
boot: `dataclasses` imports inspect, ast, dis, tokenize and re, and writes each class's __init__,
__setattr__ and __delattr__ as source that it compiles with exec(), i.e. it runs the whole
compiler per class (config.py's docstring has the figures).  Here `frozen` only collects the
fields once, in declaration order: each annotation of the class (with `from __future__ import
annotations` a string) and its class-level default, or the `field(default_factory=...)` that makes
it.  One generic __init__ serves every record; it takes the fields positionally or by keyword, as
a dataclass's does, then calls `__post_init__` if the class has one.  Assigning or deleting an
attribute raises `FrozenRecordError`.  Records compare by identity and have object's repr (no
__eq__ or __repr__ is made, as with eq=False, repr=False).

Type checkers see `frozen` as a dataclass transform (PEP 681), so `mypy --strict` checks the
names and types of every constructor call; at runtime `dataclass_transform` is a no-op, as is
everything under TYPE_CHECKING (`typing` is not imported on the boot path).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar, dataclass_transform

    _T = TypeVar("_T")
else:

    def dataclass_transform(**_kwargs):
        return lambda decorated: decorated


class FrozenRecordError(AttributeError):
    """An attribute of a frozen record was assigned or deleted (dataclasses' FrozenInstanceError
    is an AttributeError too)."""


_MISSING = object()  # no default: the field must be given


class Field:
    """One field of a record: its name, its annotation as written, and its default or the
    callable that makes one."""

    __slots__ = ("default", "default_factory", "name", "type")

    def __init__(self, name: str, type: str, default: object, default_factory: Callable[[], object] | None) -> None:
        self.name = name
        self.type = type
        self.default = default
        self.default_factory = default_factory


def field(*, default_factory: Callable[[], _T]) -> _T:
    """A field whose default is made per record (`field(default_factory=FetchConfig)`)."""
    return Field("", "", _MISSING, default_factory)  # type: ignore[return-value]  # what the class body sees


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def frozen(cls: type[_T]) -> type[_T]:
    """Make `cls` a frozen record (the class itself, changed in place, like @dataclass)."""
    own: dict[str, str] = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 (inspect is what we avoid)
    found = list(fields(cls)) if is_record(cls) else []  # a record's subclass extends its fields
    for name, annotation in own.items():
        default = cls.__dict__.get(name, _MISSING)
        if isinstance(default, Field):
            spec, default = default, _MISSING
            spec.name, spec.type = name, annotation
            delattr(cls, name)  # as dataclasses does: the class has no attribute for a factory field
        else:
            spec = Field(name, annotation, default, None)
        if isinstance(default, (list, dict, set)):
            raise ValueError(
                f"mutable default {type(default).__name__} for field {name}: use field(default_factory=...)"
            )
        if _required(spec) and found and not _required(found[-1]):
            raise TypeError(f"non-default argument {name!r} follows default argument")
        found.append(spec)
    members = {
        "__record_fields__": tuple(found),
        "__init__": _init,
        "__setattr__": _refuse_set,
        "__delattr__": _refuse_del,
    }
    for name, value in members.items():
        setattr(cls, name, value)
    return cls


@dataclass_transform(frozen_default=True, eq_default=True, field_specifiers=(field,))
def value(cls: type[_T]) -> type[_T]:
    """A frozen record that is a value: equal to a record of its class with equal fields, hashed
    by them, and shown with them (the eq=True of a frozen dataclass: GoalState, YAML scalars).
    The three methods are shared, like __init__: nothing is generated."""
    frozen(cls)
    members = {"__eq__": _eq, "__hash__": _hash, "__repr__": _repr}
    for name, method in members.items():
        setattr(cls, name, method)
    return cls


def _values(self: object) -> tuple[object, ...]:
    return tuple(getattr(self, spec.name) for spec in fields(self))


def _eq(self: object, other: object) -> object:  # bool, or NotImplemented for another class
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: object) -> int:
    return hash(_values(self))


def _repr(self: object) -> str:
    shown = ", ".join(f"{spec.name}={getattr(self, spec.name)!r}" for spec in fields(self))
    return f"{type(self).__name__}({shown})"


def _required(spec: Field) -> bool:
    return spec.default is _MISSING and spec.default_factory is None


def _init(self: Any, /, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    specs: tuple[Field, ...] = cls.__record_fields__
    if len(args) > len(specs):
        raise TypeError(f"{cls.__name__}() takes {len(specs)} positional arguments but {len(args)} were given")
    values = self.__dict__  # written directly: __setattr__ refuses
    for i, value in enumerate(args):
        values[specs[i].name] = value
    for spec in specs[len(args) :]:
        if spec.name in kwargs:
            values[spec.name] = kwargs.pop(spec.name)
        elif spec.default_factory is not None:
            values[spec.name] = spec.default_factory()
        elif spec.default is not _MISSING:
            values[spec.name] = spec.default
        else:
            raise TypeError(f"{cls.__name__}() missing required argument: {spec.name!r}")
    for name in kwargs:
        problem = "got multiple values for argument" if name in values else "got an unexpected keyword argument"
        raise TypeError(f"{cls.__name__}() {problem} {name!r}")
    post_init = getattr(cls, "__post_init__", None)
    if post_init is not None:
        post_init(self)


def _refuse_set(self: object, name: str, value: object) -> None:
    raise FrozenRecordError(f"cannot assign to field {name!r}")


def _refuse_del(self: object, name: str) -> None:
    raise FrozenRecordError(f"cannot delete field {name!r}")


def is_record(obj: object) -> bool:
    """True for a record class or instance (as dataclasses.is_dataclass)."""
    return hasattr(obj, "__record_fields__")


def fields(obj: object) -> tuple[Field, ...]:
    """The fields of a record class or instance, in declaration order."""
    specs: tuple[Field, ...] | None = getattr(obj, "__record_fields__", None)
    if specs is None:
        raise TypeError(f"not a record: {type(obj).__name__}")
    return specs


def replace(obj: _T, /, **changes: Any) -> _T:
    """A copy of record `obj` with `changes` applied, built (and checked) by its __init__."""
    for spec in fields(obj):
        if spec.name not in changes:
            changes[spec.name] = getattr(obj, spec.name)
    return type(obj)(**changes)


def asdict(obj: object) -> dict[str, Any]:
    """A record as a dict, nested records as dicts too.  Values are not copied: records hold
    immutable ones (numbers, strings, tuples)."""
    return {f.name: asdict(v) if is_record(v := getattr(obj, f.name)) else v for f in fields(obj)}
