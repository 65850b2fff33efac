"""Issue 6, point 3: fault injection against real ``redis-server`` processes under load.

Each test starts a private redis-server on a spare loopback port, runs reader and writer threads
(each request a CachingSession of its own, from one sessionmaker) against PostgreSQL or a SQLite
file, and injects one fault while a reader is between its SELECT and its fill: the fault point is
forced by a ``load`` listener that runs before sa_cache's own, not by a sleep. The fault lasts
until the load has gone on under it for a while (a number of requests, and for outages a number
of failed probes), then the server is recovered and the load continues.

Asserted: 0 failed requests (no exception reaches a caller), 0 wrong answers (each read returns
the version of the latest commit that returned before the read started, or a later one), and a
bounded lookup latency while the fault lasts. Afterwards no entry in Redis holds a stale row.

The figures are printed (``pytest -s``) and written as one dict to
``.pytest_cache/d/sa_cache/fault_injection.json``; the README's Reliability section quotes them.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import event
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache, codec
from sa_cache.rows import RowShape

from .conftest import register_all, require_service
from .models import User
from .redis_server import RedisServer

ROWS = 16  # rows 1..ROWS carry the load; CANARY is written only by the main thread
CANARY = 1000
READERS = 3
WRITERS = 2
WARMUP_OPS = 60  # requests completed before the fault point is armed
DURING_OPS = 60  # requests started under the fault before it is lifted
AFTER_OPS = 15  # requests per thread after recovery
MAX_OPS = 3000  # hard bound per thread
DEADLINE = 20.0  # seconds any wait may take before the test fails
LATENCY_BOUND = 1.5  # seconds, with socket_timeout=0.2
SOCKET_TIMEOUT = 0.2

FIGURES: dict[str, dict[str, Any]] = {}


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


class Load:
    """Readers and writers with exact bookkeeping of what each read was allowed to return."""

    def __init__(self, Session: sessionmaker[CachingSession], cache: IdentityCache) -> None:  # noqa: N803
        self.Session = Session
        self.cache = cache
        self.lock = threading.Lock()
        self.committed = dict.fromkeys(range(1, ROWS + 1), 1)
        self.completed = 0
        self.started_under_fault = 0
        self.failures: list[str] = []
        self.wrong: list[str] = []
        # (started, finished) of every lookup and every whole request
        self.lookups: list[tuple[float, float]] = []
        self.requests: list[tuple[float, float]] = []
        self.armed = False
        self.fault_point = threading.Event()  # a reader is inside a load, before its fill
        self.injected = threading.Event()
        self.recovered = threading.Event()
        self.fault_at = self.back_at = self.recovered_at = 0.0
        self.threads: list[threading.Thread] = []

    # -- the fault point: a load listener that runs before sa_cache's fill ----------------------

    def on_load(self, target: Any, context: Any) -> None:
        if not self.armed or not threading.current_thread().name.startswith("reader"):
            return
        with self.lock:
            if self.fault_point.is_set():
                return
            self.fault_point.set()
        self.injected.wait(DEADLINE)  # the fill that follows meets the fault

    # -- one request ------------------------------------------------------------------------------

    def check(self, pk: int, floor: int, user: User | None) -> None:
        if user is None or user.version < floor or user.name != f"v{user.version}":
            got = None if user is None else (user.version, user.name)
            self.wrong.append(f"user {pk}: got {got}, latest commit before the read was {floor}")

    def read(self, rng: random.Random) -> None:
        pks = rng.sample(range(1, ROWS + 1), 3 if rng.random() < 0.25 else 1)
        with self.lock:
            floors = [self.committed[pk] for pk in pks]
        with self.Session() as s:
            started = time.monotonic()
            users = [s.get(User, pks[0])] if len(pks) == 1 else s.get_many(User, pks)
            self.lookups.append((started, time.monotonic()))
            for pk, floor, user in zip(pks, floors, users, strict=True):
                self.check(pk, floor, user)

    def write(self, rng: random.Random, writer: int) -> None:
        pk = rng.choice([pk for pk in range(1, ROWS + 1) if pk % WRITERS == writer])
        with self.lock:
            floor = self.committed[pk]
        version = floor + 1  # only this writer writes this row
        with self.Session() as s:
            started = time.monotonic()
            user = s.get(User, pk)
            self.lookups.append((started, time.monotonic()))
            self.check(pk, floor, user)
            assert user is not None
            user.version = version
            user.name = f"v{version}"
            s.commit()
        with self.lock:
            self.committed[pk] = version

    def worker(self, kind: str, index: int) -> None:
        rng = random.Random(f"{kind}{index}")
        after = 0
        for _ in range(MAX_OPS):
            if self.recovered.is_set():
                if after >= AFTER_OPS:
                    return
                after += 1
            started = time.monotonic()
            under_fault = self.injected.is_set() and not self.recovered.is_set()
            try:
                if kind == "reader":
                    self.read(rng)
                else:
                    self.write(rng, index)
            except Exception as exc:  # a failed request: exactly what must never happen
                self.failures.append(f"{kind}{index}: {type(exc).__name__}: {exc}")
            self.requests.append((started, time.monotonic()))
            with self.lock:
                self.completed += 1
                self.started_under_fault += under_fault
                if self.completed >= WARMUP_OPS:
                    self.armed = True
        self.failures.append(f"{kind}{index}: ran out of its {MAX_OPS} requests")

    def start(self) -> None:
        for kind, count in (("reader", READERS), ("writer", WRITERS)):
            for index in range(count):
                thread = threading.Thread(
                    target=self.worker, args=(kind, index), name=f"{kind}{index}", daemon=True
                )
                self.threads.append(thread)
                thread.start()

    def join(self) -> None:
        for thread in self.threads:
            thread.join(DEADLINE)
            assert not thread.is_alive(), f"{thread.name} did not finish"

    # -- figures -----------------------------------------------------------------------------------

    def window(self, spans: list[tuple[float, float]], phase: str) -> list[float]:
        def belongs(span: tuple[float, float]) -> bool:
            started, finished = span
            if phase == "before":
                return finished < self.fault_at
            if phase == "after":
                return started > self.recovered_at
            return finished >= self.fault_at and started <= self.recovered_at

        return [finished - started for started, finished in spans if belongs((started, finished))]

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": len(self.requests),
            "failed": len(self.failures),
            "wrong": len(self.wrong),
            "fault_s": round(self.back_at - self.fault_at, 3),
            "back_to_cached_s": round(self.recovered_at - self.back_at, 3),
        }
        for phase in ("before", "during", "after"):
            lookups = self.window(self.lookups, phase)
            out[f"lookups_{phase}"] = len(lookups)
            out[f"p99_ms_{phase}"] = round(1000 * percentile(lookups, 0.99), 1)
            out[f"max_ms_{phase}"] = round(1000 * max(lookups, default=0.0), 1)
        out["max_request_ms_during"] = round(
            1000 * max(self.window(self.requests, "during"), default=0.0), 1
        )
        stats = self.cache.stats()
        for name in ("hits", "misses", "fills", "evictions", "errors", "bypassed", "rejected"):
            out[name] = stats[name]
        return out


# -- the faults ----------------------------------------------------------------------------------


class Fault:
    """inject() at the fault point, lifted by recover() once ``enough()`` holds."""

    extra_args: tuple[str, ...] = ()
    probes = 2  # failed probes after the breaker opened, before the fault is lifted

    def __init__(self, server: RedisServer, load: Load) -> None:
        self.server = server
        self.load = load
        self.errors_at_open: int | None = None

    def inject(self) -> None:
        raise NotImplementedError

    def during(self) -> None:
        """Runs in the main thread while the fault lasts (after the canary write)."""

    def enough(self) -> bool:
        cache = self.load.cache
        if self.load.started_under_fault < DURING_OPS:
            return False
        if not self.probes:
            return True
        if self.errors_at_open is None:
            if cache.breaker.is_open:
                self.errors_at_open = cache.guarded.errors
            return False
        return cache.guarded.errors >= self.errors_at_open + self.probes

    def recover(self) -> None:
        pass


class Sigkill(Fault):
    def inject(self) -> None:
        self.server.kill()

    def recover(self) -> None:
        self.server.start()  # same port, empty memory


class Sigstop(Fault):
    def inject(self) -> None:
        self.server.pause()

    def recover(self) -> None:
        self.server.resume()


class Restart(Fault):
    probes = 0  # the first reconnect is retried: usually no error at all

    def inject(self) -> None:
        self.server.restart()


class MaxMemory(Fault):
    """``noeviction`` and a full memory: writes (fills, tombstones) fail, reads still work."""

    extra_args = ("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")

    def inject(self) -> None:
        self.admin = self.server.client()
        # 2 MB of other data, then maxmemory lowered under what is used: with noeviction every
        # write is refused (a write whose own query buffer does not fit is refused earlier than
        # a small one, so filling up alone leaves room for small writes)
        self.ballast = [f"ballast:{i}" for i in range(32)]
        for key in self.ballast:
            self.admin.set(key, b"x" * (64 << 10))
        self.admin.config_set("maxmemory", "1mb")
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            self.admin.set("probe", b"1")
        assert self.admin.get("ballast:0") is not None  # reads still work

    def during(self) -> None:
        # the canary's eviction failed and its stale row is still in Redis, readable: only the
        # journal keeps it from being served
        canary = stored_row(self.load.cache, CANARY, self.admin)
        assert canary is not None
        assert canary.values[shape_index("version")] == 1
        with self.load.Session() as s:
            assert s.get(User, CANARY).version == 2

    def recover(self) -> None:
        self.admin.config_set("maxmemory", "4mb")
        self.admin.delete(*self.ballast)


class ClientKill(Fault):
    """``CLIENT KILL TYPE normal`` from another client, five times while the load runs."""

    probes = 0
    kills = 5

    def inject(self) -> None:
        self.admin = self.server.client()
        self.killed = [self.admin.client_kill_filter(_type="normal")]

    def during(self) -> None:
        for round_ in range(1, self.kills):
            wait_for(
                lambda r=round_: self.load.started_under_fault >= r * DURING_OPS // self.kills,
                "requests between two CLIENT KILLs",
            )
            self.killed.append(self.admin.client_kill_filter(_type="normal"))

    def enough(self) -> bool:
        return super().enough() and len(self.killed) == self.kills

    def recover(self) -> None:
        assert sum(self.killed) >= self.kills  # the cache's connections were really killed


FAULTS: dict[str, type[Fault]] = {
    "sigkill": Sigkill,
    "sigstop": Sigstop,
    "restart": Restart,
    "maxmemory": MaxMemory,
    "client_kill": ClientKill,
}


def shape_index(attr: str) -> int:
    """Where ``attr`` sits in a cached User row's values."""
    return RowShape(User.__mapper__).attrs.index(attr)


