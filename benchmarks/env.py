"""Where the benchmark runs: its own databases (``sa_cache_bench`` in PostgreSQL and MariaDB, a
SQLite file in a temporary directory), its own Redis key prefixes, and exact counters of Redis
round trips (counted on the real connections) and SQL statements."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from dogpile.cache import make_region
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
MARIADB_SERVER = "mysql+pymysql://root@127.0.0.1:3306"
DB_NAME = "sa_cache_bench"
RUN = f"sa_cache_bench_{os.getpid()}"


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


PORTS = {"sqlite": None, "postgresql": 5432, "mariadb": 3306}


def available(db: str) -> bool:
    port = PORTS[db]
    return port is None or port_open(port)


def _admin(server: str) -> Engine:
    admin_db = "postgres" if server.startswith("postgresql") else "test"
    return create_engine(f"{server}/{admin_db}", isolation_level="AUTOCOMMIT")


def database_url(db: str, tmpdir: str) -> str:
    """Create (or recreate) the benchmark's own database and return its URL."""
    if db == "sqlite":
        return f"sqlite:///{os.path.join(tmpdir, 'bench.sqlite3')}"
    drop_database(db)
    server = PG_SERVER if db == "postgresql" else MARIADB_SERVER
    admin = _admin(server)
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {DB_NAME}"))
    admin.dispose()
    return f"{server}/{DB_NAME}"


def drop_database(db: str) -> None:
    if db == "sqlite":
        return
    server = PG_SERVER if db == "postgresql" else MARIADB_SERVER
    admin = _admin(server)
    with admin.connect() as conn:
        if db == "postgresql":
            conn.execute(text(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)"))
        else:
            conn.execute(text(f"DROP DATABASE IF EXISTS {DB_NAME}"))
    admin.dispose()


# -- counters -----------------------------------------------------------------------------------


class RoundTrips:
    """Redis round trips and commands, counted on the client's real connections."""

    def __init__(self) -> None:
        self.round_trips = 0
        self.commands = 0

    def reset(self) -> None:
        self.round_trips = 0
        self.commands = 0

    @contextmanager
    def counting(self) -> Iterator[RoundTrips]:
        self.reset()
        yield self


def counting_connection_class(counter: RoundTrips) -> type[redis.Connection]:
    class CountingConnection(redis.Connection):
        def send_command(self, *args: Any, **kwargs: Any) -> None:
            counter.commands += 1
            super().send_command(*args, **kwargs)

        def pack_commands(self, commands: Any) -> Any:
            counter.commands += len(commands)
            return super().pack_commands(commands)

        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            counter.round_trips += 1
            super().send_packed_command(command, check_health)

    return CountingConnection


def counted_region(counter: RoundTrips, **extra: Any) -> Any:
    """dogpile's Redis backend with counted connections (short timeouts, as sa_cache uses)."""
    return make_region(**extra).configure(
        "dogpile.cache.redis",
        arguments={
            "url": REDIS_URL,
            "socket_timeout": 0.25,
            "socket_connect_timeout": 0.25,
            "connection_kwargs": {"connection_class": counting_connection_class(counter)},
        },
    )


def counted_client(counter: RoundTrips) -> redis.Redis:
    return redis.Redis.from_url(
        REDIS_URL, socket_timeout=0.25, connection_class=counting_connection_class(counter)
    )


class SQLCounter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, *args: Any) -> None:
        self.count += 1

    def attach(self, engine: Engine) -> SQLCounter:
        event.listen(engine, "before_cursor_execute", self)
        return self


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    removed = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=prefix + "*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            removed += client.unlink(*batch)
            batch = []
    if batch:
        removed += client.unlink(*batch)
    return removed
