"""The near cache's two figures: what a hit costs, and how stale another process's commit reads.

``python -m benchmarks.near [--trials 1000] [--redis URL] [--rounds 7] [--hit-only]
[--before CHECKOUT]``

**Hit path**, side by side in one run, interleaved round by round, each lookup timed alone: an
identity-map hit (the floor), a near-cache hit, an in-process store hit and a Redis hit, each
both in a fresh session (what a request does) and in a session that already exists (the found
object expunged afterwards, outside the timing, so the identity map misses every time). Medians
of per-round medians, microseconds. SQLite file, the benchmarks' 10-column user model. Beside
them the floor of such a lookup without any cache work (:func:`floors`).

**Cross-process staleness**: a writer process commits a change of one row through its own cache
(the commit's eviction included) and notes the time the commit returned; a reader process, with
its own near cache already holding that row, reads it in a loop of fresh sessions until it sees
the new version, noting when each read began. One trial's staleness is how long after the
commit returned the last read that still answered the old version began (0 if none did). The
commit lands at a random moment of the reader's loop. The same trials with the near cache off
measure the method itself (every read goes to Redis: it must report 0).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import create_engine, inspect, update
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from sa_cache import CachingSession, IdentityCache, NearCache
from sa_cache.near import NearStore

from .models import User, UserColumns, populate
from .readshapes import placing_sessions

REDIS_URL = os.environ.get("SA_CACHE_TEST_REDIS") or "redis://127.0.0.1:6379/0"
ROW = 42


def _engine(path: str) -> Any:
    return create_engine(f"sqlite:///{path}", connect_args={"timeout": 30})


def _confirmed(cache: IdentityCache) -> None:
    store = cache.store
    if hasattr(store, "invalidations"):  # a near store (of either checkout)
        started = time.monotonic()
        while store.invalidations.confirmed() <= started:
            time.sleep(0.01)


# -- the hit path ---------------------------------------------------------------------------------


def hit_path(
    db: str, url: str, rounds: int, per_round: int, before: str | None = None
) -> dict[str, float]:
    """``before``: a checkout whose near-cache hit runs interleaved with this one's, on a model
    of its own mapped to the same table (``before_near_fresh``, ``before_near_open``)."""
    engine = _engine(db)
    prefix = f"near_bench_{uuid.uuid4().hex[:8]}"
    caches = {
        "near": IdentityCache(url, prefix=prefix + "_near", near_cache=True),
        "memory": IdentityCache(prefix=prefix + "_mem"),
        "redis": IdentityCache(url, prefix=prefix + "_redis"),
    }
    sessions: dict[str, sessionmaker[Any]] = {}
    models: dict[str, type[Any]] = {}
    for name, cache in caches.items():
        cache.register(User)
        sessions[name] = sessionmaker(engine, class_=CachingSession, cache=cache)
        models[name] = User
    if before is not None:
        from .interleaved import load

        old = load(before, "sa_cache_before")

        class BeforeBase(DeclarativeBase):
            pass

        class BeforeUser(UserColumns, BeforeBase):
            pass

        caches["before_near"] = old.IdentityCache(url, prefix=prefix + "_bn", near_cache=True)
        caches["before_near"].register(BeforeUser)
        sessions["before_near"] = sessionmaker(
            engine, class_=old.CachingSession, cache=caches["before_near"]
        )
        models["before_near"] = BeforeUser
    for name, cache in caches.items():
        _confirmed(cache)
        for _ in range(3):
            with sessions[name]() as s:
                s.get(models[name], ROW)
    holder = Session(engine)
    kept = holder.get(User, ROW)  # the identity map holds it weakly: keep it referenced

    def fresh(name: str) -> Callable[[], float]:
        model = models[name]

        def once() -> float:
            start = time.perf_counter()
            with sessions[name]() as s:
                s.get(model, ROW)
            return time.perf_counter() - start

        return once

    def open_session(name: str) -> Callable[[], float]:
        session = sessions[name]()
        model = models[name]

        def once() -> float:
            start = time.perf_counter()
            found = session.get(model, ROW)
            elapsed = time.perf_counter() - start
            session.expunge(found)
            return elapsed

        return once

    def idmap() -> float:
        start = time.perf_counter()
        holder.get(User, ROW)
        return time.perf_counter() - start

    variants: dict[str, Callable[[], float]] = {"idmap": idmap}
    for name in caches:
        variants[f"{name}_fresh"] = fresh(name)
        variants[f"{name}_open"] = open_session(name)
    variants.update(floors(engine, kept))
    medians: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            timings = [variants[name]() for _ in range(per_round)]
            medians[name].append(statistics.median(timings) * 1e6)
    assert kept is not None
    near_stats = caches["near"].stats()["near"]
    for cache in caches.values():
        if hasattr(cache.store, "invalidations"):  # a near store, of either checkout
            cache.store.close()
        cache.flush()
    result = {name: round(statistics.median(values), 2) for name, values in medians.items()}
    result["near_hits_counted"] = near_stats["hits"]
    return result


def floors(engine: Any, kept: Any) -> dict[str, Callable[[], float]]:
    """What a ``Session.get`` that misses the identity map and builds the instance costs with no
    cache work at all, in an open session (the instance expunged afterwards, untimed):

    - ``floor_place``: sa_cache's own placement (``_orm.place_in_session``: the new instance,
      the identity map, the ``load`` events) of values already in hand, through the same
      ``Session.get`` hooks a hit passes: what a hit costs if reading the cache were free;
    - ``floor_merge``: SQLAlchemy's own way to put a row it already has into a session without
      SQL, ``merge(detached, load=False)``.
    """
    values = {attr.key: getattr(kept, attr.key) for attr in inspect(User).column_attrs}
    placing = placing_sessions(engine, values)()
    merging = Session(engine)
    with Session(engine) as loading:
        detached = loading.get(User, ROW)  # detached when its session closes

    def place() -> float:
        start = time.perf_counter()
        found = placing.get(User, ROW)
        elapsed = time.perf_counter() - start
        placing.expunge(found)
        return elapsed

    def merge() -> float:
        start = time.perf_counter()
        found = merging.merge(detached, load=False)
        elapsed = time.perf_counter() - start
        merging.expunge(found)
        return elapsed

    return {"floor_place": place, "floor_merge": merge}


# -- cross-process staleness ----------------------------------------------------------------------


def _reader(db: str, url: str, prefix: str, near: bool, pipe: Any) -> None:
    cache = IdentityCache(url, prefix=prefix, near_cache=NearCache() if near else False)
    cache.register(User)
    _confirmed(cache)
    Reader = sessionmaker(_engine(db), class_=CachingSession, cache=cache)  # noqa: N806
    while True:
        expected = pipe.recv()
        if expected is None:
            break
        for _ in range(3):  # the row is cached (in memory, with the near cache) before the commit
            with Reader() as s:
                assert s.get(User, ROW).login_count == expected - 1
        pipe.send("ready")
        last_stale = -1.0
        while True:
            began = time.monotonic()
            with Reader() as s:
                seen = s.get(User, ROW).login_count
            if seen >= expected:
                fresh_at = time.monotonic()
                break
            last_stale = began
        committed_at = pipe.recv()
        pipe.send((max(0.0, last_stale - committed_at), fresh_at - committed_at))
    pipe.send(cache.stats().get("near"))


def staleness(db: str, url: str, trials: int, near: bool) -> dict[str, Any]:
    prefix = f"near_stale_{uuid.uuid4().hex[:8]}"
    writer_cache = IdentityCache(url, prefix=prefix, near_cache=near)
    writer_cache.register(User)
    Writer = sessionmaker(_engine(db), class_=CachingSession, cache=writer_cache)  # noqa: N806
    with Writer() as s:
        s.execute(update(User).where(User.id == ROW).values(login_count=0))
        s.commit()
    writer_cache.evict(User, ROW)
    mine, theirs = multiprocessing.Pipe()
    reader = multiprocessing.get_context("spawn").Process(
        target=_reader, args=(db, url, prefix, near, theirs)
    )
    reader.start()
    stale: list[float] = []
    visible: list[float] = []
    try:
        for trial in range(1, trials + 1):
            mine.send(trial)
            assert mine.recv() == "ready"
            time.sleep(random.uniform(0, 0.002))  # a random moment of the reader's loop
            with Writer() as s:
                s.get(User, ROW).login_count = trial
                s.commit()
            mine.send(time.monotonic())
            stale_s, visible_s = mine.recv()
            stale.append(stale_s * 1000)
            visible.append(visible_s * 1000)
        mine.send(None)
        reader_near = mine.recv()
    finally:
        reader.join(timeout=30)
        if isinstance(writer_cache.store, NearStore):
            writer_cache.store.close()
        writer_cache.flush()
    return {
        "near": near,
        "trials": trials,
        "stale_trials": sum(1 for s in stale if s > 0),
        "stale_ms": _spread(stale),
        "visible_ms": _spread(visible),
        "reader_near_stats": reader_near,
    }


def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(fraction: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 3)

    return {"p50": at(0.50), "p99": at(0.99), "max": round(ordered[-1], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--redis", default=REDIS_URL)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=2000)
    parser.add_argument("--hit-only", action="store_true", help="the hit path alone")
    parser.add_argument("--before", help="a checkout whose near hit runs beside this one's")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        db = os.path.join(folder, "near.db")
        engine = _engine(db)
        populate(engine)
        engine.dispose()
        out: dict[str, Any] = {
            "hit_us": hit_path(db, args.redis, args.rounds, args.per_round, args.before)
        }
        if not args.hit_only:
            out["staleness_near"] = staleness(db, args.redis, args.trials, near=True)
            out["staleness_redis_only"] = staleness(
                db, args.redis, max(100, args.trials // 5), False
            )
    hits = out["hit_us"]
    out["near_hit_vs_idmap"] = {
        "fresh": round(hits["near_fresh"] / hits["idmap"], 2),
        "open": round(hits["near_open"] / hits["idmap"], 2),
        "floor_place (open)": round(hits["floor_place"] / hits["idmap"], 2),
        "floor_merge (open)": round(hits["floor_merge"] / hits["idmap"], 2),
    }
    if args.before:
        out["near_hit_vs_idmap"]["before: fresh"] = round(
            hits["before_near_fresh"] / hits["idmap"], 2
        )
        out["near_hit_vs_idmap"]["before: open"] = round(
            hits["before_near_open"] / hits["idmap"], 2
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
