"""The row format. Never pickle: a cached row is the mapped class's column values,
msgpack-encoded with an exact round-trip for every common column type, inside a value that carries
a format version and a hash of the mapper's columns and types. Anything else found in the store is
a miss that the fill overwrites, never an exception to the caller."""

from __future__ import annotations

import datetime as dt
import decimal
import math
import pickle
import uuid
import zoneinfo
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    inspect,
)
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache, codec
from sa_cache.store import Write

from .counting import expect_commands, expect_sql
from .entries import wire_fields
from .models import Color, Everything, User

COLUMNS = [prop.key for prop in inspect(Everything).column_attrs]

AWKWARD: dict[str, Any] = {
    "id": 1,
    "i": 2**63 - 1,
    "s": "Zoë ✓ 日本 😀 :{}%@\t",
    "b": False,
    "f": -0.1,
    "d": decimal.Decimal("1.5E+3"),
    "dt_naive": dt.datetime(1999, 12, 31, 23, 59, 59, 999999),
    "dt_aware": dt.datetime(
        2024, 3, 31, 2, 30, 0, 123456, tzinfo=zoneinfo.ZoneInfo("Asia/Kolkata")
    ),
    "day": dt.date(2024, 2, 29),
    "t": dt.time(0, 0, 0, 1),
    "td": dt.timedelta(days=-3, seconds=5, microseconds=7),
    "u": uuid.UUID("00000000-0000-4000-8000-0000000000ff"),
    "color": Color.green,
    "raw": b"",
    "doc": {"a": [1, -2, {"b": None, "c": [True, False]}], "big": 2**70, "f": 1.5, "é": "ü"},
}
#: Redis commands of a miss: MGET of generation and row; SET NX of the lease with an MGET re-read;
#: then one pipeline of the compare-and-set fill (over what the miss saw) and the lease's release,
#: a compare-and-delete on its owner token (both EVALSHA).
MISS_THEN_FILL = Counter({"MGET": 2, "SET": 1, "EVALSHA": 2})
#: At MariaDB's default REPEATABLE READ the load begins a snapshot: the lease's round trip also
#: reads Redis's TIME, a lower bound on its start for the transaction's later fills.
SNAPSHOT_BOUND = {"mariadb": Counter({"TIME": 1})}

EMPTY: dict[str, Any] = {"id": 2} | {name: None for name in COLUMNS if name != "id"}


