"""Redis Sentinel: the cache works through a dogpile ``redis_sentinel`` region and a
``redis+sentinel://`` URL, and a change of master loses no eviction: entries written before it
are unreachable on the new master, and an eviction no replica acknowledged is journaled and
delivered to the new master. Every test runs a private deployment (tests/redis_sentinel.py: a
master, a replica, three sentinels on loopback); the shared Redis is never touched."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from dogpile.cache import make_region
from dogpile.cache.proxy import ProxyBackend
from redis.sentinel import SentinelManagedConnection
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache
from sa_cache.errors import UnsupportedBackend
from sa_cache.store import Write
from sa_cache.stores import region_for_url
from sa_cache.stores.redis_sentinel import MasterChanged, RedisSentinelStore, ReplicationTimeout

from . import redis_sentinel
from .checked_load import CheckedLoad
from .conftest import RUN_ID, register_all
from .counting import (
    RedisCounter,
    counting_connection_class,
    counting_sql,
    expect_commands,
    expect_sql,
)
from .models import User
from .redis_sentinel import RedisSentinelServers


@pytest.fixture
def shared_sentinel() -> RedisSentinelServers:
    """The run's deployment, for the tests that do not change its topology."""
    return redis_sentinel.shared()


@pytest.fixture
def sentinel() -> Iterator[RedisSentinelServers]:
    """A deployment of this test's own: it loses or changes its master."""
    servers = RedisSentinelServers().start()
    yield servers
    servers.stop()


