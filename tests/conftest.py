"""Fixtures: real SQLite, PostgreSQL and MariaDB databases, real Redis, and exact counters.

Each test run creates its own PostgreSQL and MariaDB database and uses its own Redis key prefix,
so concurrent runs on one machine never see each other's rows or keys. A service that is down is
a skip on a developer's machine and a failure under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache
from sa_cache.near import NearStore

from . import models, redis_cluster, redis_sentinel
from .counting import RedisCounter, SQLCounter, counted_redis_region, counting_sql
from .databases import create_database, drop_database, port_open
from .redis_server import RedisServer, make_tls_files

REDIS_URL = os.environ.get("SA_CACHE_TEST_REDIS") or "redis://127.0.0.1:6379/0"
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
MARIADB_SERVER = "mysql+pymysql://root@127.0.0.1:3306"
#: names of the databases (and the Redis key prefix) this run creates: the prefix, then the pid
RUN_ID = f"{os.environ.get('SA_CACHE_TEST_DB') or 'sa_cache_t'}{os.getpid()}"
IN_CI = os.environ.get("CI") == "true"

DATABASES = ["sqlite", "postgresql", "mariadb"]
BACKENDS = ["memory", "redis"]


def require_service(name: str, port: int) -> None:
    if not port_open(port):
        message = f"{name} is not running on 127.0.0.1:{port} (scripts/test.sh starts it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    redis_cluster.stop_shared()  # the private Redis Cluster, if a test started it
    redis_sentinel.stop_shared()  # the private Sentinel deployment, likewise


def _require_cluster_tools() -> None:
    """redis-server and redis-cli, which a Redis Cluster of the tests' own needs."""
    if not redis_cluster.available():
        message = "redis-server and redis-cli are needed for the Redis Cluster tests"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def require_redis_cluster() -> redis_cluster.RedisClusterServers:
    """The run's private Redis Cluster (tests/redis_cluster.py), started on first use."""
    _require_cluster_tools()
    return redis_cluster.shared()


@pytest.fixture(scope="module")
def tls_files() -> Iterator[str]:
    """A folder of throwaway certificates (tests/redis_server.py ``make_tls_files``) for the
    module's TLS servers; no ``openssl`` is a failure, never a skip."""
    folder = tempfile.mkdtemp(prefix="sa_cache_tls_")
    try:
        make_tls_files(folder)
    except FileNotFoundError:
        pytest.fail("the openssl command line is needed to make a test certificate")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def start_tls_server(folder: str, *extra_args: str, tls_auth_clients: str = "no") -> RedisServer:
    """A private redis-server listening for TLS only (``folder``: :func:`tls_files`); a build
    without TLS is a skip on a developer's machine and a failure under ``CI=true``."""
    require_service("redis", 6379)  # redis-server is installed
    server = RedisServer(*extra_args, tls_dir=folder, tls_auth_clients=tls_auth_clients)
    try:
        return server.start()
    except RuntimeError as exc:
        server.stop()
        if "TLS" not in str(exc) and "tls" not in str(exc):
            raise
        message = f"this redis-server build has no TLS support: {exc}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def start_tls_cluster(folder: str) -> redis_cluster.RedisClusterServers:
    """A private Redis Cluster of three TLS-only masters, no replicas (``folder``:
    :func:`tls_files`), apart from the run's shared cluster; the caller stops it. Skipped or
    failed as :func:`start_tls_server` is when the tools or TLS support are missing."""
    _require_cluster_tools()
    start_tls_server(folder).stop()  # this redis-server build speaks TLS (or skip, as there)
    servers = redis_cluster.RedisClusterServers(replicas=0, tls_dir=folder)
    try:
        return servers.start()
    except BaseException:
        servers.stop()
        raise


# -- counters (tests/counting.py) ---------------------------------------------------------------


def counted_region(counter: RedisCounter, url: str | None = None) -> Any:
    """dogpile's Redis backend at the tests' Redis, its connections counted by ``counter``."""
    return counted_redis_region(counter, url or REDIS_URL)


# -- databases ----------------------------------------------------------------------------------


_engines: dict[str, Engine] = {}


def database_url(kind: str, tmp_root: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_root}/{RUN_ID}.sqlite"
    if kind == "postgresql":
        require_service("postgresql", 5432)
        return create_database(PG_SERVER, RUN_ID)
    require_service("mariadb", 3306)
    return create_database(MARIADB_SERVER, RUN_ID)


@pytest.fixture(scope="session")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Engine]]:
    yield _engines
    for kind, engine in _engines.items():
        engine.dispose()
        if kind == "postgresql":
            drop_database(PG_SERVER, RUN_ID)
        elif kind == "mariadb":
            drop_database(MARIADB_SERVER, RUN_ID)


def make_engine(kind: str, engines: dict[str, Engine], tmp_root: str) -> Engine:
    engine = engines.get(kind)
    if engine is None:
        engine = create_engine(database_url(kind, tmp_root))
        models.Base.metadata.create_all(engine)
        engines[kind] = engine
    return engine


