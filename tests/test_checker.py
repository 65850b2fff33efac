"""The randomized concurrency checker (tests/stress/checker.py) at a size that runs in well under a
minute for both databases: worker processes and threads read and write a hot table through
CachingSession on PostgreSQL (READ COMMITTED) and MariaDB (REPEATABLE READ) with Redis, and no
read may see a row older than a commit that returned before it started.

The checker is shown able to fail: with every eviction dropped it must report stale reads.
Long runs: ``python -m tests.stress --db postgresql --operations 100000``.
"""

from __future__ import annotations

import pytest

from .conftest import MARIADB_SERVER, PG_SERVER, REDIS_URL, require_service
from .stress import checker

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
