"""The shapes of a warm read side by side, in one run: a raw redis-py GET of the very bytes
sa_cache stores for the row (the floor a Redis hit is held to), sa_cache's Redis hit (a fresh
session, and a lookup in a session already open), an identity-map hit, ``get_many`` of 1000
rows per key, and the floor under a hit: the raw GET followed by a lookup that places the row's
values with no cache work at all (:func:`placing_sessions`), in a fresh and in an open session.
``python -m benchmarks.readshapes [BEFORE] [--awake]``: with a checkout BEFORE (e.g.
``/work/main``), its hits and ``get_many`` run interleaved with this one's; ``--awake``: with
the machine's CPUs kept from halting (:mod:`benchmarks.awake`), the fast round trip of a busy
machine.

Short batches of every shape alternate round after round, so whatever else the machine does
weighs on all alike. It prints each shape's median call (wall clock, each call timed alone) and
CPU time per call, and the ratios the targets name (hit / raw GET <= 1.3, get_many <= 10 us a
key). SQLite in memory: a hit reads no database.
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import redis
from sqlalchemy import Boolean, DateTime, Float, Integer, String, Text, create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from .env import REDIS_URL, TIMEOUT

ROWS = 1000
ROUNDS = 40


def mapped_row(cache: Any = None) -> type[Any]:
    """A 10-column model registered with ``cache`` (None: none), on a declarative base of its
    own (so two checkouts' packages can map the same table side by side)."""

    class Base(DeclarativeBase):
        pass

    class Row(Base):
        __tablename__ = "sa_cache_bench_rows"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        a: Mapped[str] = mapped_column(String(50))
        b: Mapped[str] = mapped_column(String(50))
        c: Mapped[bool] = mapped_column(Boolean)
        d: Mapped[dt.datetime] = mapped_column(DateTime)
        e: Mapped[float] = mapped_column(Float)
        f: Mapped[str] = mapped_column(Text)
        g: Mapped[int] = mapped_column(Integer)
        h: Mapped[str] = mapped_column(String(20))
        i: Mapped[bool] = mapped_column(Boolean)

    if cache is not None:
        cache.register(Row)
    return Row


def fill_table(engine: Engine, row: type[Any], rows: int) -> None:
    when = dt.datetime(2020, 1, 1, 12, 0, 0, 123)
    row.metadata.drop_all(engine)
    row.metadata.create_all(engine)
    with sessionmaker(engine)() as s:  # a plain session: nothing evicted, nothing cached
        s.add_all(
            row(id=n, a="x" * 20, b="y" * 20, c=True, d=when, e=1.5, f="t" * 100, g=n, h="h", i=0)
            for n in range(1, rows + 1)
        )
        s.commit()


def side(sa_cache: ModuleType, engine: Engine, prefix: str) -> dict[str, Callable[[], Any]]:
    """One checkout's warm hit and get_many(1000), on ``engine`` (its table filled)."""
    cache = sa_cache.IdentityCache(REDIS_URL, prefix=prefix, socket_timeout=TIMEOUT)
    row = mapped_row(cache)
    cache.flush()
    Session = sessionmaker(engine, class_=sa_cache.CachingSession, cache=cache)
    with Session() as s:
        s.get_many(row, range(1, ROWS + 1))
    for _ in range(3):
        with Session() as s:
            s.get(row, 7)

    def hit() -> None:
        with Session() as s:
            s.get(row, 7)

    def many() -> None:
        with Session() as s:
            s.get_many(row, range(1, ROWS + 1))

    open_session = Session()

    def lookup() -> None:
        open_session.expunge(open_session.get(row, 7))

    identity = Session()
    held = identity.get(row, 7)  # held: the identity map keeps only weak references

    def identity_hit() -> None:
        assert identity.get(row, 7) is held

    return {
        "hit": hit,
        "lookup": lookup,
        "identity": identity_hit,
        "many": many,
        "cache": lambda: cache,
        "row": lambda: row,
    }


def placing_sessions(engine: Engine, values: dict[str, Any]) -> sessionmaker[Any]:
    """Sessions whose identity-map misses are answered by placing ``values`` (sa_cache's own
    placement, ``_orm.place_in_session``, through the same ``Session.get`` hooks a hit passes):
    a lookup with no cache work at all, the floor under any hit."""
    from sqlalchemy.orm import Session

    from sa_cache import _orm

    class Placing(_orm.IdentityLookupHooks, Session):
        def cache_lookup(self, mapper: Any, pk: Any, token: Any, *_: Any) -> Any:
            identity_key = mapper.identity_key_from_primary_key(pk, token)
            return _orm.place_in_session(self, mapper, identity_key, values, frozenset())

    return sessionmaker(engine, class_=Placing)


def interleave(
    shapes: dict[str, tuple[Callable[[], Any], int, float]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each shape ``(fn, calls, per)`` run ``calls`` times a round, shapes alternating round
    after round. Wall clock: every call timed alone (us, divided by ``per``), so a call the
    scheduler preempted (the machine is shared) is one outlier, not a slower batch. CPU: the
    process's CPU time per call of each batch, which a round trip's wait does not count (this
    process's own cost, whatever the machine's load)."""
    wall: dict[str, list[float]] = {name: [] for name in shapes}
    cpu: dict[str, list[float]] = {name: [] for name in shapes}
    clock, cpu_clock = time.perf_counter, time.process_time
    for _ in range(rounds):
        for name, (fn, calls, per) in shapes.items():
            record = wall[name].append
            cpu_started = cpu_clock()
            for _ in range(calls):
                started = clock()
                fn()
                record((clock() - started) / per * 1e6)
            cpu[name].append((cpu_clock() - cpu_started) / calls / per * 1e6)
    return wall, cpu


def main() -> None:
    import sa_cache

    from . import awake
    from .interleaved import load

    args, measured_in = awake.regime(sys.argv[1:])
    before = args[0] if args else None
    engine = create_engine("sqlite://")
    fill_table(engine, mapped_row(), ROWS)
    after = side(sa_cache, engine, "readshapes_after")
    cache = after["cache"]()
    key = cache.registry.model_for(after["row"]().__mapper__).keys.row_key((7,))
    stored = cache.store.get_many([key])[0]
    raw_client = redis.Redis.from_url(REDIS_URL, socket_timeout=TIMEOUT)
    raw_client.set("readshapes_raw:7", stored)

    def raw_get() -> None:
        raw_client.get("readshapes_raw:7")

    row = after["row"]()
    with sessionmaker(engine)() as plain:
        loaded = plain.get(row, 7)
        values = {attr.key: getattr(loaded, attr.key) for attr in row.__mapper__.column_attrs}
    Placing = placing_sessions(engine, values)  # noqa: N806
    placing = Placing()

    def floor_open() -> None:
        raw_client.get("readshapes_raw:7")
        placing.expunge(placing.get(row, 7))

    def floor_fresh() -> None:
        with Placing() as fresh:
            raw_client.get("readshapes_raw:7")
            fresh.get(row, 7)

    shapes: dict[str, tuple[Callable[[], Any], int, float]] = {
        "raw redis-py GET": (raw_get, 200, 1.0),
        "sa_cache hit, fresh session": (after["hit"], 200, 1.0),
        "sa_cache hit, open session": (after["lookup"], 200, 1.0),
        "identity-map hit": (after["identity"], 200, 1.0),
        "floor: raw GET + placement, fresh": (floor_fresh, 200, 1.0),
        "floor: raw GET + placement, open": (floor_open, 200, 1.0),
        "get_many(1000), per key": (after["many"], 2, 1000.0),
    }
    if before:
        old = side(load(before, "sa_cache_before"), engine, "readshapes_before")
        shapes["before: sa_cache hit, fresh session"] = (old["hit"], 200, 1.0)
        shapes["before: sa_cache hit, open session"] = (old["lookup"], 200, 1.0)
        shapes["before: get_many(1000), per key"] = (old["many"], 2, 1000.0)
    with measured_in:
        wall, cpu = interleave(shapes, ROUNDS)
    medians = {name: statistics.median(values) for name, values in wall.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    print(f"{'':40} {'wall us':>9} {'cpu us':>9}")
    for name, us in medians.items():
        print(f"{name:40} {us:9.2f} {cpu_medians[name]:9.2f}")
    for label, table in (("wall", medians), ("cpu", cpu_medians)):
        raw = table["raw redis-py GET"]
        for which in ("", "before: ") if before else ("",):
            for session in ("fresh", "open"):
                ratio = table[f"{which}sa_cache hit, {session} session"] / raw
                print(f"{f'{which}hit / raw GET, {session} session ({label})':40} {ratio:9.2f}x")
        for session in ("fresh", "open"):
            ratio = table[f"floor: raw GET + placement, {session}"] / raw
            print(f"{f'floor / raw GET, {session} session ({label})':40} {ratio:9.2f}x")
    if before:
        for shape in (
            "sa_cache hit, fresh session",
            "sa_cache hit, open session",
            "get_many(1000), per key",
        ):
            for label, table in (("wall", medians), ("cpu", cpu_medians)):
                ratio = table[shape] / table[f"before: {shape}"]
                print(f"{f'after / before ({label}): ' + shape:40} {ratio:9.2f}")
    raw_client.delete("readshapes_raw:7")
    cache.flush()


if __name__ == "__main__":
    main()
