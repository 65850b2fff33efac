"""The differential fuzzer: random sequences of ORM operations, applied in the same order to a
plain SQLAlchemy session factory and to a caching one, over two copies of the same schema, must
give the same answers, the same errors and the same committed data.

Operations: get, get_one, Query.get, get_many, merge, a lazy many-to-one load, add, update,
delete, flush, commit, rollback, savepoints, ORM bulk UPDATE/DELETE statements, Core UPDATE, and a
fresh session in place of the old one (several sessions in turn, so later lookups really hit).
The cache is warm from the first reads on, so most lookups after a commit test a hit or an
eviction. A failure prints the shortest sequence hypothesis found.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from sqlalchemy import ForeignKey, Integer, String, create_engine, delete, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from sa_cache import CachingSession, IdentityCache

from .conftest import REDIS_URL, RUN_ID, require_service
from .databases import SERVERS, create_database, drop_database


class FuzzBase(DeclarativeBase):
    pass


class Team(FuzzBase):
    __tablename__ = "fuzz_teams"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(20))


class Member(FuzzBase):
    __tablename__ = "fuzz_members"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    team_id: Mapped[int | None] = mapped_column(ForeignKey("fuzz_teams.id"))
    name: Mapped[str] = mapped_column(String(20))
    team: Mapped[Team | None] = relationship()


IDS = st.integers(1, 6)
NAMES = st.sampled_from(["ann", "bob", "cy", "di"])
MODELS = st.sampled_from([Team, Member])


def describe(value: Any) -> Any:
    """What an answer looks like to a caller: instances by class, key and column values."""
    if isinstance(value, list):
        return [describe(v) for v in value]
    if isinstance(value, Team):
        return ("Team", value.id, value.name)
    if isinstance(value, Member):
        return ("Member", value.id, value.team_id, value.name)
    return value


def outcome(call: Any) -> Any:
    try:
        return ("ok", describe(call()))
    except Exception as exc:  # the same error type on both sides, whatever it is
        return ("raised", type(exc).__name__)


def committed(engine: Engine) -> Any:
    with engine.connect() as conn:
        teams = conn.execute(select(Team.id, Team.name).order_by(Team.id)).all()
        members = conn.execute(
            select(Member.id, Member.team_id, Member.name).order_by(Member.id)
        ).all()
    return [tuple(r) for r in teams], [tuple(r) for r in members]


def machine(plain_engine: Engine, cached_engine: Engine, cache: IdentityCache) -> type:
    class SameAnswers(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            for engine in (plain_engine, cached_engine):
                with engine.begin() as conn:
                    conn.execute(delete(Member))
                    conn.execute(delete(Team))
                    conn.execute(Team.__table__.insert(), [{"id": i, "name": "t"} for i in (1, 2)])
            cache.flush()
            self.sessions: dict[str, Session] = {}
            self.fresh_sessions()

        def fresh_sessions(self) -> None:
            for session in self.sessions.values():
                session.close()
            self.sessions = {
                "plain": Session(plain_engine),
                "cached": CachingSession(cached_engine, cache=cache),
            }

        def both(self, action: Any) -> None:
            answers = {name: outcome(lambda s=s: action(s)) for name, s in self.sessions.items()}
            assert answers["cached"] == answers["plain"], answers
            if answers["plain"][0] == "raised":
                for session in self.sessions.values():
                    session.rollback()  # a failed flush leaves the session needing a rollback

        @rule()
        def new_sessions(self) -> None:
            self.fresh_sessions()

        @rule(model=MODELS, pk=IDS)
        def get(self, model: type, pk: int) -> None:
            self.both(lambda s: s.get(model, pk))

        @rule(model=MODELS, pk=IDS)
        def get_one(self, model: type, pk: int) -> None:
            self.both(lambda s: s.get_one(model, pk))

        @rule(model=MODELS, pk=IDS)
        def query_get(self, model: type, pk: int) -> None:
            self.both(lambda s: s.query(model).get(pk))

        @rule(model=MODELS, pks=st.lists(IDS, max_size=4))
        def get_many(self, model: type, pks: list[int]) -> None:
            def many(s: Session) -> Any:
                if isinstance(s, CachingSession):
                    return s.get_many(model, pks)
                return [s.get(model, pk) for pk in pks]

            self.both(many)

        @rule(pk=IDS)
        def lazy_team(self, pk: int) -> None:
            self.both(lambda s: (m := s.get(Member, pk)) and m.team)

        @rule(pk=IDS, name=NAMES)
        def merge_team(self, pk: int, name: str) -> None:
            self.both(lambda s: s.merge(Team(id=pk, name=name)))

        @rule(pk=IDS, name=NAMES)
        def add_team(self, pk: int, name: str) -> None:
            self.both(lambda s: s.add(Team(id=pk, name=name)))

        @rule(pk=IDS, team=st.none() | IDS, name=NAMES)
        def add_member(self, pk: int, team: int | None, name: str) -> None:
            self.both(lambda s: s.add(Member(id=pk, team_id=team, name=name)))

        @rule(model=MODELS, pk=IDS, name=NAMES)
        def rename(self, model: type, pk: int, name: str) -> None:
            def change(s: Session) -> Any:
                found = s.get(model, pk)
                if found is not None:
                    found.name = name
                return found

            self.both(change)

        @rule(pk=IDS, team=st.none() | IDS)
        def move_member(self, pk: int, team: int | None) -> None:
            def move(s: Session) -> Any:
                found = s.get(Member, pk)
                if found is not None:
                    found.team_id = team
                return found

            self.both(move)

        @rule(model=MODELS, pk=IDS)
        def delete_row(self, model: type, pk: int) -> None:
            def remove(s: Session) -> Any:
                found = s.get(model, pk)
                if found is not None:
                    s.delete(found)
                return found

            self.both(remove)

        @rule(name=NAMES, below=IDS, how=st.sampled_from(["auto", "fetch", "evaluate", False]))
        def bulk_update(self, name: str, below: int, how: Any) -> None:
            statement = update(Member).where(Member.id < below).values(name=name)
            self.both(
                lambda s: s.execute(statement, execution_options={"synchronize_session": how})
                .rowcount
            )

        @rule(below=IDS)
        def bulk_delete(self, below: int) -> None:
            self.both(lambda s: s.execute(delete(Member).where(Member.id < below)).rowcount)

        @rule(name=NAMES)
        def core_update(self, name: str) -> None:
            table = Team.__table__
            self.both(lambda s: s.execute(update(table).values(name=name)).rowcount)

        @rule()
        def flush(self) -> None:
            self.both(lambda s: s.flush())

        @rule()
        def commit(self) -> None:
            self.both(lambda s: s.commit())

        @rule()
        def rollback(self) -> None:
            self.both(lambda s: s.rollback())

        @rule(release=st.booleans(), model=MODELS, pk=IDS, name=NAMES)
        def savepoint(self, release: bool, model: type, pk: int, name: str) -> None:
            def nested(s: Session) -> Any:
                point = s.begin_nested()
                found = s.get(model, pk)
                if found is not None:
                    found.name = name
                s.flush()
                if release:
                    point.commit()
                else:
                    point.rollback()
                return found

            self.both(nested)

        @invariant()
        def same_committed_data(self) -> None:
            assert committed(plain_engine) == committed(cached_engine)

        def teardown(self) -> None:
            for session in self.sessions.values():
                session.close()

    return SameAnswers


@pytest.fixture
def twin_engines(db: str, tmp_path: Any) -> Iterator[tuple[Engine, Engine]]:
    names = [f"{RUN_ID}_fuzz_plain", f"{RUN_ID}_fuzz_cached"]
    if db == "sqlite":
        urls = [f"sqlite:///{tmp_path}/{name}.sqlite" for name in names]
    else:
        require_service(db, 5432 if db == "postgresql" else 3306)
        urls = [create_database(SERVERS[db], name) for name in names]
    engines = [create_engine(url) for url in urls]
    for engine in engines:
        FuzzBase.metadata.create_all(engine)
    yield engines[0], engines[1]
    for engine in engines:
        engine.dispose()
    if db != "sqlite":
        for name in names:
            drop_database(SERVERS[db], name)


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_random_sequence_of_operations_gives_plain_sqlalchemys_answers(twin_engines, backend):
    if backend == "redis":
        require_service("redis", 6379)
    cache = IdentityCache(
        REDIS_URL if backend == "redis" else None, prefix=f"{RUN_ID}_fuzz_{uuid.uuid4().hex[:6]}"
    )
    cache.register(Team)
    cache.register(Member)
    try:
        run_state_machine_as_test(
            machine(*twin_engines, cache),
            settings=settings(
                max_examples=25,
                stateful_step_count=30,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            ),
        )
        assert cache.stats()["hits"] > 0  # the cache answered, not only the database
    finally:
        cache.flush()
