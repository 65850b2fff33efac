"""Eager relationships of a hit (issue 13, part 2): a ``get`` answered from the cache leaves its
``joined``, ``selectin``, ``subquery`` and ``immediate`` relationships loaded as a load leaves
them (the same objects, the same attributes loaded, the same load paths, the same stop at a
cycle), served from the cached collections and rows level by level, and loads from the
database only what the cache lacks, one attribute at a time.

Each scenario is differential: the object graph a plain session's ``get`` leaves (every
instance reachable through loaded attributes: its class, identity, unloaded attributes, load
path, load options and the members of each loaded relationship) must be the graph the cache
leaves, cold and warm, on SQLite, PostgreSQL and MariaDB, with Redis and the in-process store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import event, insert, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.orm import selectinload, sessionmaker

from sa_cache import CachingSession, IdentityCache, codec
from sa_cache.eager import plan

from .conftest import another_process
from .counting import RedisCounter, SQLCounter, expect_commands, expect_sql
from .entries import entry_kind
from .models_eager import (
    CACHED,
    Ability,
    Board,
    Book,
    Node,
    Note,
    Post,
    Role,
    Shelf,
    Tag,
    User,
    ensure_tables,
    role_abilities,
)

Read = Callable[[Any], Any]


@pytest.fixture
def eager(engine: Engine, cache: IdentityCache) -> Iterator[None]:
    ensure_tables(engine)
    for model in CACHED:
        cache.register(model)
    yield


@pytest.fixture
def plain(engine: Engine) -> sessionmaker[PlainSession]:
    return sessionmaker(engine)


def _path(state: Any) -> list[str]:
    return [
        element.class_.__name__ if hasattr(element, "class_") else element.key
        for element in state.load_path.path
    ]


def graph(root: Any) -> list[Any]:
    """Everything a load left reachable from ``root`` without loading anything more."""
    if root is None:
        return []
    found: dict[Any, Any] = {}
    todo = [root]
    while todo:
        instance = todo.pop(0)
        state = inspect(instance)
        if state.key in found:
            continue
        loaded: dict[str, Any] = {}
        for rel in state.mapper.relationships:
            if rel.key in state.dict:
                value = state.dict[rel.key]
                members = list(value) if rel.uselist else ([] if value is None else [value])
                loaded[rel.key] = [inspect(m).identity for m in members]
                todo.extend(members)
        found[state.key] = (
            type(instance).__name__,
            state.identity,
            sorted(state.unloaded),
            _path(state),
            len(state.load_options),
            sorted(loaded.items()),
        )
    return sorted(found.values(), key=repr)


def outcome(factory: Callable[[], Any], read: Read) -> Any:
    with factory() as session:
        return read(session)


def agree(plain: Any, cached: Any, read: Read) -> Any:
    """The plain answer, after checking the cache's cold and warm answers are the same."""
    expected = outcome(plain, read)
    assert outcome(cached, read) == expected, "cold"
    assert outcome(cached, read) == expected, "warm"
    return expected


def settle(factory: Callable[[], Any], read: Read, sql: SQLCounter, runs: int = 12) -> None:
    """Run ``read`` until a run costs no SQL: each run's hit loads from the database the
    collections the cache lacks, which fills them (under MariaDB's REPEATABLE READ, one level
    per run: see tests/test_relationships.py)."""
    for _ in range(runs):
        sql.reset()
        outcome(factory, read)
        if not sql.statements:
            return
    raise AssertionError(f"still {sql.statements} after {runs} runs")


def get(model: Any, pk: int, **kw: Any) -> Read:
    return lambda s: graph(s.get(model, pk, **kw))


