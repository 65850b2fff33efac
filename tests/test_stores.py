"""One suite for every store: what the cache protocol relies on, checked the same way on each.

Modelled on dogpile.cache's ``testing/fixtures.py``: each check is written once against the
:class:`~sa_cache.store.Store` contract and run unchanged on every store (the in-process store,
Redis, and each of them behind a read-only dogpile proxy). A store added later (Cluster, the near
cache) joins by adding one factory to :data:`STORES`. The suite is itself tested: deliberately
broken stores must each fail it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import pytest
from dogpile.cache import make_region
from dogpile.cache.proxy import ProxyBackend

from sa_cache import IdentityCache
from sa_cache.errors import UnsupportedBackend
from sa_cache.near import NearStore
from sa_cache.store import Capabilities, DomainStore, Fill, Release, Store, Write
from sa_cache.stores import memory_region, redis_region, region_for_url, store_for

from . import redis_sentinel
from .conftest import REDIS_URL, require_redis_cluster, require_service

# -- the stores ---------------------------------------------------------------------------------


class CountingReads(ProxyBackend):
    """A read-only dogpile proxy: counts the reads that pass through it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def get_serialized_multi(self, keys: Sequence[Any]) -> Any:
        self.reads += 1
        return self.proxied.get_serialized_multi(keys)


def _memory(proxied: bool) -> Store:
    if not proxied:
        return store_for(memory_region())
    region = make_region().configure(
        "dogpile.cache.memory", arguments={"cache_dict": {}}, wrap=[CountingReads()]
    )
    return store_for(region)


def _redis(proxied: bool) -> Store:
    require_service("redis", 6379)
    region = redis_region(REDIS_URL, 1.0, 1)
    if proxied:
        region = make_region().configure(
            "dogpile.cache.redis", arguments={"url": REDIS_URL}, wrap=[CountingReads()]
        )
    return store_for(region)


def _cluster() -> Store:
    return store_for(region_for_url(require_redis_cluster().url, 1.0, 1))


def _sentinel() -> Store:
    return store_for(region_for_url(redis_sentinel.shared().url, 1.0, 1))


def _near(inner: Store, messages: bool = True) -> Store:
    """The near cache in front of ``inner``, following the suite's key prefixes, once its
    tracking connections are confirmed (so its memory is really used). Without ``messages``
    the tracking messages are not applied: the store's own writes alone must keep it coherent
    with itself."""
    store = NearStore(inner, "sa_cache_store_")
    if not messages:
        store.invalidations._on_keys = lambda keys: None
    started = time.monotonic()
    deadline = started + 10
    while store.invalidations.confirmed() <= started and time.monotonic() < deadline:
        time.sleep(0.01)
    return store


STORES: dict[str, Callable[[], Store]] = {
    "memory": lambda: _memory(False),
    "memory+proxy": lambda: _memory(True),
    "redis": lambda: _redis(False),
    "redis+proxy": lambda: _redis(True),
    "redis_cluster": _cluster,
    "redis_sentinel": _sentinel,
    "redis+near": lambda: _near(_redis(False)),
    "redis+near_withheld": lambda: _near(_redis(False), messages=False),
    "redis_cluster+near": lambda: _near(_cluster()),
    "redis_sentinel+near": lambda: _near(_sentinel()),
}


@pytest.fixture(params=list(STORES))
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    store = STORES[request.param]()
    yield store
    if isinstance(store, NearStore):
        store.close()


@pytest.fixture
def prefix(store: Store) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    name = f"sa_cache_store_{uuid.uuid4().hex[:12]}:"
    yield name
    store.delete_prefix(name)


# -- the suite: each check takes a store and a fresh key prefix -----------------------------------


def check_absent_keys_read_as_none_in_order(store: Store, p: str) -> None:
    store.write_many([Write(p + "b", b"B", None)])
    assert store.get_many([p + "a", p + "b", p + "c"]) == [None, b"B", None]


def check_values_round_trip_byte_for_byte(store: Store, p: str) -> None:
    value = bytes(range(256)) + b"\x00tail"
    store.write_many([Write(p + "k", value, 60)])
    assert store.get_many([p + "k"]) == [value]


def check_a_write_replaces_unconditionally(store: Store, p: str) -> None:
    store.write_many([Write(p + "k", b"one", 60)])
    store.write_many([Write(p + "k", b"two", 60), Write(p + "j", b"three", None)])
    assert store.get_many([p + "k", p + "j"]) == [b"two", b"three"]


