"""A randomized concurrency checker: can a read ever see a row older than a committed write?

Several processes (``spawn``; each builds its own engine, Redis client and
:class:`~sa_cache.IdentityCache`), each running several threads, read and write random rows of a
small hot table through :class:`~sa_cache.CachingSession`:

- reads: ``Session.get``, ``session.get_many``, lazy many-to-one loads (``Ref.hot``), legacy
  ``Query.get``, each in a fresh session, and inside longer read transactions that mix them
  with plain SELECTs;
- writes: update (one or two rows), delete, insert, deliberate rollback, savepoint rollback, ORM
  bulk UPDATE (WHERE ... IN, and executemany by primary key) and bulk DELETE.

Every write locks its rows first (``SELECT ... FOR UPDATE``; an insert holds the unique-index
entry once flushed) and only then draws its version from a global counter (Redis ``INCR``), so
a row's versions increase in commit order, deletes included (a delete consumes a version too).
Each writer records, for every row it changed, the version (or "deleted"), when it called
``commit()`` and when ``commit()`` returned; each reader records which version of which row it
saw, when its read started and when it ended. Times are ``time.monotonic_ns()``, one clock for
every process on Linux (CLOCK_MONOTONIC).

When every worker has finished, the checker counts

- **stale**: a read that started after the commit of version ``v`` of a row returned and saw an
  older version of that row (a row, where the newest commit before it deleted the row; "no row",
  where it (re)created the row and no later delete had even begun to commit);
- **dirty**: a version that was never committed (rolled back, rolled back to a savepoint, or
  the placeholder of an insert), or one whose ``commit()`` had not even been called when the
  read returned;
- **mismatches**: after quiescence, rows whose cache entry differs from the database: the raw
  entries decoded with the cache's own classification, then every row read through the hit path
  of a fresh :class:`~sa_cache.CachingSession` and compared with a plain ``Session``.

"Started" is the start of the read call for a fresh session (its transaction and snapshot begin
inside the call). Inside a longer transaction it is, per row, the start of the transaction's
first read of that row under READ COMMITTED (the identity map then holds what that read saw),
and the start of the transaction's first read of anything under REPEATABLE READ / SERIALIZABLE
(MariaDB's default: later misses read the snapshot, which may legitimately be older than a
commit made since; a cache hit may be newer, which is fine).

Run it: ``python -m tests.stress --db postgresql --operations 100000`` (or ``--db mariadb``,
or ``--db-url`` for any server URL). The checker creates its own database on the server
(``sa_cache_checker_<pid>_<random>``), uses its own Redis key prefix, and removes both at the end.
"""

from __future__ import annotations

import argparse
import bisect
import multiprocessing
import os
import queue
import random
import sys
import threading
import time
import traceback
import uuid
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
from sqlalchemy import (
    BigInteger,
    Integer,
    String,
    create_engine,
    delete,
    event,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from sa_cache import CachingSession, IdentityCache
from sa_cache.protocol import classify
from sa_cache.store import Write

from ..databases import SERVERS, create_database, drop_database

REDIS_URL = "redis://127.0.0.1:6379/0"

HOT_ROWS = 20  # rows 1..HOT_ROWS exist at the start
ROW_IDS = 24  # ids 1..ROW_IDS are read and written (the last few start absent)
READ_FRACTION = 0.6

clock = time.monotonic_ns  # CLOCK_MONOTONIC: one clock for every process of the machine

# deletes remove ~9 rows per 100 writes, inserts put back up to 30: about a fifth of ids absent
WRITE_KINDS = {
    "update": 24,
    "update_two": 8,
    "delete": 5,
    "insert": 30,
    "rollback": 8,
    "savepoint_rollback": 8,
    "bulk_update": 10,
    "bulk_delete": 2,
}
READ_KINDS = {"get": 30, "get_many": 20, "lazy": 15, "query_get": 10, "transaction": 25}
IN_TRANSACTION_KINDS = {"get": 3, "get_many": 2, "lazy": 2, "query_get": 1, "select": 2}


# -- the schema ---------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class Hot(Base):
    """The hot table: every committed write sets ``version`` to a fresh, globally unique number."""

    __tablename__ = "sa_cache_checker_hot"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[str] = mapped_column(String(40))


class Ref(Base):
    """Immutable rows pointing at the hot table, for lazy many-to-one loads (``ref.hot``).

    No database foreign key: the hot row it points at may be deleted and re-inserted."""

    __tablename__ = "sa_cache_checker_ref"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    hot_id: Mapped[int] = mapped_column(Integer)
    hot: Mapped[Hot | None] = relationship(
        primaryjoin="foreign(Ref.hot_id) == Hot.id", viewonly=True, lazy="select"
    )


# -- records ------------------------------------------------------------------------------------

# (row, version, state: version or None when deleted, commit called, commit returned, kind)
WriteRecord = tuple[int, int, "int | None", int, int, str]
# (row, version or None, started, ended, kind)
ReadRecord = tuple[int, "int | None", int, int, str]


@dataclass
class Records:
    writes: list[WriteRecord] = field(default_factory=list)
    aborted: list[tuple[int, int]] = field(default_factory=list)  # (row, version) never committed
    uncertain: list[tuple[int, int, int | None]] = field(default_factory=list)  # commit() raised
    reads: list[ReadRecord] = field(default_factory=list)
    operations: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    # what a session sharing a connection saw where plain SQLAlchemy sees something else
    wrong_answers: list[str] = field(default_factory=list)
    increments: Counter[int] = field(default_factory=Counter)  # committed, per counter row
    uncertain_increments: Counter[int] = field(default_factory=Counter)  # commit() raised
    outages: list[tuple[int, int]] = field(default_factory=list)  # (stall began, stall ended)
    delivery_bound: float = 0.0  # seconds after an outage by which its evictions are delivered
    # keys whose evictions were still undelivered ``delivery_bound`` after the last outage
    undelivered: int = 0
    # a scenario's own records by name (concatenated across workers), e.g. collection versions
    extra: defaultdict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))

    def merge(self, other: Records) -> None:
        self.writes += other.writes
        self.aborted += other.aborted
        self.uncertain += other.uncertain
        self.reads += other.reads
        self.operations.update(other.operations)
        self.outcomes.update(other.outcomes)
        self.errors += other.errors
        self.wrong_answers += other.wrong_answers
        self.increments.update(other.increments)
        self.uncertain_increments.update(other.uncertain_increments)
        self.outages += other.outages
        self.delivery_bound = max(self.delivery_bound, other.delivery_bound)
        self.undelivered += other.undelivered
        for name, items in other.extra.items():
            self.extra[name] += items


