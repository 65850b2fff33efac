"""Counters shared by every process that uses one cache prefix, so ``sa-cache stats`` reports a
whole deployment (every gunicorn worker, every container), not the process that asks.

Each process keeps its own counters (:meth:`sa_cache.IdentityCache.stats`, plain integers bumped
on the hot path). A :class:`StatsPublisher` adds what changed since its last publication into the
Redis hash ``prefix:stats`` with ``HINCRBY``, all fields in one pipelined round trip, from a
daemon thread at most once per ``interval`` seconds: never on a lookup's round trip. A failed
publication keeps its deltas for the next one, so counts are late during an outage, not lost.
:func:`read_shared_stats` sums the hash back into the shape of ``IdentityCache.stats()``.

Fields of the hash: ``total:<counter>``, ``model:<Model>:<counter>`` and, per live process,
``process:<host>:<pid>`` holding the Unix time of its last publication.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import threading
import time
import weakref
from typing import Any

from .cache import IdentityCache
from .errors import describe_error
from .stats import ALL_COUNTERS, MODEL_COUNTERS

log = logging.getLogger("sa_cache")


TOTALS = ALL_COUNTERS
#: A process that has not published for this many intervals is not counted as live.
LIVE_INTERVALS = 3


def stats_key(prefix: str) -> str:
    """The hash holding the shared counters of the cache with this prefix."""
    return f"{prefix}:stats"


def flatten(stats: dict[str, Any]) -> dict[str, int]:
    """``IdentityCache.stats()`` as flat hash fields."""
    fields = {
        f"total:{name}": int(value)
        for name, value in stats.items()
        if name != "models" and isinstance(value, int)
    }
    for model, counters in stats.get("models", {}).items():
        for name, value in counters.items():
            fields[f"model:{model}:{name}"] = int(value)
    return fields


class StatsPublisher:
    """Publishes one :class:`IdentityCache`'s counter deltas into ``prefix:stats``.

    Call :meth:`ensure_running` from code every process runs (the Flask extension calls it
    before each request; it costs a pid comparison): it starts the thread in the current
    process, and after a fork it starts a new one whose baseline is the counters inherited from
    the parent, which remain the parent's to publish.
    """

    def __init__(self, cache: IdentityCache, interval: float = 5.0) -> None:
        client = getattr(cache.store, "client", None)
        if client is None:
            raise ValueError("shared counters need the Redis backend")
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.cache = cache
        self.client: Any = client
        self.key = stats_key(cache.prefix)
        self.interval = interval
        self._lock = threading.Lock()
        self._published: dict[str, int] = {}
        self._pid = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    @property
    def process_field(self) -> str:
        return f"process:{socket.gethostname()}:{os.getpid()}"

    def ensure_running(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            if self._pid:  # forked: what the parent counted is the parent's to publish
                self._published = flatten(self.cache.stats())
            self._pid = os.getpid()
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=_run,
                args=(weakref.ref(self), self._stop, self.interval),
                name=f"sa_cache-stats-{self.cache.prefix}",
                daemon=True,
            )
            self._thread.start()
        _live_publishers.add(self)

    def publish(self) -> bool:
        """Add the deltas since the last publication: one pipelined round trip. True if done."""
        with self._lock:
            current = flatten(self.cache.stats())
            deltas = {
                field: value - self._published.get(field, 0)
                for field, value in current.items()
                if value != self._published.get(field, 0)
            }
            pipe = self.client.pipeline(transaction=False)
            for field, delta in deltas.items():
                pipe.hincrby(self.key, field, delta)
            pipe.hset(self.key, self.process_field, f"{time.time():.3f}")
            try:
                pipe.execute()
            except Exception as exc:
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "sa_cache: could not publish shared counters (%s)", describe_error(exc)
                    )
                return False
            self._failing = False
            self._published = current
            return True

    def stop(self, *, final: bool = True) -> None:
        """Stop the thread; publish what is left and withdraw this process (``final``)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.interval + 1)
        if final and self._pid == os.getpid() and self.publish():
            with contextlib.suppress(Exception):  # best effort at shutdown
                self.client.hdel(self.key, self.process_field)
        _live_publishers.discard(self)
        self._pid = 0


def _run(ref: weakref.ref[StatsPublisher], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        publisher = ref()
        if publisher is None:
            return  # its application is gone
        publisher.publish()
        del publisher


_live_publishers: weakref.WeakSet[StatsPublisher] = weakref.WeakSet()


@atexit.register
def _publish_on_exit() -> None:
    for publisher in list(_live_publishers):
        if publisher._pid == os.getpid():
            publisher.stop()


def read_shared_stats(client: Any, prefix: str, *, interval: float = 5.0) -> dict[str, Any]:
    """The counters every process published under ``prefix``, summed, in the shape of
    ``IdentityCache.stats()``, plus ``processes``: how many published in the last few
    ``interval`` seconds."""
    raw: dict[Any, Any] = client.hgetall(stats_key(prefix))
    totals: dict[str, int] = dict.fromkeys(TOTALS, 0)
    models: dict[str, dict[str, int]] = {}
    live = 0
    now = time.time()
    for raw_field, raw_value in raw.items():
        field = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
        value = raw_value.decode() if isinstance(raw_value, bytes) else str(raw_value)
        kind, _, rest = field.partition(":")
        try:
            if kind == "total" and rest and rest not in ("models", "processes"):
                totals[rest] = int(value)
            elif kind == "model":
                model, _, name = rest.rpartition(":")
                if model and name:
                    models.setdefault(model, dict.fromkeys(MODEL_COUNTERS, 0))[name] = int(value)
            elif kind == "process" and now - float(value) <= LIVE_INTERVALS * interval:
                live += 1
        except ValueError:
            continue  # not ours: ignore rather than fail the whole report
    return {**totals, "models": dict(sorted(models.items())), "processes": live}