def healthy(cache: IdentityCache) -> bool:
    """The breaker is closed and every journaled eviction has been replayed."""
    return not cache.breaker.is_open and cache.guarded.journal() == ({}, set())


def stored_row(cache: IdentityCache, pk: int, client: Any) -> codec.RowEntry | None:
    """The row entry Redis holds for user ``pk``, decoded; None if it holds anything else."""
    model = cache.model_for(User.__mapper__)
    assert model is not None
    raw = client.get(model.keys.row_key((pk,)))
    entry = None if raw is None else codec.decode(raw)
    return entry if type(entry) is codec.RowEntry else None


@pytest.fixture(scope="module")
def report(request: pytest.FixtureRequest) -> Iterator[dict[str, dict[str, Any]]]:
    yield FIGURES
    if FIGURES:
        store = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
        if store is not None:
            folder = store.mkdir("sa_cache")
            (folder / "fault_injection.json").write_text(json.dumps(FIGURES, indent=2))
        print("\nFAULT_INJECTION =", json.dumps(FIGURES, indent=1))


@pytest.mark.parametrize("db", ["postgresql", "mariadb", "sqlite"])
@pytest.mark.parametrize("fault_name", list(FAULTS))
def test_under_load_no_request_fails_no_read_is_stale_and_latency_stays_bounded(
    engine, db, fault_name, report
):
    under_fault(engine, db, fault_name)


