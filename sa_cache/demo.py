"""The scripted scenario behind ``sa-cache demo``: what the cache does, step by step, measured.

It runs on the embedded default (a SQLite file in a temporary folder and the in-process backend)
unless given a database URL and a Redis URL, and reports for each step the SQL statements the
engine ran, what the cache did, and the time taken.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Boolean, DateTime, String, create_engine, event, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from .cache import IdentityCache
from .session import CachingSession


class DemoBase(DeclarativeBase):
    pass


class DemoUser(DemoBase):
    __tablename__ = "sa_cache_demo_users"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(100))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[Any] = mapped_column(DateTime, server_default=func.now())


@dataclass
class Step:
    name: str
    sql: int
    outcome: str
    millis: float


def _outcome(before: dict[str, int], after: dict[str, int]) -> str:
    parts = [
        f"{name} {after[name] - before[name]}"
        for name in ("hits", "misses", "fills", "evictions", "errors")
        if after[name] != before[name]
    ]
    return ", ".join(parts) or "-"


def run(db_url: str | None = None, redis_url: str | None = None) -> list[Step]:
    """Run the scenario; return one :class:`Step` per line of the table."""
    with tempfile.TemporaryDirectory() as folder:
        engine = create_engine(db_url or f"sqlite:///{folder}/demo.sqlite")
        cache = IdentityCache(redis_url, prefix="sa_cache_demo")
        cache.register(DemoUser)
        DemoBase.metadata.drop_all(engine)
        DemoBase.metadata.create_all(engine)
        Session = sessionmaker(engine, class_=CachingSession, cache=cache)
        statements: list[str] = []
        event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
        steps: list[Step] = []

        @contextmanager
        def step(name: str) -> Iterator[None]:
            statements.clear()
            before = cache.stats()
            started = time.perf_counter()
            yield
            millis = (time.perf_counter() - started) * 1000
            steps.append(Step(name, len(statements), _outcome(before, cache.stats()), millis))

        with Session() as s:
            s.add_all([DemoUser(id=i, email=f"user{i}@example.com") for i in range(1, 11)])
            s.commit()
        cache.evict_model(DemoUser)  # a clean start when run twice against one Redis

        def get(pk: int) -> Callable[[], Any]:
            def load() -> Any:
                with Session() as s:
                    return s.get(DemoUser, pk)

            return load

        with step("get(User, 1): cold, a miss"):
            get(1)()
        with step("get(User, 1): warm, a hit"):
            get(1)()
        with step("update email of user 1 + commit"), Session() as s:
            user = s.get(DemoUser, 1)
            assert user is not None
            user.email = "new@example.com"
            s.commit()
        with step("get(User, 1): after the commit, a miss"):
            assert get(1)().email == "new@example.com"
        with step("get(User, 1): warm again, a hit"):
            get(1)()
        with step("get_many(User, 1..10)"), Session() as s:
            s.get_many(DemoUser, range(1, 11))
        with step("get_many(User, 1..10) again"), Session() as s:
            s.get_many(DemoUser, range(1, 11))
        with step("update user 2, then roll back"), Session() as s:
            user = s.get(DemoUser, 2)
            assert user is not None
            user.email = "never@example.com"
            s.flush()
            s.rollback()
        with step("get(User, 2): still cached"):
            assert get(2)().email == "user2@example.com"
        with step("get(User, 404): absent, a miss"):
            get(404)()
        with step("get(User, 404): absent, from the cache"):
            get(404)()
        DemoBase.metadata.drop_all(engine)
        engine.dispose()
        return steps


def render(steps: list[Step]) -> str:
    header = ("step", "SQL", "cache", "ms")
    rows = [(s.name, str(s.sql), s.outcome, f"{s.millis:.2f}") for s in steps]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = [
        "  ".join(
            cell.ljust(w) if i != 1 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, tuple("-" * w for w in widths), *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)