@dataclass
class Report:
    database: str
    isolation_level: str
    scenario: str = "mixed"
    operations: int = 0
    reads: int = 0
    absent_reads: int = 0
    writes: int = 0
    versions: int = 0
    rollbacks: int = 0
    conflicts: int = 0
    errors: int = 0
    stale: int = 0
    dirty: int = 0
    mismatches: int = 0
    lost_updates: int = 0
    increments: int = 0  # committed read-modify-write increments
    stale_during_outage: int = 0  # not failures: see tests.stress.outage
    outages: int = 0
    outage_time: float = 0.0  # seconds stalled, summed
    delivery_bound: float = 0.0
    outage_lag: float = 0.0  # seconds after its stall ended that the latest excused read began
    undelivered: int = 0
    wall_time: float = 0.0
    processes: int = 0
    threads: int = 0
    seed: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    cache: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a scenario adds to the report
    error_messages: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        failures = (self.stale, self.dirty, self.mismatches, self.lost_updates, self.undelivered)
        return sum(failures) == self.errors == 0

    def summary(self) -> str:
        return (
            f"{self.scenario} on {self.database}: operations={self.operations} "
            f"reads={self.reads} hits={self.cache.get('hits', 0)} "
            f"fills={self.cache.get('fills', 0)} stale={self.stale} dirty={self.dirty} "
            f"lost_updates={self.lost_updates} mismatches={self.mismatches}"
            + (f" stale_during_outage={self.stale_during_outage}" if self.outages else "")
        )

    def format(self) -> str:
        lines = [
            f"scenario: {self.scenario}",
            f"database: {self.database} ({self.isolation_level}), {self.processes} processes x "
            f"{self.threads} threads, seed {self.seed}",
            f"operations: {self.operations}",
            f"reads: {self.reads} ({self.absent_reads} saw no row)",
            f"writes: {self.writes} committed transactions, {self.versions} row versions; "
            f"{self.rollbacks} rolled back on purpose; {self.conflicts} lock/unique conflicts",
            f"stale: {self.stale}",
            f"dirty: {self.dirty}",
            f"lost updates: {self.lost_updates} (of {self.increments} committed increments)",
            f"mismatches: {self.mismatches}",
            f"errors: {self.errors}",
            f"wall time: {self.wall_time:.1f} s",
            "kinds: " + ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items())),
            "cache: " + ", ".join(f"{k} {v}" for k, v in self.cache.items()),
        ]
        if self.outages:
            lines.insert(
                7,
                f"outages: {self.outages} stalls of one process's Redis, {self.outage_time:.1f} s "
                f"in all; stale during an outage or within {self.delivery_bound:.2f} s after it "
                f"(not failures): {self.stale_during_outage}, the latest beginning "
                f"{self.outage_lag * 1000:.0f} ms after its stall ended; keys undelivered after "
                f"that: {self.undelivered}",
            )
        lines += [f"note: {line}" for line in self.notes]
        lines += [f"  example: {line}" for line in self.examples]
        lines += [f"  error: {line}" for line in self.error_messages]
        return "\n".join(lines)


# -- a deliberately broken configuration --------------------------------------------------------


class _NoEvictions:
    """A store that drops every unconditional write: no tombstone, no generation bump."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def write_many(self, writes: Any) -> None:
        return None


def drop_evictions(cache: IdentityCache) -> None:
    """Break ``cache`` on purpose: commits evict nothing. The checker must report stale reads."""
    cache.store = _NoEvictions(cache.store)  # type: ignore[assignment]


class _UnconditionalFills:
    """A store whose fills overwrite whatever the key holds: dogpile's plain SET."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def fill_many(self, fills: Any, release: Any = ()) -> list[bool]:
        self._inner.write_many([Write(f.key, f.value, f.ttl) for f in fills])
        self._inner.fill_many([], release)  # release the leases
        return [True] * len(fills)


