"""guest_agent.record: frozen records built without generated source."""

from __future__ import annotations

import pytest

from guest_agent import record
from guest_agent.record import field, frozen


@frozen
class Inner:
    n: int = 1


@frozen
class Point:
    x: int
    y: int = 2
    tags: tuple[str, ...] = ("a",)
    inner: Inner = field(default_factory=Inner)


def test_positional_keyword_and_default_construction() -> None:
    p = Point(1)
    assert (p.x, p.y, p.tags, p.inner.n) == (1, 2, ("a",), 1)
    q = Point(1, 5, inner=Inner(7))
    assert (q.x, q.y, q.inner.n) == (1, 5, 7)
    assert Point(x=3, y=4).y == 4


def test_a_factory_makes_one_default_per_record() -> None:
    assert Point(1).inner is not Point(1).inner
    assert "inner" not in vars(Point)  # as with dataclasses: no class attribute for a factory field


def test_fields_cannot_be_assigned_or_deleted() -> None:
    p = Point(1)
    with pytest.raises(record.FrozenRecordError, match="cannot assign to field 'x'"):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):  # as dataclasses' FrozenInstanceError
        del p.y  # type: ignore[misc]
    with pytest.raises(AttributeError):
        p.other = 1  # type: ignore[attr-defined]
    assert p.x == 1


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, r"Point\(\) missing required argument: 'x'"),
        ((1, 2, (), Inner(), 5), {}, r"Point\(\) takes 4 positional arguments but 5 were given"),
        ((1,), {"z": 3}, r"Point\(\) got an unexpected keyword argument 'z'"),
        ((1,), {"x": 3}, r"Point\(\) got multiple values for argument 'x'"),
    ],
)
def test_wrong_calls_fail_as_a_dataclass_constructor_does(
    args: tuple[object, ...], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        Point(*args, **kwargs)


def test_post_init_runs_after_the_fields_are_set() -> None:
    @frozen
    class Checked:
        low: int = 0
        high: int = 1

        def __post_init__(self) -> None:
            if self.high < self.low:
                raise ValueError("high < low")

    assert Checked(1, 2).high == 2
    with pytest.raises(ValueError, match="high < low"):
        Checked(3)


def test_fields_replace_and_asdict() -> None:
    p = Point(1, inner=Inner(4))
    assert [(f.name, f.type) for f in record.fields(Point)] == [
        ("x", "int"),
        ("y", "int"),
        ("tags", "tuple[str, ...]"),
        ("inner", "Inner"),
    ]
    q = record.replace(p, y=9)
    assert (q.x, q.y, q.inner) == (1, 9, p.inner) and p.y == 2
    assert record.asdict(q) == {"x": 1, "y": 9, "tags": ("a",), "inner": {"n": 4}}
    assert record.is_record(p) and record.is_record(Point) and not record.is_record(object())
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        record.replace(p, z=1)
    with pytest.raises(TypeError, match="not a record"):
        record.fields(object())


def test_records_compare_by_identity_and_keep_objects_repr() -> None:
    p = Point(1)
    assert p == p and p != Point(1)  # eq=False
    assert repr(p).startswith("<tests.test_record.Point object at ")
    assert hash(p) == object.__hash__(p)


def test_class_definition_errors() -> None:
    with pytest.raises(TypeError, match="non-default argument 'b' follows default argument"):

        @frozen
        class Bad:
            a: int = 1
            b: int

    with pytest.raises(ValueError, match="mutable default list for field a"):

        @frozen
        class Mutable:
            a: list[int] = []  # noqa: RUF012


def test_a_subclass_extends_the_fields() -> None:
    @frozen
    class Point3(Point):
        z: int = 0

    assert [f.name for f in record.fields(Point3)] == ["x", "y", "tags", "inner", "z"]
    assert Point3(1, z=5).z == 5


@record.value
class Pair:
    a: int
    b: str = "x"


def test_value_records_compare_hash_and_show_by_their_fields() -> None:
    """record.value: the eq=True of a frozen dataclass, with shared methods (GoalState, safeyaml.Scalar)."""
    assert Pair(1) == Pair(1, "x") and Pair(1) != Pair(2) and Pair(1) != Pair(1, "y")
    assert hash(Pair(1)) == hash(Pair(1, "x")) and len({Pair(1), Pair(1), Pair(2)}) == 2
    assert repr(Pair(1)) == "Pair(a=1, b='x')"
    assert Pair(1) != (1, "x") and Pair(1).__eq__((1, "x")) is NotImplemented
    with pytest.raises(record.FrozenRecordError):
        Pair(1).a = 2  # type: ignore[misc]


def test_the_boot_paths_records_are_frozen() -> None:
    """The records that were NamedTuples before the import diet stay immutable."""
    from guest_agent import clouds, files, initdata, network, providers, safeyaml, transport, userdata
    from guest_agent.azure import health, wire
    from guest_agent.clouds import tokenflow

    classes = (
        health.ReportResult, wire.GoalState, clouds.Facts, files.FileSpec, initdata.Initdata, network.RouteInfo,
        providers.Provider, safeyaml.Scalar, transport.Backoff, userdata.Plan, userdata.Parsed, tokenflow.Flavour,
    )  # fmt: skip
    assert [c.__name__ for c in classes if not record.is_record(c)] == []
    route = network.RouteInfo("169.254.169.254", 2, None, "10.0.0.5", 254, waited=False)
    with pytest.raises(record.FrozenRecordError):
        route.ifindex = 3  # type: ignore[misc]
