"""Turning what the user passed as ``backend=`` into a dogpile region and a :class:`Store`."""

from __future__ import annotations

from typing import Any

from dogpile.cache import make_region
from dogpile.cache.region import CacheRegion

from ..backend import Store, UnsupportedBackend
from .memory import MemoryStore
from .redis import RedisStore

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def memory_region() -> tuple[CacheRegion, dict[str, Any]]:
    entries: dict[str, Any] = {}
    region = make_region().configure("dogpile.cache.memory", arguments={"cache_dict": entries})
    return region, entries


def redis_region(url: str, socket_timeout: float, retries: int) -> CacheRegion:
    """dogpile's Redis backend with short timeouts and a bounded retry, not redis-py's defaults
    (5 s timeouts and ten retries: a dead Redis would stall every request for seconds)."""
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.retry import Retry

    return make_region().configure(
        "dogpile.cache.redis",
        arguments={
            "url": url,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            # retry a dropped connection (Redis restarted), never a timeout (Redis hung)
            "connection_kwargs": {
                "retry": Retry(NoBackoff(), retries, supported_errors=(RedisConnectionError,))
            },
        },
    )


def store_for(region: CacheRegion, entries: dict[str, Any] | None = None) -> Store:
    from dogpile.cache.backends.memory import MemoryBackend, MemoryPickleBackend

    backend = region.actual_backend if region.actual_backend is not None else region.backend
    if isinstance(backend, MemoryBackend) and not isinstance(backend, MemoryPickleBackend):
        return MemoryStore(backend, entries)
    if hasattr(backend, "writer_client"):
        return RedisStore(backend)
    raise UnsupportedBackend(
        f"sa_cache needs compare-and-set from its cache backend; {type(backend).__name__} has "
        "none. Use dogpile.cache.redis (or a subclass) or dogpile.cache.memory."
    )