def seed(Session: Any) -> None:  # noqa: N803
    """Users 1 (roles 1, 2), 2 (role 2), 3 (none); role 1 (created by user 3) has abilities 1,
    2, role 2 ability 3;
    board 1 with posts 1 (by user 1), 2 (no author), notes 1, 2 and tag 1; board 2 empty; a
    tree of nodes 1 > 2 > 3 > 4; shelf 1 with books 1, 2."""
    with Session() as s:
        a1, a2 = Ability(id=1, name="read"), Ability(id=2, name="write")
        a3 = Ability(id=3, name="a")
        r1 = Role(id=1, name="admin", abilities=[a1, a2], creator_id=3)
        r2 = Role(id=2, name="staff", abilities=[a3])
        s.add(User(id=3, name="u3"))
        s.flush()
        s.add_all([User(id=1, name="u1", roles=[r2, r1]), User(id=2, name="u2", roles=[r2])])
        s.add(Board(id=1, name="b1", notes=[Note(id=1), Note(id=2)], tags=[Tag(id=1)]))
        s.add(Board(id=2, name="b2"))
        s.flush()
        s.add_all([Post(id=1, board_id=1, author_id=1), Post(id=2, board_id=1)])
        s.add(Node(id=1, children=[Node(id=2, children=[Node(id=3, children=[Node(id=4)])])]))
        s.add(Shelf(id=1))
        s.flush()
        s.add_all([Book(id=1, shelf_id=1), Book(id=2, shelf_id=1)])
        s.commit()


# -- what a hit loads -----------------------------------------------------------------------------


@pytest.mark.usefixtures("eager")
def test_a_warm_get_loads_two_selectin_levels_from_the_cache_in_three_round_trips(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    sql: SQLCounter,
    redis_counter: RedisCounter,
) -> None:
    seed(Session)
    expected = agree(plain, Session, get(User, 1))
    settle(Session, get(User, 1), sql)
    before = cache.stats()["models"]
    # the user; the roles' collection with their rows; both roles' abilities' collections with
    # their rows (a level's collections and the rows of the members this process last saw in
    # them are read together)
    with (
        Session() as s,
        expect_sql(sql, 0),
        expect_commands(redis_counter, {"MGET": 3}, round_trips=3),
    ):
        user = s.get(User, 1)
        assert graph(user) == expected
        assert inspect(user).load_path.path == (inspect(User),)
    after = cache.stats()["models"]
    assert after["User.roles"]["hits"] == before["User.roles"]["hits"] + 1
    assert after["Role.abilities"]["hits"] == before["Role.abilities"]["hits"] + 2
    assert after["Role.users"]["hits"] == before["Role.users"]["hits"]  # a cycle: not loaded


@pytest.mark.usefixtures("eager")
def test_joined_subquery_immediate_and_a_joined_many_to_one_load_from_the_cache(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
    redis_counter: RedisCounter,
) -> None:
    seed(Session)
    expected = agree(plain, Session, get(Board, 1))
    assert ("Post", (2,), [], ["Board", "posts", "Post"], 0, [("author", [])]) in expected
    settle(Session, get(Board, 1), sql)
    # the board; its three collections with their rows; the author; the author's roles'
    # collection with their rows; the roles' abilities' collections with their rows
    with (
        Session() as s,
        expect_sql(sql, 0),
        expect_commands(redis_counter, {"MGET": 5}, round_trips=5),
    ):
        assert graph(s.get(Board, 1)) == expected


def add_role_1_to_user_2(s: Any) -> Any:
    user = s.get(User, 2)
    user.roles.append(s.get(Role, 1))
    return user


def remove_role_1_from_user_1(s: Any) -> Any:
    user = s.get(User, 1)
    user.roles = [r for r in user.roles if r.id != 1]
    return user


def rename_ability_3(s: Any) -> Any:
    ability = s.get(Ability, 3)
    ability.name = "renamed"
    return ability


#: what another process commits after this one's guesses were made, and the get it changes
GUESS_CHANGES = {
    "a member added": (add_role_1_to_user_2, get(User, 2)),
    "a member removed": (remove_role_1_from_user_1, get(User, 1)),
    "a member's row changed": (rename_ability_3, get(User, 1)),
}


@pytest.mark.usefixtures("eager")
@pytest.mark.parametrize("change", list(GUESS_CHANGES))
def test_the_members_last_seen_choose_which_rows_a_level_reads_never_what_it_answers(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    engine: Engine,
    cache: IdentityCache,
    sql: SQLCounter,
    change: str,
) -> None:
    write, read = GUESS_CHANGES[change]
    seed(Session)
    for warm in (get(User, 1), get(User, 2)):
        settle(Session, warm, sql)
    other = sessionmaker(engine, class_=CachingSession, cache=another_process(cache, CACHED))
    with other() as s:  # committed elsewhere, after this process's guesses were made
        changed = write(s)
        s.commit()
    assert changed is not None
    settle(other, read, sql)  # and cached again there: this process's guesses are now wrong
    assert agree(plain, Session, read) == outcome(plain, read)


