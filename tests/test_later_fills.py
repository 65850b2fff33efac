"""Later fills in a REPEATABLE READ transaction (MariaDB's default): a miss after the snapshot
began fills only when the store proves that nothing evicted its key, or its model, since a store
time read before the snapshot began (docs/protocol.md, "Later fills in a snapshot").

Only MariaDB applies: PostgreSQL's REPEATABLE READ never uses the cache (test_isolation_promises),
its READ COMMITTED and pysqlite's default mode read fresh data, so every miss fills there."""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from dogpile.cache import make_region
from sqlalchemy import ForeignKey, Integer, String, create_engine, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from sa_cache import CachingSession, IdentityCache, codec, isolation, lookup
from sa_cache.protocol import CLOCK_MARGIN, GENERATION_TTL, proves_no_eviction_since
from sa_cache.store import Clock, Write

from .conftest import RUN_ID, register_all
from .counting import expect_commands, expect_sql
from .redis_server import RedisServer


class LaterBase(DeclarativeBase):
    pass


class Account(LaterBase):
    __tablename__ = "later_accounts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class Post(LaterBase):
    __tablename__ = "later_posts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    title: Mapped[str] = mapped_column(String(50))
    author_id: Mapped[int] = mapped_column(ForeignKey("later_accounts.id"))
    author: Mapped[Account] = relationship()


@pytest.fixture(params=["mariadb"])
def db(request: pytest.FixtureRequest) -> str:
    """MariaDB at its default level, REPEATABLE READ (see the module docstring)."""
    return str(request.param)


@pytest.fixture
def tables(engine: Engine) -> Engine:
    assert engine.dialect.default_isolation_level == "REPEATABLE READ"
    LaterBase.metadata.create_all(engine)
    with engine.begin() as conn:
        for table in reversed(LaterBase.metadata.sorted_tables):
            conn.execute(table.delete())
    return engine


def use(cache: IdentityCache, engine: Engine) -> sessionmaker[CachingSession]:
    cache.register(Account)
    cache.register(Post)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with Session() as s:
        s.add_all([Account(id=1, name="author"), Account(id=2, name="reader")])
        s.add(Post(id=1, title="hello", author_id=1))
        s.commit()
    return Session


@pytest.fixture
def Session(tables: Engine, cache: IdentityCache) -> sessionmaker[CachingSession]:  # noqa: N802
    return use(cache, tables)


def request(Session: sessionmaker[CachingSession], author: str = "author") -> None:  # noqa: N803
    """The issue's request: a post, its lazy author, and the current account by Query.get."""
    with Session() as s:
        post = s.get(Post, 1)
        assert post is not None and post.author.name == author
        assert s.query(Account).get(2).name == "reader"


def settle() -> None:
    """Let the store's clock move past its doubt (:data:`CLOCK_MARGIN`): what was written before
    this is provably older than any snapshot that begins after it. Time passing, not an
    interleaving."""
    time.sleep(5 * CLOCK_MARGIN)


def warm_up(Session: sessionmaker[CachingSession], sql: Any) -> None:  # noqa: N803
    """From a cold store: the first pass creates the models' generations (the accounts' after its
    snapshot began, so that pass proves nothing for them: only the post fills); the second fills
    both accounts, the later one proven."""
    with expect_sql(sql, selects=3):
        request(Session)
    settle()
    with expect_sql(sql, selects=2):
        request(Session)
    with expect_sql(sql, 0):
        request(Session)


def key_of(cache: IdentityCache, model: type, pk: int) -> str:
    return cache.model_for(model.__mapper__).keys.row_key((pk,))  # type: ignore[attr-defined,union-attr]


def entry_at(cache: IdentityCache, key: str) -> Any:
    raw = cache.store.get_many([key])[0]
    return None if raw is None else codec.decode(raw)


def fills(cache: IdentityCache, model: str) -> int:
    return int(cache.stats()["models"][model]["fills"])


def renamed_in_another_session(Session: sessionmaker[CachingSession]) -> None:  # noqa: N803
    with Session() as w:
        w.get(Account, 1).name = "renamed"
        w.commit()  # evicts account 1: a tombstone written now
    settle()  # long enough ago to pass for older than a bound read after it


# -- fills that go ahead ---------------------------------------------------------------------------


