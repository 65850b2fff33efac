"""dogpile.cache's Redis backend, driven through its redis-py client with the commands the
protocol needs: MGET for reads, ``SET NX`` and a compare-and-set script for fills, pipelines so a
batch costs one round trip.

Reads go to the backend's writer client on purpose: a replica may lag behind an eviction.

The commands of one call are written on one pooled connection of that client and their replies
read raw (:meth:`RedisStore._exchange`): the hit path's round trip then costs what a bare GET
costs, without redis-py's per-command dispatch, retry closure and reply callbacks (about 10 us a
call, a tenth of a loopback hit). The connection keeps redis-py's own settings (timeouts, health
checks, the pool's retry of a dropped connection); any error drops it, so a reply that arrives
after a timeout is never read as the next command's.

Under asyncio (a session driven by ``AsyncSession``, whose synchronous code runs in SQLAlchemy's
greenlet) the same commands go through a ``redis.asyncio`` client with the same connection
settings, one per event loop, awaited through that greenlet bridge the way SQLAlchemy's asyncio
drivers are: a lookup's round trip suspends its task, never the event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import weakref
from collections.abc import Sequence
from typing import Any

from dogpile.cache.api import NO_VALUE

from .. import _orm
from ..store import Capabilities, Clock, Fill, Release, Write
from .scripts import lua_script

_COMPARE_AND_SET = lua_script("compare_and_set")
_COMPARE_AND_DELETE = lua_script("compare_and_delete")
#: Keys per SCAN step and per UNLINK of :meth:`RedisStore.delete_prefix`.
SCAN_BATCH = 1000


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisStore:
    """A :class:`~sa_cache.store.Store` over a dogpile ``dogpile.cache.redis`` backend.

    ``reader`` is the region's outermost backend when it has dogpile proxies: they see every
    :meth:`get_many`. Everything else goes to the writer client (see :mod:`sa_cache.stores`).
    """

    def __init__(self, backend: Any, reader: Any = None) -> None:
        self.client = backend.writer_client
        self._reader = reader
        options = self.client.connection_pool.connection_kwargs
        if options.get("decode_responses"):
            raise ValueError("sa_cache needs a Redis client with decode_responses=False")
        self._cas = self.client.register_script(_COMPARE_AND_SET)
        self._cad = self.client.register_script(_COMPARE_AND_DELETE)
        #: ``keeps_ttl`` is learnt with the first timed acquire (see :meth:`acquire_timed`)
        self.capabilities = Capabilities(shared=True, scans=True, clock=True, keeps_ttl=False)
        self._asked_config = False
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Awaiting] = (
            weakref.WeakKeyDictionary()
        )

    def _client(self) -> Any:
        """The client for this call: the synchronous one, or under asyncio this event loop's
        ``redis.asyncio`` client behind the same synchronous interface."""
        if not _orm.under_asyncio():
            return self.client
        loop = asyncio.get_running_loop()
        client = self._by_loop.get(loop)
        if client is None:
            client = self._by_loop[loop] = _Awaiting(async_twin(self.client))
        return client

    def _exchange(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send ``commands`` on one pooled connection in one write and read their raw replies,
        in order; an error reply comes back as its exception, in its place (the rest of the
        replies are still read, so the connection stays in step). A dropped connection is
        retried as the pool's ``Retry`` says (sa_cache's regions: never a timeout); any other
        error disconnects the connection before it goes back to the pool. Synchronous client
        only: under asyncio the ``redis.asyncio`` twin's own pipeline runs instead."""
        from redis.exceptions import ResponseError

        pool = self.client.connection_pool
        conn = pool.get_connection()
        packed = conn.pack_commands(commands)

        def send_and_read() -> list[Any]:
            conn.send_packed_command(packed)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except ResponseError as error:  # the error reply was read whole
                    replies.append(error)
            return replies

        try:
            return conn.retry.call_with_retry(  # type: ignore[no-any-return]
                send_and_read, lambda _error: conn.disconnect()
            )
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if self._reader is not None:
            values = self._reader.get_serialized_multi(keys)
            return [None if value is NO_VALUE else value for value in values]
        if not keys:
            return []
        if _orm.under_asyncio():
            return self._client().mget(keys)  # type: ignore[no-any-return]
        (values,) = self._exchange([("MGET", *keys)])
        if isinstance(values, Exception):
            raise values
        return values  # type: ignore[no-any-return]

    def _run(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Raw ``commands`` in one round trip, their replies in order (an error reply as its
        exception): :meth:`_exchange`, or under asyncio the twin's pipeline."""
        if not commands:
            return []
        client = self._client()
        if client is self.client:
            return self._exchange(commands)
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute(raise_on_error=False)  # type: ignore[no-any-return]

    def _fill_command(self, fill: Fill) -> tuple[Any, ...]:
        if fill.expected is None:
            return ("SET", fill.key, fill.value, "PX", _ms(fill.ttl), "NX")
        return ("EVALSHA", self._cas.sha, 1, fill.key, fill.expected, fill.value, _ms(fill.ttl))

    def fill_many(self, fills: Sequence[Fill], release: Sequence[Release] = ()) -> list[bool]:
        from redis.exceptions import NoScriptError

        commands = [self._fill_command(fill) for fill in fills]
        commands += [("EVALSHA", self._cad.sha, 1, key, token) for key, token in release]
        replies: list[Any] = [None] * len(commands)
        unsent = list(range(len(commands)))
        for attempt in (1, 2):
            for i, reply in zip(unsent, self._run([commands[i] for i in unsent]), strict=True):
                replies[i] = reply
            # only the script calls came back NOSCRIPT: the rest ran, and must not run twice
            unsent = [i for i in unsent if isinstance(replies[i], NoScriptError)]
            if not unsent or attempt == 2:
                break
            for script in (_COMPARE_AND_SET, _COMPARE_AND_DELETE):
                self._client().script_load(script)  # Redis restarted, or SCRIPT FLUSH
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return [bool(reply) for reply in replies[: len(fills)]]

    def write_many(self, writes: Sequence[Write]) -> None:
        commands: list[tuple[Any, ...]] = [
            ("SET", w.key, w.value) if w.ttl is None else ("SET", w.key, w.value, "PX", _ms(w.ttl))
            for w in writes
        ]
        for reply in self._run(commands):
            if isinstance(reply, Exception):
                raise reply

    def acquire(
        self, key: str, token: bytes, ttl: float, read: Sequence[str]
    ) -> tuple[bool, list[bytes | None]]:
        commands: list[tuple[Any, ...]] = [("SET", key, token, "PX", _ms(ttl), "NX")]
        if read:
            commands.append(("MGET", *read))
        acquired, *values = self._run(commands)
        for reply in (acquired, *values):
            if isinstance(reply, Exception):
                raise reply
        return bool(acquired), values[0] if values else []

    def acquire_timed(
        self, key: str, token: bytes, ttl: float, read: Sequence[str], ttls: bool
    ) -> tuple[bool, list[bytes | None], Clock]:
        """The first call with ``ttls`` also asks, in the same round trip, whether the server
        evicts keys under memory pressure (``CONFIG GET maxmemory*``): ``capabilities.keeps_ttl``
        becomes True only for ``maxmemory`` 0 or ``maxmemory-policy noeviction``, and stays False
        if CONFIG is refused (an ACL, a managed service). A change of that setting at runtime is
        not seen: restart the processes after it."""
        ask = ttls and not self._asked_config
        pipe = self._client().pipeline(transaction=False)
        pipe.set(key, token, px=_ms(ttl), nx=True)
        pipe.mget(read)
        for k in read if ttls else ():
            pipe.pttl(k)
        pipe.time()
        if ask:
            pipe.config_get("maxmemory*")
        replies = pipe.execute(raise_on_error=False)
        if ask:
            self._learn_keeps_ttl(replies.pop())
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        acquired, values, *left_ms, (seconds, micros) = replies
        left = [None if ms < 0 else ms / 1000 for ms in left_ms]  # -1: no TTL, -2: absent
        return bool(acquired), values, Clock(seconds + micros / 1_000_000, left)

    def _learn_keeps_ttl(self, config: Any) -> None:
        from redis.exceptions import ResponseError

        if isinstance(config, ResponseError):  # CONFIG refused or renamed: assume the worst
            self._asked_config = True
            return
        if isinstance(config, Exception):
            return  # ask again next time
        self._asked_config = True
        options = {_text(k): _text(v) for k, v in config.items()}
        keeps_ttl = (
            options.get("maxmemory") == "0" or options.get("maxmemory-policy") == "noeviction"
        )
        self.capabilities = self.capabilities._replace(keeps_ttl=keeps_ttl)

    def init_generation(self, key: str, token: bytes, ttl: float | None = None) -> bytes:
        px = None if ttl is None else _ms(ttl)
        previous = self._client().set(key, token, nx=True, get=True, px=px)
        return token if previous is None else previous

    def delete_prefix(self, prefix: str) -> int:
        removed = 0
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=_glob_escape(prefix) + "*", count=SCAN_BATCH):
            batch.append(key)
            if len(batch) >= SCAN_BATCH:
                removed += self.client.unlink(*batch)
                batch = []
        if batch:
            removed += self.client.unlink(*batch)
        return removed


