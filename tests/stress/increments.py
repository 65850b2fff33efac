"""The ``increments`` scenario: read-modify-write increments at REPEATABLE READ and SERIALIZABLE.

A few counter rows; each increment is one transaction at REPEATABLE READ or SERIALIZABLE (chosen
at random) that does ``get(Counter, k)`` through :class:`~sa_cache.CachingSession` (the cache is
warm, so a hit is possible), sets ``value + 1`` and commits, retrying on a serialization failure
or deadlock (SQLSTATE 40001 / 40P01). Without the cache PostgreSQL makes such increments safe: a
transaction whose snapshot read the counter before another increment committed fails (first
updater wins) and retries. With a cache hit the transaction has read nothing from its snapshot;
if the hit predates a concurrent increment's commit, the UPDATE overwrites it: a *lost update*.

The workers count their committed increments per counter; at the end each counter's value must
equal that count (``lost updates`` = the shortfall; increments whose ``commit()`` raised
something other than a serialization failure may or may not have committed and widen the
accepted range). The counter's value is its version for the checker's stale/dirty analysis
(value ``v`` is committed by exactly one increment when none is lost), so the plain reads beside
(fresh-session ``get`` / ``get_many`` at READ COMMITTED, and short REPEATABLE READ read
transactions) are judged as in the mixed workload. Only PostgreSQL: MariaDB's REPEATABLE READ
does not detect write conflicts.

``read_outside=True`` (tests only) breaks the increments on purpose: each one reads the counter
in a separate READ COMMITTED session (a cache hit when warm) and only then begins its snapshot
transaction with the UPDATE, which is what a cache hit inside the transaction amounts to. The
checker must then report lost updates.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Integer, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Mapped, Session, mapped_column

from sa_cache import CachingSession

from .checker import (
    Base,
    Records,
    Report,
    Scenario,
    Scope,
    VersionCounter,
    Worker,
    WriteRecord,
    clock,
    make_cache,
    make_engine,
    populate,
)

COUNTERS = range(1001, 1005)  # few rows: increments collide often
RETRY_CODES = ("40001", "40P01")  # serialization_failure, deadlock_detected
LEVELS = ("REPEATABLE READ", "SERIALIZABLE")
MAX_ATTEMPTS = 100


class Counter(Base):
    __tablename__ = "sa_cache_checker_counter"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    value: Mapped[int] = mapped_column(BigInteger)


def retryable(exc: OperationalError) -> bool:
    return getattr(exc.orig, "sqlstate", None) in RETRY_CODES


class IncrementWorker(Worker):
    read_fraction = 0.5
    read_kinds = {"counter_get": 4, "counter_get_many": 2, "counter_transaction": 2}
    write_kinds = {"increment": 1}
    read_outside = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.binds = {
            level: self.engine.execution_options(isolation_level=level) for level in LEVELS
        }

    # -- reads ----------------------------------------------------------------------------

    def read_counter_get(self) -> None:
        self.read_counters("get", [self.rng.choice(COUNTERS)], None)

    def read_counter_get_many(self) -> None:
        self.read_counters("get_many", self.rng.sample(COUNTERS, 2), None)

    def read_counter_transaction(self) -> None:
        """Two or three lookups in one REPEATABLE READ transaction: "started" is its first."""
        rows = [self.rng.choice(COUNTERS) for _ in range(self.rng.randint(2, 3))]
        self.read_counters("get", rows, "REPEATABLE READ")

    def read_counters(self, kind: str, rows: list[int], level: str | None) -> None:
        bind = self.engine if level is None else self.binds[level]
        scope = Scope(snapshot=level is not None, label="" if level is None else "rr.")
        with self.factory(bind=bind) as session:
            if kind == "get_many":
                scope.begin(rows)
                found = session.get_many(Counter, rows)  # type: ignore[attr-defined]
                ended = clock()
                for row, obj in zip(rows, found, strict=True):
                    self.out.reads.append((row, obj.value, scope.started(row), ended, kind))
                return
            for row in rows:
                scope.begin([row])
                obj = session.get(Counter, row)
                assert obj is not None
                self.out.reads.append(
                    (row, obj.value, scope.started(row), clock(), scope.label + kind)
                )

    # -- increments -----------------------------------------------------------------------

    def write_increment(self) -> None:
        row = self.rng.choice(COUNTERS)
        level = self.rng.choice(LEVELS)
        for _ in range(MAX_ATTEMPTS):
            if self.try_increment(row, level):
                return
            self.out.outcomes["serialization failure, retried"] += 1
        raise RuntimeError(f"an increment failed {MAX_ATTEMPTS} times in a row")

    def try_increment(self, row: int, level: str) -> bool:
        """One attempt: whether it committed (False: a serialization failure, to retry)."""
        with self.factory(bind=self.binds[level]) as session:
            try:
                value = self.read_value(session, row) + 1
                session.flush()
            except OperationalError as exc:
                session.rollback()
                if retryable(exc):
                    return False
                raise
            called = clock()
            try:
                session.commit()
            except OperationalError as exc:
                session.rollback()
                if retryable(exc):  # PostgreSQL rolled it back
                    return False
                self.out.uncertain.append((row, value, value))
                self.out.uncertain_increments[row] += 1
                raise
            returned = clock()
        self.out.writes.append((row, value, value, called, returned, f"increment.{level}"))
        self.out.increments[row] += 1
        self.out.outcomes["committed"] += 1
        return True

    def read_value(self, session: Session, row: int) -> int:
        """Read the counter and set it one higher, leaving the UPDATE to the flush."""
        if self.read_outside:
            with self.factory() as reader:  # READ COMMITTED: a hit when the cache is warm
                obj = reader.get(Counter, row)
                assert obj is not None
                value = obj.value
            session.execute(update(Counter).where(Counter.id == row).values(value=value + 1))
            return value
        counter = session.get(Counter, row)
        assert counter is not None
        counter.value += 1
        return counter.value - 1


class BrokenIncrementWorker(IncrementWorker):
    read_outside = True


class IncrementScenario(Scenario):
    name = "increments"
    summary = (
        "read-modify-write increments of a few counters at REPEATABLE READ and SERIALIZABLE "
        "(lost updates counted), with plain reads beside"
    )
    databases = ("postgresql",)
    models = (Counter,)
    worker_class: type[Worker] = IncrementWorker

    def __init__(self, read_outside: bool = False) -> None:
        if read_outside:
            self.worker_class = BrokenIncrementWorker

    def populate(self, engine: Engine, versions: VersionCounter) -> list[WriteRecord]:
        records = populate(engine, versions)
        with engine.begin() as conn:
            conn.execute(insert(Counter), [{"id": row, "value": 0} for row in COUNTERS])
        now = clock()
        return records + [(row, 0, 0, now, now, "initial") for row in COUNTERS]

    def judge(self, url: str, redis_url: str, prefix: str, records: Records, report: Report):
        engine = make_engine(url, 1)
        with Session(engine) as session:
            rows = session.execute(select(Counter.id, Counter.value))
            final = {row: value for row, value in rows}
        engine.dispose()
        report.increments = sum(records.increments.values())
        retried = records.outcomes["serialization failure, retried"]
        report.notes.append(f"{retried} serialization failures or deadlocks retried")
        for row in COUNTERS:
            low = records.increments[row]
            high = low + records.uncertain_increments[row]
            if final[row] < low:
                report.lost_updates += low - final[row]
                report.examples.append(
                    f"lost updates: counter {row} is {final[row]} after {low} committed increments"
                )
            elif final[row] > high:
                report.mismatches += 1
                report.examples.append(
                    f"counter {row} is {final[row]}, more than the {high} increments that may "
                    "have committed"
                )
        report.mismatches += check_counters(url, redis_url, prefix, final)


def check_counters(url: str, redis_url: str, prefix: str, final: dict[int, int]) -> int:
    """Counters a cached get (twice: the first may fill) answers differently from the database."""
    engine = make_engine(url, 1)
    cache = make_cache(redis_url, prefix, None, (Counter,))
    bad = set()
    for _ in range(2):
        for row in COUNTERS:
            with CachingSession(engine, cache=cache) as session:
                obj = session.get(Counter, row)
                if obj is None or obj.value != final[row]:
                    bad.add(row)
    engine.dispose()
    return len(bad)