def unconditional_fills(cache: IdentityCache) -> None:
    """Break ``cache`` on purpose: a fill no longer checks what the key holds (the stale-fill
    race of a plain SET). Rarer than :func:`drop_evictions`: a few stale reads per thousands."""
    cache.store = _UnconditionalFills(cache.store)  # type: ignore[assignment]


class _NoCollectionEvictions(_NoEvictions):
    """A store that drops the unconditional writes of relationship collections only (their keys
    and generations live under ``{rel:...}``): rows are still evicted."""

    def write_many(self, writes: Any) -> None:
        kept = [w for w in writes if "{rel:" not in w.key]
        if kept:
            self._inner.write_many(kept)


def drop_collection_evictions(cache: IdentityCache) -> None:
    """Break ``cache`` on purpose: commits evict rows but no collection. The ``collections``
    scenario must report stale collection reads."""
    cache.store = _NoCollectionEvictions(cache.store)  # type: ignore[assignment]


BREAKERS: dict[str, Callable[[IdentityCache], None]] = {
    "evictions": drop_evictions,
    "fill-cas": unconditional_fills,
    "collection-evictions": drop_collection_evictions,
}


# -- engines and caches -------------------------------------------------------------------------


def make_engine(url: str, pool_size: int, isolation_level: str | None = None) -> Engine:
    """An engine with bounded lock waits, so a lock cycle the server misses cannot hang a run;
    at ``isolation_level`` if given, else at the database's default."""
    options: dict[str, Any] = (
        {} if isolation_level is None else {"isolation_level": isolation_level}
    )
    engine = create_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=False, **options
    )
    dialect = engine.dialect.name

    @event.listens_for(engine, "connect")
    def _bounded_waits(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if dialect == "postgresql":
            cursor.execute("SET lock_timeout = '10s'")
            cursor.execute("SET statement_timeout = '60s'")
        else:
            cursor.execute("SET SESSION innodb_lock_wait_timeout = 10")
        cursor.close()
        if dialect == "postgresql":
            dbapi_connection.commit()

    return engine


def make_cache(
    redis_url: str,
    prefix: str,
    configure: Callable[[IdentityCache], None] | None = None,
    models: tuple[type[Base], ...] = (),
    register_options: dict[type[Base], dict[str, Any]] | None = None,
    **options: Any,
) -> IdentityCache:
    settings: dict[str, Any] = {"socket_timeout": 2.0, "retries": 2, **options}
    cache = IdentityCache(redis_url, prefix=prefix, **settings)
    cache.register(Hot)
    cache.register(Ref)
    for model in models:
        cache.register(model, **(register_options or {}).get(model, {}))
    if configure is not None:
        configure(cache)
    return cache


def populate(engine: Engine, versions: VersionCounter) -> list[WriteRecord]:
    """Create the tables and the starting rows; returns their (initial) write records."""
    Base.metadata.create_all(engine)
    records: list[WriteRecord] = []
    rows = []
    for row in range(1, HOT_ROWS + 1):
        version = versions.next()
        rows.append({"id": row, "version": version, "payload": f"v{version}"})
    with engine.begin() as conn:
        conn.execute(insert(Hot), rows)
        conn.execute(insert(Ref), [{"id": row, "hot_id": row} for row in range(1, ROW_IDS + 1)])
    now = clock()
    for values in rows:
        records.append((values["id"], values["version"], values["version"], now, now, "initial"))
    for row in range(HOT_ROWS + 1, ROW_IDS + 1):
        records.append((row, 0, None, now, now, "initial"))  # absent at the start
    return records


class VersionCounter:
    """The global version counter: Redis INCR, shared by every process, never repeats. It is
    the checker's instrument, not the cache: when the cache's URL names a Redis Cluster or
    Sentinel deployment, the counter lives in the tests' plain Redis (:data:`REDIS_URL`)."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        if not redis_url.startswith(("redis://", "rediss://", "unix://")):
            redis_url = REDIS_URL
        self.client = redis.Redis.from_url(redis_url, socket_timeout=5)
        self.key = f"{prefix}:checker-clock"

    def next(self) -> int:
        return int(self.client.incr(self.key))

    def close(self) -> None:
        self.client.close()


# -- one worker thread --------------------------------------------------------------------------


class Conflict(Exception):
    """The write found nothing to do (its row vanished, or it already exists)."""


class Worker:
    """One thread of the mixed workload; scenarios subclass it and change its mix."""

    read_fraction = READ_FRACTION
    read_kinds = READ_KINDS
    write_kinds = WRITE_KINDS
    in_transaction_kinds = IN_TRANSACTION_KINDS
    reads_per_transaction = (3, 7)

    def __init__(
        self,
        factory: sessionmaker[CachingSession],
        versions: VersionCounter,
        rng: random.Random,
        snapshot_reads: bool,
        tag: str = "",
    ) -> None:
        self.factory = factory
        self.versions = versions
        self.rng = rng
        self.snapshot_reads = snapshot_reads
        self.tag = tag  # appended to the kind of every read and write it records
        self.out = Records()

    @property
    def engine(self) -> Engine:
        bind = self.factory.kw["bind"]
        assert isinstance(bind, Engine)
        return bind

    def next_version(self) -> int:
        return self.versions.next()

    def pick(self) -> int:
        return self.rng.randint(1, ROW_IDS)

    def picks(self, low: int, high: int) -> list[int]:
        return self.rng.sample(range(1, ROW_IDS + 1), self.rng.randint(low, high))

    def choose(self, weights: dict[str, int]) -> str:
        return self.rng.choices(list(weights), list(weights.values()))[0]

    def run(self, operations: int, deadline: int) -> Records:
        for _ in range(operations):
            if clock() > deadline:
                self.out.outcomes["stopped by the time limit"] += 1
                break
            if self.rng.random() < self.read_fraction:
                kind = self.choose(self.read_kinds)
                op: Callable[[], None] = lambda kind=kind: self.read(kind)  # noqa: E731
            else:
                kind = self.choose(self.write_kinds)
                op = getattr(self, "write_" + kind)
            self.out.operations[kind] += 1
            try:
                op()
            except Conflict:
                self.out.outcomes["conflict"] += 1
            except (IntegrityError, OperationalError) as exc:  # deadlock, duplicate key
                self.out.outcomes["conflict"] += 1
                self.out.outcomes[f"conflict: {type(exc.orig).__name__}"] += 1
            except Exception:
                self.out.errors.append(f"{kind}: {traceback.format_exc(limit=6)}")
        return self.out

    # -- reads ----------------------------------------------------------------------------

    def read(self, kind: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Query.get is legacy
            if kind == "transaction":
                self.read_transaction()
            elif hasattr(self, "read_" + kind):
                getattr(self, "read_" + kind)()
            else:
                with self.factory() as session:
                    self.read_one(session, kind, Scope(snapshot=False, label=""))

    def read_transaction(self) -> None:
        """Several reads (some plain SELECTs) in one transaction, with short pauses between."""
        scope = Scope(snapshot=self.snapshot_reads, label="transaction.")
        with self.factory() as session:
            for _ in range(self.rng.randint(*self.reads_per_transaction)):
                self.read_one(session, self.choose(self.in_transaction_kinds), scope)
                time.sleep(self.rng.random() * 0.002)

    def read_one(self, session: Session, kind: str, scope: Scope) -> None:
        seen: list[tuple[int, int | None]] = []
        if kind == "get_many":
            rows = self.picks(2, 4)
            scope.begin(rows)
            found = session.get_many(Hot, rows)  # type: ignore[attr-defined]
            seen = [
                (row, None if obj is None else obj.version)
                for row, obj in zip(rows, found, strict=True)
            ]
        else:
            row = self.pick()
            scope.begin([row])
            if kind == "get":
                obj = session.get(Hot, row)
            elif kind == "query_get":
                obj = session.query(Hot).get(row)
            elif kind == "lazy":
                ref = session.get(Ref, row)
                assert ref is not None and ref.hot_id == row
                obj = ref.hot
            elif kind == "select":
                version = session.scalar(select(Hot.version).where(Hot.id == row))
                seen = [(row, version)]
            else:
                raise ValueError(kind)
            if kind != "select":
                seen = [(row, obj.version if obj is not None else None)]
        ended = clock()
        for row, version in seen:
            self.out.reads.append(
                (row, version, scope.started(row), ended, scope.label + kind + self.tag)
            )

    # -- writes ---------------------------------------------------------------------------

    @contextmanager
    def writing(self) -> Iterator[CachingSession]:
        with self.factory() as session:
            try:
                yield session
            except BaseException:
                session.rollback()
                raise

    def lock(self, session: Session, rows: list[int]) -> list[Hot]:
        statement = (
            select(Hot)
            .where(Hot.id.in_(sorted(rows)))
            .order_by(Hot.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        return list(session.scalars(statement))

    def commit(self, session: Session, changes: list[tuple[int, int, int | None]], kind: str):
        """Commit and record every row version it made, with the commit's call and return."""
        called = clock()
        try:
            session.commit()
        except Exception:
            self.out.uncertain += changes
            raise
        returned = clock()
        for row, version, state in changes:
            self.out.writes.append((row, version, state, called, returned, kind + self.tag))
        self.out.outcomes["committed"] += 1

    def set_version(self, obj: Hot) -> tuple[int, int, int]:
        version = self.next_version()
        obj.version = version
        obj.payload = f"v{version}"
        return (obj.id, version, version)

    def write_update(self, rows: list[int] | None = None, kind: str = "update") -> None:
        with self.writing() as session:
            objs = self.lock(session, rows or [self.pick()])
            if not objs:
                raise Conflict
            changes = [self.set_version(obj) for obj in objs]
            self.commit(session, changes, kind)

    def write_update_two(self) -> None:
        self.write_update(self.picks(2, 2), "update_two")

    def write_delete(self) -> None:
        with self.writing() as session:
            objs = self.lock(session, [self.pick()])
            if not objs:
                raise Conflict
            version = self.next_version()
            session.delete(objs[0])
            self.commit(session, [(objs[0].id, version, None)], "delete")

    def write_insert(self) -> None:
        """Insert a row the cache says is absent; update it instead if the cache says it exists."""
        row = self.pick()
        with self.writing() as session:
            if session.get(Hot, row) is not None:
                objs = self.lock(session, [row])
                if not objs:
                    raise Conflict
                self.commit(session, [self.set_version(objs[0])], "insert->update")
                return
            obj = Hot(id=row, version=0, payload="placeholder")
            session.add(obj)
            session.flush()  # holds the key now: a version drawn from here on is ordered
            self.commit(session, [self.set_version(obj)], "insert")

    def write_rollback(self) -> None:
        with self.writing() as session:
            objs = self.lock(session, [self.pick()])
            if not objs:
                raise Conflict
            row, version, _ = self.set_version(objs[0])
            session.flush()
            self.out.aborted.append((row, version))
            session.rollback()
            self.out.outcomes["rolled back"] += 1

    def write_savepoint_rollback(self) -> None:
        with self.writing() as session:
            objs = self.lock(session, self.picks(2, 2))
            if not objs:
                raise Conflict
            first, last = objs[0], objs[-1]
            changes = [self.set_version(first)]
            session.flush()
            nested = session.begin_nested()
            row, version, _ = self.set_version(last)
            self.out.aborted.append((row, version))
            if last is not first and self.rng.random() < 0.5:
                row, version, _ = self.set_version(first)
                self.out.aborted.append((row, version))
            session.flush()
            nested.rollback()
            self.out.outcomes["rolled back to a savepoint"] += 1
            self.commit(session, changes, "savepoint_rollback")

    def locked_ids(self, session: Session, rows: list[int]) -> list[int]:
        statement = select(Hot.id).where(Hot.id.in_(sorted(rows))).order_by(Hot.id)
        return list(session.scalars(statement.with_for_update()))

    def write_bulk_update(self) -> None:
        with self.writing() as session:
            rows = self.locked_ids(session, self.picks(2, 4))
            if not rows:
                raise Conflict
            version = self.next_version()
            values = {"version": version, "payload": f"v{version}"}
            if self.rng.random() < 0.5:
                session.execute(update(Hot).where(Hot.id.in_(rows)).values(**values))
                kind = "bulk_update"
            else:  # ORM bulk UPDATE by primary key (executemany)
                session.execute(update(Hot), [{"id": row, **values} for row in rows])
                kind = "bulk_update_by_pk"
            self.commit(session, [(row, version, version) for row in rows], kind)

    def write_bulk_delete(self) -> None:
        with self.writing() as session:
            rows = self.locked_ids(session, self.picks(2, 2))
            if not rows:
                raise Conflict
            version = self.next_version()
            session.execute(delete(Hot).where(Hot.id.in_(rows)))
            self.commit(session, [(row, version, None) for row in rows], "bulk_delete")


class Scope:
    """When the reads of one session "started", for judging what they may legitimately see."""

    def __init__(self, snapshot: bool, label: str) -> None:
        self.snapshot = snapshot
        self.label = label
        self.first: int | None = None
        self.rows: dict[int, int] = {}

    def begin(self, rows: list[int]) -> None:
        now = clock()
        if self.first is None:
            self.first = now
        for row in rows:
            self.rows.setdefault(row, now)

    def started(self, row: int) -> int:
        if self.snapshot:
            assert self.first is not None
            return self.first
        return self.rows[row]


# -- scenarios ----------------------------------------------------------------------------------


class Scenario:
    """A named workload (``--scenario NAME``). This base is the mixed workload every other one
    extends; :mod:`tests.stress.scenarios` lists them all. An instance travels to each worker
    process (pickled with the :class:`Job`), so per-process state lives on that process's copy.
    """

    name = "mixed"
    summary = "reads and writes of every kind, at the database's default isolation level"
    databases: tuple[str, ...] = ("postgresql", "mariadb")
    isolation_level: str | None = None  # the engines' level; None: the database's default
    models: tuple[type[Base], ...] = ()  # registered beside Hot and Ref
    #: per model, what ``register`` is given beside it (``{"unique": [...]}``)
    register_options: dict[type[Base], dict[str, Any]] = {}  # noqa: RUF012 (read only)
    cache_options: dict[str, Any] = {}  # noqa: RUF012 (read only)
    worker_class: type[Worker] = Worker

    def populate(self, engine: Engine, versions: VersionCounter) -> list[WriteRecord]:
        return populate(engine, versions)

    def cache_url(self, job: Job) -> str:
        """The Redis URL this process's cache uses (the checker's own clients use the real one)."""
        return job.redis_url

    def worker(self, job: Job, factory: Any, versions: VersionCounter, n: int, snapshot: bool):
        rng = random.Random(f"{job.seed}-{job.index}-{n}")
        return self.worker_class(factory, versions, rng, snapshot)

    def started(self, job: Job, cache: IdentityCache) -> None:
        """Called in each worker process once its threads run."""

    def finished(self, job: Job, cache: IdentityCache, records: Records) -> None:
        """Called in each worker process once its threads have ended."""

    def excuse(self, records: Records) -> Callable[[ReadRecord, WriteRecord], bool] | None:
        """Which stale reads are not failures (the read, and the newest write it missed)."""
        return None

    def judge(self, url: str, redis_url: str, prefix: str, records: Records, report: Report):
        """Checks beyond the common ones (stale, dirty, mismatched entries of the hot table)."""


MIXED = Scenario()


# -- one worker process -------------------------------------------------------------------------


@dataclass
class Job:
    index: int
    db_url: str
    redis_url: str
    prefix: str
    seed: int
    threads: int
    operations: list[int]
    deadline: int
    configure_cache: Callable[[IdentityCache], None] | None = None
    scenario: Scenario = MIXED


def run_job(job: Job, barrier: Any = None) -> tuple[Records, dict[str, int]]:
    """One process's share: its own engine, cache and counter client, ``job.threads`` threads."""
    scenario = job.scenario
    engine = make_engine(job.db_url, job.threads + 2, scenario.isolation_level)
    cache = make_cache(
        scenario.cache_url(job),
        job.prefix,
        job.configure_cache,
        scenario.models,
        scenario.register_options,
        **scenario.cache_options,
    )
    versions = VersionCounter(job.redis_url, job.prefix)
    factory = sessionmaker(engine, class_=CachingSession, cache=cache)
    with engine.connect() as conn:
        level = conn.get_isolation_level()
    snapshot_reads = level not in ("READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT")
    workers = [
        scenario.worker(job, factory, versions, n, snapshot_reads) for n in range(job.threads)
    ]
    if barrier is not None:
        barrier.wait(timeout=120)
    start = threading.Barrier(job.threads)
    scenario.started(job, cache)

    def body(worker: Worker, operations: int) -> None:
        start.wait()
        worker.run(operations, job.deadline)

    threads = [
        threading.Thread(target=body, args=(w, n), daemon=True)
        for w, n in zip(workers, job.operations, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = Records()
    for worker in workers:
        records.merge(worker.out)
    scenario.finished(job, cache, records)
    stats = cache.stats()
    engine.dispose()
    counters = {k: v for k, v in stats.items() if isinstance(v, int)}
    counters.update((f"near_{k}", v) for k, v in stats.get("near", {}).items())
    return records, counters


def _process_main(job: Job, barrier: Any, results: Any) -> None:
    try:
        results.put((job.index, run_job(job, barrier), None))
    except BaseException:
        results.put((job.index, None, traceback.format_exc()))


# -- the analysis -------------------------------------------------------------------------------


class History:
    """The committed versions of one row, in commit order (= version order)."""

    def __init__(self, events: list[WriteRecord]) -> None:
        by_return = sorted(events, key=lambda e: e[4])
        self.returned = [e[4] for e in by_return]
        # the newest (version, state, commit returned) of the commits returned so far
        self.newest: list[tuple[int, int | None, int]] = []
        best: tuple[int, int | None, int] = (-1, None, 0)
        for _, version, state, _, returned, _ in by_return:
            if version > best[0]:
                best = (version, state, returned)
            self.newest.append(best)
        deletes = sorted((e[1], e[3]) for e in events if e[2] is None)
        self.delete_versions = [v for v, _ in deletes]
        self.delete_called = [c for _, c in deletes]
        for i in range(len(deletes) - 2, -1, -1):  # suffix minimum of the commit-call times
            self.delete_called[i] = min(self.delete_called[i], self.delete_called[i + 1])

    def newest_before(self, started: int) -> tuple[int, int | None, int]:
        index = bisect.bisect_left(self.returned, started) - 1
        return self.newest[index] if index >= 0 else (-1, None, 0)

    def deleted_after(self, version: int, ended: int) -> bool:
        """Whether a delete newer than ``version`` had begun to commit by ``ended``."""
        index = bisect.bisect_right(self.delete_versions, version)
        return index < len(self.delete_versions) and self.delete_called[index] < ended


def analyse(
    records: Records,
    initial: list[WriteRecord],
    excuse: Callable[[ReadRecord, WriteRecord], bool] | None = None,
) -> tuple[int, int, list[str], int]:
    """(stale, dirty, examples, excused) over every read: stale reads for which ``excuse(read,
    the newest write it missed)`` holds are counted as excused, not stale."""
    events: dict[int, list[WriteRecord]] = defaultdict(list)
    committed: dict[tuple[int, int], WriteRecord] = {}
    every: dict[tuple[int, int], WriteRecord] = {}
    for record in initial + records.writes:
        events[record[0]].append(record)
        every[(record[0], record[1])] = record
        key = (record[0], record[1])
        if record[2] is not None and (key not in committed or record[3] < committed[key][3]):
            committed[key] = record  # a version committed twice (a lost update): the first
    uncertain = {(row, version) for row, version, _ in records.uncertain}
    uncertain_deletes = {row for row, _, state in records.uncertain if state is None}
    aborted = set(records.aborted)
    histories = {row: History(evs) for row, evs in events.items()}
    stale = dirty = excused = 0
    examples: list[str] = []

    def excused_read(read: ReadRecord, missed: int) -> bool:
        return excuse is not None and excuse(read, every[(read[0], missed)])

    def example(text: str) -> None:
        if len(examples) < 10:
            examples.append(text)

    for read in records.reads:
        row, seen, started, ended, kind = read
        history = histories[row]
        newest_version, newest_state, newest_returned = history.newest_before(started)
        ago = f"{(started - newest_returned) / 1e6:.3f} ms"
        if seen is not None:
            write = committed.get((row, seen))
            if write is None:
                if (row, seen) in uncertain:
                    continue
                dirty += 1
                why = "rolled back" if (row, seen) in aborted else "never committed"
                example(f"dirty: {kind} of row {row} saw version {seen} ({why})")
            elif write[3] > ended:
                dirty += 1
                example(f"dirty: {kind} of row {row} saw version {seen} before its commit began")
            elif seen < newest_version and excused_read(read, newest_version):
                excused += 1
            elif seen < newest_version:
                stale += 1
                was = "deleted" if newest_state is None else "committed"
                example(
                    f"stale: {kind} of row {row} saw version {seen}, but version {newest_version} "
                    f"({was}) had returned {ago} before the read started"
                )
        elif newest_state is not None and not history.deleted_after(newest_version, ended):
            if row in uncertain_deletes:
                continue
            if excused_read(read, newest_version):
                excused += 1
                continue
            stale += 1
            example(
                f"stale: {kind} of row {row} saw no row, but version {newest_version} had "
                f"returned {ago} before the read started and no later delete had begun"
            )
    return stale, dirty, examples, excused


def check_quiescent(db_url: str, redis_url: str, prefix: str) -> tuple[int, list[str]]:
    """Rows whose cache entry differs from the database, once nothing runs any more."""
    engine = make_engine(db_url, 2)
    cache = make_cache(redis_url, prefix)
    model = cache.model_for(Hot.__mapper__)
    assert model is not None
    rows = list(range(1, ROW_IDS + 1))
    with Session(engine) as plain:
        truth = {
            row: (version, payload)
            for row, version, payload in plain.execute(select(Hot.id, Hot.version, Hot.payload))
        }
    bad: dict[int, str] = {}
    # 1. the raw entries, judged the way a lookup judges them
    keys = [model.keys.row_key((row,)) for row in rows]
    read = cache.guarded.read([model], keys)
    assert read is not None, "Redis did not answer"
    (generation,), _, payloads = read
    for row, payload in zip(rows, payloads, strict=True):
        outcome = classify(model, generation, payload, (row,))
        if outcome is None:
            continue  # a miss: nothing to serve
        cached = None if isinstance(outcome, str) else (outcome.value["version"],)
        actual = None if row not in truth else (truth[row][0],)
        if cached != actual:
            bad[row] = f"row {row}: cache entry holds {cached}, the database {actual}"
    # 2. through the hit path of fresh caching sessions (the first may fill, the second hits)
    factory = sessionmaker(engine, class_=CachingSession, cache=cache)
    for _ in range(2):
        for row in rows:
            with factory() as session:
                obj = session.get(Hot, row)
                got = None if obj is None else (obj.version, obj.payload)
            if got != truth.get(row) and row not in bad:
                bad[row] = f"row {row}: a cached get returned {got}, the database {truth.get(row)}"
    with factory() as session:
        found = session.get_many(Hot, rows)
        for row, obj in zip(rows, found, strict=True):
            got = None if obj is None else (obj.version, obj.payload)
            if got != truth.get(row) and row not in bad:
                bad[row] = f"row {row}: get_many returned {got}, the database {truth.get(row)}"
    engine.dispose()
    return len(bad), [bad[row] for row in sorted(bad)]


# -- the run ------------------------------------------------------------------------------------


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run(
    db_url: str,
    redis_url: str = REDIS_URL,
    *,
    operations: int = 10_000,
    threads: int = 3,
    processes: int = 2,
    seed: int = 0,
    prefix: str | None = None,
    configure_cache: Callable[[IdentityCache], None] | None = None,
    time_limit: float = 3600.0,
    keep: bool = False,
    scenario: Scenario | str = MIXED,
) -> Report:
    """Run the checker against the server of ``db_url`` (its database names the admin database
    used to create and drop the checker's own) and the Redis at ``redis_url``.

    ``processes`` worker processes (0: threads of this process only) of ``threads`` threads share
    ``operations``; ``configure_cache`` is applied to every worker's cache (e.g.
    :func:`drop_evictions`); workers stop early once ``time_limit`` seconds have passed.
    ``scenario`` is a :class:`Scenario` or the name of one in :mod:`tests.stress.scenarios`."""
    if isinstance(scenario, str):
        from .scenarios import SCENARIOS  # the scenarios build on this module

        scenario = SCENARIOS[scenario]
    suffix = uuid.uuid4().hex[:8]
    prefix = prefix or f"sa_cache_checker_{os.getpid()}_{suffix}"
    name = f"sa_cache_checker_{os.getpid()}_{suffix}"
    began = time.monotonic()
    url = create_database(db_url, name)
    versions = VersionCounter(redis_url, prefix)
    report = Report(
        database=make_url(url).get_backend_name(),
        isolation_level="?",
        scenario=scenario.name,
        processes=processes,
        threads=threads,
        seed=seed,
    )
    try:
        engine = make_engine(url, 2, scenario.isolation_level)
        initial = scenario.populate(engine, versions)
        with engine.connect() as conn:
            report.isolation_level = conn.get_isolation_level()
        engine.dispose()
        deadline = clock() + int(time_limit * 1e9)
        shares = _split(operations, max(processes, 1))
        jobs = [
            Job(
                i, url, redis_url, prefix, seed, threads, split, deadline, configure_cache, scenario
            )
            for i, split in enumerate(_split(n, threads) for n in shares)
        ]
        records = Records()
        stats: Counter[str] = Counter()
        if processes == 0:
            job_records, job_stats = run_job(jobs[0])
            records.merge(job_records)
            stats.update(job_stats)
        else:
            _run_processes(jobs, time_limit, records, stats)
        report.stale, report.dirty, report.examples, report.stale_during_outage = analyse(
            records, initial, scenario.excuse(records)
        )
        report.mismatches, mismatch_lines = check_quiescent(url, redis_url, prefix)
        report.examples += mismatch_lines[:10]
        report.mismatches += len(records.wrong_answers)
        report.examples += records.wrong_answers[:10]
        report.outages = len(records.outages)
        report.outage_time = sum(end - begin for begin, end in records.outages) / 1e9
        report.delivery_bound = records.delivery_bound
        report.undelivered = records.undelivered
        scenario.judge(url, redis_url, prefix, records, report)
        report.operations = sum(records.operations.values())
        report.kinds = dict(records.operations)
        report.reads += len(records.reads)  # a scenario's judge may count reads of its own
        report.absent_reads = sum(1 for read in records.reads if read[1] is None)
        report.writes = records.outcomes["committed"]
        report.versions = len(records.writes)
        report.rollbacks = records.outcomes["rolled back"]
        report.conflicts = records.outcomes["conflict"]
        report.errors = len(records.errors)
        report.error_messages = records.errors[:5]
        report.cache = {
            k: stats[k]
            for k in ("hits", "misses", "fills", "evictions", "skipped", "errors", "rejected")
        }
        report.cache.update((k, v) for k, v in sorted(stats.items()) if k.startswith("near_"))
        if records.outcomes["stopped by the time limit"]:
            report.examples.append(
                f"{records.outcomes['stopped by the time limit']} threads stopped by the time limit"
            )
    finally:
        if not keep:
            drop_database(db_url, name)
            make_cache(redis_url, prefix).store.delete_prefix(prefix + ":")
        versions.close()
        report.wall_time = time.monotonic() - began
    return report


def _run_processes(
    jobs: list[Job], time_limit: float, records: Records, stats: Counter[str]
) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(jobs))
    results = context.Queue()
    children = [
        context.Process(target=_process_main, args=(job, barrier, results), daemon=True)
        for job in jobs
    ]
    for child in children:
        child.start()
    give_up = time.monotonic() + time_limit + 300
    try:
        pending = len(children)
        while pending:
            try:
                index, outcome, error = results.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > give_up:
                    records.errors.append("a worker process did not report in time")
                    break
                if sum(child.is_alive() for child in children) < pending:
                    time.sleep(2)  # a process that just exited may still be flushing its result
                    if results.empty() and sum(c.is_alive() for c in children) < pending:
                        records.errors.append("a worker process died without reporting")
                        break
                continue
            pending -= 1
            if error is not None:
                records.errors.append(f"process {index}: {error}")
                continue
            job_records, job_stats = outcome
            records.merge(job_records)
            stats.update(job_stats)
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.terminate()
                child.join(timeout=10)


# -- command line -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from .scenarios import SCENARIOS  # the scenarios build on this module

    parser = argparse.ArgumentParser(
        prog="python -m tests.stress",
        description=__doc__.split("\n\n")[0],
        epilog="scenarios: "
        + "; ".join(
            f"{s.name} ({', '.join(s.databases)}): {s.summary}" for s in SCENARIOS.values()
        ),
    )
    parser.add_argument("--db", choices=sorted(SERVERS), default="postgresql")
    parser.add_argument("--db-url", help="server URL (its database, if any, is the admin database)")
    parser.add_argument("--redis", default=REDIS_URL)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="run this scenario (repeatable; default: every scenario that applies to --db)",
    )
    parser.add_argument("--operations", type=int, default=100_000, help="per scenario")
    parser.add_argument("--threads", type=int, default=3, help="threads per process")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix", default=None, help="Redis key prefix (default: unique)")
    parser.add_argument("--time-limit", type=float, default=3600.0, help="seconds")
    parser.add_argument(
        "--break",
        dest="breaker",
        choices=sorted(BREAKERS),
        help="run a deliberately broken configuration (the checker must fail): drop every "
        "eviction, make fills unconditional, or drop the collections' evictions",
    )
    args = parser.parse_args(argv)
    url = args.db_url or SERVERS[args.db]
    # SQLAlchemy calls MariaDB's backend "mysql"; the scenarios name the databases they check
    backend = make_url(url).get_backend_name()
    database = "mariadb" if backend == "mysql" else backend
    names = args.scenario or [s.name for s in SCENARIOS.values() if database in s.databases]
    if not names:
        parser.error(f"no scenario applies to {database}: name one with --scenario")
    reports = []
    for name in names:
        report = run(
            url,
            args.redis,
            operations=args.operations,
            threads=args.threads,
            processes=args.processes,
            seed=args.seed,
            prefix=args.prefix,
            configure_cache=BREAKERS[args.breaker] if args.breaker else None,
            time_limit=args.time_limit,
            scenario=SCENARIOS[name],
        )
        print(report.format(), flush=True)
        print("OK" if report.ok else "FAILED", flush=True)
        print(flush=True)
        reports.append(report)
    for report in reports:
        print(("OK     " if report.ok else "FAILED ") + report.summary())
    return 0 if all(report.ok for report in reports) else 1


if __name__ == "__main__":
    # run as tests.stress.checker, not __main__, so the spawned workers unpickle the same module
    from tests.stress.checker import main as _main

    sys.exit(_main())
