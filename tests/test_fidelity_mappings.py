"""A hit is the load SQLAlchemy would have done: concrete inheritance, classes mapped to what is
not a table, keys the database compares loosely, and values only the column type can restore.

Each scenario runs through a plain session and through the cache, cold and warm, and all three
must agree (the answer, each attribute's value and type, or the error raised), on every database,
with Redis and the in-process store."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from sa_cache.integrations.flask import SACache
from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache, codec
from sa_cache.errors import CacheError

from .conftest import REDIS_URL
from .counting import SQLCounter, expect_sql
from .entries import raw_entry, row_key
from .models_mappings import (
    SPELLINGS,
    UNTABLED,
    Badge,
    Boss,
    Code,
    Coder,
    Ferry,
    Keepsake,
    Level,
    MappingsBase,
    Marker,
    Part,
    Shout,
    Staff,
    Tag,
    Vessel,
    ensure_tables,
)

Read = Callable[[Any], Any]


@pytest.fixture
def mapped(engine: Engine, cache: IdentityCache) -> Iterator[None]:
    ensure_tables(engine)
    for model in (Staff, Vessel, Part, Keepsake, Marker, Shout, *SPELLINGS):
        cache.register(model)
    yield


@pytest.fixture
def plain(engine: Engine) -> sessionmaker[PlainSession]:
    return sessionmaker(engine)


def describe(obj: Any) -> Any:
    """What a lookup gave, down to each column attribute's type."""
    if obj is None:
        return None
    values = {}
    for attr in inspect(obj).mapper.column_attrs:
        value = getattr(obj, attr.key, AttributeError)  # a concrete class lacks the union's "type"
        if value is not AttributeError:
            values[attr.key] = (type(value).__name__, value)
    return type(obj).__name__, values


def outcome(factory: Callable[[], Any], read: Read) -> Any:
    with factory() as session:
        try:
            return describe(read(session))
        except Exception as exc:  # the error is part of the answer
            return ("raises", type(exc).__name__)


def agree(plain: Any, cached: Any, read: Read) -> Any:
    """The plain answer, after checking the cache's cold and warm answers are the same."""
    expected = outcome(plain, read)
    assert outcome(cached, read) == expected, "cold"
    assert outcome(cached, read) == expected, "warm"
    return expected


def write(Session: Any, *objects: Any) -> None:  # noqa: N803
    with Session() as s:
        s.add_all(objects)
        s.commit()


# -- 5. concrete inheritance ---------------------------------------------------------------------


@pytest.mark.usefixtures("mapped")
def test_concrete_classes_are_keyed_and_evicted_by_their_own_tables(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    sql: SQLCounter,
) -> None:
    write(Session, Boss(id=1, name="b", office="o"), Coder(id=1, name="c", language="py"))
    boss = agree(plain, Session, lambda s: s.get(Boss, 1))
    coder = agree(plain, Session, lambda s: s.get(Coder, 1))
    assert boss[0] == "Boss" and coder[0] == "Coder"
    assert row_key(cache, Boss, 1) != row_key(cache, Coder, 1)
    with Session() as s, expect_sql(sql, 0):  # both warm, each from its own key
        assert s.get(Coder, 1).language == "py" and s.get(Boss, 1).office == "o"
    # the polymorphic base reads a union of both tables: never answered from the cache
    assert agree(plain, Session, lambda s: s.get(Staff, 1)) == ("raises", "MultipleResultsFound")
    assert cache.model_for(inspect(Staff)) is None
    assert agree(plain, Session, lambda s: s.get(Staff, 5)) is None
    write(Session, Boss(id=5, name="b5"))  # evicts the boss's key: no absence of Staff 5 hides it
    assert agree(plain, Session, lambda s: s.get(Staff, 5))[0] == "Boss"
    # an absence, then an insert into that concrete table
    assert agree(plain, Session, lambda s: s.get(Coder, 2)) is None
    write(Session, Coder(id=2, name="c2"))
    assert agree(plain, Session, lambda s: s.get(Coder, 2))[0] == "Coder"
    # a change evicts its own table's row
    with Session() as s:
        s.get(Boss, 1).office = "x"
        s.commit()
    assert agree(plain, Session, lambda s: s.get(Boss, 1))[1]["office"] == ("str", "x")
    with Session() as s:
        s.delete(s.get(Coder, 1))
        s.commit()
    assert agree(plain, Session, lambda s: s.get(Coder, 1)) is None
    assert agree(plain, Session, lambda s: s.get(Staff, 1))[0] == "Boss"
    # the concrete classes of one hierarchy share its generation: evicting the model evicts all
    agree(plain, Session, lambda s: s.get(Coder, 2))
    cache.evict_model(Staff)
    with Session() as s, expect_sql(sql, selects=2):
        assert s.get(Boss, 1).office == "x" and s.get(Coder, 2).name == "c2"