def same(a: Any, b: Any) -> bool:
    """Equal, of the same type, and for the types where equality forgives: the same exponent,
    the same tzinfo, the same sign of zero."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, decimal.Decimal):
        return a.as_tuple() == b.as_tuple()
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b) or (a != a and b != b)
    if isinstance(a, dt.datetime | dt.time):
        return bool(a == b and a.tzinfo == b.tzinfo and a.fold == b.fold and repr(a) == repr(b))
    return bool(a == b)


def values_of(instance: Any) -> dict[str, Any]:
    return {name: getattr(instance, name) for name in COLUMNS}


def row_key(cache: IdentityCache, pk: int) -> str:
    return cache.model_for(inspect(Everything)).keys.row_key((pk,))  # type: ignore[union-attr]


def stored(cache: IdentityCache, pk: int) -> bytes | None:
    return cache.store.get_many([row_key(cache, pk)])[0]


def put(cache: IdentityCache, backend: str, key: str, value: bytes) -> None:
    """Write raw bytes straight into the store, as another process (or an attacker) would."""
    if backend == "redis":
        cache.store.client.set(key, value)  # type: ignore[attr-defined]
    else:
        cache.store.write_many([Write(key, value, None)])


@pytest.fixture
def rows(Session: sessionmaker[CachingSession]) -> None:
    with Session() as s:
        s.add(Everything(**AWKWARD))
        s.add(Everything(**EMPTY))
        s.commit()


@pytest.mark.usefixtures("rows")
@pytest.mark.parametrize("pk", [1, 2], ids=["awkward", "all_null"])
def test_a_hit_gives_exactly_the_values_and_types_the_database_load_gave(
    Session, sql, db, cache, redis_counter, pk
):
    # the model's first read also creates its generation (one more SET NX)
    first_read = MISS_THEN_FILL + Counter({"SET": 1}) + SNAPSHOT_BOUND.get(db, Counter())
    with expect_sql(sql, selects=1), expect_commands(redis_counter, first_read), Session() as s:
        loaded = values_of(s.get(Everything, pk))
    assert cache.stats()["models"]["Everything"]["fills"] == 1
    with expect_commands(redis_counter, {"MGET": 1}), Session() as s:
        with expect_sql(sql, 0):
            hit = s.get(Everything, pk)
        cached = values_of(hit)
    assert cache.stats()["models"]["Everything"]["hits"] == 1
    for name in COLUMNS:
        assert same(cached[name], loaded[name]), (name, cached[name], loaded[name])
    if pk == 2:
        assert all(cached[name] is None for name in COLUMNS if name != "id")
    else:
        assert cached["i"] == 2**63 - 1 and cached["raw"] == b"" and cached["s"] == AWKWARD["s"]
        assert cached["doc"] == AWKWARD["doc"] and cached["color"] is Color.green
        assert cached["u"] == AWKWARD["u"]
        assert cached["d"] == decimal.Decimal(1500)


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2024, 10, 27, 2, 30, tzinfo=zoneinfo.ZoneInfo("Europe/Oslo")),
        dt.datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=zoneinfo.ZoneInfo("Europe/Oslo")),
        dt.datetime(2024, 1, 1, 12, 0, 0, 1, tzinfo=dt.timezone.utc),
        dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=-3, minutes=-30))),
        dt.datetime(1, 1, 1),
        dt.time(23, 59, 59, 999999, tzinfo=zoneinfo.ZoneInfo("America/New_York")),
        dt.time(12, 0, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=45))),
        dt.date(1, 1, 1),
        dt.timedelta(days=-1, microseconds=1),
        dt.timedelta(days=999999999, seconds=86399, microseconds=999999),
        decimal.Decimal("1.50E+3"),
        decimal.Decimal("-0.000"),
        decimal.Decimal("NaN"),
        decimal.Decimal("-Infinity"),
        decimal.Decimal("12345678901234567890.123456789012345678901234567890"),
        -(2**63),
        2**64 - 1,
        2**64,
        -(2**200),
        -0.0,
        float("inf"),
        5e-324,
        "",
        "\U0001f600\x00",
        b"\x80\x04\x95",
        uuid.UUID(int=0),
        uuid.UUID(int=2**128 - 1),
        True,
        None,
        [{"nested": [[], {}, {"x": 2**65}]}],
    ],
    ids=repr,
)
def test_every_common_type_round_trips_exactly_through_the_codec(value):
    (back,) = codec.decode(codec.encode(codec.RowEntry(b"h" * 8, b"g" * 8, None, [value]))).values
    assert same(back, value), (back, value)
    if isinstance(value, dt.datetime | dt.time) and isinstance(value.tzinfo, zoneinfo.ZoneInfo):
        assert back.tzinfo is value.tzinfo  # the zone keeps its key, not just its offset


def test_a_value_msgpack_cannot_carry_is_refused_not_pickled():
    for value in (object(), {1, 2}, Color.red, dt.timezone.utc):
        with pytest.raises(TypeError):
            codec.encode(codec.RowEntry(b"h" * 8, b"g" * 8, None, [value]))


def test_an_enum_is_stored_by_name_and_restored_through_its_column(cache):
    shape = cache.model_for(inspect(Everything)).shape(inspect(Everything))
    row = dict.fromkeys(shape.attrs) | {"id": 1, "color": Color.green}
    values = shape.dehydrate(row)
    assert values[shape.attrs.index("color")] == "green"
    assert shape.hydrate(values)["color"] is Color.green


@pytest.mark.usefixtures("rows")
def test_the_stored_value_is_msgpack_of_column_values_not_pickle(Session, cache):
    with Session() as s:
        instance = s.get(Everything, 1)
        state_dict = dict(inspect(instance).dict)
        pickled = pickle.dumps({k: v for k, v in vars(instance).items() if not k.startswith("_sa")})
    raw = stored(cache, 1)
    assert raw is not None
    assert not raw.startswith(b"\x80")  # every pickle protocol >= 2 starts with PROTO
    with pytest.raises(Exception):  # noqa: B017 - any error: it is not a pickle
        pickle.loads(raw)
    assert b"tests.models" not in raw and b"Everything" not in raw and b"builtins" not in raw
    entry = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    shape = cache.model_for(inspect(Everything)).shape(inspect(Everything))
    assert entry[:3] == [codec.FORMAT_VERSION, codec.ROW, shape.schema_hash]
    assert entry[4] is None  # Everything has no polymorphic identity
    assert len(entry[5]) == len(shape.attrs) == len(COLUMNS)
    assert entry[5][shape.attrs.index("s")] == state_dict["s"]
    assert entry[5][shape.attrs.index("color")] == "green"
    assert len(raw) < 0.6 * len(pickled), (len(raw), len(pickled))
    assert len(raw) < 0.4 * len(pickle.dumps(instance))


def test_a_cached_user_is_a_fraction_of_its_pickle(Session, cache):
    with Session() as s:
        s.add(User(id=1, name="alice", email="alice@example.com", bio="long " * 20))
        s.commit()
    with Session() as s:
        user = s.get(User, 1)
        pickled = pickle.dumps({k: v for k, v in vars(user).items() if not k.startswith("_sa")})
        pickled_instance = pickle.dumps(user)
    raw = cache.store.get_many([f"{cache.prefix}:{{users:1}}"])[0]
    assert raw is not None
    assert b"long" not in raw  # the deferred column is not cached
    assert len(raw) * 2 < len(pickled)  # measured: 52 bytes against 133
    assert len(raw) * 6 < len(pickled_instance)  # and against 425


def test_the_schema_hash_covers_class_column_names_types_and_nullability():
    def shape_hash(
        name: str = "n", type_: Any = None, nullable: bool = True, cls: str = "m.C"
    ) -> bytes:
        table = Table(
            "t",
            MetaData(),
            Column("id", Integer, primary_key=True),
            Column(name, String(50) if type_ is None else type_, nullable=nullable),
        )
        return codec.schema_hash(cls, [(c.key, c) for c in table.columns])

    base = shape_hash()
    assert shape_hash() == base and len(base) == 8
    assert shape_hash(name="m") != base
    assert shape_hash(type_=String(60)) != base
    assert shape_hash(type_=Numeric(20, 6)) != shape_hash(type_=Numeric(20, 5))
    assert shape_hash(type_=DateTime()) != shape_hash(type_=DateTime(timezone=True))
    assert shape_hash(nullable=False) != base
    assert shape_hash(cls="m.D") != base


# -- what the store may hold instead: each is a miss, rejected, and overwritten by the fill -----




def _garbage(raw: bytes, other: bytes) -> bytes:
    return b"this is not msgpack \xc1\xff"


def _truncated(raw: bytes, other: bytes) -> bytes:
    return raw[: len(raw) // 2]


def _other_version(raw: bytes, other: bytes) -> bytes:
    entry = wire_fields(raw)
    entry[0] = codec.FORMAT_VERSION + 1
    return codec.pack(entry)


def _other_schema(raw: bytes, other: bytes) -> bytes:
    entry = wire_fields(raw)
    entry[2] = b"\x00" * 8
    return codec.pack(entry)


def _other_primary_key(raw: bytes, other: bytes) -> bytes:
    return other  # row 2's genuine entry, found under row 1's key


def _unknown_class_tag(raw: bytes, other: bytes) -> bytes:
    entry = wire_fields(raw)
    entry[4] = "no-such-class"
    return codec.pack(entry)


def _unhashable_class_tag(raw: bytes, other: bytes) -> bytes:
    entry = wire_fields(raw)
    entry[4] = ["not", "hashable"]
    return codec.pack(entry)


def _missing_column(raw: bytes, other: bytes) -> bytes:
    entry = wire_fields(raw)
    entry[5] = entry[5][:-1]
    return codec.pack(entry)


def _unknown_enum_member(raw: bytes, other: bytes) -> bytes:
    entry = wire_fields(raw)
    entry[5][COLUMNS.index("color")] = "purple"
    return codec.pack(entry)


def _values_not_a_list(raw: bytes, other: bytes) -> bytes:
    entry = wire_fields(raw)
    entry[5] = {"id": 1}
    return codec.pack(entry)


CORRUPTIONS: list[Callable[[bytes, bytes], bytes]] = [
    _garbage,
    _truncated,
    _other_version,
    _other_schema,
    _other_primary_key,
    _unknown_class_tag,
    _unhashable_class_tag,
    _missing_column,
    _unknown_enum_member,
    _values_not_a_list,
]


@pytest.mark.usefixtures("rows")
@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_a_value_that_is_not_a_valid_row_is_a_rejected_miss_and_is_overwritten(
    Session, sql, db, cache, backend, redis_counter, corrupt
):
    with Session() as s:
        expected = values_of(s.get(Everything, 1))
    with Session() as s:  # a session of its own: a REPEATABLE READ snapshot fills once
        s.get(Everything, 2)
    good, other = stored(cache, 1), stored(cache, 2)
    assert good is not None and other is not None
    assert wire_fields(good)[1] == wire_fields(other)[1] == codec.ROW
    bad = corrupt(good, other)
    assert bad != good
    put(cache, backend, row_key(cache, 1), bad)
    before = cache.stats()["models"]["Everything"]

    # the compare-and-set replaces `bad`
    with (
        expect_sql(sql, selects=1),
        expect_commands(redis_counter, MISS_THEN_FILL + SNAPSHOT_BOUND.get(db, Counter())),
        Session() as s,
    ):
        instance = s.get(Everything, 1)  # never an exception
        assert instance is not None
        assert all(same(getattr(instance, n), expected[n]) for n in COLUMNS)
    after = cache.stats()["models"]["Everything"]
    assert after["rejected"] == before["rejected"] + 1
    assert after["misses"] == before["misses"] + 1
    assert after["fills"] == before["fills"] + 1
    assert wire_fields(stored(cache, 1) or b"")[1] == codec.ROW

    with expect_sql(sql, 0), Session() as s:
        hit = s.get(Everything, 1)
        assert all(same(getattr(hit, n), expected[n]) for n in COLUMNS)
    assert cache.stats()["models"]["Everything"]["hits"] == after["hits"] + 1


@pytest.mark.usefixtures("rows")
def test_an_entry_of_another_deploy_is_a_miss_and_both_deploys_share_the_key(
    Session, cache, backend, sql
):
    """A process with another column layout reads the same key, rejects it and overwrites it;
    each deploy's entry is a miss for the other, never a wrong row."""
    with Session() as s:
        s.get(Everything, 1)
    ours = stored(cache, 1)
    assert ours is not None
    entry = wire_fields(ours)
    entry[2] = codec.schema_hash("old.Everything", [])
    entry[5] = entry[5][:3]
    put(cache, backend, row_key(cache, 1), codec.pack(entry))
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(Everything, 1).s == AWKWARD["s"]
    assert wire_fields(stored(cache, 1) or b"")[2] == entry_hash(cache)


def entry_hash(cache: IdentityCache) -> bytes:
    return cache.model_for(inspect(Everything)).shape(inspect(Everything)).schema_hash  # type: ignore[union-attr]
