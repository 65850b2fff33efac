"""Fixtures: real SQLite, PostgreSQL and MariaDB databases, real Redis, and exact counters.

Each test run creates its own PostgreSQL and MariaDB database and uses its own Redis key prefix,
so concurrent runs on one machine never see each other's rows or keys. A service that is down is
a skip on a developer's machine and a failure under ``CI=true``.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from dogpile.cache import make_region
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache

from . import models

REDIS_URL = os.environ.get("SA_CACHE_TEST_REDIS", "redis://127.0.0.1:6379/0")
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
MARIADB_SERVER = "mysql+pymysql://root@127.0.0.1:3306"
#: names of the databases (and the Redis key prefix) this run creates: the prefix, then the pid
RUN_ID = f"{os.environ.get('SA_CACHE_TEST_DB') or 'sa_cache_t'}{os.getpid()}"
IN_CI = os.environ.get("CI") == "true"

DATABASES = ["sqlite", "postgresql", "mariadb"]
BACKENDS = ["memory", "redis"]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def require_service(name: str, port: int) -> None:
    if not _port_open(port):
        message = f"{name} is not running on 127.0.0.1:{port} (scripts/test.sh starts it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


# -- counters -----------------------------------------------------------------------------------


class SQLCounter:
    """Every statement the engine sends, as seen by ``before_cursor_execute``."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    @property
    def count(self) -> int:
        return len(self.statements)

    def reset(self) -> None:
        self.statements.clear()

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)

    def selects(self) -> int:
        return sum(1 for s in self.statements if s.lstrip().upper().startswith("SELECT"))


class RedisCounter:
    """Redis commands and round trips, counted on the client's real connections."""

    def __init__(self) -> None:
        self.commands: Counter[str] = Counter()
        self.round_trips = 0

    @property
    def total(self) -> int:
        return sum(self.commands.values())

    def reset(self) -> None:
        self.commands.clear()
        self.round_trips = 0


def counting_connection_class(counter: RedisCounter) -> type[redis.Connection]:
    class CountingConnection(redis.Connection):
        def send_command(self, *args: Any, **kwargs: Any) -> None:
            counter.commands[str(args[0]).upper()] += 1
            super().send_command(*args, **kwargs)

        def pack_commands(self, commands: Any) -> Any:
            for command in commands:
                counter.commands[str(command[0]).upper()] += 1
            return super().pack_commands(commands)

        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            counter.round_trips += 1
            super().send_packed_command(command, check_health)

    return CountingConnection


def counted_redis_region(counter: RedisCounter, url: str = REDIS_URL) -> Any:
    return make_region().configure(
        "dogpile.cache.redis",
        arguments={
            "url": url,
            "socket_timeout": 1.0,
            "connection_kwargs": {"connection_class": counting_connection_class(counter)},
        },
    )


# -- databases ----------------------------------------------------------------------------------


def _create_database(server: str, port: int, name: str) -> str:
    require_service(server.split(":")[0], port)
    admin = create_engine(
        f"{server}/{'postgres' if server.startswith('postgresql') else 'test'}",
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return f"{server}/{name}"


def _drop_database(server: str, name: str) -> None:
    admin = create_engine(
        f"{server}/{'postgres' if server.startswith('postgresql') else 'test'}",
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as conn:
        if server.startswith("postgresql"):
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        else:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
    admin.dispose()


_engines: dict[str, Engine] = {}


def database_url(kind: str, tmp_root: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_root}/{RUN_ID}.sqlite"
    if kind == "postgresql":
        return _create_database(PG_SERVER, 5432, RUN_ID)
    return _create_database(MARIADB_SERVER, 3306, RUN_ID)


@pytest.fixture(scope="session")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Engine]]:
    yield _engines
    for kind, engine in _engines.items():
        engine.dispose()
        if kind == "postgresql":
            _drop_database(PG_SERVER, RUN_ID)
        elif kind == "mariadb":
            _drop_database(MARIADB_SERVER, RUN_ID)


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
    counter = SQLCounter()
    event.listen(engine, "before_cursor_execute", counter)
    yield counter
    event.remove(engine, "before_cursor_execute", counter)


# -- caches -------------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        require_service("redis", 6379)
    return str(request.param)


@pytest.fixture
def redis_counter() -> RedisCounter:
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


def new_cache(backend: str, counter: RedisCounter, **options: Any) -> IdentityCache:
    prefix = f"{RUN_ID}_{uuid.uuid4().hex[:8]}"
    if backend == "redis":
        cache = IdentityCache(counted_redis_region(counter), prefix=prefix, **options)
        cache.store.client.ping()  # type: ignore[attr-defined]
        counter.reset()
    else:
        cache = IdentityCache(prefix=prefix, **options)
    return register_all(cache)


@pytest.fixture
def cache(backend: str, redis_counter: RedisCounter) -> Iterator[IdentityCache]:
    cache = new_cache(backend, redis_counter)
    yield cache
    if backend == "redis":
        cache.store.delete_prefix(cache.prefix + ":")


@pytest.fixture
def Session(engine: Engine, cache: IdentityCache) -> sessionmaker[CachingSession]:  # noqa: N802
    return sessionmaker(engine, class_=CachingSession, cache=cache)
