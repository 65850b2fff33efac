"""dogpile.cache's Redis Cluster backend, driven node by node.

A cluster refuses what the single-Redis store sends: an MGET whose keys live in different slots
(a row and its model's generation always do) and a Lua script inside redis-py's cluster pipeline.
So this store routes each key itself, using the slot map of the backend's
``redis.cluster.RedisCluster`` client: the commands of a batch are grouped by the primary that
serves their key's slot, and each group goes as one pipeline on that node's own ``redis.Redis``
connection (which carries EVALSHA like any pipeline). A batch costs one round trip per node
involved, and the nodes' pipelines run together (a small thread pool, :attr:`node_threads`;
under asyncio, tasks on the loop), so a batch over three nodes takes about one round trip's time.

- **Failure domains** (``Capabilities.domains``): each primary is one (:meth:`domain_of` is its
  name). A batch that fails on some nodes raises :class:`~sa_cache.store.DomainFailure` with the
  other nodes' replies, so the guarded store opens the breaker of the failed nodes only and a
  dead master costs only the keys of its slots.
- **asyncio**: under ``AsyncSession`` (:func:`sa_cache._orm.under_asyncio`) each node's pipeline
  goes through a ``redis.asyncio`` twin of that node's connection, the nodes' pipelines are
  awaited together (:func:`sa_cache._orm.run_together`), and a slot-map refresh runs in a
  worker thread: the event loop is never held by the cache's I/O.

- **Scripts** are loaded on a node when it first answers NOSCRIPT (a new primary after a
  failover, a restart, SCRIPT FLUSH) and the refused commands are sent again once.
- **Redirects**: a MOVED or ASK reply (slots migrating, a replica promoted) refreshes the slot
  map and the redirected commands are sent again once, the others are not repeated. A connection
  error marks the slot map for a refresh before the next call (the node may be gone for good).
- **Reads go to primaries**, never replicas: a replica may lag behind an eviction.
- **Evictions wait for a replica**: each node's writes end with ``WAIT 1`` when the slot map lists
  a replica of it, and a write that no replica acknowledged in time raises (the guarded store
  journals it and writes it again later). Redis replicates asynchronously: without this, a
  master killed right after acknowledging a tombstone could be replaced by a replica that never
  saw it, and serve the row the tombstone evicted.
- A lease and the row it guards share a hash tag, so a lease's read of the row is ordered after
  taking it (same node, same pipeline). The generation read beside it lives elsewhere and may be
  read a moment earlier; an older generation only makes the filled entry count as stale sooner.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final

from .. import _orm
from ..store import Capabilities, DomainFailure, Fill, Release, Write
from .redis import _Awaiting, async_twin
from .scripts import lua_script

if TYPE_CHECKING:
    from ..store import Clock

_COMPARE_AND_SET: Final = lua_script("compare_and_set")
_COMPARE_AND_DELETE: Final = lua_script("compare_and_delete")
_SCRIPTS: Final = (_COMPARE_AND_SET, _COMPARE_AND_DELETE)
#: Keys per SCAN step and per UNLINK pipeline of :meth:`RedisClusterStore.delete_prefix`.
SCAN_BATCH: Final = 1000
#: Milliseconds a batch of writes waits for a replica of its node to acknowledge them.
REPLICA_WAIT_MS: Final = 500
#: Seconds between two slot-map refreshes while writes go to a node with no replica listed:
#: Redis lists a replica in CLUSTER SLOTS only once it has replicated something, so a replica of
#: a fresh cluster (or one added later) appears only on a refresh.
REPLICA_RECHECK_S: Final = 5.0
#: Threads sending the pipelines of a batch's nodes together (a batch on one node sends inline).
NODE_THREADS: Final = 4
#: The domain of a key whose slot the slot map does not cover (mid-failover).
UNCOVERED: Final = "uncovered"

#: One command of a batch: the key that routes it, and how to queue it on a pipeline.
_Command = tuple[str, Callable[[Any], Any]]


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _get(key: str) -> _Command:
    return key, lambda pipe: pipe.get(key)


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


class ReplicationTimeout(Exception):
    """Writes a node acknowledged were not acknowledged by its replica in time."""


class RedisClusterStore:
    """A :class:`~sa_cache.store.Store` over a dogpile ``dogpile.cache.redis_cluster`` backend
    (see the module docstring)."""

    capabilities = Capabilities(shared=True, scans=True, domains=True)
    #: Threads of the pool that sends the nodes' pipelines of one batch together.
    node_threads = NODE_THREADS

    def __init__(self, backend: Any) -> None:
        self.client = backend.writer_client
        if self.client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("sa_cache needs a Redis client with decode_responses=False")
        self._cas = _sha(_COMPARE_AND_SET)
        self._cad = _sha(_COMPARE_AND_DELETE)
        self._stale = False  # the slot map needs a refresh before the next batch
        self._recheck_at = 0.0  # monotonic time of the next refresh looking for replicas
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0  # the process the pool's threads run in (a forked child has none)
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]] = (
            weakref.WeakKeyDictionary()
        )

    def domain_of(self, key: str) -> str:
        """The name of the primary serving ``key``'s slot in the slot map as it is (no I/O)."""
        try:
            return str(self._node(key)[0].name)
        except Exception:  # a slot no node serves (the map is refreshed before the next batch)
            return UNCOVERED

    # -- routing -----------------------------------------------------------------------------

    def _refresh(self) -> None:
        with self._lock:
            stale, self._stale = self._stale, False
        if stale:
            try:
                if _orm.under_asyncio():  # it connects and reads node by node: not on the loop
                    _orm.await_(asyncio.to_thread(self.client.nodes_manager.initialize))
                else:
                    self.client.nodes_manager.initialize()
            except Exception:
                self._stale = True  # still to do: no node answered
                raise

    def _node(self, key: str) -> tuple[Any, bool]:
        """The primary serving ``key``'s slot, and whether the slot map knows a replica of it
        (a WAIT for a replica that does not exist would only ever time out)."""
        manager = self.client.nodes_manager
        slot = self.client.keyslot(key)
        node = manager.get_node_from_slot(slot)
        return node, len(manager.slots_cache.get(slot, ())) > 1

    def _connection(self, node: Any) -> Any:
        """``node``'s client: its ``redis.Redis``, or under asyncio this loop's ``redis.asyncio``
        twin of it behind the same synchronous interface."""
        connection = self.client.get_redis_connection(node)
        if not _orm.under_asyncio():
            return connection
        twins = self._by_loop.setdefault(asyncio.get_running_loop(), {})
        twin = twins.get(node.name)
        if twin is None:
            twin = twins[node.name] = _Awaiting(async_twin(connection))
        return twin

    def _send_together(self, sends: Sequence[Callable[[], list[Any]]]) -> list[Any]:
        """Run each node's send at the same time; per send its replies or its exception. On
        threads, the first runs in the calling thread and the others in the pool, so a read of
        a row and its generation on two nodes holds one pool thread."""
        if len(sends) > 1 and _orm.under_asyncio():
            return _orm.run_together(sends)
        pool = self._threads() if len(sends) > 1 else None
        futures = [pool.submit(send) for send in sends[1:]] if pool is not None else []
        try:
            first: Any = sends[0]()
        except Exception as exc:
            first = exc
        return [first, *(future.exception() or future.result() for future in futures)]

    def _threads(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = ThreadPoolExecutor(self.node_threads, "sa_cache-node")
                self._pool_pid = os.getpid()
            return self._pool

    def _run(self, commands: Sequence[_Command], *, wait: bool = False) -> list[Any]:
        """Send ``commands`` grouped by the primary serving each key, one pipeline per node, and
        return the replies in order; ``wait``: each node's pipeline ends with a WAIT for one
        replica. A command redirected (MOVED, ASK) is sent again once after a slot-map refresh;
        any other error reply is raised. A node that cannot be reached, a slot no node serves, a
        cluster that says it is down: the slot map is read again before the next batch."""
        from redis.exceptions import (
            ClusterDownError,
            ConnectionError,
            RedisClusterException,
            TimeoutError,
        )

        # a replica that did not acknowledge may have failed (it leaves CLUSTER SLOTS), or been
        # promoted: either way the slot map is asked again
        node_errors = (
            ConnectionError,
            TimeoutError,
            RedisClusterException,
            ClusterDownError,
            ReplicationTimeout,
        )
        try:
            return self._route(commands, wait)
        except DomainFailure as failure:
            if any(isinstance(exc, node_errors) for exc in failure.errors.values()):
                self._stale = True
            raise
        except node_errors:
            self._stale = True  # the node may be gone: ask the cluster before next time
            raise

    def _route(self, commands: Sequence[_Command], wait: bool) -> list[Any]:
        """:meth:`_run`; nodes that fail leave their commands failed (``errors`` by node name),
        raised as a :class:`~sa_cache.store.DomainFailure` when other nodes' commands ran."""
        from redis.exceptions import AskError, MovedError

        self._refresh()
        replies: list[Any] = [None] * len(commands)
        todo: dict[int, Any] = {i: None for i in range(len(commands))}  # index -> ASK target
        sent_to: dict[int, str] = {}  # index -> the node it was last sent to
        errors: dict[str, BaseException] = {}
        for attempt in (1, 2):
            groups: dict[tuple[str, bool], tuple[Any, bool, list[int]]] = {}
            for index, ask in todo.items():
                node, replicated = (
                    (ask, True) if ask is not None else self._node(commands[index][0])
                )
                group = groups.setdefault((node.name, ask is not None), (node, replicated, []))
                group[2].append(index)
            redirected: dict[int, Any] = {}
            if wait and not all(replicated for _, replicated, _ in groups.values()):
                self._look_for_replicas()
            sends = [
                _bound_send(self._send, node, [commands[i] for i in indexes], asking, wait and rep)
                for (_, asking), (node, rep, indexes) in groups.items()
            ]
            outcomes = self._send_together(sends)
            for (node, _, indexes), results in zip(groups.values(), outcomes, strict=True):
                for index in indexes:
                    sent_to[index] = node.name
                if isinstance(results, BaseException):
                    errors[node.name] = results
                    for index in indexes:
                        replies[index] = results
                    continue
                for index, result in zip(indexes, results, strict=True):
                    if isinstance(result, MovedError):
                        self._stale = True
                        redirected[index] = None
                    elif isinstance(result, AskError):
                        target = self.client.get_node(host=result.host, port=result.port)
                        redirected[index] = target
                        if target is None:
                            self._stale = True
                            redirected[index] = None
                    replies[index] = result
            if not redirected or attempt == 2:
                break
            self._refresh()
            todo = redirected
        failed = [i for i, reply in enumerate(replies) if isinstance(reply, BaseException)]
        if not failed:
            return replies
        if len(failed) == len(replies):
            raise replies[failed[0]]
        for index in failed:
            errors.setdefault(sent_to[index], replies[index])
        raise DomainFailure(
            errors, failed, [None if i in failed else r for i, r in enumerate(replies)]
        )

    def _look_for_replicas(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now >= self._recheck_at:
                self._recheck_at = now + REPLICA_RECHECK_S
                self._stale = True

    def _send(self, node: Any, commands: Sequence[_Command], asking: bool, wait: bool) -> list[Any]:
        """One pipeline on ``node``; commands refused with NOSCRIPT are sent again once after
        loading the scripts there."""
        from redis.exceptions import NoScriptError

        connection = self._connection(node)
        results = self._pipeline(connection, commands, asking, wait)
        refused = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if refused:
            for script in _SCRIPTS:
                connection.script_load(script)
            again = self._pipeline(connection, [commands[i] for i in refused], asking, wait)
            for index, result in zip(refused, again, strict=True):
                results[index] = result
        return results

    def _pipeline(
        self, connection: Any, commands: Sequence[_Command], asking: bool, wait: bool
    ) -> list[Any]:
        pipe = connection.pipeline(transaction=False)
        for _, queue in commands:
            if asking:
                pipe.execute_command("ASKING")
            queue(pipe)
        if wait:
            pipe.execute_command("WAIT", 1, REPLICA_WAIT_MS)
        results: list[Any] = pipe.execute(raise_on_error=False)
        if wait:
            acknowledged = results.pop()
            if not isinstance(acknowledged, Exception) and int(acknowledged) < 1:
                raise ReplicationTimeout(
                    f"no replica acknowledged the writes within {REPLICA_WAIT_MS} ms"
                )
        return results[1::2] if asking else results

    # -- the store ---------------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return self._run([_get(key) for key in keys])

    def _fill(self, fill: Fill) -> _Command:
        key, expected, value, ttl = fill.key, fill.expected, fill.value, _ms(fill.ttl)
        if expected is None:
            return key, lambda pipe: pipe.set(key, value, px=ttl, nx=True)
        return key, lambda pipe: pipe.evalsha(self._cas, 1, key, expected, value, ttl)

    def _release(self, release: Release) -> _Command:
        key, token = release
        return key, lambda pipe: pipe.evalsha(self._cad, 1, key, token)

    def fill_many(self, fills: Sequence[Fill], release: Sequence[Release] = ()) -> list[bool]:
        commands = [self._fill(fill) for fill in fills] + [self._release(r) for r in release]
        try:
            replies = self._run(commands)
        except DomainFailure as failure:
            n = len(fills)
            filled = [bool(reply) for reply in failure.results[:n]]
            raise DomainFailure(
                failure.errors, failure.failed, filled + [None] * len(release)
            ) from None
        return [bool(reply) for reply in replies[: len(fills)]]

    def write_many(self, writes: Sequence[Write]) -> None:
        def command(write: Write) -> _Command:
            px = None if write.ttl is None else _ms(write.ttl)
            return write.key, lambda pipe: pipe.set(write.key, write.value, px=px)

        self._run([command(write) for write in writes], wait=True)

    def acquire(
        self, key: str, token: bytes, ttl: float, read: Sequence[str]
    ) -> tuple[bool, list[bytes | None]]:
        commands: list[_Command] = [(key, lambda pipe: pipe.set(key, token, px=_ms(ttl), nx=True))]
        commands += [_get(k) for k in read]
        acquired, *values = self._run(commands)
        return bool(acquired), values

    def acquire_timed(
        self, key: str, token: bytes, ttl: float, read: Sequence[str], ttls: bool
    ) -> tuple[bool, list[bytes | None], Clock]:
        """Not offered (``capabilities.clock`` is False): the keys live on nodes with clocks of
        their own, so later fills in snapshot transactions are refused on a cluster."""
        raise NotImplementedError

    def init_generation(self, key: str, token: bytes, ttl: float | None = None) -> bytes:
        px = None if ttl is None else _ms(ttl)
        (previous,) = self._run(
            [(key, lambda pipe: pipe.set(key, token, nx=True, get=True, px=px))]
        )
        return token if previous is None else previous

    def delete_prefix(self, prefix: str) -> int:
        """SCAN every primary (each holds its own slots' keys); UNLINK key by key in pipelines,
        since keys of different slots cannot share one command even on one node."""
        from .redis import _glob_escape

        self._refresh()
        removed = 0
        for node in self.client.get_primaries():
            connection = self._connection(node)
            batch: list[bytes] = []
            for key in connection.scan_iter(match=_glob_escape(prefix) + "*", count=SCAN_BATCH):
                batch.append(key)
                if len(batch) >= SCAN_BATCH:
                    removed += self._unlink(connection, batch)
                    batch = []
            if batch:
                removed += self._unlink(connection, batch)
        return removed

    @staticmethod
    def _unlink(connection: Any, keys: Sequence[bytes]) -> int:
        pipe = connection.pipeline(transaction=False)
        for key in keys:
            pipe.unlink(key)
        return sum(int(n) for n in pipe.execute())


def _bound_send(
    send: Callable[[Any, Sequence[_Command], bool, bool], list[Any]],
    node: Any,
    commands: Sequence[_Command],
    asking: bool,
    wait: bool,
) -> Callable[[], list[Any]]:
    return lambda: send(node, commands, asking, wait)