@pytest.mark.usefixtures("mapped")
def test_a_base_that_does_not_load_its_concrete_subclass_is_cached_by_its_own_table(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    sql: SQLCounter,
) -> None:
    write(Session, Vessel(id=1, name="v"), Ferry(id=1, name="f", cars=9), Ferry(id=2, name="g"))
    for model, pk in ((Vessel, 1), (Ferry, 1), (Vessel, 2), (Ferry, 2), (Ferry, 3)):
        agree(plain, Session, lambda s, model=model, pk=pk: s.get(model, pk))
    with Session() as s, expect_sql(sql, 0):  # all warm, each from its own table's key
        assert s.get(Vessel, 1).name == "v" and s.get(Ferry, 1).cars == 9
        assert s.get(Vessel, 2) is None and s.get(Ferry, 3) is None
    write(Session, Vessel(id=2, name="w"))  # evicts the vessel's absence, not the ferry's row
    assert agree(plain, Session, lambda s: s.get(Vessel, 2))[0] == "Vessel"
    with Session() as s, expect_sql(sql, 0):
        assert s.get(Ferry, 2).name == "g"


# -- 6. classes mapped to a subquery, a CTE or a join ---------------------------------------------


@pytest.mark.parametrize("model", UNTABLED, ids=lambda m: m.__name__)
@pytest.mark.usefixtures("mapped")
def test_a_class_mapped_to_what_is_not_a_table_is_refused_at_register_and_left_to_sqlalchemy(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    model: type[Any],
) -> None:
    with pytest.raises(CacheError, match=f"{model.__name__} cannot be cached: .*not a table"):
        cache.register(model)
    assert cache.model_for(inspect(model)) is None
    with Session() as s:
        s.add(Part(id=1, name="p"))
        s.commit()
    if model.__name__ == "PartWithNote":
        write(Session, model(id=2, part_id=2, name="q", note="n"))
    for pk in (1, 2, 3):
        agree(plain, Session, lambda s, pk=pk: s.get(model, pk))


def test_the_flask_extension_caches_the_other_models_and_warns_about_the_refused_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Flask(__name__)
    with caplog.at_level(logging.WARNING, logger="sa_cache"):
        sacache = SACache(app, models=MappingsBase)
    with app.app_context():
        cache = sacache.cache
        for model in UNTABLED:
            assert cache.model_for(inspect(model)) is None
            assert f"not caching {model.__name__}: {model.__name__} cannot be cached" in caplog.text
        for model in (Part, Boss, Coder, Keepsake, *SPELLINGS):
            assert cache.model_for(inspect(model)) is not None, model


# -- 8. equal keys with different spellings --------------------------------------------------------