@pytest.fixture(params=["sqlite"])
def db(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _prefix() -> str:
    return f"{RUN_ID}_sn_{uuid.uuid4().hex[:8]}"


def _region(servers: RedisSentinelServers, counter: RedisCounter | None = None) -> Any:
    arguments = servers.region_arguments()
    if counter is not None:
        arguments["connection_kwargs"] = {
            "connection_class": counting_connection_class(counter, SentinelManagedConnection)
        }
    return make_region().configure("dogpile.cache.redis_sentinel", arguments=arguments)


def _cache(servers: RedisSentinelServers, prefix: str, **options: Any) -> IdentityCache:
    return register_all(IdentityCache(servers.url, prefix=prefix, **options))


def _add_user(engine: Engine, name: str) -> None:
    with sessionmaker(engine)() as s:
        s.add(User(id=1, name=name))
        s.commit()


def _name(cache: IdentityCache, engine: Engine) -> str:
    with sessionmaker(engine, class_=CachingSession, cache=cache)() as s:
        return str(s.get(User, 1).name)


def _rename(cache: IdentityCache, engine: Engine, name: str) -> None:
    with sessionmaker(engine, class_=CachingSession, cache=cache)() as s:
        s.get(User, 1).name = name
        s.commit()


# -- working through Sentinel --------------------------------------------------------------------


@pytest.mark.parametrize("form", ["region", "url"])
def test_a_lookup_misses_then_hits_and_a_commit_evicts_it(shared_sentinel, engine, form):
    prefix = _prefix()
    if form == "region":
        cache = register_all(IdentityCache(_region(shared_sentinel), prefix=prefix))
    else:
        cache = _cache(shared_sentinel, prefix)
    assert isinstance(cache.store, RedisSentinelStore)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    _add_user(engine, "before")
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
    # the update's own get is a hit too; fills are not compared: on a server without the scripts
    # loaded the store's first fill is sent twice and counted as not stored (RedisStore)
    assert (stats["hits"], stats["errors"], stats["bypassed"]) == (3, 0, 0)
    cache.flush()


def test_the_url_names_the_sentinels_the_service_the_password_and_the_database():
    region = region_for_url("redis+sentinel://:s3cret@10.0.0.1:5000,10.0.0.2/cache?db=3", 0.5, 1)
    backend = region.backend
    assert backend.sentinels == [("10.0.0.1", 5000), ("10.0.0.2", 26379)]
    assert backend.service_name == "cache"
    assert (backend.password, backend.db, backend.socket_timeout) == ("s3cret", 3, 0.5)


def test_a_sentinel_region_with_a_dogpile_proxy_is_refused():
    """dogpile's proxies read through the backend's replica client; the cache reads the master."""
    region = make_region().configure(
        "dogpile.cache.redis_sentinel",
        arguments={"sentinels": [("127.0.0.1", 1)], "service_name": "unused"},
        wrap=[ProxyBackend],
    )
    with pytest.raises(UnsupportedBackend, match="dogpile proxies"):
        IdentityCache(region)


def test_a_batch_of_evictions_is_one_round_trip_ending_with_a_wait_for_the_replica(
    shared_sentinel,
):
    counter = RedisCounter()
    cache = register_all(IdentityCache(_region(shared_sentinel, counter), prefix=_prefix()))
    store = cache.store
    assert isinstance(store, RedisSentinelStore)
    store.get_many(["warm-up"])  # the first connection learns the master (INFO replication)
    with expect_commands(counter, {"SET": 2, "WAIT": 1}, round_trips=1):
        store.write_many([Write(f"{RUN_ID}_sn:a", b"1", 5), Write(f"{RUN_ID}_sn:b", b"2", 5)])


def test_a_read_that_timed_out_leaves_no_reply_behind_for_the_next_command(shared_sentinel):
    """redis-py's sentinel connection (8.1) keeps a connection whose read timed out; its next
    command would read the previous command's reply (another key's value). The store's
    connections are dropped after a failed read instead."""
    cache = IdentityCache(shared_sentinel.url, prefix=_prefix(), socket_timeout=0.2)
    store = cache.store
    assert isinstance(store, RedisSentinelStore)
    a, b = f"{RUN_ID}_sn_to:a", f"{RUN_ID}_sn_to:b"
    store.write_many([Write(a, b"A", 10), Write(b, b"B", 10)])
    master = shared_sentinel.server_on(shared_sentinel.master_port())
    master.pause()  # SIGSTOP: the reply to the next read comes only after the resume
    try:
        with pytest.raises(redis.TimeoutError):
            store.get_many([a])
    finally:
        master.resume()
    assert store.get_many([b]) == [b"B"]


# -- a change of master ---------------------------------------------------------------------------


def test_entries_written_before_a_change_of_master_are_not_served_from_the_new_one(
    sentinel, engine
):
    """The old master takes an eviction its replica never gets, from a process that then goes
    away; the replica becomes the master. A process that cached the row before the change must
    not serve it: its first read from the new master fails over to the database, and before
    its next one every generation is replaced."""
    prefix = _prefix()
    _add_user(engine, "v1")
    reader = _cache(sentinel, prefix)
    assert _name(reader, engine) == "v1"  # filled on the old master
    assert _name(reader, engine) == "v1"  # a hit
    old, new = sentinel.master, sentinel.replica
    assert old.client().wait(1, 2000) == 1  # the replica has the entry
    new.client().replicaof("NO", "ONE")  # the replica link is cut
    sentinel.wait(lambda: old.client().info("replication")["connected_slaves"] == 0, "unlinked")
    writer = _cache(sentinel, prefix)  # another process, on the old master only
    _rename(writer, engine, "v2")
    assert writer.stats()["journal"] == {"keys": 0, "models": 0}  # no replica to wait for
    old.kill()
    sentinel.point_sentinels_at(new)
    with counting_sql(engine) as sql:
        with expect_sql(sql, selects=1):
            assert _name(reader, engine) == "v2"  # noticed the change: from the database
        with expect_sql(sql, selects=1):
            assert _name(reader, engine) == "v2"  # generations replaced: a miss, then a fill
        with expect_sql(sql, 0):
            assert _name(reader, engine) == "v2"
    assert reader.stats()["errors"] == 1


def test_an_eviction_no_replica_acknowledged_is_delivered_to_the_new_master(sentinel, engine):
    """A graceful failover leaves the old master taking writes after the sentinels named the
    new one. An eviction written there is not acknowledged by any replica, so it is journaled,
    and its delivery reaches the new master, where another process reads."""
    prefix = _prefix()
    _add_user(engine, "v1")
    writer = _cache(sentinel, prefix)
    assert _name(writer, engine) == "v1"  # on the old master, which has a replica
    old, new = sentinel.master, sentinel.replica
    assert old.client().wait(1, 2000) == 1
    new.client().replicaof("NO", "ONE")
    sentinel.wait(lambda: old.client().info("replication")["connected_slaves"] == 0, "unlinked")
    sentinel.point_sentinels_at(new)
    reader = _cache(sentinel, prefix)  # started after the change: reads the new master
    assert _name(reader, engine) == "v1"  # a hit, on what the replica had
    _rename(writer, engine, "v2")  # evicted on the old master only
    assert writer.stats()["journal"]["keys"] == 1
    assert writer.deliver_evictions(timeout=10) is True
    with counting_sql(engine) as sql, expect_sql(sql, selects=1):
        assert _name(reader, engine) == "v2"


# -- failovers under a checked load ---------------------------------------------------------------

READERS = 3
ROWS = 200  # more than the writer rewrites during a breaker cooldown
LOAD_SECONDS_BEFORE = 1.0
SETTLE_LIMIT_SECONDS = 150.0  # a busy machine (the whole suite under CI) took over 60 s once
#: how long a killed master brought back may wait for the sentinels to make it a replica
REJOIN_WAIT = 45.0
HITS_AFTER = 20


def _run_checked_load(
    engine: Engine, servers: RedisSentinelServers, failover: Any, settled: Any, label: str
) -> None:
    """A writer commits ever-newer versions of rows while readers look them up through the
    cache; ``failover()`` runs meanwhile. No read returns a version older than one committed
    before the read began, no caller sees an exception, and hits resume once ``settled()``."""
    cache = _cache(servers, _prefix(), breaker_cooldown=0.5)
    settled_at = None
    with CheckedLoad(engine, cache, ROWS, READERS) as load:
        load.stop.wait(LOAD_SECONDS_BEFORE)
        assert load.hits_at, "the probe never hit before the failover"
        began = time.monotonic()
        failover()
        deadline = began + SETTLE_LIMIT_SECONDS
        while not load.stop.is_set() and time.monotonic() < deadline:
            if settled_at is None and settled():
                settled_at = time.monotonic()
            if settled_at is not None and load.hits_after(settled_at) >= HITS_AFTER:
                break
            time.sleep(0.05)
    longest = load.longest_without_a_hit(began)
    stats = cache.stats()
    print(
        f"\n{label}: longest stretch without a hit "
        f"{'(no hit since)' if longest is None else f'{longest:.2f} s'}; "
        f"old master a synced replica after "
        f"{'never' if settled_at is None else f'{settled_at - began:.2f} s'}; "
        f"{load.reads} checked reads, {len(load.stale)} stale, {len(load.errors)} exceptions, "
        f"{stats['errors']} store errors, {stats['bypassed']} bypassed"
    )
    assert load.errors == []
    assert load.stale == []
    assert settled_at is not None, (
        f"the old master never came back as a replica: {_replication_of(servers)}"
    )
    assert load.hits_after(settled_at) >= HITS_AFTER, "hits did not resume"


def _replication_of(servers: RedisSentinelServers) -> dict[int, Any]:
    """Each server's replication role and link, as it reports them (for a failure message)."""
    found: dict[int, Any] = {}
    for server in servers.servers:
        try:
            info = server.client().info("replication")
            found[server.port] = (info.get("role"), info.get("master_link_status"))
        except Exception as exc:  # a server down is part of the picture
            found[server.port] = repr(exc)
    return found


def _synced_replica(servers: RedisSentinelServers, port: int) -> Any:
    def synced() -> bool:
        server = servers.server_on(port)
        if server.process is None:
            return False
        info = server.client().info("replication")
        return info["role"] == "slave" and info.get("master_link_status") == "up"

    return synced


SETTINGS = {
    "default": (),
    "min-replicas-to-write": ("--min-replicas-to-write", "1", "--min-replicas-max-lag", "1"),
}


@pytest.mark.slow
@pytest.mark.parametrize("db", ["postgresql"])
@pytest.mark.parametrize("settings", list(SETTINGS))
def test_a_graceful_failover_under_load_serves_nothing_stale(engine, settings):
    servers = RedisSentinelServers(*SETTINGS[settings]).start()
    try:
        old = servers.master_port()
        _run_checked_load(
            engine,
            servers,
            servers.failover,
            _synced_replica(servers, old),
            f"SENTINEL FAILOVER ({settings})",
        )
    finally:
        servers.stop()


@pytest.mark.slow
@pytest.mark.parametrize("db", ["postgresql"])
@pytest.mark.parametrize("settings", list(SETTINGS))
def test_a_master_killed_under_load_serves_nothing_stale(engine, settings):
    servers = RedisSentinelServers(*SETTINGS[settings]).start()
    old = servers.master_port()
    victim = servers.server_on(old)
    restarted: list[float] = []

    def kill() -> None:
        victim.kill()

    def settled() -> bool:
        if not restarted:  # the old master comes back once the replica took over, as ops would
            if servers.master_port() == old:
                return False
            victim.start()
            restarted.append(time.monotonic())
        synced = bool(_synced_replica(servers, old)())
        if not synced and len(restarted) == 1 and time.monotonic() - restarted[0] > REJOIN_WAIT:
            # the sentinels convert a returning master at their next look, which a busy machine
            # delayed past this once (over 150 s): then do what they would, as ops would; the
            # cache's part (nothing stale, no exception, hits resuming) is what is checked
            new = servers.master_port()
            victim.client().execute_command("REPLICAOF", "127.0.0.1", str(new))
            restarted.append(time.monotonic())
            print(f"\nthe sentinels had not converted the old master after {REJOIN_WAIT:.0f} s")
        return synced

    try:
        _run_checked_load(engine, servers, kill, settled, f"master SIGKILLed ({settings})")
    finally:
        servers.stop()


def test_a_write_the_old_master_took_alone_is_written_again_on_the_new_master(sentinel):
    """The store keeps its writes of the last minute: after a change of master it writes them
    again (before anything else), so a tombstone only the old master took is not lost."""
    cache = IdentityCache(sentinel.url, prefix=_prefix())  # no model: no generation to replace
    store = cache.store
    assert isinstance(store, RedisSentinelStore)
    old, new = sentinel.master, sentinel.replica
    key = f"{RUN_ID}_sn_ring:tombstone"
    store.get_many([key])  # connected: the master has a replica
    new.client().replicaof("NO", "ONE")
    sentinel.wait(lambda: old.client().info("replication")["connected_slaves"] == 0, "unlinked")
    with pytest.raises(ReplicationTimeout):
        store.write_many([Write(key, b"evicted", 60)])  # the old master has it, alone
    store.write_many([Write(key, b"evicted", 60)])  # no replica any more: no WAIT
    assert new.client().get(key) is None
    old.kill()
    sentinel.point_sentinels_at(new)
    with pytest.raises(MasterChanged):
        store.get_many([key])  # answered by the new master: refused
    assert store.get_many([key]) == [b"evicted"]  # written again first
    assert new.client().get(key) == b"evicted"


def test_a_server_the_sentinels_name_that_answers_as_a_replica_is_not_read(sentinel):
    """A demoted master (or a replica named by stale sentinels) holds what it resynced, not
    what the master took since: the store refuses it as soon as it connects."""
    cache = IdentityCache(sentinel.url, prefix=_prefix())
    store = cache.store
    assert isinstance(store, RedisSentinelStore)
    sentinel.point_sentinels_at(sentinel.replica)  # still a replica
    with pytest.raises(redis.ConnectionError, match="not a master"):
        store.get_many([f"{RUN_ID}_sn_role:k"])