def check_a_ttl_expires_and_none_keeps(store: Store, p: str) -> None:
    store.write_many([Write(p + "short", b"x", 0.05), Write(p + "kept", b"y", None)])
    time.sleep(0.15)  # expiry is wall-clock time passing, not an interleaving
    assert store.get_many([p + "short", p + "kept"]) == [None, b"y"]


def check_a_fill_expecting_absence_stores_only_into_an_absent_key(store: Store, p: str) -> None:
    store.write_many([Write(p + "taken", b"old", 60)])
    stored = store.fill_many(
        [Fill(p + "free", None, b"new", 60), Fill(p + "taken", None, b"new", 60)]
    )
    assert stored == [True, False]
    assert store.get_many([p + "free", p + "taken"]) == [b"new", b"old"]


def check_a_fill_is_a_compare_and_set_on_the_exact_bytes(store: Store, p: str) -> None:
    store.write_many([Write(p + "k", b"observed", 60), Write(p + "j", b"newer", 60)])
    stored = store.fill_many(
        [Fill(p + "k", b"observed", b"filled", 60), Fill(p + "j", b"observed", b"filled", 60)]
    )
    assert stored == [True, False]
    assert store.get_many([p + "k", p + "j"]) == [b"filled", b"newer"]
    assert store.fill_many([Fill(p + "gone", b"observed", b"filled", 60)]) == [False]
    assert store.get_many([p + "gone"]) == [None]


def check_a_fill_carries_its_ttl(store: Store, p: str) -> None:
    store.write_many([Write(p + "k", b"observed", 60)])
    assert store.fill_many([Fill(p + "k", b"observed", b"filled", 0.05)]) == [True]
    assert store.fill_many([Fill(p + "j", None, b"filled", 0.05)]) == [True]
    time.sleep(0.15)
    assert store.get_many([p + "k", p + "j"]) == [None, None]


def check_a_fill_batch_releases_its_leases(store: Store, p: str) -> None:
    store.write_many([Write(p + "lease", b"mine", 60), Write(p + "other", b"mine", 60)])
    assert store.fill_many([], [Release(p + "lease", b"mine")]) == []
    assert store.get_many([p + "lease", p + "other"]) == [None, b"mine"]


def check_a_release_deletes_only_its_owners_lease(store: Store, p: str) -> None:
    """A caller whose lease expired, and was taken by another, must not delete the new one."""
    assert store.acquire(p + "lease", b"theirs", 60, [])[0] is True
    assert store.fill_many([Fill(p + "row", None, b"R", 60)], [Release(p + "lease", b"mine")]) == [
        True
    ]
    assert store.get_many([p + "lease", p + "row"]) == [b"theirs", b"R"]


def check_a_lease_goes_to_one_caller_and_reads_after_taking_it(store: Store, p: str) -> None:
    store.write_many([Write(p + "row", b"R", 60)])
    first = store.acquire(p + "lease", b"1", 60, [p + "lease", p + "row"])
    second = store.acquire(p + "lease", b"1", 60, [p + "row"])
    assert first == (True, [b"1", b"R"])
    assert second == (False, [b"R"])


def check_a_lease_expires(store: Store, p: str) -> None:
    assert store.acquire(p + "lease", b"1", 0.05, [])[0] is True
    time.sleep(0.15)
    assert store.acquire(p + "lease", b"1", 60, [])[0] is True


def check_a_generation_is_created_once(store: Store, p: str) -> None:
    assert store.init_generation(p + "gen", b"first") == b"first"
    assert store.init_generation(p + "gen", b"second") == b"first"
    assert store.get_many([p + "gen"]) == [b"first"]


def check_a_timed_acquire_reads_the_stores_clock_and_what_each_key_has_left(
    store: Store, p: str
) -> None:
    """Later fills in snapshot transactions tell when a value was written from the store's clock
    and the TTL the key has left, read in the lease's round trip (stores with a clock only)."""
    if not store.capabilities.clock:
        return
    store.write_many([Write(p + "k", b"K", 60), Write(p + "kept", b"J", None)])
    time.sleep(0.05)  # the TTL counts down with wall-clock time, not an interleaving
    acquired, values, clock = store.acquire_timed(
        p + "lease", b"1", 60, [p + "k", p + "kept", p + "none"], True
    )
    assert (acquired, values) == (True, [b"K", b"J", None])
    left = clock.left
    assert left[0] is not None and 59 < left[0] <= 59.99 and left[1:] == [None, None]
    again = store.acquire_timed(p + "lease", b"2", 60, [p + "k"], False)
    assert again[:2] == (False, [b"K"]) and again[2].left == []
    assert 0 <= again[2].now - clock.now < 5


