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
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    Load,
    defaultload,
    immediateload,
    joinedload,
    lazyload,
    load_only,
    noload,
    raiseload,
    selectinload,
    sessionmaker,
    subqueryload,
    with_loader_criteria,
)
from sqlalchemy.orm import Session as PlainSession

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
    LazyAbility,
    LazyRole,
    LazyUser,
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


def _cache_key(option: Any) -> Any:
    key = option._generate_cache_key()
    return None if key is None else key.key


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
            # an attribute with a lazy loader of the instance's own (``raiseload``...) marked
            sorted(f"{key}:own" if key in state.callables else key for key in state.unloaded),
            _path(state),
            # the options, by SQLAlchemy's own identity for them: a load records the equal
            # options of the statement its compiled cache holds, which may be another's
            tuple(_cache_key(o) for o in state.load_options),
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


def agree_warm(plain: Any, cached: Any, read: Read, sql: SQLCounter) -> Any:
    """:func:`agree`, then :func:`settle`, then the warm answer again, with no SQL."""
    expected = agree(plain, cached, read)
    settle(cached, read, sql)
    with cached() as s, expect_sql(sql, 0):
        assert read(s) == expected
    return expected


def get(model: Any, pk: int, **kw: Any) -> Read:
    return lambda s: graph(s.get(model, pk, **kw))


def seed(Session: Any) -> None:  # noqa: N803
    """Users 1 (roles 1, 2), 2 (role 2), 3 (none); role 1 (created by user 3) has abilities 1,
    2, role 2 ability 3;
    board 1 with posts 1 (by user 1), 2 (no author), notes 1, 2 and tag 1; board 2 empty; a
    tree of nodes 1 > 2 > 3 > 4; shelf 1 with books 1, 2; the same users, roles and abilities
    as ``Lazy*``."""
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
        s.add(LazyUser(id=3, name="u3"))
        s.flush()
        la1, la2, la3 = (LazyAbility(id=i, name=f"a{i}") for i in (1, 2, 3))
        lr1 = LazyRole(id=1, name="admin", abilities=[la1, la2], creator_id=3)
        lr2 = LazyRole(id=2, name="staff", abilities=[la3])
        s.add_all(
            [LazyUser(id=1, name="u1", roles=[lr2, lr1]), LazyUser(id=2, roles=[lr2], name="u2")]
        )
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
    assert ("Post", (2,), [], ["Board", "posts", "Post"], (), [("author", [])]) in expected
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

    agree_warm(plain, Session, read, sql)


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


# -- loader options -------------------------------------------------------------------------------

#: the roles-and-abilities request on lazy mappings, asked for by options
ROLES_AND_ABILITIES = [selectinload(LazyUser.roles).selectinload(LazyRole.abilities)]

#: option sets a hit carries out, each with the class and key it is given to
SERVED: dict[str, tuple[Any, int, list[Any]]] = {
    "selectinload chain": (LazyUser, 1, ROLES_AND_ABILITIES),
    "Load(...).selectinload": (
        LazyUser,
        1,
        [Load(LazyUser).selectinload(LazyUser.roles).selectinload(LazyRole.abilities)],
    ),
    "joinedload chain": (LazyUser, 1, [joinedload(LazyUser.roles).joinedload(LazyRole.abilities)]),
    "subqueryload, then selectinload": (
        LazyUser,
        1,
        [subqueryload(LazyUser.roles).selectinload(LazyRole.abilities)],
    ),
    "immediateload, then a joined many-to-one": (
        LazyUser,
        1,
        [immediateload(LazyUser.roles).joinedload(LazyRole.creator)],
    ),
    "an option at a cycle loads it": (
        LazyUser,
        1,
        [selectinload(LazyUser.roles).selectinload(LazyRole.users)],
    ),
    "two options, one under a defaultload": (
        LazyUser,
        1,
        [selectinload(LazyUser.roles), defaultload(LazyUser.roles).selectinload(LazyRole.creator)],
    ),
    "lazyload over a mapped selectin": (User, 1, [lazyload(User.roles)]),
    "noload over a mapped selectin": (User, 1, [noload(User.roles)]),
    "raiseload under a mapped selectin": (
        User,
        1,
        [defaultload(User.roles).raiseload(Role.abilities)],
    ),
    "raiseload(sql_only) at the root": (User, 1, [raiseload(User.roles, sql_only=True)]),
    "an option at a mapped cycle": (User, 1, [selectinload(User.roles).selectinload(Role.users)]),
    "options on a mapped joined collection": (
        Board,
        1,
        [joinedload(Board.posts).selectinload(Post.author).noload(User.roles)],
    ),
}


