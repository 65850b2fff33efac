"""Round trips of a single-key lookup: a hit costs one; a miss whose lease is taken in the read's
own round trip (sa_cache.forecast: a key this process evicted, a kind whose reads keep missing)
costs two with its fill; every other miss three (read, lease with a re-read, fill with the
release). Answers are the same either way, and a lease taken along by a read that hit is given
back at once."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache
from sa_cache.forecast import THRESHOLD, WEIGHT
from sa_cache.lookup import lease_key
from sa_cache.store import Write

from .counting import expect_commands, expect_sql
from .entries import row_key
from .models import User

#: consecutive misses that turn a kind's forecast to "miss", from a ratio of 0
MISSES_TO_FORECAST = next(n for n in range(1, 100) if 1 - (1 - WEIGHT) ** n > THRESHOLD)

#: a miss whose read took the lease along: (MGET + SET NX lease), then (fill + release)
LEASED_MISS = {"MGET": 1, "SET": 1, "EVALSHA": 2}


def clock(db: str) -> dict[str, int]:
    """MariaDB's REPEATABLE READ: the lease's round trip reads the store's clock too."""
    return {"TIME": 1} if db == "mariadb" else {}


def user_key(cache: IdentityCache, pk: int) -> str:
    return row_key(cache, User, pk)


def held_lease(cache: IdentityCache, pk: int) -> bool:
    return cache.store.get_many([lease_key(user_key(cache, pk))])[0] is not None


def test_a_miss_of_a_key_this_process_evicted_reads_with_its_lease_and_fills_in_two_round_trips(
    Session: sessionmaker[CachingSession], cache: IdentityCache, sql, redis_counter, db: str
) -> None:
    with Session() as s:
        s.add(User(id=1, name="alice"))
        s.commit()
    with Session() as s:
        s.get(User, 1)  # fills
    with Session() as s:
        s.get(User, 1).name = "renamed"
        s.commit()  # this process writes the tombstone
    with (
        expect_sql(sql, selects=1),
        expect_commands(redis_counter, LEASED_MISS | clock(db), round_trips=2),
        Session() as s,
    ):
        assert s.get(User, 1).name == "renamed"
    assert not held_lease(cache, 1)
    with (
        expect_sql(sql, 0),
        expect_commands(redis_counter, {"MGET": 1}, round_trips=1),
        Session() as s,
    ):
        assert s.get(User, 1).name == "renamed"


def test_a_cold_miss_costs_two_round_trips_once_the_kinds_reads_keep_missing(
    engine, Session: sessionmaker[CachingSession], cache: IdentityCache, sql, redis_counter, db
) -> None:
    rows = MISSES_TO_FORECAST + 3
    with PlainSession(engine) as s:  # no eviction here: every key absent, a cold cache
        s.add_all(User(id=i, name=f"u{i}") for i in range(1, rows + 1))
        s.commit()
    for pk in range(1, MISSES_TO_FORECAST + 1):  # read, lease, fill: the forecast still "hit"
        with (
            expect_sql(sql, selects=1),
            expect_commands(redis_counter, round_trips=3 if pk > 1 else 4),  # + the generation
            Session() as s,
        ):
            assert s.get(User, pk).name == f"u{pk}"
    for pk in range(MISSES_TO_FORECAST + 1, rows + 1):
        with (
            expect_sql(sql, selects=1),
            expect_commands(
                redis_counter, {"MGET": 1, "SET": 2, "EVALSHA": 1} | clock(db), round_trips=2
            ),
            Session() as s,
        ):
            assert s.get(User, pk).name == f"u{pk}"  # SET NX of the fill, then the release
        assert not held_lease(cache, pk)
    # the first hit still takes the lease along, and gives it back at once; the next is plain
    with (
        expect_sql(sql, 0),
        expect_commands(
            redis_counter, {"MGET": 1, "SET": 1, "EVALSHA": 1} | clock(db), round_trips=2
        ),
        Session() as s,
    ):
        assert s.get(User, 1).name == "u1"
    assert not held_lease(cache, 1)
    with (
        expect_sql(sql, 0),
        expect_commands(redis_counter, {"MGET": 1}, round_trips=1),
        Session() as s,
    ):
        assert s.get(User, 2).name == "u2"
    assert cache.stats()["models"]["User"]["hits"] == 2


@pytest.mark.parametrize("backend", ["redis"])
def test_a_read_that_takes_its_lease_along_waits_for_the_caller_already_holding_it(
    engine, backend: str, cache_factory, sql
) -> None:
    cache = cache_factory(backend, lease_wait=0.05)
    cache.register(User)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)
    with Session() as s:
        assert s.get(User, 2) is None  # creates the kind's generation
        s.add(User(id=1, name="alice"))
        s.commit()  # evicted here: the next read takes the lease along
    lease = lease_key(user_key(cache, 1))
    cache.store.write_many([Write(lease, b"another caller", 60)])
    fills = cache.stats()["models"]["User"]["fills"]
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(User, 1).name == "alice"  # waited, timed out: loaded without filling
    assert cache.stats()["models"]["User"]["fills"] == fills
    assert cache.store.get_many([lease])[0] == b"another caller"  # left alone


def test_while_evictions_wait_in_the_journal_a_forecast_read_replays_them_first(
    engine, Session: sessionmaker[CachingSession], cache: IdentityCache, sql
) -> None:
    with Session() as s:
        s.add(User(id=1, name="alice"))
        s.commit()
    with Session() as s:
        s.get(User, 1)  # fills
    with PlainSession(engine) as s:  # a change whose eviction could not be written: journaled
        s.get(User, 1).name = "renamed"
        s.commit()
    held = threading.Event()
    cache.guarded.delivery_wait = lambda seconds: held.wait(10)  # no delivery meanwhile
    key = row_key(cache, User, 1)
    try:
        cache.guarded._journal_evictions({key: cache.model_for(User.__mapper__)}, set())
        cache.guarded.forecast.evicted([key])  # a miss forecast for the key
        with expect_sql(sql, selects=1), Session() as s:
            assert s.get(User, 1).name == "renamed"  # not the entry the journal evicts
        assert cache.guarded.journal() == ({}, set())
    finally:
        held.set()