def check_a_generation_is_created_with_its_ttl(store: Store, p: str) -> None:
    assert store.init_generation(p + "gen", b"first", 60) == b"first"
    assert store.init_generation(p + "gen", b"second", 3600) == b"first"
    if store.capabilities.clock:
        left = store.acquire_timed(p + "lease", b"1", 60, [p + "gen"], True)[2].left[0]
        assert left is not None and 59 < left <= 60


def check_delete_prefix_removes_exactly_the_prefix(store: Store, p: str) -> None:
    store.write_many([Write(p + "a", b"1", None), Write(p + "b*[?", b"2", 60)])
    store.write_many([Write(p[:-1] + "X", b"kept", 60)])
    try:
        assert store.delete_prefix(p) == 2
        assert store.get_many([p + "a", p + "b*[?", p[:-1] + "X"]) == [None, None, b"kept"]
    finally:
        store.delete_prefix(p[:-1] + "X")


def check_capabilities_are_declared(store: Store, p: str) -> None:
    assert isinstance(store.capabilities, Capabilities)


def check_a_value_read_then_rewritten_reads_as_rewritten(store: Store, p: str) -> None:
    """Every read after a write of the same caller sees the write (a near cache's memory
    included), whatever the operation that wrote it."""
    store.write_many([Write(p + "k", b"one", 60)])
    assert store.get_many([p + "k"]) == [b"one"] and store.get_many([p + "k"]) == [b"one"]
    store.write_many([Write(p + "k", b"two", 60)])
    assert store.get_many([p + "k"]) == [b"two"] and store.get_many([p + "k"]) == [b"two"]
    assert store.fill_many([Fill(p + "k", b"two", b"three", 60)]) == [True]
    assert store.get_many([p + "k"]) == [b"three"]
    assert store.get_many([p + "absent"]) == [None] and store.get_many([p + "absent"]) == [None]
    assert store.fill_many([Fill(p + "absent", None, b"filled", 60)]) == [True]
    assert store.get_many([p + "absent"]) == [b"filled"]
    assert store.get_many([p + "gen"]) == [None]
    assert store.init_generation(p + "gen", b"g1") == b"g1"
    assert store.get_many([p + "gen"]) == [b"g1"]
    assert store.acquire(p + "lease", b"t", 60, [])[0] is True
    assert store.get_many([p + "lease"]) == [b"t"]
    assert store.delete_prefix(p) >= 4
    assert store.get_many([p + "k", p + "gen"]) == [None, None]


def check_a_store_of_failure_domains_keeps_a_hash_tag_in_one_domain(store: Store, p: str) -> None:
    """A row, its lease and its hold share a hash tag: one domain, so one breaker guards them
    all; and an operation over several domains reports each domain's outcome (a batch over
    every domain of a healthy store succeeds as one)."""
    if not store.capabilities.domains:
        return
    domains = cast(DomainStore, store)
    for i in range(20):
        row = f"{p}{{users:{i}}}"
        assert domains.domain_of(row) == domains.domain_of(row + ":lease")
    keys = [f"{p}{{users:{i}}}" for i in range(60)]
    assert len({domains.domain_of(key) for key in keys}) > 1
    store.write_many([Write(key, b"v", 60) for key in keys])
    assert store.get_many(keys) == [b"v"] * 60


CHECKS = [value for name, value in sorted(globals().items()) if name.startswith("check_")]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__[len("check_") :])
def test_every_store_keeps_the_contract(store: Store, prefix: str, check: Any) -> None:
    check(store, prefix)


# -- the suite catches broken stores -------------------------------------------------------------


