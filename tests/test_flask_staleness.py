"""Across gunicorn workers, a change to a user's roles or to a role's abilities is seen by that
user's next request on every worker: 100 trials on PostgreSQL and on MariaDB, 0 stale answers.

The application is the roles-and-abilities benchmark's (benchmarks/roles_app.py, the README's
three lines) under gunicorn with 4 sync workers sharing one Redis; the trials are
benchmarks/staleness.py's (each has every worker answer for a user, changes the user's roles or
a role's abilities through one worker, then has every worker answer again and compares each
answer with the database). The same trials against the application with evictions dropped find
stale answers, which is what shows they can fail.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from benchmarks.env import delete_prefix
from benchmarks.roles_app import populate
from benchmarks.staleness import Trials
from benchmarks.web_roles import Server

from .conftest import MARIADB_SERVER, PG_SERVER, REDIS_URL, RUN_ID, require_service
from .databases import create_database, drop_database

WORKERS = 4
TRIALS = 100
USERS = 40
SERVERS = {"postgresql": (PG_SERVER, 5432), "mariadb": (MARIADB_SERVER, 3306)}


@pytest.fixture(params=sorted(SERVERS), name="database_url")
def database_url_fixture(request: pytest.FixtureRequest) -> Iterator[str]:
    server, port = SERVERS[request.param]
    require_service(request.param, port)
    name = f"{RUN_ID}_staleness"
    url = create_database(server, name)
    populate(url, USERS)
    yield url
    drop_database(server, name)


def run_trials(database_url: str, tmp_path: Path, trials: int, **extra_env: str) -> Trials:
    require_service("redis", 6379)
    prefix = f"{RUN_ID}_staleness_{random.randrange(1 << 30)}"
    log = tmp_path / "gunicorn.log"
    server = Server("sa_cache", database_url, prefix, WORKERS, log, REDIS_URL, **extra_env)
    result = Trials(server, database_url, random.Random(7))
    try:
        asyncio.run(result.run(trials, list(range(1, USERS + 1))))
    finally:
        server.stop()
        result.close()
        client = redis.Redis.from_url(REDIS_URL)
        delete_prefix(client, prefix)
        client.close()
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text()[-3000:]
    return result


def test_a_role_or_ability_change_through_one_worker_is_seen_by_every_worker(
    database_url: str, tmp_path: Path
) -> None:
    trials = run_trials(database_url, tmp_path, TRIALS)
    assert trials.answers >= 2 * TRIALS * WORKERS
    assert trials.stale == [], f"{len(trials.stale)} stale of {trials.answers}: {trials.stale[:3]}"


def test_with_evictions_dropped_the_trials_find_stale_answers(
    database_url: str, tmp_path: Path
) -> None:
    """The trials can fail: the same application with commits that evict nothing."""
    trials = run_trials(database_url, tmp_path, 10, BENCH_BREAK="evictions")
    print(f"evictions dropped: {len(trials.stale)} stale answers of {trials.answers}")
    assert len({when for _, when, _, _ in trials.stale}) >= 5, trials.stale[:3]