@pytest.mark.usefixtures("eager")
@pytest.mark.parametrize("name", list(SERVED))
def test_a_get_with_loader_options_is_answered_from_the_cache_as_its_load_would_be(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    sql: SQLCounter,
    name: str,
) -> None:
    model, pk, options = SERVED[name]
    seed(Session)
    read = get(model, pk, options=options)
    expected = agree(plain, Session, read)
    settle(Session, read, sql)
    before = cache.stats()["models"][model.__name__]
    with Session() as s, expect_sql(sql, 0):
        assert read(s) == expected
    after = cache.stats()["models"][model.__name__]
    assert after["skipped"] == before["skipped"]
    assert after["hits"] > before["hits"]  # (a many-to-one's target of the class counts too)


@pytest.mark.usefixtures("eager")
def test_the_roles_and_abilities_chain_by_options_costs_what_the_mapped_selectin_chain_costs(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    sql: SQLCounter,
    redis_counter: RedisCounter,
) -> None:
    seed(Session)
    read = get(LazyUser, 1, options=ROLES_AND_ABILITIES)
    expected = agree(plain, Session, read)
    settle(Session, read, sql)
    before = cache.stats()["models"]
    # the user; the roles' collection with their rows; both roles' abilities' collections with
    # their rows: as test_a_warm_get_loads_two_selectin_levels_from_the_cache_in_three_round_trips
    with (
        Session() as s,
        expect_sql(sql, 0),
        expect_commands(redis_counter, {"MGET": 3}, round_trips=3),
    ):
        user = s.get(LazyUser, 1, options=ROLES_AND_ABILITIES)
        assert graph(user) == expected
        assert inspect(user).load_options == tuple(ROLES_AND_ABILITIES)
    after = cache.stats()["models"]
    assert after["LazyUser.roles"]["hits"] == before["LazyUser.roles"]["hits"] + 1
    assert after["LazyRole.abilities"]["hits"] == before["LazyRole.abilities"]["hits"] + 2


