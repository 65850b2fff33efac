"""TLS: the Redis store and the near cache over ``rediss://``, against private redis-servers that
listen for TLS only (tests/redis_server.py), with a CA, a server certificate (127.0.0.1,
localhost) and a client certificate made for the module by the ``openssl`` command line.

What must hold:

- TLS changes nothing the cache does: the same answers as plain SQLAlchemy, the same SQL, the
  same Redis commands and round trips as over plain TCP;
- the near cache's tracking connections speak TLS exactly when, and as, the store's own
  connections do: they trust what the store's connections trust, never more, and are refused
  where those are (so memory is never served unverified);
- a message a TLS link has already decrypted is applied before an answer, although ``poll``
  cannot see it;
- a certificate that does not verify leaves the cache to the database, and says so.

Two caches on one prefix, each with its own connections, stand for two processes (as in
tests/test_near_cache.py, whose helpers these tests use); one test commits from a real process.
"""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from dogpile.cache import make_region
from redis.cluster import ClusterNode
from redis.exceptions import RedisClusterException
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from sa_cache import IdentityCache, NearCache
from sa_cache.store import Write
from sa_cache.stores.redis_cluster import RedisClusterStore

from .conftest import RUN_ID, register_all, start_tls_cluster, start_tls_server
from .counting import RedisCounter, counted_redis_region, expect_commands, expect_sql
from .models import User
from .redis_cluster import RedisClusterServers
from .redis_server import RedisServer, tls_options
from .test_near_cache import bump, connected, near, sessions, version_of, wait_for

pytestmark = [pytest.mark.usefixtures("uncached_users"), pytest.mark.parametrize("db", ["sqlite"])]


@pytest.fixture(scope="module")
def tls(tls_files: str) -> Iterator[RedisServer]:
    """TLS only, clients not asked for a certificate; listening on 127.0.0.2 too, an address
    its certificate does not name."""
    server = start_tls_server(tls_files, "--bind", "127.0.0.1", "127.0.0.2")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mutual(tls_files: str) -> Iterator[RedisServer]:
    """TLS only, every client must present a certificate signed by the test CA."""
    server = start_tls_server(tls_files, tls_auth_clients="yes")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_cluster(tls_files: str) -> Iterator[RedisClusterServers]:
    """Three TLS-only masters (no replicas), their cluster bus TLS too; the module's own, never
    the run's shared cluster."""
    servers = start_tls_cluster(tls_files)
    yield servers
    servers.stop()


def _write(key: str, value: bytes) -> Write:
    return Write(key, value, 60)


# -- the Redis store --------------------------------------------------------------------------


def test_a_rediss_url_serves_the_redis_store_exactly_as_plain_tcp_does(
    engine: Engine, sql: Any, tls: RedisServer
) -> None:
    """Differential twice over: each step's answer is plain SQLAlchemy's, and its SQL, Redis
    commands and round trips over TLS are those over plain TCP (a private plain server)."""
    plain_server = RedisServer().start()
    try:
        steps = {}
        for transport, url in (("tcp", plain_server.url), ("tls", tls.tls_url())):
            with sessionmaker(engine)() as s:  # the same row before each transport's run
                s.execute(update(User).where(User.id == 1).values(version=1))
                s.commit()
            steps[transport] = _store_scenario(engine, sql, url)
    finally:
        plain_server.stop()
    assert steps["tls"] == steps["tcp"]
    by_name = dict(steps["tls"])
    assert by_name["miss"][1] == 1  # loaded: one SELECT
    assert by_name["hit"][1:] == (0, {"MGET": 1}, 1)  # no SQL, one MGET, one round trip
    assert by_name["after the commit"][0] == 2 and by_name["after the commit"][1] == 1
    assert by_name["hit again"][:2] == (2, 0)


