"""In-process measurements: every path run side by side, interleaved round by round (a fresh
random order each round) so that machine noise lands on all of them alike. Each round times a
block of operations one by one; a round's figure is the median operation, the reported figure
the median of the rounds."""

from __future__ import annotations

import gc
import pickle
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from . import env, paths
from .models import User

Block = Callable[[Sequence[int]], list[float]]


@dataclass
class Measure:
    """One path's figure for one operation."""

    rounds: list[float] = field(default_factory=list)  # seconds per operation (or per key)
    round_trips: float | None = None  # cache round trips per operation
    sql: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds) if self.rounds else float("nan")


@dataclass
class Settings:
    quick: bool
    hit_rounds: int
    hit_ops: int
    miss_rounds: int
    miss_ops: int
    many_sizes: tuple[int, ...]
    many_rounds: dict[int, int]
    commit_sizes: tuple[int, ...]
    commit_rounds: int
    working_set: int

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(True, 3, 40, 2, 15, (1, 10, 100, 1000), {1: 3, 10: 3, 100: 2, 1000: 1},
                       (1, 10), 2, 1500)  # fmt: skip
        return cls(False, 15, 300, 9, 60, (1, 10, 100, 1000), {1: 15, 10: 15, 100: 11, 1000: 7},
                   (1, 10, 100), 9, 10_000)  # fmt: skip


def _timed(fn: Callable[[int], Any]) -> Block:
    def block(ids: Sequence[int]) -> list[float]:
        out = []
        clock = time.perf_counter
        for uid in ids:
            start = clock()
            fn(uid)
            out.append(clock() - start)
        return out

    return block


def interleave(
    variants: dict[str, tuple[Block, env.RoundTrips | None]],
    rounds: int,
    pick_ids: Callable[[], Sequence[int]],
    rng: random.Random,
    prepare: Callable[[str, Sequence[int]], None] | None = None,
    per: Callable[[Sequence[int]], int] | None = None,
    warmup: bool = True,
) -> dict[str, Measure]:
    """Run every variant ``rounds`` times in a shuffled order per round; with ``warmup``, each
    block is preceded by one untimed operation (the first operation after another path's block
    is measurably slower on this machine, whichever path it is)."""
    results = {name: Measure() for name in variants}
    trips: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        for name in order:
            block, counter = variants[name]
            ids = pick_ids()
            if prepare is not None:
                prepare(name, ids)
            gc.collect()
            if warmup:
                block(ids[:1])
            if counter is not None:
                counter.reset()
            times = block(ids)
            divisor = per(ids) if per is not None else 1
            results[name].rounds.append(statistics.median(times) / divisor)
            if counter is not None:
                trips[name].append(counter.round_trips / len(times))
    for name, values in trips.items():
        if values:
            results[name].round_trips = statistics.median(values)
    return results