class Broken:
    """The in-process store with one operation broken on purpose."""

    def __init__(self, flaw: str) -> None:
        self.inner = _memory(False)
        self.flaw = flaw
        self.capabilities = self.inner.capabilities

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def fill_many(self, fills: Sequence[Fill], release: Sequence[Release] = ()) -> list[bool]:
        if self.flaw == "unconditional fill":
            self.inner.write_many([Write(f.key, f.value, f.ttl) for f in fills])
            return [True] * len(fills)
        if self.flaw == "fill keeps no ttl":
            fills = [f._replace(ttl=3600) for f in fills]
        if self.flaw == "release ignored":
            release = ()
        if self.flaw == "release ignores the owner":  # a plain DEL, whoever holds the lease
            for key, _ in release:
                self.inner._backend.delete(key)  # type: ignore[attr-defined]
            release = ()
        return self.inner.fill_many(fills, release)

    def acquire(self, key: str, token: bytes, ttl: float, read: Sequence[str]) -> Any:
        if self.flaw == "every caller gets the lease":
            self.inner.write_many([Write(key, token, ttl)])
            return True, self.inner.get_many(read)
        return self.inner.acquire(key, token, ttl, read)

    def init_generation(self, key: str, token: bytes, ttl: float | None = None) -> bytes:
        if self.flaw == "generation overwritten":
            self.inner.write_many([Write(key, token, None)])
            return token
        if self.flaw == "generation keeps no ttl":
            ttl = None
        return self.inner.init_generation(key, token, ttl)

    def acquire_timed(
        self, key: str, token: bytes, ttl: float, read: Sequence[str], ttls: bool
    ) -> Any:
        acquired, values, clock = self.inner.acquire_timed(key, token, ttl, read, ttls)
        if self.flaw == "clock reads the time at the write":  # no TTL counts down
            clock = clock._replace(left=[None if t is None else 60.0 for t in clock.left])
        return acquired, values, clock

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        values = self.inner.get_many(keys)
        return sorted(values, key=lambda v: v is None) if self.flaw == "reads reordered" else values


FLAWS = [
    "unconditional fill",
    "fill keeps no ttl",
    "release ignored",
    "release ignores the owner",
    "every caller gets the lease",
    "generation overwritten",
    "generation keeps no ttl",
    "clock reads the time at the write",
    "reads reordered",
]


@pytest.mark.parametrize("flaw", FLAWS)
def test_a_deliberately_broken_store_fails_the_suite(flaw: str) -> None:
    broken = Broken(flaw)
    failures = []
    for check in CHECKS:
        prefix = f"broken_{uuid.uuid4().hex[:8]}:"
        try:
            check(broken, prefix)
        except AssertionError:
            failures.append(check.__name__)
    assert failures, f"a store with {flaw!r} passed every check"


# -- choosing a store ----------------------------------------------------------------------------


def test_each_store_declares_whether_other_processes_share_it() -> None:
    assert _memory(False).capabilities.shared is False
    require_service("redis", 6379)
    assert _redis(False).capabilities.shared is True


def test_reads_go_through_the_regions_dogpile_proxies(backend: str) -> None:
    proxy = CountingReads()
    if backend == "redis":
        region = make_region().configure(
            "dogpile.cache.redis", arguments={"url": REDIS_URL}, wrap=[proxy]
        )
    else:
        region = make_region().configure("dogpile.cache.memory", wrap=[proxy])
    cache = IdentityCache(region, prefix=f"sa_cache_proxy_{uuid.uuid4().hex[:8]}")
    cache.store.get_many(["a", "b"])
    assert proxy.reads == 1


def test_a_proxy_that_rewrites_writes_is_refused_by_name() -> None:
    class Rewriting(ProxyBackend):
        def set_serialized(self, key: Any, value: bytes) -> None:
            self.proxied.set_serialized(key, value[::-1])

    region = make_region().configure("dogpile.cache.memory", wrap=[Rewriting()])
    with pytest.raises(UnsupportedBackend, match="Rewriting overrides set_serialized"):
        IdentityCache(region)


def test_a_pickling_backend_is_refused() -> None:
    region = make_region().configure("dogpile.cache.memory_pickle")
    with pytest.raises(UnsupportedBackend, match="never pickles"):
        IdentityCache(region)


def test_an_unknown_url_scheme_is_refused_without_its_password() -> None:
    with pytest.raises(ValueError, match="unsupported cache URL") as raised:
        IdentityCache("memcached://user:secret@127.0.0.1:11211")
    assert "secret" not in str(raised.value)


def test_a_batch_that_meets_flushed_scripts_reports_each_fill_once() -> None:
    """After ``SCRIPT FLUSH`` (or a Redis restart) the compare-and-set fills of a batch come back
    NOSCRIPT; only they are sent again once the scripts are loaded. An unconditional ``SET NX``
    fill of the same batch, already stored, is reported stored, not sent again and refused."""
    from .redis_server import RedisServer

    server = RedisServer().start()
    try:
        store = store_for(region_for_url(server.url, 1.0, 1))
        tombstone = b"tombstone"
        store.write_many([Write("k:observed", tombstone, 60)])
        store.fill_many([Fill("k:warm", None, b"x", 60)])  # the scripts are loaded by now
        server.client().script_flush()
        stored = store.fill_many(
            [Fill("k:absent", None, b"a", 60), Fill("k:observed", tombstone, b"b", 60)]
        )
        assert stored == [True, True]
        assert store.get_many(["k:absent", "k:observed"]) == [b"a", b"b"]
    finally:
        server.stop()