def _store_scenario(engine: Engine, sql: Any, url: str) -> list[tuple[str, Any]]:
    """(step, (answer, SELECTs, Redis commands, round trips)) for a miss, a hit, a commit, the
    read after it (another session) and the hit after that; each answer checked against plain
    SQLAlchemy's."""
    counter = RedisCounter()
    region = counted_redis_region(counter, url)
    cache = register_all(
        IdentityCache(region, prefix=f"{RUN_ID}_tls_{uuid.uuid4().hex[:8]}", exit_flush_timeout=0)
    )
    cached, plain = sessions(engine, cache), sessions(engine, None)
    steps: list[tuple[str, Any]] = []

    def step(name: str, action: Callable[[], int]) -> None:
        counter.reset()
        sql.reset()
        answer = action()
        steps.append((name, (answer, sql.selects(), dict(counter.commands), counter.round_trips)))

    try:
        for name in ("miss", "hit"):
            step(name, lambda: version_of(cached, 1))
            assert steps[-1][1][0] == version_of(plain, 1)
        step("commit", lambda: bump(cached, 1))
        for name in ("after the commit", "hit again"):
            step(name, lambda: version_of(cached, 1))
            assert steps[-1][1][0] == version_of(plain, 1)
        assert cache.stats()["errors"] == 0
        if url.startswith("rediss://"):
            connection = cache.store.client.connection_pool.get_connection()  # type: ignore[attr-defined]
            try:
                assert isinstance(connection._sock, ssl.SSLSocket)  # really TLS
            finally:
                cache.store.client.connection_pool.release(connection)  # type: ignore[attr-defined]
    finally:
        cache.store.delete_prefix(cache.prefix + ":")
    return steps


# -- the near cache -----------------------------------------------------------------------------


def test_a_near_cache_over_tls_answers_from_memory_and_sees_another_caches_commits(
    engine: Engine, sql: Any, caches: Any, tls: RedisServer
) -> None:
    counter = RedisCounter()
    a = caches(counted_redis_region(counter, tls.tls_url()))
    b = caches(tls.tls_url(), prefix=a.prefix, near_cache=False)  # connections of its own
    connected(a)
    link = near(a).invalidations._links[0]
    assert isinstance(link.sock, ssl.SSLSocket) and link.sock.version() is not None
    SessionA, SessionB = sessions(engine, a), sessions(engine, b)  # noqa: N806
    for _ in range(2):  # a miss, then a Redis hit kept in memory
        assert version_of(SessionA, 1) == 1
    hits = a.stats()["near"]["hits"]
    with expect_sql(sql, 0), expect_commands(counter, {}):
        assert version_of(SessionA, 1) == 1
    assert a.stats()["near"]["hits"] == hits + 2  # the generation and the row
    stale = 0
    for _ in range(5):
        committed = bump(SessionB, 1)
        returned = time.monotonic()
        wait_for(lambda r=returned: near(a).invalidations.confirmed() > r, "a ping after it")
        stale += version_of(SessionA, 1) != committed
        assert version_of(SessionA, 1) == committed
    assert stale == 0
    stats = a.stats()["near"]
    assert stats["invalidations"] >= 5 and stats["hits"] > hits + 2
    assert near(a).invalidations.connects == 1  # one TLS connection all along


_COMMIT_IN_ANOTHER_PROCESS = """
import sys
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
from sa_cache import CachingSession, IdentityCache
from tests.models import User

url, prefix, database = sys.argv[1:4]
cache = IdentityCache(url, prefix=prefix, exit_flush_timeout=0)
cache.register(User)
Session = sessionmaker(create_engine(database), class_=CachingSession, cache=cache)
with Session() as s:
    user = s.get(User, 1)
    user.version += 1
    s.commit()
    print(user.version)
"""


def test_a_commit_in_another_process_reaches_a_near_cache_over_tls(
    engine: Engine, caches: Any, tls: RedisServer
) -> None:
    cache = caches(tls.tls_url())
    connected(cache)
    Session = sessions(engine, cache)  # noqa: N806
    for _ in range(3):
        assert version_of(Session, 1) == 1
    database = engine.url.render_as_string(hide_password=False)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", _COMMIT_IN_ANOTHER_PROCESS, tls.tls_url(), cache.prefix, database],
        cwd=root, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    committed = int(done.stdout.strip())
    returned = time.monotonic()
    assert committed == 2
    wait_for(lambda: near(cache).invalidations.confirmed() > returned, "a ping after it")
    assert version_of(Session, 1) == committed  # 0 stale
    assert near(cache).stats.invalidations >= 1


