"""A store of failure domains for the guarded store's per-domain tests: keys routed by hash tag
to one of several real Redis servers (each a :class:`~sa_cache.stores.redis.RedisStore`), as a
Redis Cluster routes slots to primaries, so one server can be paused or killed in a test that
starts in a second, not a cluster's minute. An operation that fails on some servers raises
:class:`~sa_cache.store.DomainFailure` with the others' replies, as the Cluster store does."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sa_cache.store import Capabilities, Clock, DomainFailure, Fill, Release, Store, Write


def hash_tag(key: str) -> str:
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else key


class PartitionedStore:
    """``stores`` by domain name; ``route(hash_tag)`` names the domain of a key."""

    capabilities = Capabilities(shared=True, scans=True, domains=True)

    def __init__(self, stores: dict[str, Store], route: Callable[[str], str]) -> None:
        self.stores = stores
        self.route = route
        self.calls: dict[str, int] = dict.fromkeys(stores, 0)

    def domain_of(self, key: str) -> str:
        return self.route(hash_tag(key))

    def _per_domain(
        self, keys: Sequence[str], run: Callable[[Store, list[int]], Sequence[Any]]
    ) -> list[Any]:
        groups: dict[str, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(self.domain_of(key), []).append(index)
        replies: list[Any] = [None] * len(keys)
        errors: dict[str, BaseException] = {}
        failed: list[int] = []
        for domain, indexes in groups.items():
            self.calls[domain] += 1
            try:
                for index, reply in zip(indexes, run(self.stores[domain], indexes), strict=True):
                    replies[index] = reply
            except Exception as exc:
                errors[domain] = exc
                failed += indexes
        if errors and len(failed) == len(keys):
            raise next(iter(errors.values()))
        if errors:
            raise DomainFailure(errors, failed, replies)
        return replies

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return self._per_domain(keys, lambda store, at: store.get_many([keys[i] for i in at]))

    def fill_many(self, fills: Sequence[Fill], release: Sequence[Release] = ()) -> list[bool]:
        n = len(fills)

        def run(store: Store, at: list[int]) -> list[Any]:
            filled = store.fill_many(
                [fills[i] for i in at if i < n], [release[i - n] for i in at if i >= n]
            )
            return [*filled, *(None for i in at if i >= n)]

        keys = [f.key for f in fills] + [r.key for r in release]
        try:
            return self._per_domain(keys, run)[:n]
        except DomainFailure as failure:
            results = [bool(r) for r in failure.results[:n]] + [None] * len(release)
            raise DomainFailure(failure.errors, failure.failed, results) from None

    def write_many(self, writes: Sequence[Write]) -> None:
        def run(store: Store, at: list[int]) -> list[None]:
            store.write_many([writes[i] for i in at])
            return [None] * len(at)

        self._per_domain([w.key for w in writes], run)

    def acquire(
        self, key: str, token: bytes, ttl: float, read: Sequence[str]
    ) -> tuple[bool, list[bytes | None]]:
        lease_domain = self.domain_of(key)

        def run(store: Store, at: list[int]) -> list[Any]:
            if 0 not in at:
                return store.get_many([read[i - 1] for i in at])
            acquired, values = store.acquire(key, token, ttl, [read[i - 1] for i in at[1:]])
            return [acquired, *values]

        assert lease_domain == self.domain_of(key)
        acquired, *values = self._per_domain([key, *read], run)
        return bool(acquired), values

    def acquire_timed(
        self, key: str, token: bytes, ttl: float, read: Sequence[str], ttls: bool
    ) -> tuple[bool, list[bytes | None], Clock]:
        raise NotImplementedError  # no clock: the servers' clocks differ

    def init_generation(self, key: str, token: bytes, ttl: float | None = None) -> bytes:
        return self.stores[self.domain_of(key)].init_generation(key, token, ttl)

    def delete_prefix(self, prefix: str) -> int:
        return sum(store.delete_prefix(prefix) for store in self.stores.values())
