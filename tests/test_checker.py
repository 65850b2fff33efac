"""The randomized concurrency checker (tests/stress/) at a size that runs in about two minutes
for every scenario: worker processes and threads read and write through CachingSession on
PostgreSQL (READ COMMITTED) and MariaDB (REPEATABLE READ) with Redis, and no read may see a row
older than a commit that returned before it started, nor a version never committed; no
read-modify-write increment may be lost; the cache ends equal to the database. Scenarios: the
mixed workload, sessions joined to outer transactions, REPEATABLE READ/SERIALIZABLE increments,
MariaDB REPEATABLE READ multi-lookup transactions, one process losing Redis, relationship
collections read lazily and eagerly while their membership changes.

Each scenario is shown able to fail where that is cheap: with every eviction dropped the mixed
workload must report stale reads, and with the collections' evictions dropped the collections
scenario must too; increments that read the counter outside their snapshot (what
a cache hit inside it amounts to) must report lost updates; the outage analysis excuses only the
stale reads its delivery bound allows.
Long runs: ``python -m tests.stress --db postgresql --operations 100000``.
"""

from __future__ import annotations

import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .conftest import (
    MARIADB_SERVER,
    PG_SERVER,
    REDIS_URL,
    require_redis_cluster,
    require_service,
)
from .stress import checker
from .stress.collections import CHILDREN, TAGS_OF, judge_collections
from .stress.increments import IncrementScenario
from .stress.near import withhold_messages
from .stress.outage import PROXIED, OutageScenario
from .stress.proxy import StallingProxy

SERVERS = {"postgresql": (PG_SERVER, 5432), "mariadb": (MARIADB_SERVER, 3306)}


@pytest.fixture(params=sorted(SERVERS))
def server(request: pytest.FixtureRequest) -> str:
    url, port = SERVERS[request.param]
    require_service(request.param, port)
    require_service("redis", 6379)
    return url


def test_no_read_is_stale_or_dirty_and_the_cache_ends_equal_to_the_database(server):
    report = checker.run(
        server,
        REDIS_URL,
        operations=6000,
        threads=3,
        processes=2,
        seed=1,
        prefix=None,
        time_limit=19,  # the workers stop there: a loaded machine shortens the run, never hangs
    )
    print(report.format())
    assert report.errors == 0, report.error_messages
    assert (report.stale, report.dirty, report.mismatches) == (0, 0, 0), report.examples
    assert report.operations >= 800  # the time limit did not cut the run to nothing
    assert report.reads > report.operations / 2 and report.versions > report.operations / 5
    assert 0 < report.absent_reads < report.reads / 2
    kinds = set(report.kinds)
    assert {"get", "get_many", "lazy", "query_get", "transaction"} <= kinds
    assert {"update", "delete", "insert", "rollback", "savepoint_rollback"} <= kinds
    assert {"bulk_update", "bulk_delete"} <= kinds
    assert report.cache["hits"] > 0 and report.cache["fills"] > 0
    assert report.cache["evictions"] > 0


def test_through_a_redis_cluster_no_read_is_stale_or_dirty(server):
    """The mixed workload with the cache on the run's private Redis Cluster (3 masters, 3
    replicas): keys routed per slot, fills and leases by script on each master."""
    cluster = require_redis_cluster()
    report = checker.run(
        server, cluster.url, operations=3000, seed=21, time_limit=15, scenario="mixed"
    )
    _ran_cleanly(report, 300)
    assert (report.stale, report.dirty, report.mismatches) == (0, 0, 0), report.examples
    assert report.cache["evictions"] > 0


def test_the_checker_fails_a_cache_that_drops_its_evictions(server):
    report = checker.run(
        server,
        REDIS_URL,
        operations=600,
        threads=3,
        processes=2,
        seed=2,
        prefix=None,
        configure_cache=checker.drop_evictions,
        time_limit=5,
    )
    print(report.format())
    assert report.errors == 0, report.error_messages
    assert report.stale > 0
    assert report.mismatches > 0
    assert report.dirty == 0  # dropped evictions serve old committed rows, never uncommitted ones


def test_the_analysis_tells_stale_and_dirty_reads_from_legitimate_ones():
    initial = [(1, 1, 1, 0, 0, "initial"), (2, 0, None, 0, 0, "initial")]
    records = checker.Records()
    records.writes = [
        (1, 5, 5, 10, 20, "update"),  # row 1: version 5 committed from 10 to 20
        (2, 6, 6, 25, 35, "insert"),  # row 2: inserted as version 6 from 25 to 35
        (1, 7, None, 30, 40, "delete"),  # row 1: deleted (version 7) from 30 to 40
    ]
    records.aborted = [(1, 8)]
    legitimate = [
        (1, 1, 5, 6, "get"),  # before version 5's commit began
        (1, 1, 15, 16, "get"),  # during it
        (1, 5, 21, 22, "get"),
        (1, None, 21, 31, "get"),  # the delete had begun to commit
        (2, None, 34, 35, "get"),  # the insert had not returned yet
        (2, 6, 36, 37, "get"),
    ]
    stale = [
        (1, 1, 21, 22, "get"),  # version 5 had returned at 20
        (1, None, 21, 29, "get"),  # no delete had begun
        (1, 5, 41, 42, "get"),  # deleted at 40
        (2, None, 36, 37, "get"),  # inserted at 35
    ]
    dirty = [
        (1, 8, 41, 42, "get"),  # rolled back
        (1, 9, 0, 1, "get"),  # never written
        (2, 6, 20, 24, "get"),  # seen before its commit began
    ]
    records.reads = legitimate
    assert checker.analyse(records, initial)[:2] == (0, 0)
    records.reads = legitimate + stale + dirty
    assert checker.analyse(records, initial)[:2] == (len(stale), len(dirty))


