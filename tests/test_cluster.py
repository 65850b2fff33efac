"""Redis Cluster: the cache works on a real cluster (3 masters, 3 replicas on loopback, started
by tests/redis_cluster.py), through a dogpile ``redis_cluster`` region and through a
``redis+cluster://`` URL, and a plain ``redis://`` URL naming a cluster node fails at
construction instead of missing silently on every read.

The store suite (tests/test_stores.py) also runs on the cluster; these tests cover what is
cluster-specific: routing, round trips per node, scripts, redirects, replication, whole-cluster
flush."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from dogpile.cache import make_region
from dogpile.cache.proxy import ProxyBackend
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache
from sa_cache.errors import UnsupportedBackend
from sa_cache.lookup import lease_key
from sa_cache.store import Fill, Write
from sa_cache.stores import store_for
from sa_cache.stores.redis_cluster import RedisClusterStore

from .checked_load import CheckedLoad
from .conftest import RUN_ID, register_all, require_redis_cluster
from .counting import (
    RedisCounter,
    counted_redis_cluster_region,
    counting_sql,
    expect_commands,
    expect_sql,
)
from .models import User
from .redis_cluster import RedisClusterServers


@pytest.fixture
def cluster() -> RedisClusterServers:
    servers = require_redis_cluster()
    servers.wait_ok()  # a test before may have failed a node over
    return servers


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _node_url(cluster: RedisClusterServers) -> str:
    return cluster.masters()[0].url


@pytest.fixture(params=["region", "url"])
def cache(request: pytest.FixtureRequest, cluster: RedisClusterServers) -> Iterator[IdentityCache]:
    """A cache on the cluster: a dogpile ``redis_cluster`` region, or the ``redis+cluster://``
    URL form."""
    prefix = f"{RUN_ID}_cl_{uuid.uuid4().hex[:8]}"
    if request.param == "region":
        region = make_region().configure(
            "dogpile.cache.redis_cluster", arguments={"url": _node_url(cluster)}
        )
        made = IdentityCache(region, prefix=prefix)
    else:
        made = IdentityCache(cluster.url, prefix=prefix)
    yield register_all(made)
    made.flush()


@pytest.fixture
def Session(engine: Engine, cache: IdentityCache) -> sessionmaker[CachingSession]:  # noqa: N802
    return sessionmaker(engine, class_=CachingSession, cache=cache)


def _masters_holding(cluster: RedisClusterServers, prefix: str) -> dict[int, int]:
    """Master port -> how many keys under ``prefix`` it holds."""
    return {
        node.port: sum(1 for _ in node.client().scan_iter(match=prefix + "*", count=1000))
        for node in cluster.masters()
    }


# -- lookups --------------------------------------------------------------------------------------


def test_a_lookup_misses_then_hits_and_a_commit_evicts_it(Session, cache, engine):
    with sessionmaker(engine)() as s:
        s.add(User(id=1, name="before"))
        s.commit()
    with counting_sql(engine) as sql:
        with expect_sql(sql, selects=1), Session() as s:
            assert s.get(User, 1).name == "before"
        with expect_sql(sql, 0), Session() as s:
            assert s.get(User, 1).name == "before"
        with Session() as s:
            s.get(User, 1).name = "after"
            s.commit()
        with expect_sql(sql, selects=1), Session() as s:
            assert s.get(User, 1).name == "after"
        with expect_sql(sql, 0), Session() as s:
            assert s.get(User, 1).name == "after"
    stats = cache.stats()
    assert (stats["hits"], stats["fills"], stats["errors"], stats["bypassed"]) == (3, 2, 0, 0)


def test_a_get_many_across_slots_is_answered_from_every_node(Session, cache, engine):
    with sessionmaker(engine)() as s:
        s.add_all([User(id=i, name=f"u{i}") for i in range(1, 41)])
        s.commit()
    with Session() as s:
        s.get_many(User, range(1, 41))
    with counting_sql(engine) as sql, expect_sql(sql, 0), Session() as s:
        assert [u.name for u in s.get_many(User, range(1, 41))] == [f"u{i}" for i in range(1, 41)]
    assert cache.stats()["hits"] == 40


# -- round trips ----------------------------------------------------------------------------------


def _counted_store(cluster: RedisClusterServers, counter: RedisCounter) -> Any:
    store = store_for(counted_redis_cluster_region(counter, _node_url(cluster)))
    assert isinstance(store, RedisClusterStore)
    for node in store.client.get_primaries():  # connect to every node before counting
        store.client.get_redis_connection(node).ping()
    return store


def test_a_get_many_across_slots_costs_one_round_trip_per_node(cluster):
    counter = RedisCounter()
    store = _counted_store(cluster, counter)
    prefix = f"{RUN_ID}_rt_{uuid.uuid4().hex[:8]}:"
    keys = [f"{prefix}{{users:{i}}}" for i in range(60)]
    nodes = {store.client.keyslot(k) for k in keys}
    assert len(nodes) > 3  # many slots...
    by_node = {store.client.nodes_manager.get_node_from_slot(s).name for s in nodes}
    assert len(by_node) == 3  # ...on every master
    try:
        store.write_many([Write(k, b"v", 60) for k in keys])
        with expect_commands(counter, {"GET": 60}, round_trips=3):
            assert store.get_many(keys) == [b"v"] * 60
        same_node = [k for k in keys if store._node(k)[0].name == next(iter(by_node))]
        with expect_commands(counter, {"GET": len(same_node)}, round_trips=1):
            store.get_many(same_node)
        with expect_commands(counter, {"SET": 1, "GET": 2}, round_trips=1):
            store.acquire(keys[0] + ":lease", b"t", 5, [keys[0], keys[0]])
    finally:
        store.delete_prefix(prefix)


def _keys_on_every_master(store: RedisClusterStore, prefix: str) -> list[str]:
    keys = [f"{prefix}{{users:{i}}}" for i in range(60)]
    assert len({store.domain_of(k) for k in keys}) == 3
    return keys


def test_the_node_pipelines_of_a_batch_are_sent_together(cluster):
    """Each node's send waits at a barrier for the other two: sent one after another, the
    first would wait alone until the barrier breaks."""
    store = _counted_store(cluster, RedisCounter())
    keys = _keys_on_every_master(store, f"{RUN_ID}_tg_{uuid.uuid4().hex[:8]}:")
    barrier = threading.Barrier(3, timeout=5)
    send = store._send

    def meeting(*args: Any) -> Any:
        barrier.wait()
        return send(*args)

    store._send = meeting  # type: ignore[method-assign]
    assert store.get_many(keys) == [None] * len(keys)
    assert not barrier.broken


def test_under_asyncio_the_node_pipelines_of_a_batch_are_awaited_together(cluster):
    """The same meeting on the event loop (``asyncio.Barrier``), through ``AsyncSession``'s
    greenlet bridge: awaited one after another, the first would wait alone until it times out."""
    from sqlalchemy.util import greenlet_spawn

    from sa_cache import _orm

    store = _counted_store(cluster, RedisCounter())
    keys = _keys_on_every_master(store, f"{RUN_ID}_tga_{uuid.uuid4().hex[:8]}:")
    send = store._send

    async def main() -> list[bytes | None]:
        barrier = asyncio.Barrier(3)

        def meeting(*args: Any) -> Any:
            _orm.await_(asyncio.wait_for(barrier.wait(), 5))
            return send(*args)

        store._send = meeting  # type: ignore[method-assign]
        return await greenlet_spawn(store.get_many, keys)

    assert asyncio.run(main()) == [None] * len(keys)


def test_a_batch_of_writes_costs_one_round_trip_per_node_and_waits_for_a_replica(cluster):
    counter = RedisCounter()
    store = _counted_store(cluster, counter)
    prefix = f"{RUN_ID}_wr_{uuid.uuid4().hex[:8]}:"
    keys = [f"{prefix}{{users:{i}}}" for i in range(30)]
    try:
        with expect_commands(counter, {"SET": 30, "WAIT": 3}, round_trips=3):
            store.write_many([Write(k, b"v", 60) for k in keys])
    finally:
        store.delete_prefix(prefix)


# -- scripts, redirects, replication ----------------------------------------------------------


def test_scripts_are_loaded_again_on_a_node_that_lost_them(cluster):
    store = store_for(make_region().configure(
        "dogpile.cache.redis_cluster", arguments={"url": _node_url(cluster)}
    ))  # fmt: skip
    prefix = f"{RUN_ID}_ns_{uuid.uuid4().hex[:8]}:"
    keys = [f"{prefix}{{users:{i}}}" for i in range(12)]
    try:
        store.write_many([Write(k, b"seen", 60) for k in keys])
        for node in cluster.masters():
            node.client().script_flush()
        assert store.fill_many([Fill(k, b"seen", b"filled", 60) for k in keys]) == [True] * 12
        assert store.get_many(keys) == [b"filled"] * 12
    finally:
        store.delete_prefix(prefix)


def test_a_failover_is_followed_without_an_error_moved_refreshes_the_slot_map(cluster):
    """A replica taking over (CLUSTER FAILOVER, as after a master's loss) answers the client's
    old slot map with MOVED: the store refreshes it and sends the redirected commands again."""
    store = store_for(make_region().configure(
        "dogpile.cache.redis_cluster", arguments={"url": _node_url(cluster)}
    ))  # fmt: skip
    assert isinstance(store, RedisClusterStore)
    prefix = f"{RUN_ID}_mv_{uuid.uuid4().hex[:8]}:"
    key = f"{prefix}{{users:1}}"
    store.write_many([Write(key, b"v", 60)])
    old_master = store._node(key)[0]
    replica = next(
        n for n in cluster.running()
        if n.client().info("replication").get("master_port") == old_master.port
    )  # fmt: skip
    replica.client().cluster("failover")
    _wait(lambda: replica.client().info("replication")["role"] == "master")
    cluster.wait_ok()
    try:
        assert store.get_many([key]) == [b"v"]
        assert store._node(key)[0].port == replica.port
    finally:
        store.delete_prefix(prefix)


def test_an_eviction_no_replica_acknowledged_is_journaled_not_trusted(cluster):
    """Redis replicates asynchronously: a tombstone only the master has would be lost if the
    master died, and its replica would serve the evicted row. So an eviction counts as written
    only once a replica has it; until then it stays in the journal."""
    cache = register_all(IdentityCache(cluster.url, prefix=f"{RUN_ID}_wait_{uuid.uuid4().hex[:8]}"))
    model = cache.model_for(User.__mapper__)
    assert model is not None
    key = model.keys.row_key((1,))
    store = cache.store
    assert isinstance(store, RedisClusterStore)
    master = store._node(key)[0]
    replica = next(
        n for n in cluster.running()
        if n.client().info("replication").get("master_port") == master.port
    )  # fmt: skip
    replica.pause()
    try:
        assert cache.evict(User, 1) is False
        assert cache.stats()["journal"]["keys"] == 1
    finally:
        replica.resume()
    cluster.wait_ok()
    assert cache.deliver_evictions() is True
    assert cache.stats()["journal"]["keys"] == 0
    cache.flush()


def test_a_key_of_a_migrating_slot_is_followed_with_asking(cluster):
    """While a slot moves between masters, its absent keys are answered with ASK: the store
    asks the importing master (ASKING first) without waiting for the slot map to change."""
    store = store_for(make_region().configure(
        "dogpile.cache.redis_cluster", arguments={"url": _node_url(cluster)}
    ))  # fmt: skip
    assert isinstance(store, RedisClusterStore)
    key = f"{RUN_ID}_ask_{uuid.uuid4().hex[:8]}:{{users:1}}"
    slot = store.client.keyslot(key)
    source = next(n for n in cluster.masters() if n.port == store._node(key)[0].port)
    target = next(n for n in cluster.masters() if n is not source)
    ids = {n.port: n.client().execute_command("CLUSTER MYID").decode() for n in (source, target)}
    target.client().execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source.port])
    source.client().execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target.port])
    try:
        assert store.get_many([key]) == [None]
        assert store.fill_many([Fill(key, None, b"filled", 60)]) == [True]
        assert store.get_many([key]) == [b"filled"]
        count = source.client().execute_command("CLUSTER COUNTKEYSINSLOT", slot)
        assert count == 0  # it went to the importing master
        pipe = target.client().pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.get(key)
        assert pipe.execute()[1] == b"filled"
    finally:
        pipe = target.client().pipeline(transaction=False)
        pipe.execute_command("ASKING")
        pipe.delete(key)
        pipe.execute()
        for node in (source, target):
            node.client().execute_command("CLUSTER SETSLOT", slot, "STABLE")


def test_shared_counters_are_published_and_read_on_a_cluster(Session, cache, engine):
    from sa_cache.shared_stats import StatsPublisher, read_shared_stats

    with sessionmaker(engine)() as s:
        s.add(User(id=1, name="u1"))
        s.commit()
    for _ in range(3):
        with Session() as s:
            s.get(User, 1)
    publisher = StatsPublisher(cache, interval=60)
    assert publisher.publish() is True
    assert read_shared_stats(cache.store.client, cache.prefix)["hits"] == 2  # type: ignore[attr-defined]


# -- leases ---------------------------------------------------------------------------------------


def test_a_cold_key_missed_by_many_threads_is_loaded_once_and_its_lease_released(
    Session, cache, engine
):
    with sessionmaker(engine)() as s:
        s.add(User(id=1, name="cold"))
        s.commit()
    start = threading.Barrier(12)
    names: list[str] = []
    errors: list[BaseException] = []

    def lookup() -> None:
        try:
            start.wait(timeout=30)
            with Session() as s:
                names.append(s.get(User, 1).name)
        except BaseException as exc:
            errors.append(exc)

    with counting_sql(engine) as sql:
        workers = [threading.Thread(target=lookup) for _ in range(12)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
    assert errors == []
    assert names == ["cold"] * 12
    loads = sum(1 for s in sql.statements if s.lstrip().upper().startswith("SELECT"))
    assert 1 <= loads <= 2, loads  # one loader; a waiter past lease_wait may read for itself
    model = cache.model_for(User.__mapper__)
    assert model is not None
    assert cache.store.get_many([lease_key(model.keys.row_key((1,)))]) == [None]
    assert cache.stats()["errors"] == 0


# -- flush ----------------------------------------------------------------------------------------


def test_flush_deletes_the_prefix_on_every_master(Session, cache, engine, cluster):
    with sessionmaker(engine)() as s:
        s.add_all([User(id=i, name=f"u{i}") for i in range(1, 31)])
        s.commit()
    with Session() as s:
        s.get_many(User, range(1, 31))
    held = _masters_holding(cluster, cache.prefix + ":")
    assert len(held) == 3 and all(held.values()), held
    assert cache.flush() == sum(held.values())
    assert set(_masters_holding(cluster, cache.prefix + ":").values()) == {0}


# -- refused configurations -----------------------------------------------------------------------


def test_a_plain_redis_url_naming_a_cluster_node_fails_at_construction(cluster):
    node = cluster.masters()[0]
    with pytest.raises(UnsupportedBackend, match=r"Cluster node; use a redis\+cluster://"):
        IdentityCache(node.url)
    region = make_region().configure("dogpile.cache.redis", arguments={"url": node.url})
    with pytest.raises(UnsupportedBackend, match="redis_cluster region"):
        IdentityCache(region)


def test_a_cluster_region_with_a_dogpile_proxy_is_refused(cluster):
    region = make_region().configure(
        "dogpile.cache.redis_cluster",
        arguments={"url": _node_url(cluster)},
        wrap=[ProxyBackend()],
    )
    with pytest.raises(UnsupportedBackend, match="dogpile proxies"):
        IdentityCache(region)


def _wait(condition: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- a master killed under load -------------------------------------------------------------------

READERS = 3
ROWS = 20
LOAD_SECONDS_BEFORE_KILL = 1.0
RESUME_LIMIT_SECONDS = 30.0


@pytest.mark.slow
@pytest.mark.parametrize("db", ["postgresql"])
def test_a_master_killed_under_load_serves_nothing_stale_and_hits_resume(engine):
    """A writer commits ever-newer versions of rows while readers look them up through the
    cache; one master is SIGKILLed and its replica takes over. No read returns a version older
    than one committed before the read began, no caller sees an exception, and hits on the
    killed master's slots resume (the time it took is printed)."""
    servers = RedisClusterServers().start()  # a cluster of its own: this one loses a master
    try:
        cache = register_all(
            IdentityCache(servers.url, prefix=f"{RUN_ID}_kill", breaker_cooldown=0.5)
        )
        model = cache.model_for(User.__mapper__)
        assert model is not None and isinstance(cache.store, RedisClusterStore)
        # the probe reads user 1: the master holding its slot is the one killed
        victim_port = cache.store._node(model.keys.row_key((1,)))[0].port
        victim = next(n for n in servers.nodes if n.port == victim_port)
        with CheckedLoad(engine, cache, ROWS, READERS) as load:
            load.stop.wait(LOAD_SECONDS_BEFORE_KILL)
            assert load.hits_at, "the probe never hit before the kill"
            victim.kill()
            killed_at = time.monotonic()
            deadline = killed_at + RESUME_LIMIT_SECONDS
            while not load.stop.is_set() and time.monotonic() < deadline:
                if load.hits_at[-1] > killed_at + 0.05 and load.hits_after(killed_at) >= 20:
                    break
                time.sleep(0.05)
        # a hit in the instant the signal takes to land is no resumption: the longest gap is
        longest = load.longest_without_a_hit(killed_at)
        stats = cache.stats()
        print(
            f"\nmaster SIGKILLed: longest stretch without a hit on its slots "
            f"{'(no hit since)' if longest is None else f'{longest:.2f} s'}; "
            f"{load.reads} checked reads, {len(load.stale)} stale, {len(load.errors)} "
            f"exceptions, {stats['errors']} store errors, {stats['bypassed']} bypassed"
        )
        assert load.errors == []
        assert load.stale == []
        assert load.hits_after(killed_at + 0.05) >= 20, "hits never resumed"
    finally:
        servers.stop()
