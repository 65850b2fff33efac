"""Across gunicorn workers, a change to a user's roles or to a role's abilities is seen by that
user's next request on every worker: 100 trials on PostgreSQL and on MariaDB, 0 stale answers.

The application is the roles-and-abilities benchmark's (benchmarks/roles_app.py, the README's
three lines) under gunicorn with 4 sync workers sharing one Redis. A trial picks a user, has every
worker answer ``/abilities`` for them (so that each has the old answer cached to serve), changes
the user's roles or one of their roles' abilities through a POST that any worker may take, reads
what the answer must now be from the database, and then requests as the user in concurrent bursts
until every worker has answered again: each answer after the change is compared with the
database's. The same trials against the application with evictions dropped find stale answers,
which is what shows they can fail.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine

from benchmarks.env import delete_prefix
from benchmarks.roles_app import ABILITIES, ROLES, abilities_of, populate
from benchmarks.web_roles import Reply, Server, fetch, login

from .conftest import MARIADB_SERVER, PG_SERVER, REDIS_URL, RUN_ID, require_service
from .databases import create_database, drop_database

WORKERS = 4
TRIALS = 100
USERS = 40
BURST = 6  # concurrent requests: a sync worker busy with one leaves the next to another
MAX_BURSTS = 40  # per phase of a trial, before concluding a worker never answers
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


class Trials:
    """The trials against one running application; ``stale`` lists every stale answer."""

    def __init__(self, server: Server, database_url: str, rng: random.Random) -> None:
        self.port = server.port
        self.engine = create_engine(database_url)
        self.rng = rng
        self.cookies: dict[int, str] = {}
        self.answers = 0
        self.stale: list[tuple[int, str, object, object]] = []

    async def every_worker(self, user: int) -> list[Reply]:
        """Requests as ``user`` in bursts until all the workers have answered."""
        seen: set[str] = set()
        replies: list[Reply] = []
        for _ in range(MAX_BURSTS):
            burst = await asyncio.gather(
                *(fetch(self.port, "/abilities", self.cookies[user]) for _ in range(BURST))
            )
            for reply in burst:
                assert reply.status == 200, reply.body[:500]
                seen.add(reply.headers["x-worker-pid"])
            replies += burst
            if len(seen) == WORKERS:
                return replies
        raise AssertionError(f"only workers {sorted(seen)} answered in {MAX_BURSTS} bursts")

    def expected(self, user: int) -> dict[str, list[str]]:
        with self.engine.connect() as conn:
            return abilities_of(conn, user)

    async def change(self, trial: int, user: int) -> None:
        """Even trials replace the user's roles, odd ones the abilities of one of their roles."""
        with self.engine.connect() as conn:
            roles = [int(name.split("-")[1]) for name in abilities_of(conn, user)]
        if trial % 2 == 0:
            others = [r for r in range(1, ROLES + 1) if r not in roles]
            new = self.rng.sample(others, self.rng.randint(1, 3))
            path, form = f"/users/{user}/roles", "&".join(f"role={r}" for r in new)
        else:
            role = self.rng.choice(roles)
            new = self.rng.sample(range(1, ABILITIES + 1), self.rng.randint(2, 5))
            path, form = f"/roles/{role}/abilities", "&".join(f"ability={a}" for a in new)
        reply = await fetch(self.port, path, method="POST", form=form)
        assert reply.status == 200, reply.body[:500]

    def check(self, user: int, replies: list[Reply], when: str) -> None:
        expected = self.expected(user)
        for reply in replies:
            self.answers += 1
            got = json.loads(reply.body)["roles"]
            if got != expected:
                self.stale.append((user, when, got, expected))

    async def run(self, trials: int) -> None:
        users = list(range(1, USERS + 1))
        for user in users:
            self.cookies[user] = await login(self.port, user)
        for trial in range(trials):
            user = self.rng.choice(users)
            self.check(user, await self.every_worker(user), "before")
            await self.change(trial, user)
            self.check(user, await self.every_worker(user), f"after trial {trial}")

    def close(self) -> None:
        self.engine.dispose()


def run_trials(database_url: str, tmp_path: Path, trials: int, **extra_env: str) -> Trials:
    require_service("redis", 6379)
    prefix = f"{RUN_ID}_staleness_{random.randrange(1 << 30)}"
    log = tmp_path / "gunicorn.log"
    server = Server("sa_cache", database_url, prefix, WORKERS, log, REDIS_URL, **extra_env)
    result = Trials(server, database_url, random.Random(7))
    try:
        asyncio.run(result.run(trials))
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
