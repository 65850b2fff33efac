"""Exact counters of what the cache costs, and the two assertions the tests make with them.

- :class:`SQLCounter` records every statement an engine sends (``before_cursor_execute``);
  :func:`expect_sql` asserts what a block sent: how many statements, which ones, how many SELECTs.
- :class:`RedisCounter` counts Redis commands and round trips on a client's real connections;
  :func:`expect_commands` asserts what a block sent to Redis. A counter no Redis connection was
  ever made for (the memory backend) makes :func:`expect_commands` assert nothing, so one test
  runs over both backends.

The benchmarks and the randomized checker count with the same classes. Nothing here imports
pytest: the benchmarks run without it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import redis
import redis.asyncio
from dogpile.cache import make_region
from sqlalchemy import event
from sqlalchemy.engine import Engine

# -- SQL ----------------------------------------------------------------------------------------


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
        return sum(1 for s in self.statements if _verb(s) == "SELECT")


def _verb(statement: str) -> str:
    words = statement.split(None, 1)
    return words[0].upper() if words else ""


@contextmanager
def counting_sql(engine: Engine) -> Iterator[SQLCounter]:
    """A :class:`SQLCounter` listening on ``engine`` (an async engine: its ``sync_engine``)
    for the duration of the block."""
    counter = SQLCounter()
    event.listen(engine, "before_cursor_execute", counter)
    try:
        yield counter
    finally:
        event.remove(engine, "before_cursor_execute", counter)


def _matches(statement: str, expected: str) -> bool:
    return " ".join(statement.split()).upper().startswith(" ".join(expected.split()).upper())


@contextmanager
def expect_sql(
    sql: SQLCounter,
    statements: int | Sequence[str] | None = None,
    *,
    selects: int | None = None,
    writes: int | None = None,
) -> Iterator[SQLCounter]:
    """Assert the SQL the block sends, counted from the start of the block; the counter is
    yielded, its ``statements`` those of the block.

    ``statements``: how many statements in all (``expect_sql(sql, 0)``: the database is not
    asked), or their beginnings in order, compared case- and whitespace-insensitively
    (``expect_sql(sql, ["SELECT", "UPDATE users"])``). ``selects``: how many of them are
    SELECTs, whatever else is sent; ``writes``: how many are not (``writes=0``: nothing is
    written, whatever is read). At least one of the three must be given.
    """
    if statements is None and selects is None and writes is None:
        raise TypeError("expect_sql needs the statements, SELECTs or writes it expects")
    sql.reset()
    yield sql
    sent = list(sql.statements)
    listing = "".join(f"\n  {i + 1}. {' '.join(s.split())[:200]}" for i, s in enumerate(sent))
    if isinstance(statements, int):
        assert len(sent) == statements, (
            f"expected {statements} statements, sent {len(sent)}:{listing}"
        )
    elif statements is not None:
        expected = list(statements)
        ok = len(sent) == len(expected) and all(map(_matches, sent, expected))
        assert ok, f"expected statements {expected}, sent {len(sent)}:{listing}"
    if selects is not None:
        got = sum(1 for s in sent if _verb(s) == "SELECT")
        assert got == selects, f"expected {selects} SELECTs, sent {got}:{listing}"
    if writes is not None:
        got = sum(1 for s in sent if _verb(s) != "SELECT")
        assert got == writes, (
            f"expected {writes} statements other than SELECT, sent {got}:{listing}"
        )


# -- Redis --------------------------------------------------------------------------------------


class RedisCounter:
    """Redis commands and round trips, counted on the client's real connections.

    ``live`` turns true once a counting connection class is made for it: a counter of the
    memory backend stays not live, and :func:`expect_commands` then asserts nothing."""

    def __init__(self) -> None:
        self.commands: Counter[str] = Counter()
        self.round_trips = 0
        self.live = False

    @property
    def total(self) -> int:
        return sum(self.commands.values())

    def reset(self) -> None:
        self.commands.clear()
        self.round_trips = 0


def counting_connection_class(
    counter: RedisCounter, base: type[redis.Connection] = redis.Connection
) -> type[redis.Connection]:
    """``base``: the connection class counted (a ``SentinelManagedConnection`` for Sentinel)."""
    counter.live = True

    class CountingConnection(base):  # type: ignore[valid-type, misc]
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

    class CountingAsyncConnection(redis.asyncio.Connection):
        """The same count for the ``redis.asyncio`` twin the store makes under asyncio."""

        async def send_command(self, *args: Any, **kwargs: Any) -> None:
            counter.commands[str(args[0]).upper()] += 1
            await super().send_command(*args, **kwargs)

        def pack_commands(self, commands: Any) -> Any:
            for command in commands:
                counter.commands[str(command[0]).upper()] += 1
            return super().pack_commands(commands)

        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            counter.round_trips += 1
            await super().send_packed_command(command, check_health)

    CountingConnection.async_connection_class = CountingAsyncConnection  # type: ignore[attr-defined]
    return CountingConnection


def count_client(counter: RedisCounter, client: redis.Redis) -> None:
    """Count ``client``'s commands and round trips from now on (an application's own client,
    made where no connection class could be passed): its pool makes counting connections, and
    forgets those it made already."""
    pool = client.connection_pool
    pool.connection_class = counting_connection_class(counter, pool.connection_class)
    pool.reset()


def counted_redis_region(
    counter: RedisCounter, url: str, *, socket_timeout: float = 1.0, **region: Any
) -> Any:
    """dogpile's Redis backend at ``url``, its connections counted by ``counter`` (over TLS for
    a ``rediss://`` URL); ``region``: arguments of ``make_region`` (e.g. ``key_mangler``)."""
    base = redis.SSLConnection if url.startswith("rediss://") else redis.Connection
    return make_region(**region).configure(
        "dogpile.cache.redis",
        arguments={
            "url": url,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "connection_kwargs": {"connection_class": counting_connection_class(counter, base)},
        },
    )


