"""The thundering herd: when many callers miss the same cold key at once, one of them loads it
from the database and the others are answered by its fill; a waiter that times out reads the
database without filling."""

from __future__ import annotations

import multiprocessing
import threading
from typing import Any

import pytest
from sqlalchemy import create_engine, event
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache
from sa_cache.lookup import lease_key

from .conftest import REDIS_URL, require_service
from .counting import counting_sql, expect_sql
from .models import User

THREADS = 50
PROCESSES = 4
THREADS_PER_PROCESS = 5


def _user_loads(statements: list[str]) -> int:
    """How many of ``statements`` (an SQLCounter's) load users."""
    return sum(
        1 for s in statements if s.lstrip().upper().startswith("SELECT") and "FROM users" in s
    )


def _stampede(Session: Any, threads: int, start: Any) -> list[str]:
    names: list[str] = []
    errors: list[BaseException] = []

    def lookup() -> None:
        try:
            start.wait()
            with Session() as s:
                names.append(s.get(User, 1).name)
        except BaseException as exc:  # reported to the test, never swallowed
            errors.append(exc)

    workers = [threading.Thread(target=lookup) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    if errors:
        raise errors[0]
    return names


def _process_main(db_url: str, prefix: str, ready: Any, start: Any, results: Any) -> None:
    engine = create_engine(db_url)
    cache = IdentityCache(REDIS_URL, prefix=prefix, lease_wait=5.0)
    cache.register(User)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with counting_sql(engine) as sql:
        ready.put(True)
        names = _stampede(Session, THREADS_PER_PROCESS, start)
    results.put((_user_loads(sql.statements), names))
    engine.dispose()


def test_one_cold_key_missed_by_50_threads_and_4_processes_is_loaded_at_most_twice(engine, sql):
    require_service("redis", 6379)
    cache = IdentityCache(
        REDIS_URL, prefix=f"herd_{id(engine)}_{threading.get_ident()}", lease_wait=5.0
    )
    cache.register(User)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with sessionmaker(engine)() as s:
        s.add(User(id=1, name="cold"))
        s.commit()
    cache.evict_model(User)
    first = sql.count  # the statements from here on are the stampede's

    context = multiprocessing.get_context("spawn")
    ready, results, start = context.Queue(), context.Queue(), context.Event()
    db_url = engine.url.render_as_string(hide_password=False)
    processes = [
        context.Process(target=_process_main, args=(db_url, cache.prefix, ready, start, results))
        for _ in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            ready.get(timeout=60)
        local_start = threading.Event()
        collected: list[list[str]] = []
        local = threading.Thread(
            target=lambda: collected.append(_stampede(Session, THREADS, local_start))
        )
        local.start()
        start.set()
        local_start.set()
        local.join(timeout=60)
        remote = [results.get(timeout=60) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    names = collected[0] + [name for _, process_names in remote for name in process_names]
    assert names == ["cold"] * (THREADS + PROCESSES * THREADS_PER_PROCESS)
    database_loads = _user_loads(sql.statements[first:]) + sum(count for count, _ in remote)
    assert 1 <= database_loads <= 2, (database_loads, cache.stats())
    cache.store.delete_prefix(cache.prefix + ":")


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_waiter_that_times_out_reads_the_database_without_filling(engine, backend, sql):
    if backend == "redis":
        require_service("redis", 6379)
    cache = IdentityCache(
        REDIS_URL if backend == "redis" else None, prefix=f"herd_t_{id(sql)}", lease_wait=0.05
    )
    cache.register(User)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with sessionmaker(engine)() as s:
        s.add(User(id=1, name="cold"))
        s.commit()
    key = cache.model_for(User.__mapper__).keys.row_key((1,))
    model = cache.model_for(User.__mapper__)
    lease = cache.guarded.acquire(model, key, lease_key(key), cache.lease_ttl)
    assert lease is not None and lease[0] is not None  # taken by a loader that never fills
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(User, 1).name == "cold"
    assert cache.stats()["fills"] == 0
    assert cache.store.get_many([key]) == [None]
    if backend == "redis":
        cache.store.delete_prefix(cache.prefix + ":")


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_load_that_raises_releases_its_lease(engine, backend):
    if backend == "redis":
        require_service("redis", 6379)
    cache = IdentityCache(
        REDIS_URL if backend == "redis" else None, prefix=f"herd_r_{id(engine)}", lease_wait=5.0
    )
    cache.register(User)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    key = cache.model_for(User.__mapper__).keys.row_key((1,))

    class LoadFailed(Exception):
        pass

    held_while_loading = []

    def fail(*args: Any) -> None:  # the load's SELECT fails, after the lease was taken
        held_while_loading.append(cache.store.get_many([lease_key(key)])[0] is not None)
        raise LoadFailed

    event.listen(engine, "before_cursor_execute", fail)
    try:
        with Session() as s, pytest.raises(LoadFailed):
            s.get(User, 1)
    finally:
        event.remove(engine, "before_cursor_execute", fail)
    assert held_while_loading == [True]
    assert cache.store.get_many([lease_key(key)]) == [None]
    if backend == "redis":
        cache.store.delete_prefix(cache.prefix + ":")


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_loader_whose_lease_expired_leaves_the_next_holders_lease_alone(engine, backend):
    """Loader A's lease expires during its slow load and loader B takes the key's lease; when A
    finishes it releases its own lease only, so B's still keeps the herd waiting for B."""
    if backend == "redis":
        require_service("redis", 6379)
    cache = IdentityCache(
        REDIS_URL if backend == "redis" else None, prefix=f"herd_o_{id(engine)}", lease_wait=5.0
    )
    cache.register(User)
    with sessionmaker(engine)() as s:
        s.add(User(id=1, name="slow"))
        s.commit()
    key = cache.model_for(User.__mapper__).keys.row_key((1,))
    model = cache.model_for(User.__mapper__)
    taken_by_b = []

    def lease_expires_and_b_takes_it(*args: Any) -> None:  # during A's load
        if not taken_by_b:
            assert cache.store.delete_prefix(lease_key(key)) == 1  # A's lease expires
            taken_by_b.append(cache.guarded.acquire(model, key, lease_key(key), 60)[0])

    event.listen(engine, "before_cursor_execute", lease_expires_and_b_takes_it)
    try:
        with sessionmaker(engine, class_=CachingSession, cache=cache)() as s:
            assert s.get(User, 1).name == "slow"  # A loads, fills, releases
    finally:
        event.remove(engine, "before_cursor_execute", lease_expires_and_b_takes_it)
    assert taken_by_b[0] is not None
    assert cache.store.get_many([lease_key(key)]) == [taken_by_b[0]]  # B's lease, untouched
    if backend == "redis":
        cache.store.delete_prefix(cache.prefix + ":")