@pytest.mark.usefixtures("eager")
def test_rows_a_level_read_along_for_a_collection_that_then_misses_are_not_filled_by_its_load(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    engine: Engine,
    cache: IdentityCache,
    sql: SQLCounter,
) -> None:
    seed(Session)
    settle(Session, get(User, 2), sql)  # this process's guess of user 2's roles: role 2
    other = sessionmaker(engine, class_=CachingSession, cache=another_process(cache, CACHED))
    with other() as s:  # the list and role 2's row evicted elsewhere
        changed = add_role_1_to_user_2(s), s.get(Role, 2)
        changed[1].name = "renamed"
        s.commit()
    expected = outcome(plain, get(User, 2))
    with Session() as s:
        assert graph(s.get(User, 2)) == expected  # the list missed: SQLAlchemy loads it
        assert s._sa_cache is not None and s._sa_cache.pending == {}
    # role 2's row was read along (a tombstone) for nothing: the load that followed does not
    # fill it (only rows a read needed are filled), exactly as without the guess
    assert entry_kind(cache, Role, 2) is codec.Tombstone


@pytest.mark.usefixtures("eager")
def test_empty_collections_and_a_parent_without_relationships_loaded(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    seed(Session)
    for read in (get(Board, 2), get(User, 3), get(Ability, 1)):
        agree(plain, Session, read)
        settle(Session, read, sql)
        assert outcome(Session, read) == outcome(plain, read)


@pytest.mark.usefixtures("eager")
def test_a_noload_relationship_is_set_empty_by_a_hit_as_a_load_sets_it(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    seed(Session)
    for read in (get(Shelf, 1), get(Book, 1)):
        expected = agree(plain, Session, read)
        assert expected[0][2] == []  # nothing unloaded: a shelf's books empty, a book's shelf None
        with expect_sql(sql, 0):
            assert outcome(Session, read) == expected


@pytest.mark.usefixtures("eager")
def test_a_self_referential_tree_stops_at_its_join_depth_as_a_load_does(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    seed(Session)
    expected = agree(plain, Session, get(Node, 1))
    loaded = {identity: rels for _, identity, _, _, _, rels in expected}
    assert loaded[(1,)] == [("children", [(2,)])] and loaded[(3,)] == []  # two levels
    settle(Session, get(Node, 1), sql)
    with Session() as s, expect_sql(sql, 0):
        assert graph(s.get(Node, 1)) == expected


# -- what the cache lacks -------------------------------------------------------------------------


@pytest.mark.usefixtures("eager")
def test_a_collection_the_cache_lacks_is_loaded_alone_from_the_database(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    sql: SQLCounter,
) -> None:
    seed(Session)
    expected = outcome(plain, get(User, 1))
    settle(Session, get(User, 1), sql)
    cache.evict_collection(Role, "abilities", 2)
    with Session() as s, expect_sql(sql, selects=1):  # role 2's abilities, and nothing else
        assert graph(s.get(User, 1)) == expected
    settle(Session, get(User, 1), sql)


@pytest.mark.usefixtures("eager")
def test_a_member_row_the_cache_lacks_sends_its_collection_to_the_database(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    sql: SQLCounter,
) -> None:
    seed(Session)
    expected = outcome(plain, get(User, 1))
    settle(Session, get(User, 1), sql)
    cache.evict(Role, 2)
    # the roles' lazy load, whose own load runs the roles' selectin abilities: never part of a
    # collection from the cache
    with Session() as s, expect_sql(sql, selects=2):
        assert graph(s.get(User, 1)) == expected


@pytest.mark.usefixtures("eager")
def test_a_committed_membership_change_is_seen_by_the_next_hit(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    seed(Session)
    settle(Session, get(User, 1), sql)
    settle(Session, get(Board, 1), sql)
    with Session() as s:
        role = s.get(Role, 2)
        role.abilities.append(s.get(Ability, 1))
        s.get(Board, 1).posts[1].author_id = 2
        s.add(Tag(id=2, board_id=1))
        s.commit()
    for read in (get(User, 1), get(Board, 1)):
        agree(plain, Session, read)


@pytest.mark.usefixtures("eager")
def test_a_membership_change_committed_during_a_hits_refresh_is_never_hidden_by_its_fill(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    engine: Engine,
    db: str,
) -> None:
    if db == "sqlite":
        pytest.skip("the reader's open cursor holds SQLite's lock: the writer cannot commit")
    seed(Session)
    outcome(Session, get(Board, 2))  # the board's row is cached, its joined posts are not
    changed: list[bool] = []

    def commit_a_change(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # right after the hit's refresh of board 2 (its joined posts) ran, before its fill
        if changed or "LEFT OUTER JOIN eager_posts" not in statement:
            return
        changed.append(True)
        with Session() as other:
            other.add(Post(id=3, board_id=2))
            other.commit()

    event.listen(engine, "after_cursor_execute", commit_a_change)
    try:
        with Session() as s:
            assert s.get(Board, 2).posts == []  # what the refresh saw: the old membership
    finally:
        event.remove(engine, "after_cursor_execute", commit_a_change)
    assert changed
    loaded = {
        i: rels for name, i, *_, rels in agree(plain, Session, get(Board, 2)) if name == "Board"
    }
    assert ("posts", [(3,)]) in loaded[(2,)]


@pytest.mark.usefixtures("eager")
def test_a_transactions_own_core_write_to_a_link_table_is_read_from_the_database(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    seed(Session)
    settle(Session, get(User, 1), sql)

    def read(s: Any) -> Any:
        s.execute(insert(role_abilities).values(role_id=1, ability_id=3))
        found = graph(s.get(User, 1))
        s.rollback()
        return found

    expected = agree(plain, Session, read)
    loaded = {identity: rels for name, identity, _, _, _, rels in expected if name == "Role"}
    assert loaded[(1,)] == [("abilities", [(1,), (2,), (3,)]), ("creator", [(3,)])]
    assert agree(plain, Session, get(User, 1)) == outcome(plain, get(User, 1))


@pytest.mark.usefixtures("eager")
def test_query_get_completes_a_hit_as_session_get_does(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    seed(Session)

    def read(s: Any) -> Any:
        return graph(s.query(Board).get(1))

    expected = agree(plain, Session, read)
    settle(Session, read, sql)
    with Session() as s, expect_sql(sql, 0):
        assert read(s) == expected


@pytest.mark.usefixtures("eager")
def test_loader_options_on_a_get_are_not_answered_from_the_cache(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    sql: SQLCounter,
) -> None:
    seed(Session)
    settle(Session, get(User, 1), sql)
    read = get(User, 1, options=[selectinload(User.roles).selectinload(Role.users)])
    skipped = cache.stats()["models"]["User"]["skipped"]
    assert agree(plain, Session, read) == outcome(plain, read)
    assert cache.stats()["models"]["User"]["skipped"] == skipped + 2


@pytest.mark.usefixtures("eager")
def test_instances_already_in_the_session_are_taken_as_they_are(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    seed(Session)
    settle(Session, get(User, 1), sql)

    def read(s: Any) -> Any:
        role = s.get(Role, 2)
        return graph(s.get(User, 1)), graph(role)

    assert agree(plain, Session, read) == outcome(plain, read)


def test_the_plan_of_a_mapper_names_how_each_eager_relationship_is_served(
    engine: Engine, cache: IdentityCache
) -> None:
    ensure_tables(engine)
    for model in CACHED:
        cache.register(model)
    steps = {step.key: step for step in plan(cache.registry, inspect(Board))}
    assert set(steps) == {"posts", "notes", "tags"}
    assert all(step.collection is not None for step in steps.values())
    (author,) = plan(cache.registry, inspect(Post))
    assert author.collection is None and author.row is not None
    assert author.fk_attrs == ("author_id",)
    assert plan(cache.registry, inspect(Ability)) == ()
