"""Issue 6, point 4: poisoned or foreign entries. Whatever another process, another deploy or an
attacker wrote under a row's key (garbage, truncated msgpack, another format version or schema, a
payload for another key or model, decompression-bomb shapes, megabytes) is a miss that is
counted as ``rejected``, overwritten by the fill, and never raises: through ``get`` and through
``get_many``, on both backends. A hypothesis fuzz of :func:`sa_cache.codec.decode` and
:meth:`IdentityCache.classify` checks that no byte string that is not a valid row of the right
schema and key is ever a hit.

tests/test_format.py covers the single-corruption cases on the Everything model; here the angle is
reliability: the counters, the batch path, hostile sizes and shapes, and the fuzz.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import inspect
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache, codec
from sa_cache.kinds import ABSENT, Hit
from sa_cache.protocol import classify
from sa_cache.rows import CachedModel, RowShape
from sa_cache.store import Write

from .counting import expect_sql
from .entries import wire_fields
from .models import CACHED, Everything, User

on_sqlite = pytest.mark.parametrize("db", ["sqlite"])  # the store is what is under test


def user_model(cache: IdentityCache) -> CachedModel:
    model = cache.model_for(inspect(User))
    assert model is not None
    return model


def user_shape(cache: IdentityCache) -> RowShape:
    return user_model(cache).shape(inspect(User))


def key_of(cache: IdentityCache, pk: int) -> str:
    return user_model(cache).keys.row_key((pk,))


def raw_at(cache: IdentityCache, pk: int) -> bytes | None:
    return cache.store.get_many([key_of(cache, pk)])[0]


def put(cache: IdentityCache, pk: int, value: bytes) -> None:
    """Write raw bytes straight into the store, as another process (or an attacker) would."""
    cache.store.write_many([Write(key_of(cache, pk), value, None)])


def generation(cache: IdentityCache) -> bytes:
    model = user_model(cache)
    gen = cache.store.get_many([model.keys.generation_key])[0]
    assert gen is not None
    return gen


# -- the poisons: (cache, genuine entry of user 1, genuine entry of user 2) -> bytes -------------

Poison = Callable[[IdentityCache, bytes, bytes], bytes]


def with_field(index: int, value: Any) -> Poison:
    def poison(cache: IdentityCache, good: bytes, other: bytes) -> bytes:
        fields = wire_fields(good)
        fields[index] = value
        return msgpack.packb(fields, use_bin_type=True)

    return poison


def another_model(cache: IdentityCache, good: bytes, other: bytes) -> bytes:
    """A genuine-looking Everything row (its schema hash, its width) under a User key."""
    shape = cache.model_for(inspect(Everything)).shape(inspect(Everything))  # type: ignore[union-attr]
    values = [1] + [None] * (len(shape.attrs) - 1)
    return codec.encode(codec.RowEntry(shape.schema_hash, generation(cache), None, values))


def bad_extension(text: bytes) -> Poison:
    """A row whose name column is an extension value that does not decode."""

    def poison(cache: IdentityCache, good: bytes, other: bytes) -> bytes:
        fields = wire_fields(good)
        fields[5][user_shape(cache).attrs.index("name")] = msgpack.ExtType(1, text)
        return msgpack.packb(fields, use_bin_type=True)

    return poison


FIVE_MB = 5 << 20

POISONS: dict[str, Poison] = {
    "garbage": lambda c, g, o: b"\xc1 not msgpack \xff\x00",
    "empty": lambda c, g, o: b"",
    "nil": lambda c, g, o: msgpack.packb(None),
    "a_map": lambda c, g, o: msgpack.packb({"id": 1, "name": "evil"}),
    "truncated_by_one": lambda c, g, o: g[:-1],
    "truncated_half": lambda c, g, o: g[: len(g) // 2],
    "trailing_bytes": lambda c, g, o: g + b"\x00",
    "other_format_version": with_field(0, codec.FORMAT_VERSION + 1),
    "version_as_text": with_field(0, "1"),
    "unknown_kind": with_field(1, 7),
    "other_schema": with_field(2, b"\x00" * 8),
    "schema_as_int": with_field(2, 0),
    "generation_as_text": with_field(3, "gen"),
    "version_as_true": with_field(0, True),
    "kind_as_false": with_field(1, False),
    "primary_key_as_true": lambda c, g, o: with_field(5, [True, *wire_fields(g)[5][1:]])(c, g, o),
    "primary_key_as_float": lambda c, g, o: with_field(5, [1.0, *wire_fields(g)[5][1:]])(c, g, o),
    "values_too_long": lambda c, g, o: with_field(5, [*wire_fields(g)[5], 1])(c, g, o),
    "values_as_map": with_field(5, {"id": 1}),
    "other_primary_key": lambda c, g, o: o,  # user 2's genuine entry under user 1's key
    "another_model": another_model,
    "short_tombstone": lambda c, g, o: msgpack.packb([codec.FORMAT_VERSION, codec.TOMBSTONE]),
    "absent_marker_too_long": lambda c, g, o: msgpack.packb(
        [codec.FORMAT_VERSION, codec.ABSENT, generation(c), "x"], use_bin_type=True
    ),
    "bad_datetime_extension": bad_extension(b"not a date"),
    "zoneinfo_path_traversal": bad_extension(b"2024-01-01T00:00:00|../../../../etc/passwd"),
    "unknown_extension": lambda c, g, o: msgpack.packb(
        [codec.FORMAT_VERSION, codec.ROW, msgpack.ExtType(99, b"x")]
    ),
    "nesting_bomb": lambda c, g, o: b"\x91" * 100_000 + b"\xc0",
    "array_length_bomb": lambda c, g, o: b"\xdd\xff\xff\xff\xff",
    "five_mb_garbage": lambda c, g, o: b"\xc1" * FIVE_MB,
    "five_mb_of_nils": lambda c, g, o: b"\xc0" * FIVE_MB,
    "five_mb_row_of_wrong_width": lambda c, g, o: with_field(5, ["x" * FIVE_MB])(c, g, o),
}


@pytest.fixture
def users(Session: sessionmaker[CachingSession]) -> None:
    with Session() as s:
        s.add_all([User(id=pk, name=f"user{pk}", version=pk) for pk in (1, 2, 3)])
        s.commit()


def cache_users(Session: sessionmaker[CachingSession], cache: IdentityCache) -> tuple[bytes, bytes]:
    for pk in (1, 2):
        with Session() as s:  # a session each: a snapshot transaction fills only its first read
            s.get(User, pk)
    good, other = raw_at(cache, 1), raw_at(cache, 2)
    assert good is not None and other is not None
    assert wire_fields(good)[1] == wire_fields(other)[1] == codec.ROW
    return good, other


@on_sqlite
@pytest.mark.usefixtures("users")
@pytest.mark.parametrize("name", list(POISONS))
def test_a_poisoned_entry_is_a_counted_miss_that_the_fill_overwrites(Session, cache, sql, name):
    good, other = cache_users(Session, cache)
    poison = POISONS[name](cache, good, other)
    assert poison != good
    put(cache, 1, poison)
    before = cache.stats()["models"]["User"]
    with expect_sql(sql, selects=1), Session() as s:
        user = s.get(User, 1)  # never an exception
        assert (user.id, user.name, user.version) == (1, "user1", 1)
    after = cache.stats()["models"]["User"]
    assert after["rejected"] == before["rejected"] + 1
    assert after["misses"] == before["misses"] + 1
    assert after["fills"] == before["fills"] + 1
    assert after["errors"] == before["errors"]
    assert wire_fields(raw_at(cache, 1))[1] == codec.ROW  # overwritten by the genuine row
    with expect_sql(sql, 0), Session() as s:  # and served from then on
        assert s.get(User, 1).name == "user1"


@on_sqlite
@pytest.mark.usefixtures("users")
def test_get_many_rejects_each_poisoned_entry_and_answers_from_the_database(Session, cache, sql):
    good, other = cache_users(Session, cache)
    put(cache, 1, b"\xc1" * FIVE_MB)
    put(cache, 2, good)  # user 1's genuine entry under user 2's key
    before = cache.stats()["models"]["User"]
    with expect_sql(sql, selects=1), Session() as s:  # one SELECT for the three misses
        users = s.get_many(User, [1, 2, 3, 404])
        assert [u and (u.id, u.name) for u in users] == [
            (1, "user1"),
            (2, "user2"),
            (3, "user3"),
            None,
        ]
    after = cache.stats()["models"]["User"]
    assert after["rejected"] == before["rejected"] + 2
    assert after["fills"] == before["fills"] + 4  # three rows and the absent marker of 404
    with expect_sql(sql, 0), Session() as s:
        assert [u and u.id for u in s.get_many(User, [1, 2, 3, 404])] == [1, 2, 3, None]


@on_sqlite
@pytest.mark.usefixtures("users")
def test_a_poisoned_generation_key_is_survived(Session, cache, sql):
    """The generation token is opaque bytes: anything there only makes every entry a miss."""
    cache_users(Session, cache)
    model = user_model(cache)
    for poison in (b"", b"\xc1" * 1000, msgpack.packb([1, 0])):
        cache.store.write_many([Write(model.keys.generation_key, poison, None)])
        with Session() as s:
            assert s.get(User, 1).name == "user1"
        with Session() as s:
            assert s.get(User, 1).name == "user1"  # filled under the poisoned token, and served


# -- fuzzing ---------------------------------------------------------------------------------------

_CACHE = IdentityCache(prefix="fuzz")
for _model in CACHED:
    _CACHE.register(_model)
_MODEL = user_model(_CACHE)
_SHAPE = user_shape(_CACHE)
_KEY = _MODEL.keys.row_key((1,))
_GENERATION = b"\x01" * 8
_PK = (1,)

leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=30))
    | st.builds(
        msgpack.ExtType,
        st.integers(1, 8),
        st.sampled_from(
            [b"2024-01-01T00:00:00|Europe/Paris", b"1.5", b"\x93\x01\x02\x03", b"1e99999", b"x"]
        ),
    )
)
anything = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(leaf, inner, max_size=2),
    max_leaves=4,
)
good_values = st.fixed_dictionaries(
    {
        "id": st.just(1),
        "name": st.text(max_size=10),
        "email": st.none() | st.text(max_size=10),
        "active": st.booleans(),
        "version": st.integers(-(2**31), 2**31),
    }
).map(lambda row: [row[attr] for attr in _SHAPE.attrs])
values = (
    good_values
    | st.lists(anything, max_size=7)
    | good_values.flatmap(
        lambda row: st.integers(0, len(row) - 1).flatmap(
            lambda i: anything.map(lambda v: row[:i] + [v] + row[i + 1 :])
        )
    )
    | anything
)


def mostly(valid: Any, other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` three times in four, so that entries are often right in all fields but one."""
    return st.one_of(st.just(valid), st.just(valid), st.just(valid), other)