@pytest.mark.usefixtures("eager")
def test_query_options_get_is_answered_from_the_cache_as_session_get_with_options(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    seed(Session)

    def read(s: Any) -> Any:
        return graph(s.query(LazyUser).options(*ROLES_AND_ABILITIES).get(1))

    agree_warm(plain, Session, read, sql)


@pytest.mark.usefixtures("eager")
def test_raiseload_and_noload_leave_a_hit_as_they_leave_a_load(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    seed(Session)
    options = [
        selectinload(LazyUser.roles).raiseload(LazyRole.abilities),
        defaultload(LazyUser.roles).noload(LazyRole.users),
    ]

    def read(s: Any) -> Any:
        user = s.get(LazyUser, 1, options=options)
        found = graph(user)
        role = user.roles[0]
        with pytest.raises(sa_exc.InvalidRequestError, match="abilities"):
            role.abilities  # noqa: B018
        return found, role.users, "users" in inspect(role).dict

    expected = agree_warm(plain, Session, read, sql)
    assert expected[1:] == ([], True)


@pytest.mark.usefixtures("eager")
def test_a_lazy_load_from_an_instance_loaded_with_options_follows_them_from_the_cache(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    sql: SQLCounter,
    redis_counter: RedisCounter,
) -> None:
    seed(Session)
    by_user = [defaultload(LazyUser.roles).selectinload(LazyRole.abilities)]
    by_role = [defaultload(LazyRole.creator).selectinload(LazyUser.roles)]
    from_user = [
        selectinload(LazyUser.roles).defaultload(LazyRole.creator).selectinload(LazyUser.roles)
    ]

    def roles(s: Any) -> Any:
        user = s.get(LazyUser, 1, options=by_user)
        user.roles  # noqa: B018  a lazy collection load carrying the user's options
        return graph(user)

    def creator(s: Any) -> Any:
        role = s.get(LazyRole, 1, options=by_role)
        role.creator  # noqa: B018  a lazy many-to-one load carrying the role's options
        return graph(role)

    def deeper(s: Any) -> Any:
        user = s.get(LazyUser, 1, options=from_user)
        user.roles[0].creator  # noqa: B018  along the role's load path, from the user
        return graph(user)

    # the user; its roles' list with their rows; their abilities' lists with their rows | the
    # role; its creator's row; the creator's (empty) roles' list | the user; its roles' list with
    # their rows; the first role's creator's row; the creator's (empty) roles' list (a list and
    # the rows of the members this process last saw in it are read together)
    round_trips = {roles: 3, creator: 3, deeper: 4}
    for read in (roles, creator, deeper):
        expected = agree(plain, Session, read)
        settle(Session, read, sql)
        before = cache.stats()["models"]
        with (
            Session() as s,
            expect_sql(sql, 0),
            expect_commands(
                redis_counter, {"MGET": round_trips[read]}, round_trips=round_trips[read]
            ),
        ):
            assert read(s) == expected
        after = cache.stats()["models"]
        for name in ("LazyUser.roles", "LazyUser", "LazyRole"):
            assert after[name]["skipped"] == before[name]["skipped"]
        # user 1's roles, by the lazy load or a selectin; the creator's (empty) roles
        served = {roles: 1, creator: 1, deeper: 2}[read]
        assert after["LazyUser.roles"]["hits"] == before["LazyUser.roles"]["hits"] + served


#: options a hit cannot carry out: the load goes to the database, counted as skipped
SKIPPED: dict[str, list[Any]] = {
    "criteria": [selectinload(LazyUser.roles.and_(LazyRole.id > 1))],
    "a wildcard": [selectinload("*")],
    "load_only on a target": [selectinload(LazyUser.roles).load_only(LazyRole.name)],
    "load_only at the root": [load_only(LazyUser.name)],
    "innerjoin": [joinedload(LazyUser.roles, innerjoin=True)],
    "subqueryload below the first level": [
        defaultload(LazyUser.roles).subqueryload(LazyRole.abilities)
    ],
    "with_loader_criteria": [with_loader_criteria(LazyRole, LazyRole.id > 1)],
}


@pytest.mark.usefixtures("eager")
@pytest.mark.parametrize("name", list(SKIPPED))
def test_options_a_hit_cannot_carry_out_are_loaded_by_the_database_and_counted(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    sql: SQLCounter,
    name: str,
) -> None:
    seed(Session)
    settle(Session, get(LazyUser, 1), sql)
    read = get(LazyUser, 1, options=SKIPPED[name])
    skipped = cache.stats()["models"]["LazyUser"]["skipped"]
    assert agree(plain, Session, read) == outcome(plain, read)
    assert cache.stats()["models"]["LazyUser"]["skipped"] == skipped + 2


@pytest.mark.usefixtures("eager")
def test_noload_and_raiseload_reach_the_unloaded_attributes_of_instances_the_session_holds(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    seed(Session)
    options = [
        selectinload(LazyUser.roles).noload(LazyRole.abilities),
        defaultload(LazyUser.roles).raiseload(LazyRole.users),
    ]

    def read(s: Any) -> Any:
        held = s.get(LazyRole, 2)  # its unloaded attributes get them too, as a load's do
        held.creator  # noqa: B018  loaded: kept
        return graph(s.get(LazyUser, 1, options=options)), graph(held)

    expected = agree(plain, Session, read)
    roles = {
        i: (unloaded, rels) for name, i, unloaded, _, _, rels in expected[0] if name == "LazyRole"
    }
    assert roles[(1,)] == (["creator", "users:own"], [("abilities", [])])  # created
    assert roles[(2,)] == (["users:own"], [("abilities", []), ("creator", [])])  # held
    settle(Session, read, sql)
    with Session() as s, expect_sql(sql, 0):
        assert read(s) == expected


@pytest.mark.usefixtures("eager")
def test_a_held_instance_reached_by_a_hit_with_options_loads_its_children_with_them(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    seed(Session)

    def read(s: Any) -> Any:
        held = s.get(LazyRole, 1)  # loaded without options
        return graph(s.get(LazyUser, 1, options=ROLES_AND_ABILITIES)), graph(held)

    agree_warm(plain, Session, read, sql)