def _ran_cleanly(report: checker.Report, operations: int) -> None:
    print(report.format())
    assert report.errors == 0, report.error_messages
    assert report.operations >= operations  # the time limit did not cut the run to nothing
    assert report.cache["hits"] > 0 and report.cache["fills"] > 0


def test_increments_at_repeatable_read_and_serializable_lose_no_update():
    require_service("postgresql", 5432)
    require_service("redis", 6379)
    report = checker.run(
        PG_SERVER, REDIS_URL, operations=2000, seed=4, time_limit=10, scenario="increments"
    )
    _ran_cleanly(report, 400)
    assert report.increments > 100
    assert (report.lost_updates, report.stale, report.dirty, report.mismatches) == (0, 0, 0, 0), (
        report.examples
    )


def test_the_checker_reports_lost_updates_when_increments_read_outside_their_snapshot():
    require_service("postgresql", 5432)
    require_service("redis", 6379)
    report = checker.run(
        PG_SERVER,
        REDIS_URL,
        operations=1200,
        seed=3,
        time_limit=8,
        scenario=IncrementScenario(read_outside=True),
    )
    print(report.format())
    assert report.errors == 0, report.error_messages
    assert report.lost_updates > 0


def test_repeatable_read_transactions_of_several_lookups_see_nothing_stale():
    require_service("mariadb", 3306)
    require_service("redis", 6379)
    report = checker.run(
        MARIADB_SERVER, REDIS_URL, operations=3000, seed=5, time_limit=10, scenario="rr-lookups"
    )
    _ran_cleanly(report, 300)  # a transaction of 4-10 lookups is one operation
    assert report.isolation_level == "REPEATABLE READ"
    assert report.kinds["transaction"] > report.operations / 4
    assert (report.stale, report.dirty, report.mismatches) == (0, 0, 0), report.examples


def test_sessions_joined_to_outer_transactions_publish_nothing_early(server):
    report = checker.run(
        server, REDIS_URL, operations=2500, seed=6, time_limit=10, scenario="outer-transaction"
    )
    _ran_cleanly(report, 300)
    kinds = set(report.kinds)
    assert {"outer_commit", "outer_rollback", "outer_inner_rollback", "shared_connection"} <= kinds
    assert report.cache["skipped"] > 0  # the joined sessions' lookups stepped aside
    assert (report.stale, report.dirty, report.mismatches) == (0, 0, 0), report.examples


def test_one_process_losing_redis_serves_nothing_stale_past_the_delivery_bound():
    require_service("postgresql", 5432)
    require_service("redis", 6379)
    report = checker.run(
        PG_SERVER, REDIS_URL, operations=3000, seed=7, time_limit=10, scenario="outage"
    )
    _ran_cleanly(report, 300)
    assert report.outages >= 2 and report.delivery_bound > 0
    assert report.cache["errors"] > 0  # the proxied process did lose Redis
    assert (report.stale, report.dirty, report.mismatches, report.undelivered) == (0, 0, 0, 0), (
        report.examples
    )


def test_the_outage_analysis_excuses_only_stale_reads_within_the_delivery_bound():
    ms = 1_000_000
    records = checker.Records()
    records.outages = [(100 * ms, 200 * ms)]
    records.delivery_bound = 0.05  # 50 ms
    initial = [(1, 1, 1, 0, 0, "initial"), (2, 2, 2, 0, 0, "initial")]
    records.writes = [
        (1, 5, 5, 110 * ms, 120 * ms, "update" + PROXIED),  # during the stall, by that process
        (2, 6, 6, 110 * ms, 120 * ms, "update"),  # during the stall, by another process
    ]
    excused = [(1, 1, 240 * ms, 241 * ms, "get")]  # before the stall's end + 50 ms
    stale = [
        (1, 1, 260 * ms, 261 * ms, "get"),  # after it
        (2, 2, 130 * ms, 131 * ms, "get"),  # another process's eviction was not held up
    ]
    records.reads = excused + stale
    found = checker.analyse(records, initial, OutageScenario().excuse(records))
    assert (found[0], found[3]) == (len(stale), len(excused))