almost_valid = st.tuples(
    mostly(codec.FORMAT_VERSION, anything),
    mostly(codec.ROW, st.sampled_from([codec.ABSENT, codec.TOMBSTONE]) | anything),
    mostly(_SHAPE.schema_hash, anything),
    mostly(_GENERATION, anything),
    mostly(None, anything),
    st.one_of(good_values, good_values, good_values, values),
    mostly(6, st.integers(1, 7)),
).map(lambda fields: [*fields[:6], None][: fields[6]])


def packed(fields: Any) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def mutated(raw: bytes) -> st.SearchStrategy[bytes]:
    return st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=4).map(
        lambda flips: bytes(dict(flips).get(i, b) for i, b in enumerate(raw))
    ) | st.integers(0, len(raw)).map(lambda n: raw[:n])


_GENUINE = codec.encode(
    codec.RowEntry(_SHAPE.schema_hash, _GENERATION, None, [1, "n", None, True, 3])
)
raw_bytes = st.binary(max_size=300) | almost_valid.map(packed) | mutated(_GENUINE)


def is_valid_row_for_key(raw: bytes) -> bool:
    """The oracle, written independently of classify: a row entry of this format version, the
    User schema hash, the current generation, the base class tag, one value per cached column
    and the primary key asked for."""
    try:
        fields = msgpack.unpackb(raw, raw=False, ext_hook=codec._ext_hook)
    except Exception:
        return False
    return (
        type(fields) is list
        and len(fields) == 6
        and type(fields[0]) is int
        and fields[0] == codec.FORMAT_VERSION
        and type(fields[1]) is int
        and fields[1] == codec.ROW
        and fields[2] == _SHAPE.schema_hash
        and fields[3] == _GENERATION
        and fields[4] is None
        and type(fields[5]) is list
        and len(fields[5]) == len(_SHAPE.attrs)
        and type(fields[5][_SHAPE.attrs.index("id")]) is int
        and fields[5][_SHAPE.attrs.index("id")] == 1
    )