def test_a_later_miss_in_a_repeatable_read_transaction_fills_when_nothing_was_evicted_since_the_snapshot_began(  # noqa: E501
    Session, cache, sql, redis_counter
):
    warm_up(Session, sql)
    # every row evicted (or expired): one request fills all three again
    for model, pk in ((Post, 1), (Account, 1), (Account, 2)):
        cache.evict(model, pk)
    settle()
    with expect_sql(sql, selects=3):
        request(Session)
    with expect_sql(sql, 0):
        request(Session)

    # the author and the account evicted: one request repairs both. The first miss's lease
    # round trip reads Redis's TIME (the snapshot begins after it); the later one's also reads
    # the TTLs the generation and the key have left, which prove the tombstone older than that.
    # This process evicted both keys, so each read takes its lease along (sa_cache.forecast):
    # read with the lease, then fill and release
    cache.evict(Account, 1)
    cache.evict(Account, 2)
    settle()
    hit = Counter({"MGET": 1})
    miss = Counter({"MGET": 1, "SET": 1, "TIME": 1, "EVALSHA": 2})
    later_miss = miss + Counter({"PTTL": 2})
    with (
        expect_sql(sql, selects=2),
        expect_commands(redis_counter, hit + miss + later_miss, round_trips=1 + 2 + 2),
    ):
        request(Session)
    with expect_sql(sql, 0), expect_commands(redis_counter, {"MGET": 3}):
        request(Session)


def test_signed_tombstones_are_dated_like_plain_ones(tables, cache_factory, backend, sql):
    cache = cache_factory(backend, signing_key="later fills")
    Session = use(cache, tables)
    warm_up(Session, sql)  # its second pass fills an account under a signed tombstone
    renamed_in_another_session(Session)  # a signed tombstone on the author
    cache.evict(Post, 1)  # the post's miss begins the snapshot; the author's is proven
    settle()
    with expect_sql(sql, selects=2):
        request(Session, author="renamed")
    with expect_sql(sql, 0):
        request(Session, author="renamed")


def test_an_absent_key_fills_when_the_store_keeps_every_key_for_its_ttl(Session, cache, sql):
    warm_up(Session, sql)
    cache.evict(Post, 1)
    cache.store.delete_prefix(key_of(cache, Account, 2))  # expired, long before the snapshot
    settle()
    with expect_sql(sql, selects=2):
        request(Session)
    assert cache.store.capabilities.keeps_ttl is True
    assert type(entry_at(cache, key_of(cache, Account, 2))) is codec.RowEntry
    with expect_sql(sql, 0):
        request(Session)


def test_a_miss_at_read_committed_reads_no_clock(tables, cache, sql, redis_counter):
    """READ COMMITTED reads fresh data at every statement: no snapshot to bound, no command more."""
    Session = use(cache, tables.execution_options(isolation_level="READ COMMITTED"))
    with Session() as s:
        s.get(Post, 1)  # creates the generations
        s.get(Account, 1)
    cache.evict(Account, 2)  # evicted here: its read takes the lease along (sa_cache.forecast)
    with (
        expect_sql(sql, selects=1),
        expect_commands(redis_counter, {"MGET": 2, "SET": 1, "EVALSHA": 2}, round_trips=3),
        Session() as s,
    ):
        s.get(Post, 1)
        assert s.query(Account).get(2).name == "reader"


# -- fills that are refused ------------------------------------------------------------------------


def begin_snapshot(Session: sessionmaker[CachingSession], cache: IdentityCache) -> Any:  # noqa: N803
    """A session whose first read is a miss: its lease round trip reads the store's time, then
    its SELECT begins the snapshot. Returns the session and the post it read."""
    cache.evict(Post, 1)
    settle()
    t = Session()
    post = t.get(Post, 1)  # its SELECT begins the snapshot
    return t, post


def test_a_later_miss_does_not_fill_after_an_eviction_that_committed_after_the_snapshot_began(
    Session, cache, sql
):
    warm_up(Session, sql)
    t, post = begin_snapshot(Session, cache)
    with t:
        renamed_in_another_session(Session)  # a tombstone written after the snapshot began
        before = fills(cache, "Account")
        assert post.author.name == "author"  # T's snapshot still has the old row
        assert fills(cache, "Account") == before
    assert type(entry_at(cache, key_of(cache, Account, 1))) is codec.Tombstone
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(Account, 1).name == "renamed"