def test_a_tls_near_cache_keeps_its_tracking_connection_across_topology_checks(
    caches: Any, tls: RedisServer
) -> None:
    """The masters are resolved again every ``topology_interval`` and compared with those the
    links were made for: the same TLS settings must compare equal, not drop everything."""
    cache = caches(tls.tls_url(), near_cache=NearCache(topology_interval=0.02))
    connected(cache)
    listener = near(cache).invalidations
    resolve, resolved = listener._resolve, [0]

    def counting() -> Any:
        resolved[0] += 1
        return resolve()

    listener._resolve = counting
    flushes = near(cache).stats.flushes
    wait_for(lambda: resolved[0] >= 10, "ten topology checks")
    assert listener.connects == 1 and near(cache).stats.flushes == flushes
    assert listener.last_error is None


def test_a_tls_links_already_decrypted_bytes_are_applied_before_an_answer(
    caches: Any, tls: RedisServer
) -> None:
    """An invalidation whose TLS record was taken off the socket and decrypted, but only partly
    read out of the SSL object (as an interrupted read leaves it), is where ``poll`` cannot see
    it: a read must still apply it before answering. The supervisor is held off by holding the
    listener's lock (a reader's drain takes it again: it is reentrant)."""
    cache = caches(tls.tls_url())
    connected(cache)
    store = near(cache)
    listener = store.invalidations
    key = cache.prefix + ":decrypted"
    store.write_many([_write(key, b"old")])
    assert store.get_many([key]) == [b"old"]
    hits = store.stats.hits
    assert store.get_many([key]) == [b"old"] and store.stats.hits == hits + 1  # from memory
    with listener._lock:  # the supervisor can neither ping nor read from here on
        (link,) = listener._links
        poller = listener._poller
        assert poller is not None

        def answered() -> bool:
            listener._read_links()
            return not link._pings

        wait_for(answered, "every ping answered")  # nothing but the message can arrive now
        store.inner.write_many([_write(key, b"new")])  # another writer
        wait_for(lambda: poller.poll(0), "the invalidation's record at the socket")

        def first_byte() -> bool:
            try:
                link._buffer += link.sock.recv(1)
            except ssl.SSLWantReadError:  # the record has not all arrived yet
                return False
            return True

        wait_for(first_byte, "the record decrypted")
        assert link.sock.pending() > 0  # the rest of the message, decrypted, in the SSL object
        assert not poller.poll(0)  # and nothing left at the socket
        assert store.get_many([key]) == [b"new"]
    assert store.stats.invalidations >= 1


# -- Redis Cluster over TLS ---------------------------------------------------------------------


def _cluster_connections_are_tls(store: RedisClusterStore) -> None:
    """Every primary's connection the store's client makes is a TLS socket."""
    for node in store.client.get_primaries():
        pool = store.client.get_redis_connection(node).connection_pool
        connection = pool.get_connection()
        try:
            assert isinstance(connection._sock, ssl.SSLSocket), node.name
        finally:
            pool.release(connection)


def test_a_rediss_cluster_url_serves_the_cluster_store_as_plain_sqlalchemy(
    engine: Engine, sql: Any, tls_cluster: RedisClusterServers
) -> None:
    """``rediss+cluster://node/?ssl_ca_certs=...``: a miss fills, a hit reads no SQL, a commit
    evicts and the next read answers the new row; every answer plain SQLAlchemy's."""
    prefix = f"{RUN_ID}_tlscl_{uuid.uuid4().hex[:8]}"
    cache = register_all(IdentityCache(tls_cluster.url, prefix=prefix, exit_flush_timeout=0))
    store = cache.store
    assert isinstance(store, RedisClusterStore)
    cached, plain = sessions(engine, cache), sessions(engine, None)
    try:
        with expect_sql(sql, selects=1):
            assert version_of(cached, 1) == 1
        assert version_of(plain, 1) == 1
        assert _keys(tls_cluster, cache.prefix) >= 2  # the row and its model's generation
        with expect_sql(sql, 0):
            assert version_of(cached, 1) == 1
        assert bump(cached, 1) == 2
        with expect_sql(sql, selects=1):
            assert version_of(cached, 1) == 2
        assert version_of(plain, 1) == 2
        with expect_sql(sql, 0):
            assert version_of(cached, 1) == 2
        stats = cache.stats()
        assert (stats["hits"], stats["fills"], stats["errors"], stats["bypassed"]) == (3, 2, 0, 0)
        _cluster_connections_are_tls(store)
    finally:
        store.delete_prefix(cache.prefix + ":")