def test_collections_read_lazily_and_eagerly_are_never_older_than_a_committed_change(server):
    report = checker.run(
        server, REDIS_URL, operations=3000, seed=8, time_limit=14, scenario="collections"
    )
    print(report.format())
    assert report.errors == 0, report.error_messages
    assert report.operations >= 300  # the time limit did not cut the run to nothing
    assert report.cache["hits"] > 0 and report.cache["fills"] > 0
    kinds = set(report.kinds)
    reads = {"children", "ordered_children", "tags", "tag_parents", "selectin", "selectin_get"}
    assert reads | {"child_get", "child_by_name", "transaction"} <= kinds
    assert {"add_child", "remove_child", "move_child", "reorder", "tag_add", "tag_remove"} <= kinds
    assert {"link_insert", "link_delete", "bulk_move", "bulk_delete"} <= kinds
    assert {"collection_rollback", "collection_savepoint_rollback"} <= kinds
    assert (report.stale, report.dirty, report.lost_updates, report.mismatches) == (0, 0, 0, 0), (
        report.examples
    )


def test_the_checker_fails_a_cache_that_drops_its_collection_evictions():
    require_service("postgresql", 5432)
    require_service("redis", 6379)
    report = checker.run(
        PG_SERVER,
        REDIS_URL,
        operations=900,
        seed=9,
        time_limit=8,
        scenario="collections",
        configure_cache=checker.drop_collection_evictions,
    )
    print(report.format())
    assert report.errors == 0, report.error_messages
    assert report.stale > 0 and report.mismatches > 0


def test_a_collection_read_is_judged_by_the_newest_version_with_its_membership():
    parent, tags = CHILDREN - 1, TAGS_OF - 1
    writes = [
        (parent, 0, (1, 2), 0, 0, "initial"),
        (parent, 5, (2, 1), 10, 20, "reorder"),  # same members, new order
        (parent, 7, (1, 2), 30, 40, "reorder"),  # back to the first order (A, B, A)
        (tags, 0, (), 0, 0, "initial"),
        (tags, 6, (3,), 10, 20, "tag_add"),
    ]
    aborted = [(tags, 8, (3, 4))]
    uncertain = [(tags, 9, (5,))]
    legitimate = [
        (parent, (1, 2), True, 5, 6, "ordered_children"),
        (parent, (2, 1), True, 21, 22, "ordered_children"),
        (parent, (1, 2), True, 41, 42, "ordered_children"),  # version 7, not 0
        (parent, (1, 2), False, 21, 22, "children"),  # unordered: any version
        (tags, (), False, 15, 16, "tags"),  # version 6 had not returned
        (tags, (5,), False, 50, 51, "tags"),  # a commit that may have happened
    ]
    stale = [
        (parent, (2, 1), True, 41, 42, "ordered_children"),  # version 7 had returned
        (tags, (), False, 21, 22, "tags"),
    ]
    dirty = [
        (tags, (3, 4), False, 50, 51, "tags"),  # rolled back
        (tags, (4,), False, 50, 51, "tags"),  # never meant by anyone
        (parent, (2, 1), True, 5, 6, "ordered_children"),  # before version 5's commit began
    ]
    assert judge_collections(writes, legitimate, aborted, uncertain)[:2] == (0, 0)
    found = judge_collections(writes, legitimate + stale + dirty, aborted, uncertain)
    assert found[:2] == (len(stale), len(dirty)), found[2]


def test_the_proxy_stalls_one_client_and_resumes_it():
    require_service("redis", 6379)
    proxy = StallingProxy(("127.0.0.1", 6379))
    client = redis.Redis(port=proxy.port, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
    try:
        assert client.ping()
        proxy.stall()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert redis.Redis(socket_timeout=0.2).ping()  # the shared Redis itself answers
        proxy.resume()
        deadline = time.monotonic() + 5
        while True:  # the timed-out connection is dropped; the next one goes through
            try:
                assert client.ping()
                break
            except (redis.ConnectionError, redis.TimeoutError):
                assert time.monotonic() < deadline
    finally:
        client.close()
        proxy.close()


def test_with_near_caches_nothing_is_stale_within_a_process_and_across_only_within_the_bound():
    """Two processes, each cache with a near cache: 0 stale reads of a process's own commits, 0
    past the bound across processes (the ones within it are counted apart, in a note)."""
    require_service("postgresql", 5432)
    require_service("redis", 6379)
    report = checker.run(
        PG_SERVER, REDIS_URL, operations=3000, seed=8, time_limit=20, scenario="near"
    )
    _ran_cleanly(report, 300)
    assert (report.stale, report.dirty, report.mismatches) == (0, 0, 0), report.examples
    assert report.cache["near_hits"] > 0 and report.cache["near_invalidations"] > 0


def test_the_near_scenario_reports_stale_reads_when_tracking_messages_are_withheld():
    require_service("postgresql", 5432)
    require_service("redis", 6379)
    report = checker.run(
        PG_SERVER,
        REDIS_URL,
        operations=3000,
        seed=9,
        time_limit=12,
        scenario="near",
        configure_cache=withhold_messages,
    )
    print(report.format())
    assert report.errors == 0, report.error_messages
    assert report.stale > 0