def test_a_key_read_again_in_the_snapshot_is_judged_by_that_read_not_by_an_earlier_miss(
    Session, cache, sql
):
    """An eager level reads a row before the transaction's first SQL (its miss may begin the
    snapshot) and SQLAlchemy loads something else first, without the store's clock: the
    snapshot begins with no bound. A writer then commits the row. A later lookup of that row in
    the snapshot may fill nothing; the earlier miss, still remembered, must not lend it its
    freshness (its lease would take the store's time after the snapshot began for a lower
    bound on its start, and fill the old row)."""
    warm_up(Session, sql)
    cache.evict(Account, 1)
    settle()
    with Session() as t:
        model = cache.model_for(Account.__mapper__)
        lookups = t._sa_cache
        identity_key = Account.__mapper__.identity_key_from_primary_key((1,))
        (missed,) = lookups.read_kinds(
            [model], [(key_of(cache, Account, 1), (1,), identity_key)], t._eager_fill_rule
        )
        assert missed is None and identity_key in lookups.pending
        t.execute(select(Post.id)).all()  # the snapshot begins: no lease, no bound
        renamed_in_another_session(Session)
        assert t.get(Account, 1).name == "author"  # the snapshot's row
        assert lookups.snapshot_bound is None
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(Account, 1).name == "renamed"


def test_a_later_miss_does_not_fill_after_its_whole_model_was_evicted_after_the_snapshot_began(
    Session, cache, sql
):
    warm_up(Session, sql)
    cache.evict(Account, 1)  # the key holds a tombstone older than the snapshot: only the
    t, post = begin_snapshot(Session, cache)  # generation can refuse the fill
    with t:
        with Session() as w:
            options = {"synchronize_session": "evaluate"}
            w.execute(update(Account).values(name="renamed"), execution_options=options)
            w.commit()  # a new generation for every account
        settle()
        before = fills(cache, "Account")
        assert post.author.name == "author"
        assert fills(cache, "Account") == before
    assert type(entry_at(cache, key_of(cache, Account, 1))) is codec.Tombstone
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(Account, 1).name == "renamed"


def test_a_later_miss_does_not_fill_an_absent_key_once_the_shortest_ttl_has_passed(
    tables, cache_factory, backend, sql
):
    """A tombstone written after the snapshot began may have expired by then: absence proves
    nothing once the shortest TTL anything in the key is written with has passed."""
    cache = cache_factory(backend, tombstone_ttl=0.4)
    Session = use(cache, tables)
    request(Session)  # creates the generations (what it fills does not matter here: with fills
    settle()  # dropped a tenth of a second after their miss, a slow machine may fill nothing)
    t, post = begin_snapshot(Session, cache)
    with t:
        renamed_in_another_session(Session)
        time.sleep(0.5)  # the tombstone expires: wall-clock time passing, not an interleaving
        assert entry_at(cache, key_of(cache, Account, 1)) is None
        assert post.author.name == "author"
    assert entry_at(cache, key_of(cache, Account, 1)) is None  # not filled
    with Session() as s:
        assert s.get(Account, 1).name == "renamed"


class LruDict(dict[Any, Any]):
    """A ``cache_dict`` of the application's own: it may drop entries before they expire."""


@pytest.fixture
def dropping_cache(backend: str) -> Iterator[IdentityCache]:
    """A cache whose store may drop keys before their TTL: the in-process store over a dict of the
    application's own, or a Redis that evicts under memory pressure."""
    prefix = f"{RUN_ID}_{uuid.uuid4().hex[:8]}"
    if backend == "memory":
        region = make_region().configure(
            "dogpile.cache.memory", arguments={"cache_dict": LruDict()}
        )
        yield register_all(IdentityCache(region, prefix=prefix))
        return
    server = RedisServer("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru").start()
    try:
        yield register_all(IdentityCache(server.url, prefix=prefix))
    finally:
        server.kill()