def _tls_cluster_backend(cluster: RedisClusterServers, form: str, folder: str) -> Any:
    """The documented forms: the ``rediss+cluster://`` URL, or a dogpile ``redis_cluster``
    region whose client has ``ssl=True`` (a fresh one per call: connections of its own)."""
    if form == "url":
        return cluster.url
    return make_region().configure(
        "dogpile.cache.redis_cluster",
        arguments={
            "startup_nodes": [ClusterNode("127.0.0.1", cluster.nodes[0].port)],
            "connection_kwargs": {"ssl": True, "ssl_ca_certs": os.path.join(folder, "ca.crt"),
                                  "socket_timeout": 1.0, "socket_connect_timeout": 1.0},
        },
    )  # fmt: skip


@pytest.mark.parametrize("form", ["url", "region"])
def test_a_near_cache_over_a_tls_cluster_answers_from_memory_and_sees_another_caches_commits(
    engine: Engine,
    sql: Any,
    caches: Any,
    tls_cluster: RedisClusterServers,
    tls_files: str,
    form: str,
) -> None:
    """One TLS tracking connection per primary, trusting what the store's connections trust; a
    near hit asks neither SQL nor Redis, and a commit through another cache (connections of its
    own) is seen once a ping sent after it is answered: 0 stale."""
    a = caches(_tls_cluster_backend(tls_cluster, form, tls_files))
    b = caches(
        _tls_cluster_backend(tls_cluster, form, tls_files), prefix=a.prefix, near_cache=False
    )
    connected(a)
    listener = near(a).invalidations
    assert sorted(e.port for e in listener._endpoints) == sorted(n.port for n in tls_cluster.nodes)
    assert len(listener._links) == 3
    for link in listener._links:
        assert isinstance(link.sock, ssl.SSLSocket) and link.sock.version() is not None
    SessionA, SessionB = sessions(engine, a), sessions(engine, b)  # noqa: N806
    with expect_sql(sql, selects=1):
        assert version_of(SessionA, 1) == 1  # a miss: loaded and filled
    with expect_sql(sql, 0):
        assert version_of(SessionA, 1) == 1  # a Redis hit, kept in memory
    hits = a.stats()["near"]["hits"]
    with expect_sql(sql, 0):
        assert version_of(SessionA, 1) == 1
    assert a.stats()["near"]["hits"] == hits + 2  # the generation and the row, from memory
    stale = 0
    for _ in range(5):
        committed = bump(SessionB, 1)
        returned = time.monotonic()
        wait_for(lambda r=returned: listener.confirmed() > r, "a ping after it on every link")
        stale += version_of(SessionA, 1) != committed
        assert version_of(SessionA, 1) == committed
    assert stale == 0
    assert version_of(sessions(engine, None), 1) == 6
    stats = a.stats()["near"]
    assert stats["invalidations"] >= 5 and stats["hits"] > hits + 2
    assert listener.last_error is None and a.stats()["errors"] == b.stats()["errors"] == 0
    assert b.stats()["journal"] == {"keys": 0, "models": 0}  # every eviction written


def test_a_tls_cluster_that_does_not_verify_refuses_the_cache_at_construction(
    tls_cluster: RedisClusterServers, tls_files: str
) -> None:
    """A client trusting another CA: making the cache raises at once, naming the failed
    certificate check (redis-py's cluster client reads the slot map in its constructor, so a
    cluster it cannot reach then is refused there, as docs/configuration.md says), and nothing
    is written to the cluster. A ``rediss://`` single server connects lazily instead and serves
    from the database (above)."""
    url = tls_cluster.tls_url(ssl_ca_certs=os.path.join(tls_files, "other-ca.crt"))
    prefix = f"{RUN_ID}_tlscl_{uuid.uuid4().hex[:8]}"
    with pytest.raises(RedisClusterException) as refused:
        IdentityCache(url, prefix=prefix, exit_flush_timeout=0, socket_timeout=1)
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    assert _keys(tls_cluster, prefix) == 0


def _keys(cluster: RedisClusterServers, prefix: str) -> int:
    return sum(len(node.client().keys(prefix + "*")) for node in cluster.masters())


# -- verification -------------------------------------------------------------------------------