@pytest.fixture(params=DATABASES)
def db(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def engine(
    db: str, engines: dict[str, Engine], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    engine = make_engine(db, engines, str(tmp_path_factory.getbasetemp()))
    with engine.begin() as conn:
        for table in reversed(models.Base.metadata.sorted_tables):
            conn.execute(table.delete())
    yield engine


@pytest.fixture
def sql(engine: Engine) -> Iterator[SQLCounter]:
    """Every statement ``engine`` sends during the test: assert on it with ``expect_sql``."""
    with counting_sql(engine) as counter:
        yield counter


# -- caches -------------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        require_service("redis", 6379)
    return str(request.param)


@pytest.fixture
def redis_counter() -> RedisCounter:
    """The Redis commands of the ``cache`` fixture: assert on them with ``expect_commands`` (which
    asserts nothing for the memory backend)."""
    return RedisCounter()


def register_all(cache: IdentityCache) -> IdentityCache:
    """Register every model of tests/models.py that the tests cache."""
    for model in models.CACHED:
        cache.register(model)
    return cache


def warm(Session: sessionmaker[CachingSession], *pks: int) -> None:  # noqa: N803
    """Cache users ``pks``, one session each (a REPEATABLE READ session fills only its first
    load)."""
    for pk in pks:
        with Session() as s:
            s.get(models.User, pk)


@pytest.fixture
def users(Session: sessionmaker[CachingSession]) -> None:  # noqa: N803
    """Users 1-3, named u1-u3, each cached (modules that need other rows define their own)."""
    with Session() as s:
        s.add_all([models.User(id=i, name=f"u{i}") for i in (1, 2, 3)])
        s.commit()
    warm(Session, 1, 2, 3)


@pytest.fixture
def uncached_users(engine: Engine) -> None:
    """Users 1-3, named u1-u3 at version 1, written without any cache (nothing cached)."""
    with sessionmaker(engine)() as s:
        s.add_all([models.User(id=i, name=f"u{i}", version=1) for i in (1, 2, 3)])
        s.commit()


def new_cache(backend: str, counter: RedisCounter, **options: Any) -> IdentityCache:
    """A registered cache under a prefix of its own: ``backend`` "memory", "redis" (the tests'
    Redis, counted by ``counter``) or a Redis URL (a server of the test's own, not counted)."""
    prefix = f"{RUN_ID}_{uuid.uuid4().hex[:8]}"
    # a test's cache whose server is gone never delays the run's exit (its ERROR line remains)
    options.setdefault("exit_flush_timeout", 0)
    if backend == "redis":
        cache = IdentityCache(counted_region(counter), prefix=prefix, **options)
        cache.store.client.ping()  # type: ignore[attr-defined]
        counter.reset()
    elif backend == "memory":
        cache = IdentityCache(prefix=prefix, **options)
    else:
        cache = IdentityCache(backend, prefix=prefix, **options)
    return register_all(cache)


def another_process(cache: IdentityCache, models: Any) -> IdentityCache:
    """Another process's cache on ``cache``'s store and prefix, with ``models`` registered: its
    commits evict what ``cache`` reads without ``cache``'s own miss forecast knowing (so
    ``cache``'s next read of an evicted key is a plain read, as after another process's
    commit)."""
    other = IdentityCache(cache.region, prefix=cache.prefix, exit_flush_timeout=0)
    for model in models:
        other.register(model)
    return other


CacheFactory = Callable[..., IdentityCache]


@pytest.fixture
def cache_factory(redis_counter: RedisCounter) -> Iterator[CacheFactory]:
    """``cache_factory(backend, **options)``: a cache as :func:`new_cache` makes it, with
    IdentityCache options of the test's own (``cache_factory(backend, lease_wait=0)``). The keys
    of every cache made on the tests' Redis are removed after the test; a server of the test's
    own (a URL) is discarded with its keys."""
    shared: list[tuple[Any, str]] = []

    def make(backend: str, **options: Any) -> IdentityCache:
        cache = new_cache(backend, redis_counter, **options)
        if backend == "redis":
            shared.append((cache.store, cache.prefix + ":"))  # the store, even if a test swaps it
        return cache

    yield make
    for store, prefix in shared:
        store.delete_prefix(prefix)


@pytest.fixture
def cache(backend: str, cache_factory: CacheFactory) -> IdentityCache:
    return cache_factory(backend)


@pytest.fixture
def Session(engine: Engine, cache: IdentityCache) -> sessionmaker[CachingSession]:  # noqa: N802
    return sessionmaker(engine, class_=CachingSession, cache=cache)


@pytest.fixture
def caches() -> Iterator[Callable[..., IdentityCache]]:
    """``caches(url=None, prefix=None, **options)``: a registered near cache (Redis at ``url``,
    the tests' Redis by default) under ``prefix`` (a fresh one by default); every cache made is
    closed and its keys removed afterwards (tests/test_near_cache.py, tests/test_tls.py)."""
    made: list[IdentityCache] = []

    def make(url: str | None = None, prefix: str | None = None, **options: Any) -> IdentityCache:
        require_service("redis", 6379)
        options.setdefault("exit_flush_timeout", 0)
        options.setdefault("near_cache", True)
        cache = IdentityCache(
            url or REDIS_URL, prefix=prefix or f"{RUN_ID}_near_{uuid.uuid4().hex[:8]}", **options
        )
        made.append(register_all(cache))
        return cache

    yield make
    for cache in made:
        store = cache.store
        if isinstance(store, NearStore):
            store.close()
            store = store.inner
        with contextlib.suppress(redis.RedisError):  # a private server already gone
            store.delete_prefix(cache.prefix + ":")