def test_a_later_miss_does_not_fill_an_absent_key_on_a_store_that_may_drop_keys(
    tables, dropping_cache, sql
):
    cache = dropping_cache
    Session = use(cache, tables)
    warm_up(Session, sql)
    t, post = begin_snapshot(Session, cache)
    with t:
        renamed_in_another_session(Session)
        key = key_of(cache, Account, 1)
        cache.store.delete_prefix(key)  # dropped under memory pressure, as an LRU store would
        assert post.author.name == "author"
    assert cache.store.capabilities.keeps_ttl is False
    assert entry_at(cache, key) is None  # not filled
    with Session() as s:
        assert s.get(Account, 1).name == "renamed"


def test_entries_whose_write_time_is_unknown_prove_nothing(Session, cache, sql, backend):
    """A tombstone of the older format carries no TTL, and a generation key written without one
    (by an older version) has none: neither can be dated, so neither lets a later miss fill."""
    warm_up(Session, sql)
    old_tombstone = codec.pack([codec.FORMAT_VERSION, codec.TOMBSTONE, os.urandom(8)])
    assert codec.decode(old_tombstone) == codec.Tombstone(old_tombstone[-8:], None)
    key = key_of(cache, Account, 2)
    cache.store.write_many([Write(key, old_tombstone, 60)])
    cache.evict(Post, 1)  # so that the post's miss begins the snapshot
    settle()
    with expect_sql(sql, selects=2):
        request(Session)  # the post begins the snapshot; the account stays unfilled
    assert cache.store.get_many([key]) == [old_tombstone]

    gen_key = cache.model_for(Account.__mapper__).keys.generation_key  # type: ignore[union-attr]
    (generation,) = cache.store.get_many([gen_key])
    assert generation is not None
    cache.store.write_many([Write(gen_key, generation, None)])  # the same token, no TTL
    cache.evict(Account, 2)
    cache.evict(Post, 1)
    settle()
    with expect_sql(sql, selects=2):
        request(Session)
    assert type(entry_at(cache, key)) is codec.Tombstone


def test_a_generation_without_a_ttl_is_given_one_so_later_transactions_can_date_it(
    Session, cache, sql
):
    """Generation keys written before they had a TTL would block later fills of their model for
    good: the refused miss gives the generation its TTL (the same token, compare-and-set), dated
    from then on, so a later transaction's miss proves its fill."""
    warm_up(Session, sql)
    gen_key = cache.model_for(Account.__mapper__).keys.generation_key  # type: ignore[union-attr]
    (generation,) = cache.store.get_many([gen_key])
    assert generation is not None
    cache.store.write_many([Write(gen_key, generation, None)])  # as an older version left it
    cache.evict(Account, 2)
    cache.evict(Post, 1)
    settle()
    with expect_sql(sql, selects=2):
        request(Session)  # refused, and dated
    assert cache.store.get_many([gen_key]) == [generation]  # the same token: rows stay valid
    settle()
    cache.evict(Post, 1)
    with expect_sql(sql, selects=2):
        request(Session)  # the account's miss is proven now
    with expect_sql(sql, 0):
        request(Session)


def test_dating_a_generation_never_brings_back_one_replaced_meanwhile(
    Session, cache, sql, monkeypatch
):
    """The model is evicted whole between the round trip that found its generation undated and
    the dating: the dating is a compare-and-set, so the new generation stays and the rows of the
    old one stay unreadable."""
    warm_up(Session, sql)
    gen_key = cache.model_for(Account.__mapper__).keys.generation_key  # type: ignore[union-attr]
    (generation,) = cache.store.get_many([gen_key])
    cache.store.write_many([Write(gen_key, generation, None)])
    cache.evict(Account, 2)
    cache.evict(Post, 1)
    settle()

    undated = lookup.undated_generation

    def evicted_whole_first(clock: Clock, seen: bytes | None) -> bool:
        cache.evict_model(Account)  # a bulk statement's commit, just before the dating
        return undated(clock, seen)

    monkeypatch.setattr(lookup, "undated_generation", evicted_whole_first)
    with expect_sql(sql, selects=2):
        request(Session)
    monkeypatch.setattr(lookup, "undated_generation", undated)
    (now,) = cache.store.get_many([gen_key])
    assert now not in (None, generation)
    with expect_sql(sql, selects=1), Session() as s:  # account 1's row was of the old generation
        assert s.get(Account, 1).name == "author"


