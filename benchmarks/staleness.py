"""The cross-worker staleness trials, shared by tests/test_flask_staleness.py and the report of
:mod:`benchmarks.web_roles`.

Against the roles application (:mod:`benchmarks.roles_app`) running under gunicorn, a trial picks
a user, has every worker answer ``/abilities`` for them (so that each has the old answer cached
to serve), changes the user's roles (even trials) or the abilities of one of their roles (odd
trials) through a POST that any worker may take, reads what the answer must now be from the
database, and then requests as the user in concurrent bursts until every worker has answered
again: each answer is compared with the database's, and a mismatch is a stale answer.
"""

from __future__ import annotations

import asyncio
import json
import random

from sqlalchemy import create_engine

from .roles_app import ABILITIES, ROLES, abilities_of
from .web_roles import Reply, Server, fetch, login

BURST = 6  # concurrent requests: a sync worker busy with one leaves the next to another
MAX_BURSTS = 40  # per phase of a trial, before concluding a worker never answers


class Trials:
    """The trials against one running application; ``stale`` lists every stale answer."""

    def __init__(self, server: Server, database_url: str, rng: random.Random) -> None:
        self.port = server.port
        self.workers = server.workers
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
            if len(seen) == self.workers:
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

    async def run(self, trials: int, users: list[int]) -> None:
        for user in users:
            if user not in self.cookies:
                self.cookies[user] = await login(self.port, user)
        for trial in range(trials):
            user = self.rng.choice(users)
            self.check(user, await self.every_worker(user), "before")
            await self.change(trial, user)
            self.check(user, await self.every_worker(user), f"after trial {trial}")

    def close(self) -> None:
        self.engine.dispose()