def counted_redis_cluster_region(
    counter: RedisCounter, url: str, *, socket_timeout: float = 1.0, **region: Any
) -> Any:
    """dogpile's Redis Cluster backend at ``url`` (one node's ``redis://`` address), every node's
    connections counted by ``counter``: a pipeline on one node is one round trip."""
    return make_region(**region).configure(
        "dogpile.cache.redis_cluster",
        arguments={
            "url": url,
            "connection_kwargs": {
                "socket_timeout": socket_timeout,
                "socket_connect_timeout": socket_timeout,
                "connection_class": counting_connection_class(counter),
            },
        },
    )


def counted_redis_client(
    counter: RedisCounter, url: str, *, socket_timeout: float = 1.0
) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_timeout=socket_timeout, connection_class=counting_connection_class(counter)
    )


@contextmanager
def expect_commands(
    counter: RedisCounter,
    commands: Mapping[str, int] | None = None,
    *,
    round_trips: int | None = None,
) -> Iterator[RedisCounter]:
    """Assert what the block sends to Redis, counted from the start of the block.

    ``commands``: exactly these commands, each this many times (``{}``: Redis is not asked);
    ``round_trips``: this many round trips. At least one of the two must be given. On a counter
    that never counted a Redis connection (the memory backend) the block runs and nothing is
    asserted.
    """
    if commands is None and round_trips is None:
        raise TypeError("expect_commands needs the commands or the round trips it expects")
    counter.reset()
    yield counter
    if not counter.live:
        return
    if commands is not None:
        expected = Counter({name.upper(): n for name, n in commands.items() if n})
        assert counter.commands == expected, (
            f"expected commands {dict(expected)}, sent {dict(counter.commands)}"
        )
    if round_trips is not None:
        assert counter.round_trips == round_trips, (
            f"expected {round_trips} round trips, made {counter.round_trips} "
            f"(commands {dict(counter.commands)})"
        )