class Bench:
    """All in-process measurements against one database."""

    def __init__(self, db: str, engine: Any, settings: Settings, rng: random.Random) -> None:
        self.db = db
        self.engine = engine
        self.s = settings
        self.rng = rng
        prefix = f"{env.RUN}_{db}"
        self.paths: dict[str, paths.Path] = {
            "a": paths.NoCache(engine),
            "b": paths.FlaskCachingMemoize(engine, f"{prefix}_fc:"),
            "c": paths.DogpileMerge(engine, f"{prefix}_dp:"),
            "d": paths.SaCacheRedis(engine, f"{prefix}_sa"),
            "e": paths.SaCacheMemory(engine, f"{prefix}_mem"),
        }
        self.raw_counter = env.RoundTrips()
        self.raw = env.counted_client(self.raw_counter)
        self.raw_prefix = f"{prefix}_raw:"
        self.ids = list(range(1, settings.working_set + 1))

    def close(self) -> None:
        for path in self.paths.values():
            path.close()
        env.delete_prefix(self.raw, self.raw_prefix)
        self.raw.close()

    def sample(self, n: int) -> Callable[[], list[int]]:
        return lambda: self.rng.sample(self.ids, n)

    # -- setup ------------------------------------------------------------------------------------

    def warm(self) -> None:
        for path in self.paths.values():
            path.warm(self.ids)
        d = self.paths["d"]
        assert isinstance(d, paths.SaCacheRedis)
        pipe = self.raw.pipeline(transaction=False)
        for uid in self.ids:
            pipe.set(self.raw_prefix + str(uid), d.raw_payload(uid))
        pipe.execute()

    # -- operations -------------------------------------------------------------------------------

    def hits(self) -> tuple[dict[str, Measure], dict[str, Measure]]:
        """A warm lookup: in a fresh session each, and in one reused session (lookup only)."""
        variants: dict[str, tuple[Block, env.RoundTrips | None]] = {}
        for key, path in self.paths.items():
            variants[key] = (_timed(path.hit), path.counter if path.uses_redis else None)
        raw_get = self.raw.get
        prefix = self.raw_prefix
        variants["raw_get"] = (_timed(lambda uid: raw_get(prefix + str(uid))), self.raw_counter)
        plain = sessionmaker(self.engine)

        def empty_session(uid: int) -> None:
            with plain():
                pass

        variants["session"] = (_timed(empty_session), None)
        fresh = interleave(variants, self.s.hit_rounds, self.sample(self.s.hit_ops), self.rng)

        # the same lookups in a session that already exists; the found object is expunged
        # afterwards, outside the timing, so the identity map misses every time
        holder = plain()
        everyone = holder.scalars(select(User).where(User.id.in_(self.ids))).all()

        def reused(path: paths.Path) -> Block:
            def block(ids: Sequence[int]) -> list[float]:
                out = []
                with path.Session() as session:
                    for uid in ids:
                        start = time.perf_counter()
                        found = path.lookup(session, uid)
                        out.append(time.perf_counter() - start)
                        if found is not None and found in session:
                            session.expunge(found)
                return out

            return block

        variants2: dict[str, tuple[Block, env.RoundTrips | None]] = {
            key: (reused(path), path.counter if path.uses_redis else None)
            for key, path in self.paths.items()
        }
        variants2["raw_get"] = variants["raw_get"]
        variants2["idmap"] = (_timed(lambda uid: holder.get(User, uid)), None)
        reused_results = interleave(
            variants2, self.s.hit_rounds, self.sample(self.s.hit_ops), self.rng
        )
        fresh["idmap"] = reused_results["idmap"]
        holder.close()
        del everyone
        return fresh, reused_results

    def misses(self) -> dict[str, Measure]:
        """A lookup the cache cannot answer: SELECT, then the fill."""
        variants: dict[str, tuple[Block, env.RoundTrips | None]] = {
            key: (_timed(path.hit), path.counter if path.uses_redis else None)
            for key, path in self.paths.items()
        }

        def prepare(name: str, ids: Sequence[int]) -> None:
            self.paths[name].clear(ids)

        return interleave(
            variants,
            self.s.miss_rounds,
            self.sample(self.s.miss_ops),
            self.rng,
            prepare,
            warmup=False,
        )

    def get_many(self) -> dict[int, dict[str, Measure]]:
        out: dict[int, dict[str, Measure]] = {}
        for n in self.s.many_sizes:
            variants: dict[str, tuple[Block, env.RoundTrips | None]] = {}
            for key, path in self.paths.items():
                variants[key] = (self._many_block(path.get_many, n), path.counter)
            variants["raw_mget"] = (self._many_block(self._raw_mget, n), self.raw_counter)
            results = interleave(
                variants,
                self.s.many_rounds[n],
                self.sample(n),
                self.rng,
                per=len,
            )
            for key, path in self.paths.items():
                if not path.uses_redis:
                    results[key].round_trips = None
            out[n] = results
        return out

    def _raw_mget(self, ids: Sequence[int]) -> Any:
        prefix = self.raw_prefix
        return self.raw.mget([prefix + str(i) for i in ids])

    @staticmethod
    def _many_block(fn: Callable[[Sequence[int]], Any], n: int) -> Block:
        repeat = max(1, min(20, 200 // n))  # several calls per block for small N

        def block(ids: Sequence[int]) -> list[float]:
            out = []
            for _ in range(repeat):
                start = time.perf_counter()
                fn(ids)
                out.append(time.perf_counter() - start)
            return out

        return block

    def commits(self) -> dict[int, dict[str, Measure]]:
        """Change ``rows`` loaded rows and commit: the cost of the commit with its evictions (by
        hand for (b) and (c), automatic for sa_cache), per written row."""
        out: dict[int, dict[str, Measure]] = {}
        for rows in self.s.commit_sizes:
            variants: dict[str, tuple[Block, env.RoundTrips | None]] = {
                key: (self._commit_block(path), path.counter if path.uses_redis else None)
                for key, path in self.paths.items()
            }
            for path in self.paths.values():
                if isinstance(path, paths.SaCache):
                    path.eviction_times.clear()
            results = interleave(
                variants, self.s.commit_rounds, self.sample(rows), self.rng, per=len, warmup=False
            )
            for key, path in self.paths.items():
                if isinstance(path, paths.SaCache) and path.eviction_times:
                    results[key].extra["evict_us_per_row"] = (
                        statistics.median(path.eviction_times) / rows * 1e6
                    )
            out[rows] = results
        return out

    @staticmethod
    def _commit_block(path: paths.Path) -> Block:
        def block(ids: Sequence[int]) -> list[float]:
            with path.Session() as session:
                users = session.scalars(select(User).where(User.id.in_(ids))).all()
                counter = path.counter
                counter.reset()
                start = time.perf_counter()
                for user in users:
                    user.login_count += 1
                session.commit()
                path.evict_after_commit(ids)
                elapsed = time.perf_counter() - start
            return [elapsed]

        return block

    def payload(self) -> dict[str, float]:
        """Bytes per row: sa_cache's value against pickle, as stored by each path."""
        d = self.paths["d"]
        c = self.paths["c"]
        b = self.paths["b"]
        assert isinstance(d, paths.SaCacheRedis) and isinstance(c, paths.DogpileMerge)
        assert isinstance(b, paths.FlaskCachingMemoize)
        sample = self.ids[:200]
        sa = [len(d.raw_payload(uid)) for uid in sample]
        with Session(self.engine) as session:
            users = session.scalars(select(User).where(User.id.in_(sample))).all()
            session.expunge_all()
        pickled = [len(pickle.dumps(u)) for u in users]
        dogpile = [c.stored_bytes(uid) for uid in sample]
        memo_keys = [k for k in b.client.scan_iter(match=b.prefix + "*", count=1000)][:2000]
        flask = [int(b.client.strlen(k)) for k in memo_keys]
        flask = [n for n in flask if n > 100]  # leave out memoize's version keys
        return {
            "rows": len(sample),
            "sa_cache": statistics.mean(sa),
            "pickle": statistics.mean(pickled),
            "dogpile": statistics.mean(dogpile),
            "flask_caching": statistics.mean(flask) if flask else float("nan"),
        }