@pytest.mark.parametrize("db", ["postgresql"])
@pytest.mark.parametrize("fault_name", list(FAULTS))
def test_with_a_near_cache_no_request_fails_no_read_is_stale_and_latency_stays_bounded(
    engine, db, fault_name, report
):
    """The same faults with the near cache: one process, so its own commits' synchronous
    drops must keep every read at least as new as the last commit returned."""
    under_fault(engine, db, fault_name, near=True)


def under_fault(engine: Any, db: str, fault_name: str, near: bool = False) -> None:
    require_service("redis", 6379)
    fault_class = FAULTS[fault_name]
    server = RedisServer(*fault_class.extra_args).start()
    cache = IdentityCache(
        server.url, socket_timeout=SOCKET_TIMEOUT, breaker_cooldown=0.2, near_cache=near
    )
    register_all(cache)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)  # noqa: N806
    with Session() as s:
        s.add_all([User(id=pk, name="v1", version=1) for pk in [*range(1, ROWS + 1), CANARY]])
        s.commit()
    load = Load(Session, cache)
    fault = fault_class(server, load)
    event.listen(User, "load", load.on_load, insert=True)
    try:
        admin = server.client()
        for _ in range(2):  # the canary is cached before the fault
            with Session() as s:
                assert s.get(User, CANARY).version == 1
        assert stored_row(cache, CANARY, admin) is not None
        load.start()
        assert load.fault_point.wait(DEADLINE), "no reader reached the fault point"
        load.fault_at = time.monotonic()
        fault.inject()
        load.injected.set()
        with Session() as s:  # a write under the fault: its eviction fails or is bypassed
            s.get(User, CANARY).version = 2
            s.commit()
        fault.during()
        wait_for(fault.enough, f"the load to run under {fault_name}")
        fault.recover()
        load.back_at = time.monotonic()
        # the load drives the breaker's probe and the journal's replay
        wait_for(lambda: healthy(cache), "the cache to be used again")
        load.recovered_at = time.monotonic()
        load.recovered.set()
        load.join()

        # after recovery: every row reads as its last commit, and Redis holds no stale row
        with Session() as s:
            assert s.get(User, CANARY).version == 2
        for _ in range(2):
            with Session() as s:
                users = s.get_many(User, list(range(1, ROWS + 1)))
                assert [u.version for u in users] == [load.committed[pk] for pk in load.committed]
        admin = server.client()
        version_at = shape_index("version")
        for pk, version in [*load.committed.items(), (CANARY, 2)]:
            entry = stored_row(cache, pk, admin)
            assert entry is None or entry.values[version_at] == version, f"stale entry for {pk}"
    finally:
        event.remove(User, "load", load.on_load)
        load.injected.set()
        load.recovered.set()
        server.stop()
        near_hits = cache.stats().get("near", {}).get("hits", 0)
        if near:
            cache.store.close()  # type: ignore[attr-defined]

    figures = load.figures()
    name = f"{fault_name}/{db}" + ("/near" if near else "")
    FIGURES[name] = figures
    print(f"\n{name}: {figures}")
    assert load.failures == []
    assert load.wrong == []
    assert near_hits > 0 or not near  # the near cache answered some of the load
    assert figures["lookups_during"] > 0
    assert figures["max_ms_during"] < 1000 * LATENCY_BOUND
    assert figures["p99_ms_during"] < 1000 * LATENCY_BOUND
    if fault_class.probes:
        assert figures["errors"] > fault_class.probes and figures["bypassed"] > 0