def test_a_redis_that_refuses_config_is_taken_for_one_that_may_drop_keys(tables, sql):
    """Managed Redis services often refuse CONFIG: the store cannot know its eviction policy, so
    it declares the worst, and absent keys never fill late."""
    server = RedisServer("--rename-command", "CONFIG", "").start()
    try:
        cache = register_all(IdentityCache(server.url, prefix=f"{RUN_ID}_{uuid.uuid4().hex[:8]}"))
        Session = use(cache, tables)
        warm_up(Session, sql)  # the first later miss asked, and was refused
        assert cache.store.capabilities.keeps_ttl is False
        assert cache.stats()["errors"] == 0  # a refusal is an answer, not a store failure
    finally:
        server.kill()


def test_whether_a_load_may_begin_a_snapshot_is_read_from_the_bind_without_sql(engine, sql):
    with expect_sql(sql, 0):
        assert isolation.begins_snapshot(engine) is True  # MariaDB's default, REPEATABLE READ
        assert isolation.begins_snapshot(engine.execution_options(isolation_level="SERIALIZABLE"))
        for level in ("READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"):
            assert not isolation.begins_snapshot(engine.execution_options(isolation_level=level))
    never_connected = create_engine(engine.url)
    assert getattr(never_connected.dialect, "default_isolation_level", None) is None
    assert isolation.begins_snapshot(never_connected) is True  # unknown: assume it may
    never_connected.dispose()
    assert isolation.begins_snapshot(create_engine("sqlite://")) is False  # pysqlite's default mode


def test_a_process_whose_first_database_use_is_a_cache_miss_fills_it(tables, cache, sql):
    """The engine has never connected, so its default level is not known yet: the miss takes
    the bound as for a snapshot, and its load (the engine's first connect) fills."""
    use(cache, tables)
    fresh = create_engine(tables.url)
    try:
        with sessionmaker(fresh, class_=CachingSession, cache=cache)() as s:
            assert s.get(Post, 1).title == "hello"
        assert fills(cache, "Post") == 1
    finally:
        fresh.dispose()


# -- the proof itself ------------------------------------------------------------------------------


def tombstone(ttl: float) -> bytes:
    return codec.new_tombstone(ttl)


@pytest.mark.parametrize(
    ("case", "proven"),
    [
        ("tombstone and generation written before the bound", True),
        ("tombstone written after the bound", False),
        ("tombstone written within the clock's doubt of the bound", False),
        ("generation written after the bound", False),
        ("generation without a ttl", False),
        ("tombstone of the older format", False),
        ("a row entry", False),
        ("absent, kept for its ttl, soon after the bound", True),
        ("absent, on a store that may drop keys", False),
        ("absent, the shortest ttl since the bound", False),
        ("a held generation", False),
        ("a hold", False),
    ],
)
def test_the_proof_that_nothing_was_evicted_since_the_snapshot_began(case: str, proven: bool):
    bound, now, shortest = 1000.0, 1010.0, 60.0
    generation_left: float | None = GENERATION_TTL - 100  # written at 910
    key_left: float | None = 300 - 50  # a 300 s tombstone written at 960
    payload: bytes | None = tombstone(300)
    keeps_ttl = True
    generation = codec.new_generation()
    if case == "tombstone written after the bound":
        key_left = 300 - 5  # at 1005
    elif case == "tombstone written within the clock's doubt of the bound":
        key_left = 300 - (now - bound) - 0.001  # 1 ms before it: Redis keeps whole ms
    elif case == "generation written after the bound":
        generation_left = GENERATION_TTL - 5
    elif case == "generation without a ttl":
        generation_left = None
    elif case == "tombstone of the older format":
        payload = codec.pack([codec.FORMAT_VERSION, codec.TOMBSTONE, b"12345678"])
    elif case == "a row entry":
        payload = codec.encode(codec.RowEntry(b"h" * 8, b"g" * 8, None, [1]))
    elif case.startswith("absent"):
        payload, key_left = None, None
        keeps_ttl = case != "absent, on a store that may drop keys"
        if case == "absent, the shortest ttl since the bound":
            now = bound + shortest
    elif case == "a held generation":
        generation = codec.new_held_generation()
    elif case == "a hold":
        payload = codec.new_hold()
    clock = Clock(now, [generation_left, key_left])
    proof = proves_no_eviction_since(bound, clock, generation, payload, shortest, keeps_ttl)
    assert proof is proven