BADGE = "6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b"
CASES = {
    "uuid-as-string": (Badge, BADGE.upper(), BADGE),
    "nocase": (Tag, "ACME", "acme"),
    "char-padding": (Code, "ab ", "ab"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.usefixtures("mapped")
def test_an_absence_is_never_cached_under_a_spelling_the_database_finds_the_row_by(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    case: str,
) -> None:
    model, asked, stored = CASES[case]
    agree(plain, Session, lambda s: s.get(model, asked))
    write(Session, model(id=stored, label="x"))
    agree(plain, Session, lambda s: s.get(model, asked))
    agree(plain, Session, lambda s: s.get(model, stored))


def test_absence_is_cached_only_where_every_key_column_compares_exactly() -> None:
    from sqlalchemy.dialects import mysql, postgresql, sqlite

    from sa_cache.rows import compares_exactly

    def exact(model: type[Any], dialect: Any) -> bool:
        return all(compares_exactly(c, dialect) for c in inspect(model).primary_key)

    pg, lite, maria = postgresql.dialect(), sqlite.dialect(), mysql.dialect()
    assert [exact(m, pg) for m in (Badge, Tag, Code, Part)] == [False, True, False, True]
    assert [exact(m, lite) for m in (Badge, Tag, Code, Part)] == [False, False, True, True]
    assert [exact(m, maria) for m in (Badge, Tag, Code, Part)] == [False, False, False, True]


# -- 9. exact round trip through the column type's own processing ---------------------------------

PICKLED = (1, "a", (2.5, None), [3, {"k": (4,)}])


@pytest.mark.usefixtures("mapped")
def test_typedecorator_and_pickletype_values_come_back_exactly_as_a_load_gives_them(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    sql: SQLCounter,
) -> None:
    token = uuid.uuid4()
    write(
        Session,
        Keepsake(id=1, pickled=PICKLED, level=Level.high, token=token),
        Keepsake(id=2),
    )
    loaded = agree(plain, Session, lambda s: s.get(Keepsake, 1))[1]
    assert loaded["pickled"] == ("tuple", PICKLED) and loaded["level"] == ("Level", Level.high)
    agree(plain, Session, lambda s: s.get(Keepsake, 2))
    with Session() as s, expect_sql(sql, 0):  # a hit
        hit = s.get(Keepsake, 1)
        assert type(hit.pickled) is tuple and hit.pickled == PICKLED
        assert type(hit.level) is Level and type(hit.token) is uuid.UUID
    # the database's values are stored: the pickle's own bytes, the integer
    values = codec.decode(raw_entry(cache, row_key(cache, Keepsake, 1)) or b"").values
    attrs = cache.model_for(inspect(Keepsake)).shape(inspect(Keepsake), _dialect(s)).attrs
    stored = dict(zip(attrs, values, strict=True))
    assert (
        type(stored["pickled"]) is bytes and stored["level"] == 2 and type(stored["level"]) is int
    )


@pytest.mark.usefixtures("mapped")
def test_a_process_that_has_not_used_the_dialect_yet_misses_then_fills_never_rejects(
    Session: sessionmaker[CachingSession],  # noqa: N803
    engine: Engine,
    backend: str,
    cache: IdentityCache,
    sql: SQLCounter,
) -> None:
    if backend != "redis":
        pytest.skip("two processes share entries only through Redis")
    write(Session, Keepsake(id=1, pickled=PICKLED, level=Level.low))
    with Session() as s:
        s.get(Keepsake, 1)  # filled by this "process"
    other = IdentityCache(REDIS_URL, prefix=cache.prefix)  # another process: no dialect seen
    other.register(Keepsake)
    OtherSession = sessionmaker(engine, class_=CachingSession, cache=other)  # noqa: N806
    with OtherSession() as s, expect_sql(sql, selects=1):
        assert s.get(Keepsake, 1).pickled == PICKLED
    with OtherSession() as s, expect_sql(sql, 0):
        hit = s.get(Keepsake, 1)
        assert type(hit.pickled) is tuple and hit.level is Level.low
    stats = other.stats()["models"]["Keepsake"]
    assert (stats["rejected"], stats["hits"], stats["misses"]) == (0, 1, 1)


@pytest.mark.usefixtures("mapped")
def test_a_type_processed_at_the_drivers_level_is_not_cached_but_loaded_as_sqlalchemy_does(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    sql: SQLCounter,
) -> None:
    write(Session, Marker(id=1, label="m", raw="r"))
    assert agree(plain, Session, lambda s: s.get(Marker, 1))[1]["raw"] == ("str", "<r>")
    values = codec.decode(raw_entry(cache, row_key(cache, Marker, 1)) or b"").values
    assert values == [1, "m"]  # the row without it; a hit completes it as a load would
    with Session() as s, expect_sql(sql, ["SELECT fm_markers.id, fm_markers.raw"]):
        assert s.get(Marker, 1).raw == "<r>"


@pytest.mark.usefixtures("mapped")
def test_a_type_that_is_not_its_own_inverse_is_read_from_the_database(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    write(Session, Shout(id=1, shout="hey"))
    assert agree(plain, Session, lambda s: s.get(Shout, 1))[1]["shout"] == ("str", "hey!")
    with Session() as s, expect_sql(sql, selects=1):  # never cached: binding "hey!" gives "HEY!"
        assert s.get(Shout, 1).shout == "hey!"


def _dialect(session: Any) -> Any:
    return session.get_bind().dialect
