"""Choosing a store: from a URL scheme, or from the backend of a configured dogpile region.

Two registries, both open to extension the way dogpile's ``register_backend`` is:

- :data:`SCHEMES`: URL scheme -> a function building a dogpile region for that URL;
- :data:`BACKENDS`: dogpile backend class -> a function building the :class:`~sa_cache.store.Store`
  that drives it. The most specific class wins, so a subclass of dogpile's Redis backend gets the
  Redis store, and a backend whose guarantees sa_cache cannot rely on is refused by name (the
  pickling memory backend).

dogpile proxies (``region.configure(..., wrap=[...])``) are honoured where dogpile's API can carry
the operation: every read goes through the proxy chain's ``get_serialized_multi``, so a proxy that
logs, counts or vetoes reads runs. The protocol's writes (a fill that stores only if the key still
holds what the miss observed, a tombstone with its own TTL) have no form in dogpile's API, so a
proxy that overrides a write method is refused at construction rather than silently skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dogpile.cache import make_region
from dogpile.cache.proxy import ProxyBackend
from dogpile.cache.region import CacheRegion

from ..errors import UnsupportedBackend, redact
from ..store import Store

RegionFactory = Callable[[str, float, int], CacheRegion]
StoreFactory = Callable[[Any, Any], Store]  # (actual backend, reader or None) -> Store

_PROXY_WRITES = (
    "set",
    "set_multi",
    "set_serialized",
    "set_serialized_multi",
    "delete",
    "delete_multi",
    "get_mutex",
)


def memory_region() -> CacheRegion:
    """A fresh in-process region (the embedded default)."""
    return make_region().configure("dogpile.cache.memory", arguments={"cache_dict": {}})


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


def redis_cluster_region(url: str, socket_timeout: float, retries: int) -> CacheRegion:
    """dogpile's Redis Cluster backend for ``redis+cluster://host:port/`` (``rediss+cluster://``
    for TLS): one node's address, the client discovers the others. ``retries`` does not apply:
    a node that drops its connection makes the cluster store refresh its slot map instead."""
    return make_region().configure(
        "dogpile.cache.redis_cluster",
        arguments={
            "url": url.replace("+cluster://", "://", 1),
            "connection_kwargs": {
                "socket_timeout": socket_timeout,
                "socket_connect_timeout": socket_timeout,
            },
        },
    )


def redis_sentinel_region(url: str, socket_timeout: float, retries: int) -> CacheRegion:
    """dogpile's Redis Sentinel backend for
    ``redis+sentinel://[:password@]host:port,host:port/service_name[?db=N]``: the sentinels'
    addresses and the monitored service (``mymaster`` if none). The password, if any, is given
    to the servers and to the sentinels (as dogpile does)."""
    from urllib.parse import parse_qs, unquote, urlsplit

    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.retry import Retry

    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    sentinels = []
    for address in hosts.split(","):
        host, _, port = address.partition(":")
        sentinels.append((host or "127.0.0.1", int(port or 26379)))
    arguments: dict[str, Any] = {
        "sentinels": sentinels,
        "service_name": unquote(parts.path.strip("/")) or "mymaster",
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "sentinel_kwargs": {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
        },
        "connection_kwargs": {
            "retry": Retry(NoBackoff(), retries, supported_errors=(RedisConnectionError,))
        },
    }
    if parts.password:
        arguments["password"] = unquote(parts.password)
    if "db" in parse_qs(parts.query):
        arguments["db"] = int(parse_qs(parts.query)["db"][0])
    return make_region().configure("dogpile.cache.redis_sentinel", arguments=arguments)


#: URL scheme -> region factory ``(url, socket_timeout, retries)``.
SCHEMES: dict[str, RegionFactory] = {
    "redis": redis_region,
    "rediss": redis_region,
    "unix": redis_region,
    "redis+cluster": redis_cluster_region,
    "rediss+cluster": redis_cluster_region,
    "redis+sentinel": redis_sentinel_region,
}


def region_for_url(url: str, socket_timeout: float, retries: int) -> CacheRegion:
    scheme = url.partition("://")[0] if "://" in url else ""
    factory = SCHEMES.get(scheme)
    if factory is None:
        raise ValueError(
            f"unsupported cache URL {redact(url)!r}: expected one of "
            + ", ".join(f"{name}://" for name in SCHEMES)
        )
    return factory(url, socket_timeout, retries)


def _memory_store(backend: Any, reader: Any) -> Store:
    from .memory import MemoryStore

    return MemoryStore(backend, reader=reader)


def _redis_store(backend: Any, reader: Any) -> Store:
    from .redis import RedisStore

    if reader is not None and backend.reader_client is not backend.writer_client:
        raise UnsupportedBackend(
            f"{type(backend).__name__} reads from replicas; sa_cache must read the master (a "
            "replica may lag behind an eviction), so its reads cannot go through dogpile proxies"
        )
    _refuse_a_cluster_node(backend)
    return RedisStore(backend, reader)


def _refuse_a_cluster_node(backend: Any) -> None:
    """A plain Redis URL naming a cluster node would fail every read (the generation and the row
    live in different slots) and the breaker would hide it: refuse it here, loudly. A server that
    cannot be asked now (down, or INFO denied) is given the benefit of the doubt."""
    from redis.exceptions import RedisError

    try:
        cluster = backend.writer_client.info("cluster").get("cluster_enabled")
    except RedisError:
        return
    if cluster:
        kwargs = backend.writer_client.connection_pool.connection_kwargs
        where = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
        raise UnsupportedBackend(
            f"the Redis server at {where} is a Redis Cluster node; use a "
            f"redis+cluster://{where}/ URL (or a dogpile.cache.redis_cluster region)"
        )


def _without_proxies(backend: Any, reader: Any, why: str) -> None:
    """Refuse a region whose dogpile proxies this store cannot read through, saying ``why``."""
    if reader is not None:
        raise UnsupportedBackend(
            f"{type(backend).__name__}: {why}; configure the region without wrap="
        )


def _redis_cluster_store(backend: Any, reader: Any) -> Store:
    from .redis_cluster import RedisClusterStore

    _without_proxies(
        backend, reader, "reads through dogpile proxies cannot be routed per cluster node"
    )
    return RedisClusterStore(backend)


def _redis_sentinel_store(backend: Any, reader: Any) -> Store:
    from .redis_sentinel import RedisSentinelStore

    _without_proxies(
        backend,
        reader,
        "dogpile proxies read through the backend's replica client, and sa_cache must read "
        "the master",
    )
    return RedisSentinelStore(backend)


def _refuse(reason: str) -> StoreFactory:
    def refuse(backend: Any, reader: Any) -> Store:
        raise UnsupportedBackend(f"{type(backend).__name__}: {reason}")

    return refuse


def _backends() -> list[tuple[type, StoreFactory]]:
    from dogpile.cache.backends.memory import MemoryBackend, MemoryPickleBackend
    from dogpile.cache.backends.redis import (
        RedisBackend,
        RedisClusterBackend,
        RedisSentinelBackend,
    )

    return [
        (MemoryBackend, _memory_store),
        (MemoryPickleBackend, _refuse("sa_cache never pickles; use dogpile.cache.memory")),
        (RedisBackend, _redis_store),
        (RedisClusterBackend, _redis_cluster_store),
        (RedisSentinelBackend, _redis_sentinel_store),
    ]


#: dogpile backend class -> store factory; the most specific registered class wins.
BACKENDS: list[tuple[type, StoreFactory]] = _backends()


def store_for(region: CacheRegion) -> Store:
    """The store that drives ``region``'s backend, reading through its proxies if it has any."""
    backend = region.actual_backend if region.actual_backend is not None else region.backend
    reader = region.backend if region.backend is not backend else None
    if reader is not None:
        _check_proxies(reader)
    for cls in type(backend).__mro__:
        factory = next((f for c, f in BACKENDS if c is cls), None)
        if factory is not None:
            return factory(backend, reader)
    raise UnsupportedBackend(
        f"sa_cache needs compare-and-set from its cache backend; {type(backend).__name__} has "
        "none. Use dogpile.cache.redis (or a subclass) or dogpile.cache.memory."
    )


def _check_proxies(outermost: Any) -> None:
    proxy = outermost
    while isinstance(proxy, ProxyBackend):
        for name in _PROXY_WRITES:
            if getattr(type(proxy), name) is not getattr(ProxyBackend, name):
                raise UnsupportedBackend(
                    f"dogpile proxy {type(proxy).__name__} overrides {name}(); sa_cache's writes "
                    "are conditional and carry their own TTL, which dogpile's proxy API cannot "
                    "express. Proxies that only read (get*) are supported."
                )
        proxy = proxy.proxied
