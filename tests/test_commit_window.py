"""The window between a database commit and the eviction after it.

SQLAlchemy tells a session it committed only after the database did (``after_commit``), so the
eviction comes a moment after the commit. A reader in that moment may already know of the
commit through the database: it waited for a lock the writer held, or it loaded a row the writer
committed. Plain SQLAlchemy then reads the new row; the cache must not answer with the old one,
or a read-modify-write built on it silently loses the write (its UPDATE is never sent, because
the value it sets is the one it believes is there). The commit's keys are therefore held just
before the database commit (``sa_cache.connections``).

Every scenario runs through a plain session and a cached one, which must agree; the reader runs
inside the writer's commit, after the database commit and before the eviction, forced by a
listener placed ahead of the cache's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from sa_cache import CachingSession, IdentityCache

from .counting import RedisCounter, expect_commands, expect_sql
from .models import User


@pytest.fixture(params=["plain", "cached"])
def Sessions(  # noqa: N802
    request: pytest.FixtureRequest, engine: Engine, cache: IdentityCache
) -> sessionmaker[CachingSession]:
    """The same sessions with and without the cache, user 1 ("old") committed and cached."""
    Sessions = sessionmaker(
        engine, class_=CachingSession, cache=cache if request.param == "cached" else None
    )
    with Sessions() as s:
        s.add_all([User(id=1, name="old"), User(id=2, name="lock")])
        s.commit()
    with Sessions() as s:
        s.get(User, 1)
    return Sessions


@contextmanager
def inside_the_commit(writer: Session, reader: Callable[[], None]) -> Iterator[None]:
    """Run ``reader`` when ``writer`` commits, after the database commit and before anything the
    cache does in ``after_commit`` (the listener is placed first)."""

    def run(session: Session) -> None:
        if session is writer:
            reader()

    event.listen(CachingSession, "after_commit", run, insert=True)
    try:
        yield
    finally:
        event.remove(CachingSession, "after_commit", run)


def _name(Sessions: sessionmaker[CachingSession], pk: int = 1) -> str:  # noqa: N803
    with Sessions() as s:
        return s.get(User, pk).name


def test_a_reader_that_took_the_writer_s_lock_gets_the_committed_row(
    Sessions: sessionmaker[CachingSession],  # noqa: N803
) -> None:
    seen: list[str] = []

    def reader() -> None:
        with Sessions() as s:
            # the lock the writer held on user 2 is free now: the writer's commit is done
            s.execute(select(User.id).where(User.id == 2).with_for_update()).all()
            seen.append(s.get(User, 1).name)

    with Sessions() as writer:
        writer.execute(select(User.id).where(User.id == 2).with_for_update()).all()
        writer.get(User, 1).name = "new"
        with inside_the_commit(writer, reader):
            writer.commit()
    assert seen == ["new"]
    assert _name(Sessions) == "new"


def test_a_read_modify_write_inside_the_commit_window_is_not_lost(
    Sessions: sessionmaker[CachingSession],  # noqa: N803
) -> None:
    """The reader sets the name back to "old": with the old row from the cache it would believe
    nothing changed, send no UPDATE, and the database would keep the writer's "new"."""
    sent: list[str] = []

    def reader() -> None:
        with Sessions() as s:
            user = s.get(User, 1)
            sent.append(user.name)
            user.name = "old"
            s.commit()

    with Sessions() as writer:
        writer.get(User, 1).name = "new"
        with inside_the_commit(writer, reader):
            writer.commit()
    assert sent == ["new"]
    assert _name(Sessions) == "old"


def test_a_commit_costs_a_hold_and_an_eviction_only_when_it_wrote(
    engine: Engine, cache: IdentityCache, redis_counter: RedisCounter, sql: Any
) -> None:
    """The hold is one round trip before the database commit, the eviction one after it; a
    commit that wrote nothing sends neither, and the row is cached again at the next read."""
    Sessions = sessionmaker(engine, class_=CachingSession, cache=cache)  # noqa: N806
    with Sessions() as s:
        s.add(User(id=1, name="old"))
        s.commit()
    _name(Sessions)
    with Sessions() as s:
        user = s.get(User, 1)
        user.name = "new"
        s.flush()
        with expect_commands(redis_counter, round_trips=2):
            s.commit()
    with Sessions() as s:
        s.get(User, 1)
        with expect_commands(redis_counter, {}):
            s.commit()
    assert _name(Sessions) == "new"  # the hold is gone: this load fills
    with expect_sql(sql, 0):
        assert _name(Sessions) == "new"