def is_absent_marker(raw: bytes) -> bool:
    try:
        fields = msgpack.unpackb(raw, raw=False, ext_hook=codec._ext_hook)
    except Exception:
        return False
    return (
        fields == [codec.FORMAT_VERSION, codec.ABSENT, _GENERATION]
        and type(fields[0]) is int
        and type(fields[1]) is int
    )


@settings(
    max_examples=10_000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(raw_bytes)
def test_fuzz_decode_and_classify_never_raise_and_never_hit_on_an_invalid_row(raw):
    decoded = codec.decode(raw)  # never raises
    assert decoded is None or type(decoded) in (codec.RowEntry, codec.AbsentEntry, codec.Tombstone)
    outcome = classify(_MODEL, _GENERATION, raw, _PK)  # never raises
    if type(outcome) is Hit:
        assert is_valid_row_for_key(raw), raw
        assert outcome.value["id"] == 1
    elif outcome is ABSENT:
        assert is_absent_marker(raw), raw
    else:
        assert outcome is None


def test_the_fuzz_strategies_reach_hits_absent_markers_and_rejections():
    """The generators are not vacuous: they produce each kind of outcome."""
    assert type(classify(_MODEL, _GENERATION, _GENUINE, _PK)) is Hit
    absent = codec.encode(codec.AbsentEntry(_GENERATION))
    assert classify(_MODEL, _GENERATION, absent, _PK) is ABSENT
    seen: set[str] = set()

    @settings(max_examples=300, deadline=None, database=None)
    @given(almost_valid.map(packed))
    def sample(raw: bytes) -> None:
        outcome = classify(_MODEL, _GENERATION, raw, _PK)
        seen.add(type(outcome).__name__ if outcome is not None else "miss")

    sample()
    assert {"Hit", "miss"} <= seen
