"""dogpile.cache's Redis Sentinel backend: the Redis store, made safe across a change of master.

Redis replicates asynchronously, and a failover can drop writes the old master acknowledged: a
``SENTINEL FAILOVER`` promotes the replica while the old master keeps taking writes for seconds
(until the sentinels demote it and it resyncs from the new one, discarding them), and a SIGKILL
loses whatever had not reached the replica yet. A lost tombstone is a row served stale until its
TTL. So this store:

- **learns the master's identity on every new connection** (a ``redis_connect_func`` runs
  ``INFO replication`` before the connection is used): its ``master_replid``, which a promoted
  replica replaces and a restarted server draws anew, and how many replicas it has. A server that
  answers as a replica is refused (a demoted master);
- **on a change of master, before anything else is served from the new one**: the call during
  which the change was noticed fails (its reply may come from the new master, which may lack
  evictions), and the next call first re-writes every write of the last
  :data:`RECENT_WRITES_S` seconds (so a tombstone the old master took and the new one never got
  is written again) and then replaces the generation of every registered kind (given by
  :meth:`RedisSentinelStore.on_master_change`), which makes every entry written before the change
  unreachable. Generations go last: a generation token re-written from the recent writes is
  replaced at once;
- **makes evictions wait for a replica**: each batch of writes ends with ``WAIT 1`` when the
  master has a replica; a batch no replica acknowledged in time raises, so the guarded store
  journals it and delivers it again (after a failover, to the new master). After such a failure,
  a connection error or a READONLY reply, the sentinels are asked for the master's address, and
  connections to an old one are dropped.

Under asyncio (:func:`sa_cache._orm.under_asyncio`) the same commands go to a
``redis.asyncio.sentinel`` master client (one per event loop, with the same sentinels, service
and settings, and the same identity check on every new connection), awaited through the greenlet
bridge: a lookup's round trip, a sentinel query and a recovery suspend the task, not the loop.
A recovery already under way in another task makes the call fail (the lookup reads the
database) rather than wait on a lock the loop's own thread holds. Server settings that narrow
the window are in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Final

from redis.exceptions import ConnectionError as RedisConnectionError

from .. import _orm
from ..store import Clock, Fill, Release, Write
from .redis import RedisStore, _Awaiting, _ms

#: Seconds of writes kept to be written again on a new master (a graceful failover leaves the
#: old master taking writes for about 10 s before it is demoted).
RECENT_WRITES_S: Final = 60.0
#: At most this many recent writes are kept; generations are replaced on a change anyway.
RECENT_WRITES_LIMIT: Final = 10_000
#: Milliseconds a batch of writes waits for a replica to acknowledge it.
REPLICA_WAIT_MS: Final = 500
#: Seconds between two checks for a replica while the master has none.
REPLICA_RECHECK_S: Final = 5.0


class ReplicationTimeout(Exception):
    """Writes the master acknowledged were not acknowledged by a replica in time."""


class MasterChanged(Exception):
    """The master changed during this call: its reply is not used."""


def _no_generations() -> list[Write]:
    return []


class RedisSentinelStore(RedisStore):
    """A :class:`~sa_cache.store.Store` over a dogpile ``dogpile.cache.redis_sentinel`` backend
    (see the module docstring)."""

    def __init__(self, backend: Any, reader: Any = None) -> None:
        super().__init__(backend, reader)
        self.capabilities = self.capabilities._replace(failover=True)
        self._generations: Callable[[], Sequence[Write]] = _no_generations
        self._lock = threading.Lock()
        self._recovery = threading.Lock()
        self._replid: str | None = None  # the master's replication id, once known
        self._epoch = 0  # bumped on every change of master
        self._pending = False  # a change of master not yet recovered from
        self._replicas = 0  # replicas the master had when last asked
        self._recheck_at = 0.0
        self._recent: collections.deque[tuple[float, Write]] = collections.deque(
            maxlen=RECENT_WRITES_LIMIT
        )
        pool = self.client.connection_pool
        pool.connection_kwargs["redis_connect_func"] = self._on_connect
        pool.connection_class = _disconnecting(pool.connection_class)
        timeout = pool.connection_kwargs.get("socket_timeout")
        #: a WAIT gives up well before the socket would (a timed-out reply is an error, not 0)
        self.wait_ms = REPLICA_WAIT_MS if not timeout else min(REPLICA_WAIT_MS, _ms(timeout / 2))
        pool.reset()  # connections made before the hook (the construction's checks) are dropped
        self._masters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Awaiting] = (
            weakref.WeakKeyDictionary()
        )

    def on_master_change(self, generations: Callable[[], Sequence[Write]]) -> None:
        """Set the writes that replace every registered kind's generation (keys as stored)."""
        self._generations = generations

    # -- learning the master ---------------------------------------------------------------------

    def _on_connect(self, connection: Any) -> None:
        """Runs on every new connection, before its first command: who is the master?"""
        connection.on_connect()
        connection.send_command("INFO", "replication")
        self._learn(_parse_info(connection.read_response()))

    async def _on_connect_async(self, connection: Any) -> None:
        """:meth:`_on_connect` for a ``redis.asyncio`` connection."""
        await connection.on_connect()
        await connection.send_command("INFO", "replication")
        self._learn(_parse_info(await connection.read_response()))

    def _learn(self, info: dict[str, str]) -> None:
        if info.get("role") != "master":
            raise RedisConnectionError("the server the sentinels named is not a master (demoted)")
        replid = info.get("master_replid")
        with self._lock:
            self._replicas = int(info.get("connected_slaves", "0"))
            if self._replid is not None and replid != self._replid:
                self._epoch += 1
                self._pending = True
            self._replid = replid

    def _check_address(self) -> None:
        """Ask the sentinels who the master is; idle connections to another are dropped (and
        connections in use are not returned to the pool)."""
        with contextlib.suppress(Exception):  # the caller raises its own error
            if _orm.under_asyncio():
                _orm.await_(self._client()._target.connection_pool.get_master_address())
            else:
                self.client.connection_pool.get_master_address()

    def _recover(self) -> None:
        """After a change of master: write the recent writes again, then new generations."""
        if _orm.under_asyncio():  # the lock's holder may be a task suspended on this thread
            if not self._recovery.acquire(blocking=False):
                raise MasterChanged("the Redis master changed: recovery under way")
        else:
            self._recovery.acquire()
        try:
            while self._pending:
                with self._lock:
                    epoch = self._epoch
                    horizon = time.monotonic() - RECENT_WRITES_S
                    recent = [write for at, write in self._recent if at >= horizon]
                writes = [*recent, *self._generations()]
                if writes:
                    pipe = self._client().pipeline(transaction=False)
                    for write in writes:
                        pipe.set(
                            write.key, write.value, px=None if write.ttl is None else _ms(write.ttl)
                        )
                    pipe.execute()
                with self._lock:
                    if self._epoch == epoch:
                        self._pending = False
        finally:
            self._recovery.release()

    def _call(self, operation: Callable[[], Any]) -> Any:
        """Run ``operation`` on the master, after recovering from a change of master; its reply
        is refused if the master changed meanwhile."""
        epoch = self._epoch  # read first: a change noticed from here on refuses the reply
        if self._pending:
            self._recover()
        try:
            result = operation()
        except (RedisConnectionError, ReplicationTimeout):
            self._check_address()
            raise
        if self._epoch != epoch:
            raise MasterChanged("the Redis master changed during this call")
        return result

    def _client(self) -> Any:
        """The master client for this call: the synchronous one, or under asyncio this event
        loop's ``redis.asyncio.sentinel`` master client behind the same synchronous interface."""
        if not _orm.under_asyncio():
            return self.client
        loop = asyncio.get_running_loop()
        master = self._masters.get(loop)
        if master is None:
            master = self._masters[loop] = _Awaiting(self._async_master())
        return master

    def _async_master(self) -> Any:
        """A ``redis.asyncio`` master client of the same sentinels, service and settings, whose
        every new connection first learns the master's identity (:meth:`_on_connect_async`)."""
        from redis.asyncio import BlockingConnectionPool
        from redis.asyncio.connection import Connection
        from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

        class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
            """A task that finds every connection in use awaits one (for up to the socket
            timeout), as under :func:`~sa_cache.stores.redis.async_twin`, instead of failing."""

        pool = self.client.connection_pool
        manager = pool.sentinel_manager
        accepted: set[str] = set()
        for base in Connection.__mro__:
            init = vars(base).get("__init__")
            if init is not None:
                accepted.update(inspect.signature(init).parameters)
        skipped = {"retry", "redis_connect_func", "host", "port", "connection_pool"}
        options = {
            k: v
            for k, v in pool.connection_kwargs.items()
            if k in accepted and k not in skipped
        }
        addresses = [sentinel.connection_pool.connection_kwargs for sentinel in manager.sentinels]
        sentinels = [(address["host"], address["port"]) for address in addresses]
        sentinel_options = {
            k: v for k, v in manager.sentinel_kwargs.items() if k in accepted and k not in skipped
        }
        return Sentinel(  # type: ignore[no-untyped-call]
            sentinels,
            min_other_sentinels=manager.min_other_sentinels,
            sentinel_kwargs=sentinel_options,
        ).master_for(
            pool.service_name,
            connection_pool_class=BlockingSentinelPool,
            redis_connect_func=self._on_connect_async,
            max_connections=pool.max_connections,
            timeout=options.get("socket_timeout") or 1.0,
            **options,
        )

    # -- the store -----------------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return self._call(lambda: RedisStore.get_many(self, keys))  # type: ignore[no-any-return]

    def fill_many(self, fills: Sequence[Fill], release: Sequence[Release] = ()) -> list[bool]:
        return self._call(  # type: ignore[no-any-return]
            lambda: RedisStore.fill_many(self, fills, release)
        )

    def write_many(self, writes: Sequence[Write]) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent.extend((now, write) for write in writes)
        self._call(lambda: self._write_and_wait(writes))

    def _write_and_wait(self, writes: Sequence[Write]) -> None:
        client = self._client()
        if not self._replicas and time.monotonic() >= self._recheck_at:
            self._recheck_at = time.monotonic() + REPLICA_RECHECK_S
            self._replicas = int(client.info("replication").get("connected_slaves", 0))
        wait = self._replicas > 0
        pipe = client.pipeline(transaction=False)
        for write in writes:
            pipe.set(write.key, write.value, px=None if write.ttl is None else _ms(write.ttl))
        if wait:
            pipe.execute_command("WAIT", 1, self.wait_ms)
        replies = pipe.execute()
        if wait and int(replies[-1]) < 1:
            self._replicas = 0  # ask again before the next batch
            raise ReplicationTimeout(f"no replica acknowledged the writes in {self.wait_ms} ms")

    def acquire(
        self, key: str, token: bytes, ttl: float, read: Sequence[str]
    ) -> tuple[bool, list[bytes | None]]:
        return self._call(  # type: ignore[no-any-return]
            lambda: RedisStore.acquire(self, key, token, ttl, read)
        )

    def acquire_timed(
        self, key: str, token: bytes, ttl: float, read: Sequence[str], ttls: bool
    ) -> tuple[bool, list[bytes | None], Clock]:
        return self._call(  # type: ignore[no-any-return]
            lambda: RedisStore.acquire_timed(self, key, token, ttl, read, ttls)
        )

    def init_generation(self, key: str, token: bytes, ttl: float | None = None) -> bytes:
        return self._call(  # type: ignore[no-any-return]
            lambda: RedisStore.init_generation(self, key, token, ttl)
        )

    def delete_prefix(self, prefix: str) -> int:
        return self._call(  # type: ignore[no-any-return]
            lambda: RedisStore.delete_prefix(self, prefix)
        )


def _disconnecting(connection_class: Any) -> Any:
    """``connection_class`` with redis-py's usual behaviour after a failed read: disconnect.
    redis-py's ``SentinelManagedConnection`` (8.1) defaults ``disconnect_on_error`` to False, so
    a connection whose read timed out goes back to the pool with the reply still to come, and
    the next command on it reads the previous command's reply (another key's value)."""

    class Disconnecting(connection_class):  # type: ignore[misc]
        def read_response(self, *args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("disconnect_on_error", True)
            return super().read_response(*args, **kwargs)

    Disconnecting.__name__ = Disconnecting.__qualname__ = connection_class.__name__
    return Disconnecting


def _parse_info(raw: Any) -> dict[str, str]:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    info = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and not name.startswith("#"):
            info[name.strip()] = value.strip()
    return info


__all__ = ["MasterChanged", "RECENT_WRITES_S", "RedisSentinelStore", "ReplicationTimeout"]