class _Awaiting:
    """A ``redis.asyncio`` client or pipeline behind the synchronous interface the store uses:
    a call whose result is awaitable is awaited through SQLAlchemy's greenlet bridge
    (:func:`sa_cache._orm.await_`); queueing a command on a pipeline returns the pipeline, as the
    synchronous one does."""

    __slots__ = ("_target",)

    def __init__(self, target: Any) -> None:
        self._target = target

    def pipeline(self, transaction: bool = False) -> _Awaiting:
        return _Awaiting(self._target.pipeline(transaction=transaction))

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._target, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            return _orm.await_(result) if inspect.isawaitable(result) else result

        return call


#: The ``redis.asyncio`` connection class for each synchronous one.
_ASYNC_CONNECTIONS = {
    "Connection": "Connection",
    "SSLConnection": "SSLConnection",
    "UnixDomainSocketConnection": "UnixDomainSocketConnection",
}


def async_twin(client: Any, connect: Any = None) -> Any:
    """A ``redis.asyncio.Redis`` with ``client``'s connection settings. Its connection class is
    the one the synchronous class names as ``async_connection_class`` (a custom class brings its
    own), else redis-py's asyncio class of the same name; settings the asyncio class does not
    take are left out, a ``Retry`` is rebuilt with the same backoff and count, and the pool
    allows as many connections as the synchronous one. A ``redis_connect_func`` of the
    synchronous client (a Cluster node's, the Sentinel store's) cannot run on an asyncio
    connection: ``connect`` (a coroutine function) replaces it, or none runs."""
    import redis.asyncio
    from redis.asyncio import connection as async_connection
    from redis.asyncio.retry import Retry

    pool = client.connection_pool
    sync_class = pool.connection_class
    async_class = getattr(sync_class, "async_connection_class", None)
    if async_class is None:
        for base in sync_class.__mro__:
            name = _ASYNC_CONNECTIONS.get(base.__name__)
            if name is not None and base.__module__.startswith("redis."):
                async_class = getattr(async_connection, name)
                break
        else:
            raise TypeError(f"no asyncio connection class for {sync_class.__name__}")
    accepted: set[str] = set()
    for base in async_class.__mro__:
        init = vars(base).get("__init__")
        if init is not None:
            accepted.update(inspect.signature(init).parameters)
    options = {
        k: v
        for k, v in pool.connection_kwargs.items()
        if k in accepted and k not in ("retry", "redis_connect_func")
    }
    if connect is not None:
        options["redis_connect_func"] = connect
    retry = pool.connection_kwargs.get("retry")
    if retry is not None and "retry" in accepted:
        options["retry"] = Retry(retry._backoff, getattr(retry, "_retries", 0))
    # as many connections as the synchronous pool allows; a task that finds them all in use
    # awaits one (for up to the socket timeout) instead of failing
    async_pool = redis.asyncio.BlockingConnectionPool(
        connection_class=async_class,
        max_connections=pool.max_connections,
        timeout=options.get("socket_timeout") or 1.0,
        **options,
    )
    return redis.asyncio.Redis(connection_pool=async_pool)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