def _variants(folder: str) -> dict[str, tuple[str, str, dict[str, str]]]:
    """name -> (server fixture, host, URL query)"""
    ca, other = os.path.join(folder, "ca.crt"), os.path.join(folder, "other-ca.crt")
    mine = tls_options(folder)
    return {
        "the test CA": ("tls", "127.0.0.1", {"ssl_ca_certs": ca}),
        "localhost": ("tls", "localhost", {"ssl_ca_certs": ca}),
        "no verification": ("tls", "127.0.0.1", {"ssl_cert_reqs": "none"}),
        "another CA": ("tls", "127.0.0.1", {"ssl_ca_certs": other}),
        "the system's CAs": ("tls", "127.0.0.1", {}),
        "a name the certificate lacks": ("tls", "127.0.0.2", {"ssl_ca_certs": ca}),
        "a name unchecked": (
            "tls",
            "127.0.0.2",
            {"ssl_ca_certs": ca, "ssl_check_hostname": "false"},
        ),
        "a client certificate": ("mutual", "127.0.0.1", mine),
        "no client certificate": ("mutual", "127.0.0.1", {"ssl_ca_certs": ca}),
    }


VARIANTS = list(_variants(""))


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_tracking_connection_trusts_what_the_stores_connections_trust(
    request: pytest.FixtureRequest, tls_files: str, caches: Any, variant: str
) -> None:
    """Differential against redis-py: a near cache's tracking connection is refused exactly
    where the store's own connection is (same URL, same ``ssl_*`` options)."""
    which, host, query = _variants(tls_files)[variant]
    server: RedisServer = request.getfixturevalue(which)
    url = f"rediss://{host}:{server.port}/0?" + "&".join(f"{k}={v}" for k, v in query.items())
    cache = caches(url, socket_timeout=1.0)
    listener = near(cache).invalidations
    try:
        cache.store.inner.client.ping()  # type: ignore[attr-defined]
        store_connects = True
    except redis.ConnectionError:
        store_connects = False
    wait_for(
        lambda: listener.connects > 0 or (listener.last_error or "").startswith("cannot connect"),
        "the tracking connection to connect or be refused",
    )
    assert (listener.connects > 0) == store_connects, listener.last_error
    refused = (
        "another CA",
        "the system's CAs",
        "a name the certificate lacks",
        "no client certificate",
    )
    expected = variant not in refused
    assert store_connects == expected
    if not store_connects:
        assert listener.confirmed() == -1.0
        assert "SSL" in (listener.last_error or "") or "OSError" in (listener.last_error or "")


def test_a_server_that_does_not_verify_leaves_the_redis_store_to_the_database(
    engine: Engine, sql: Any, tls: RedisServer, tls_files: str, caplog: Any
) -> None:
    """A client trusting another CA: every answer is plain SQLAlchemy's, loaded from the
    database; the breaker opens and the log says why. Nothing is cached unverified."""
    caplog.set_level(logging.WARNING, logger="sa_cache")
    url = tls.tls_url(ssl_ca_certs=os.path.join(tls_files, "other-ca.crt"))
    cache = register_all(IdentityCache(url, prefix=f"{RUN_ID}_tls_{uuid.uuid4().hex[:8]}",
                                       exit_flush_timeout=0, socket_timeout=1.0))  # fmt: skip
    cached, plain = sessions(engine, cache), sessions(engine, None)
    for _ in range(4):
        with expect_sql(sql, selects=1):
            answer = version_of(cached, 2)
        assert answer == version_of(plain, 2) == 1
    stats = cache.stats()
    assert stats["errors"] >= 1 and stats["hits"] == 0
    assert cache.guarded.breaker.is_open
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "serving from the database" in text and "CERTIFICATE_VERIFY_FAILED" in text
    assert tls.client().keys(cache.prefix + "*") == []  # nothing written either


def test_a_near_cache_that_does_not_verify_serves_nothing_from_memory(
    engine: Engine, sql: Any, caches: Any, tls: RedisServer, tls_files: str
) -> None:
    url = tls.tls_url(ssl_ca_certs=os.path.join(tls_files, "other-ca.crt"))
    cache = caches(url, socket_timeout=1.0)
    listener = near(cache).invalidations
    wait_for(lambda: (listener.last_error or "").startswith("cannot connect"), "the refusal")
    assert "SSLCertVerificationError" in (listener.last_error or "")
    cached, plain = sessions(engine, cache), sessions(engine, None)
    for _ in range(4):
        with expect_sql(sql, selects=1):
            answer = version_of(cached, 3)
        assert answer == version_of(plain, 3) == 1
    assert cache.stats()["near"]["hits"] == 0 and not near(cache)._entries
    assert listener.connects == 0 and listener.confirmed() == -1.0
