"""A Redis Cluster master SIGKILLed during a checked load (tests/checked_load.py): the cache
opens the breaker of that master only. No read is stale, no caller sees an exception, rows on
the healthy masters keep hitting through the outage (their hit ratio is printed and must stay
near what it was before the kill), and the killed master's rows hit again once its replica
has taken over (the time it took is printed).

The cluster is this module's own (tests/redis_cluster.py): it loses a master."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import Engine

from sa_cache import IdentityCache
from sa_cache.stores.redis_cluster import RedisClusterStore

from .checked_load import CheckedLoad
from .conftest import RUN_ID, register_all, require_redis_cluster
from .models import User
from .redis_cluster import RedisClusterServers

READERS = 2
ROWS = 30
LOAD_SECONDS_BEFORE_KILL = 1.5
RESUME_LIMIT_SECONDS = 30.0
#: The healthy rows' hit ratio during the outage, as a fraction of theirs before the kill: the
#: only misses they should see are the writer's evictions, as before.
HEALTHY_RATIO_FLOOR = 0.5


@pytest.fixture
def db() -> str:
    return "postgresql"


@pytest.fixture(scope="module")
def servers() -> Iterator[RedisClusterServers]:
    require_redis_cluster()  # skips where redis-server or redis-cli is missing
    started = RedisClusterServers().start()
    yield started
    started.stop()


@pytest.mark.slow
def test_a_killed_master_costs_only_its_own_keys_and_nothing_stale(
    engine: Engine, servers: RedisClusterServers
) -> None:
    cache = register_all(
        IdentityCache(
            servers.url, prefix=f"{RUN_ID}_outage", breaker_cooldown=0.5, exit_flush_timeout=0
        )
    )
    store = cache.store
    model = cache.model_for(User.__mapper__)
    assert model is not None and isinstance(store, RedisClusterStore)
    node_of = {pk: store.domain_of(model.keys.row_key((pk,))) for pk in range(1, ROWS + 1)}
    generation_node = store.domain_of(model.keys.generation_key)
    # the victim does not hold the users' generation: every users lookup needs that one
    victim_name = next(name for name in sorted(set(node_of.values())) if name != generation_node)
    victim_pk = next(pk for pk, name in node_of.items() if name == victim_name)
    healthy_pks = tuple(
        next(pk for pk, name in node_of.items() if name == other)
        for other in sorted(set(node_of.values()) - {victim_name})
    )
    assert len(healthy_pks) == 2
    victim = next(n for n in servers.nodes if n.address == victim_name)

    with CheckedLoad(
        engine, cache, ROWS, READERS, probe_pk=victim_pk, more_probes=healthy_pks
    ) as load:
        began = time.monotonic()
        load.stop.wait(LOAD_SECONDS_BEFORE_KILL)
        assert load.hits_at, "the victim's probe never hit before the kill"
        victim.kill()
        killed_at = time.monotonic()
        deadline = killed_at + RESUME_LIMIT_SECONDS
        while not load.stop.is_set() and time.monotonic() < deadline:
            if load.hits_at[-1] > killed_at + 0.05 and load.hits_after(killed_at) >= 20:
                break
            time.sleep(0.05)
        resumed_at = time.monotonic()
    journaled = len(cache.guarded.journal()[0])
    delivered = cache.deliver_evictions(10)
    longest = load.longest_without_a_hit(killed_at)
    before = {pk: load.hit_ratio(pk, began, killed_at) for pk in healthy_pks}
    during = {pk: load.hit_ratio(pk, killed_at, resumed_at) for pk in healthy_pks}
    stats = cache.stats()
    print(
        f"\nmaster {victim_name} SIGKILLed: its rows hit again after "
        f"{'(never)' if longest is None else f'{longest:.2f} s'}; healthy masters' rows, hit "
        "ratio before -> during the outage: "
        + ", ".join(
            f"{before[pk][0]:.0%} ({before[pk][1]} reads) -> {during[pk][0]:.0%} "
            f"({during[pk][1]} reads)"
            for pk in healthy_pks
        )
        + f"; {journaled} evictions journaled at the end; {load.reads} checked reads, "
        f"{len(load.stale)} stale, {len(load.errors)} exceptions, {stats['errors']} store "
        f"errors, {stats['bypassed']} bypassed"
    )
    assert load.errors == []
    assert delivered, "evictions journaled in the outage never reached the cluster"
    assert load.stale == []
    assert load.hits_after(killed_at + 0.05) >= 20, "the victim's rows never hit again"
    for pk in healthy_pks:
        assert during[pk][1] >= 20, "the healthy rows' probe stalled"
        assert during[pk][0] >= HEALTHY_RATIO_FLOOR * before[pk][0], (pk, before, during)
    assert not cache.guarded.breaker_for(generation_node).is_open
