"""Cached relationship collections (issue 13, part 1): a lazy load of a collection is answered
from the cache as the list of its targets' primary keys, hydrated through the row cache, and
every change to its membership made through a session evicts it at commit.

Each scenario is differential: the same read through a plain session and through the cache,
cold and warm, must agree (the members, in order), on SQLite, PostgreSQL and MariaDB, with Redis
and the in-process store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import delete, event, insert, inspect, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.orm import defer, sessionmaker

from sa_cache import CachingSession, IdentityCache, codec
from sa_cache.errors import CacheError, NotRegistered
from sa_cache.relationships import CollectionEntry, uncacheable

from .conftest import CacheFactory, another_process
from .counting import RedisCounter, SQLCounter, expect_commands, expect_sql
from .entries import entry_kind, raw_entry
from .models_relationships import (
    CACHED,
    Ability,
    Board,
    Engineer,
    Line,
    Member,
    Node,
    Order,
    Post,
    Product,
    Role,
    Team,
    Worker,
    ensure_tables,
    user_roles,
)

Read = Callable[[Any], Any]


@pytest.fixture
def rel(engine: Engine, cache: IdentityCache) -> Iterator[None]:
    ensure_tables(engine)
    for model in CACHED:
        cache.register(model)
    yield


@pytest.fixture
def plain(engine: Engine) -> sessionmaker[PlainSession]:
    return sessionmaker(engine)


def names(objects: Any) -> list[Any]:
    """A collection as the test compares it: each member's class and primary key, in order."""
    return [(type(o).__name__, inspect(o).identity) for o in objects]


def outcome(factory: Callable[[], Any], read: Read) -> Any:
    with factory() as session:
        return read(session)


def agree(plain: Any, cached: Any, read: Read) -> Any:
    """The plain answer, after checking the cache's cold and warm answers are the same."""
    expected = outcome(plain, read)
    assert outcome(cached, read) == expected, "cold"
    assert outcome(cached, read) == expected, "warm"
    return expected


def settle(factory: Callable[[], Any], read: Read, sql: SQLCounter, runs: int = 10) -> None:
    """Run ``read`` until a run costs no SQL. Under MariaDB's REPEATABLE READ a miss after the
    transaction's first SELECT fills only what the store's clock proves no older than the
    snapshot (docs/protocol.md): rows first loaded by a collection's SELECT inside a snapshot
    are not filled, so a request warms one level of collections per run, never in more than
    ``runs``; elsewhere the first run is already free."""
    for _ in range(runs):
        sql.reset()
        outcome(factory, read)
        if not sql.statements:
            return
    raise AssertionError(f"still {sql.statements} after {runs} runs")


def seed(Session: Any) -> None:  # noqa: N803
    """Three members: 1 has roles 1 and 2, 2 has role 2, 3 none; role 1 has abilities 1 and 2,
    role 2 has ability 3."""
    with Session() as s:
        a1, a2 = Ability(id=1, name="read"), Ability(id=2, name="write")
        a3 = Ability(id=3, name="a")
        r1 = Role(id=1, name="admin", abilities=[a1, a2])
        r2 = Role(id=2, name="staff", abilities=[a3])
        s.add_all([Member(id=1, name="m1", roles=[r2, r1]), Member(id=2, name="m2", roles=[r2])])
        s.add(Member(id=3, name="m3"))
        s.commit()


def roles_and_abilities(s: Any) -> Any:
    """The issue's request: a user, the user's roles, every role's abilities."""
    member = s.get(Member, 1)
    return [(role.name, [a.name for a in role.abilities]) for role in member.roles]


def roles_of(pk: int) -> Read:
    return lambda s: names(s.get(Member, pk).roles)


def users_of(pk: int) -> Read:
    return lambda s: names(s.get(Role, pk).users)


def posts_of(pk: int) -> Read:
    return lambda s: names(s.get(Board, pk).posts)


# -- reads ----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("rel")
def test_a_warm_request_reads_roles_and_abilities_with_no_sql(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    sql: SQLCounter,
    redis_counter: RedisCounter,
) -> None:
    seed(Session)
    expected = agree(plain, Session, roles_and_abilities)
    assert expected == [("admin", ["read", "write"]), ("staff", ["a"])]  # in order
    settle(Session, roles_and_abilities, sql)
    before = cache.stats()["models"]
    # the member: 1 round trip; each collection: 1, its list and its rows' values read together
    with (
        Session() as s,
        expect_sql(sql, 0),
        expect_commands(redis_counter, {"MGET": 4}, round_trips=4),
    ):
        assert roles_and_abilities(s) == expected
    after = cache.stats()["models"]
    assert after["Member.roles"]["hits"] == before["Member.roles"]["hits"] + 1
    assert after["Role.abilities"]["hits"] == before["Role.abilities"]["hits"] + 2


@pytest.mark.usefixtures("rel")
def test_a_warm_collection_and_its_rows_are_read_in_one_round_trip_once_the_process_saw_it(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    engine: Engine,
    cache: IdentityCache,
    sql: SQLCounter,
    redis_counter: RedisCounter,
) -> None:
    seed(Session)
    settle(Session, roles_of(1), sql)
    expected = outcome(plain, roles_of(1))
    with Session() as s:
        member = s.get(Member, 1)
        with expect_sql(sql, 0), expect_commands(redis_counter, {"MGET": 1}, round_trips=1):
            assert names(member.roles) == expected
    # a process that never saw the collection reads its list, then the rows it names; then one
    fresh = sessionmaker(engine, class_=CachingSession, cache=another_process(cache, CACHED))
    for round_trips in (2, 1):
        with fresh() as s:
            member = s.get(Member, 1)
            with expect_sql(sql, 0), expect_commands(redis_counter, round_trips=round_trips):
                assert names(member.roles) == expected


# each returns what it changed: the session holds its instances weakly until the commit


def add_role_3(s: Any) -> Any:
    member = s.get(Member, 1)
    member.roles.append(s.get(Role, 3))
    return member


def remove_role_1(s: Any) -> Any:
    member = s.get(Member, 1)
    member.roles.remove(s.get(Role, 1))
    return member


def replace_roles(s: Any) -> Any:
    member = s.get(Member, 1)
    member.roles = [s.get(Role, 3)]
    return member


def rename_role_1(s: Any) -> Any:
    role = s.get(Role, 1)
    role.name = "renamed"
    return role


def roles_named(read: Callable[[Any], Any]) -> Read:
    return lambda s: [(role.id, role.name) for role in read(s)]


#: Member.roles names its members (a membership change evicts the list); Ability.roles is
#: unordered, so a role's new name evicts only the role's row: the list still names it
GUESS_CHANGES = {
    "a member added": (add_role_3, Member.roles),
    "a member removed": (remove_role_1, Member.roles),
    "every member replaced": (replace_roles, Member.roles),
    "a member's row changed": (rename_role_1, Ability.roles),
}


@pytest.mark.usefixtures("rel")
@pytest.mark.parametrize("change", list(GUESS_CHANGES))
def test_the_members_last_seen_choose_which_rows_are_read_never_what_is_answered(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    engine: Engine,
    cache: IdentityCache,
    sql: SQLCounter,
    change: str,
) -> None:
    write, roles = GUESS_CHANGES[change]
    read = roles_named(lambda s: s.get(roles.class_, 1).roles)
    seed(Session)
    with Session() as s:
        s.add(Role(id=3, name="guest"))
        s.commit()
    settle(Session, read, sql)
    assert outcome(Session, read) == outcome(plain, read)
    kind = cache.registry.relationship_kind(roles.property)
    assert kind is not None and kind.guesses.guess((1,)) == [(r[0],) for r in outcome(plain, read)]
    other = sessionmaker(engine, class_=CachingSession, cache=another_process(cache, CACHED))
    with other() as s:  # committed elsewhere, after this process's guess was made
        changed = write(s)
        s.commit()
    assert changed is not None
    settle(other, read, sql)  # and cached again there: this process's guess is now wrong
    assert agree(plain, Session, read) == outcome(plain, read)


@pytest.mark.usefixtures("rel")
def test_a_collection_this_process_evicted_reads_with_its_lease_not_its_guess(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
    redis_counter: RedisCounter,
    db: str,
) -> None:
    """A miss is forecast (sa_cache.forecast): its read takes the lease in its round trip, rows
    read along would serve nothing; the fill remembers the members for the next read."""
    seed(Session)
    with Session() as s:
        s.add(Role(id=3, name="guest"))
        s.commit()
    settle(Session, roles_of(1), sql)
    with Session() as s:
        changed = add_role_3(s)
        s.commit()  # this process writes the list's tombstone
    assert changed
    expected = outcome(plain, roles_of(1))
    leased_miss = {"MGET": 1, "SET": 1, "EVALSHA": 2} | ({"TIME": 1} if db == "mariadb" else {})
    with Session() as s:
        member = s.get(Member, 1)
        with expect_sql(sql, selects=1), expect_commands(redis_counter, leased_miss, round_trips=2):
            assert names(member.roles) == expected
    with Session() as s:
        member = s.get(Member, 1)
        with expect_sql(sql, 0), expect_commands(redis_counter, {"MGET": 1}, round_trips=1):
            assert names(member.roles) == expected


@pytest.mark.usefixtures("rel")
def test_rows_read_along_for_a_collection_that_then_misses_are_neither_counted_nor_filled(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    engine: Engine,
    cache: IdentityCache,
    sql: SQLCounter,
) -> None:
    seed(Session)
    with Session() as s:
        s.add(Role(id=3, name="guest"))
        s.commit()
    settle(Session, roles_of(1), sql)
    other = sessionmaker(engine, class_=CachingSession, cache=another_process(cache, CACHED))
    with other() as s:  # the list and role 1's row evicted elsewhere
        changed = add_role_3(s), rename_role_1(s)
        s.commit()
    assert changed
    expected = outcome(plain, roles_of(1))
    before = cache.stats()["models"]["Role"]
    with Session() as s:
        member = s.get(Member, 1)
        with expect_sql(sql, selects=1):  # the list missed: its SELECT, which loads role 1
            assert names(member.roles) == expected
        assert s._sa_cache is not None and s._sa_cache.pending == {}
    # role 1's row was read along (a tombstone) for nothing: not a miss, and the collection's
    # SELECT does not fill it (it fills only rows a read needed), exactly as without the guess
    assert cache.stats()["models"]["Role"] == before
    assert entry_kind(cache, Role, 1) is codec.Tombstone
    with Session() as s:  # a later lookup of the row misses and fills it as ever
        assert s.get(Role, 1).name == "renamed"
    assert entry_kind(cache, Role, 1) is codec.RowEntry


@pytest.mark.usefixtures("rel")
def test_a_collection_is_stored_as_its_targets_primary_keys_never_as_rows(
    Session: sessionmaker[CachingSession],  # noqa: N803
    cache: IdentityCache,
    sql: SQLCounter,
) -> None:
    seed(Session)
    settle(Session, roles_of(1), sql)
    kind = cache.registry.relationship_kind(Member.roles.property)
    assert kind is not None
    key = kind.keys.row_key((1,))
    assert key == f"{cache.prefix}:{{rel:rel_users.Member.roles:1}}"
    raw = raw_entry(cache, key)
    entry = codec.decode(raw or b"")
    assert type(entry) is CollectionEntry
    assert entry.targets == [[1], [2]]  # in order; the names of the roles are not in it
    assert b"admin" not in (raw or b"") and b"staff" not in (raw or b"")


@pytest.mark.usefixtures("rel")
def test_collections_of_instances_already_in_the_session_cost_one_round_trip(
    Session: sessionmaker[CachingSession],  # noqa: N803
    sql: SQLCounter,
    redis_counter: RedisCounter,
) -> None:
    seed(Session)
    settle(Session, roles_and_abilities, sql)
    with Session() as s:
        held = [s.get(Role, 1), s.get(Role, 2)]  # the identity map holds them weakly
        member = s.get(Member, 1)
        with expect_sql(sql, 0), expect_commands(redis_counter, {"MGET": 1}, round_trips=1):
            assert member.roles == held


@pytest.mark.usefixtures("rel")
def test_an_empty_collection_is_cached_too(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    seed(Session)
    assert agree(plain, Session, roles_of(3)) == []
    settle(Session, roles_of(3), sql)
    with Session() as s:
        member = s.get(Member, 3)
        with expect_sql(sql, 0):
            assert member.roles == []


@pytest.mark.usefixtures("rel")
def test_one_to_many_keeps_its_order_by(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    with Session() as s:
        s.add_all([Board(id=1), Board(id=2)])
        s.add_all([Post(id=i, board_id=1, rank=r) for i, r in ((1, 5), (2, 9), (3, 5), (4, 0))])
        s.commit()
    assert [pk for _, (pk,) in agree(plain, Session, posts_of(1))] == [2, 1, 3, 4]
    assert agree(plain, Session, posts_of(2)) == []
    settle(Session, posts_of(1), sql)
    with Session() as s:
        board = s.get(Board, 1)
        with expect_sql(sql, 0):
            assert [p.id for p in board.posts] == [2, 1, 3, 4]
    # a change of a member's rank reorders the collection: evicted by the member's change
    with Session() as s:
        s.get(Post, 4).rank = 10
        s.commit()
    assert [pk for _, (pk,) in agree(plain, Session, posts_of(1))] == [4, 2, 1, 3]


@pytest.mark.usefixtures("rel")
def test_a_self_referential_tree(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    with Session() as s:
        root = Node(id=1, name="root")
        a, b = Node(id=2, parent=root), Node(id=3, parent=root)
        s.add_all([root, a, b, Node(id=4, parent=a), Node(id=5, parent=a)])
        s.commit()

    def tree(s: Any) -> Any:
        def walk(node: Node) -> Any:
            return (node.id, [walk(child) for child in node.children])

        return walk(s.get(Node, 1))

    assert agree(plain, Session, tree) == (1, [(2, [(4, []), (5, [])]), (3, [])])
    settle(Session, tree, sql)
    with Session() as s, expect_sql(sql, 0):
        tree(s)
    with Session() as s:  # move a subtree: both parents' children change
        s.get(Node, 2).parent = s.get(Node, 3)
        s.commit()
    assert agree(plain, Session, tree) == (1, [(3, [(2, [(4, []), (5, [])])])])


@pytest.mark.usefixtures("rel")
def test_an_association_object_with_a_composite_key(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    with Session() as s:
        s.add_all([Product(id=i, name=f"p{i}") for i in (1, 2, 3)])
        s.add(Order(id=1, lines=[Line(product_id=3, quantity=2), Line(product_id=1)]))
        s.commit()

    def lines(s: Any) -> Any:
        return [(line.product.name, line.quantity) for line in s.get(Order, 1).lines]

    assert agree(plain, Session, lines) == [("p1", 1), ("p3", 2)]
    settle(Session, lines, sql)
    with Session() as s, expect_sql(sql, 0):
        lines(s)
    with Session() as s:  # an orphan deleted by the cascade, a line added
        order = s.get(Order, 1)
        order.lines.remove(order.lines[0])
        order.lines.append(Line(product_id=2, quantity=7))
        s.commit()
    assert agree(plain, Session, lines) == [("p2", 7), ("p3", 2)]


@pytest.mark.usefixtures("rel")
def test_a_polymorphic_target_comes_back_as_its_own_class(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    with Session() as s:
        s.add(Team(id=1))
        s.add(Team(id=2))
        s.add_all([Worker(id=1, team_id=1), Engineer(id=2, team_id=1, language="py")])
        s.add(Engineer(id=3, team_id=1, language="c"))
        s.commit()

    def team(s: Any) -> Any:
        found = s.get(Team, 1)
        workers = [(type(w).__name__, w.id, getattr(w, "language", None)) for w in found.workers]
        return workers, [e.id for e in found.engineers]

    assert agree(plain, Session, team) == (
        [("Worker", 1, None), ("Engineer", 2, "py"), ("Engineer", 3, "c")],
        [2, 3],
    )
    # a base class's SELECT loads a subclass row without its own table's columns: not a row the
    # cache can hold, so the collection's rows are cached by lookups of their own classes
    settle(Session, lambda s: (s.get(Worker, 1), s.get(Engineer, 2), s.get(Engineer, 3)), sql)
    settle(Session, team, sql)
    with Session() as s:  # an engineer moves: both collections of both teams change
        s.get(Engineer, 3).team_id = 2
        s.commit()
    assert agree(plain, Session, team) == (
        [("Worker", 1, None), ("Engineer", 2, "py")],
        [2],
    )
    guild = lambda s: [e.id for e in s.get(Team, 2).guild]  # noqa: E731
    assert agree(plain, Session, guild) == []
    with Session() as s:  # a base instance changes: it has no guild, it is in no guild
        s.add(Worker(id=4, team_id=2))
        s.get(Engineer, 2).guild_id = 2
        s.commit()
    assert agree(plain, Session, guild) == [2]


# -- invalidation ---------------------------------------------------------------------------------


def boards(Session: Any) -> None:  # noqa: N803
    with Session() as s:
        s.add_all([Board(id=1), Board(id=2)])
        s.add_all([Post(id=1, board_id=1), Post(id=2, board_id=1), Post(id=3, board_id=2)])
        s.commit()


def warm_all(plain: Any, Session: Any, *reads: Read) -> None:  # noqa: N803
    for read in reads:
        agree(plain, Session, read)


@pytest.mark.usefixtures("rel")
def test_moving_a_child_to_another_parent_evicts_both_parents(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
) -> None:
    boards(Session)
    warm_all(plain, Session, posts_of(1), posts_of(2))
    with Session() as s:  # through the foreign key
        s.get(Post, 1).board_id = 2
        s.commit()
    assert agree(plain, Session, posts_of(1)) == [("Post", (2,))]
    assert agree(plain, Session, posts_of(2)) == [("Post", (1,)), ("Post", (3,))]
    with Session() as s:  # through the relationship, from the other side
        parent = s.get(Board, 1)
        parent.posts.append(s.get(Post, 3))
        s.commit()
    assert agree(plain, Session, posts_of(1)) == [("Post", (2,)), ("Post", (3,))]
    assert agree(plain, Session, posts_of(2)) == [("Post", (1,))]


@pytest.mark.usefixtures("rel")
def test_adding_and_deleting_a_child_evicts_its_parent(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
) -> None:
    boards(Session)
    warm_all(plain, Session, posts_of(1), posts_of(2))
    with Session() as s:
        s.add(Post(id=4, board_id=2))
        s.commit()
    assert agree(plain, Session, posts_of(2)) == [("Post", (3,)), ("Post", (4,))]
    with Session() as s:
        s.delete(s.get(Post, 1))
        s.commit()
    assert agree(plain, Session, posts_of(1)) == [("Post", (2,))]
    with Session() as s:  # removed from the collection: its foreign key set to NULL
        board = s.get(Board, 1)
        board.posts.remove(board.posts[0])
        s.commit()
    assert agree(plain, Session, posts_of(1)) == []


@pytest.mark.usefixtures("rel")
@pytest.mark.parametrize("side", ["member", "role"])
def test_adding_or_removing_a_many_to_many_member_evicts_both_sides(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    side: str,
) -> None:
    seed(Session)
    warm_all(plain, Session, roles_of(1), roles_of(3), users_of(1), users_of(2))
    with Session() as s:
        if side == "member":
            parent = s.get(Member, 3)
            parent.roles.append(s.get(Role, 1))
        else:
            parent = s.get(Role, 1)
            parent.users.append(s.get(Member, 3))
        s.commit()
    assert agree(plain, Session, roles_of(3)) == [("Role", (1,))]
    assert agree(plain, Session, users_of(1)) == [("Member", (1,)), ("Member", (3,))]
    with Session() as s:
        if side == "member":
            parent = s.get(Member, 1)
            parent.roles.remove(s.get(Role, 2))
        else:
            parent = s.get(Role, 2)
            parent.users.remove(s.get(Member, 1))
        s.commit()
    assert agree(plain, Session, roles_of(1)) == [("Role", (1,))]
    assert agree(plain, Session, users_of(2)) == [("Member", (2,))]


@pytest.mark.usefixtures("rel")
def test_a_commit_holds_then_evicts_every_collection_it_changed_in_two_round_trips(
    Session: sessionmaker[CachingSession],  # noqa: N803
    redis_counter: RedisCounter,
) -> None:
    seed(Session)
    with Session() as s:
        member, role = s.get(Member, 3), s.get(Role, 1)
        member.roles.append(role)
        board = Board(id=1, posts=[Post(id=1)])
        s.add(board)
        s.flush()
        changed = set(s._sa_cache.changes.keys)
        assert {
            f"{s.cache.prefix}:{{rel:rel_users.Member.roles:3}}",
            f"{s.cache.prefix}:{{rel:rel_roles.Role.users:1}}",
            f"{s.cache.prefix}:{{rel:rel_boards.Board.posts:1}}",
        } <= changed
        with expect_commands(redis_counter, round_trips=2):  # all of them: held, then evicted
            s.commit()


@pytest.mark.usefixtures("rel")
def test_deleting_a_many_to_many_member_evicts_the_collections_it_was_in(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
) -> None:
    seed(Session)
    warm_all(plain, Session, roles_of(1), roles_of(2), users_of(2))
    with Session() as s:
        s.delete(s.get(Role, 2))  # its link rows go with it (the users side is loaded for it)
        s.commit()
    assert agree(plain, Session, roles_of(1)) == [("Role", (1,))]
    assert agree(plain, Session, roles_of(2)) == []
    with Session() as s:
        s.delete(s.get(Member, 1))
        s.commit()
    assert agree(plain, Session, users_of(1)) == []


@pytest.mark.usefixtures("rel")
def test_a_deleted_target_inserted_again_does_not_return_to_its_old_collections(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    seed(Session)
    settle(Session, roles_of(1), sql)  # member 1's roles, and the roles' rows
    settle(Session, roles_of(2), sql)
    with Session() as s:
        s.delete(s.get(Role, 2))
        s.commit()
    with Session() as s:  # the same key, in no collection
        s.add(Role(id=2, name="again"))
        s.commit()
    settle(Session, lambda s: s.get(Role, 2).name, sql)  # its row cached again
    assert agree(plain, Session, roles_of(1)) == [("Role", (1,))]
    assert agree(plain, Session, roles_of(2)) == []


@pytest.mark.usefixtures("rel")
def test_a_deleted_target_of_an_unordered_collection_evicts_the_relationship(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    seed(Session)

    def roles_with(pk: int) -> Read:
        return lambda s: sorted(r.id for r in s.get(Ability, pk).roles)

    settle(Session, roles_with(3), sql)  # ability 3's roles: [2], unordered
    with Session() as s:
        s.delete(s.get(Role, 2))  # deleted through its own side: Ability.roles is not loaded
        s.commit()
    with Session() as s:
        s.add(Role(id=2, name="again"))
        s.commit()
    settle(Session, lambda s: s.get(Role, 2).name, sql)
    assert agree(plain, Session, roles_with(3)) == []


@pytest.mark.usefixtures("rel")
def test_bulk_statements_on_the_child_table_evict_the_relationship(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
) -> None:
    boards(Session)
    warm_all(plain, Session, posts_of(1), posts_of(2))
    with Session() as s:
        s.execute(update(Post).where(Post.id == 1).values(board_id=2))
        s.commit()
    assert agree(plain, Session, posts_of(1)) == [("Post", (2,))]
    assert agree(plain, Session, posts_of(2)) == [("Post", (1,)), ("Post", (3,))]
    with Session() as s:
        s.execute(delete(Post).where(Post.board_id == 2))
        s.commit()
    assert agree(plain, Session, posts_of(2)) == []


@pytest.mark.usefixtures("rel")
def test_core_statements_on_the_link_table_evict_the_relationship(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
) -> None:
    seed(Session)
    warm_all(plain, Session, roles_of(1), roles_of(3), users_of(1))
    with Session() as s:
        s.execute(insert(user_roles).values(user_id=3, role_id=1))
        s.commit()
    assert agree(plain, Session, roles_of(3)) == [("Role", (1,))]
    assert agree(plain, Session, users_of(1)) == [("Member", (1,)), ("Member", (3,))]
    with Session() as s:
        s.execute(delete(user_roles).where(user_roles.c.user_id == 1))
        s.commit()
    assert agree(plain, Session, roles_of(1)) == []
    assert agree(plain, Session, users_of(1)) == [("Member", (3,))]


@pytest.mark.usefixtures("rel")
def test_a_rolled_back_change_evicts_nothing_and_publishes_nothing(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    sql: SQLCounter,
) -> None:
    seed(Session)
    warm_all(plain, Session, roles_of(1), roles_of(3), users_of(2))
    settle(Session, roles_of(3), sql)
    with Session() as s:
        parent, role = s.get(Member, 3), s.get(Role, 2)
        evictions, fills = cache.stats()["evictions"], cache.stats()["fills"]
        parent.roles.append(role)
        s.flush()
        # its own write is read from the database, never from the cache (nor filled)
        assert names(s.get(Member, 3).roles) == [("Role", (2,))]
        assert names(s.get(Role, 2).users) == [("Member", (1,)), ("Member", (2,)), ("Member", (3,))]
        s.rollback()
    assert cache.stats()["evictions"] == evictions and cache.stats()["fills"] == fills
    with Session() as s:
        member = s.get(Member, 3)
        with expect_sql(sql, 0):  # still the cached (and true) empty collection
            assert member.roles == []


@pytest.mark.usefixtures("rel")
def test_a_session_that_wrote_fills_nothing(
    Session: sessionmaker[CachingSession],  # noqa: N803
    cache: IdentityCache,
    sql: SQLCounter,
) -> None:
    seed(Session)
    with Session() as s:
        s.add(Product(id=9))  # a write elsewhere: nothing this transaction reads is published
        s.flush()
        assert [r.id for r in s.get(Member, 1).roles] == [1, 2]
        s.commit()
    assert cache.stats()["models"]["Member.roles"]["fills"] == 0
    settle(Session, roles_of(1), sql)  # sessions that write nothing fill it
    assert cache.stats()["models"]["Member.roles"]["fills"] == 1


@pytest.mark.usefixtures("rel")
def test_an_update_of_an_ordered_many_to_many_target_evicts_the_relationship(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
) -> None:
    seed(Session)

    def abilities(s: Any) -> Any:
        return [a.name for a in s.get(Role, 1).abilities]

    assert agree(plain, Session, abilities) == ["read", "write"]
    with Session() as s:
        s.get(Ability, 1).name = "zzz"  # ordered by name: the order changes
        s.commit()
    assert agree(plain, Session, abilities) == ["write", "zzz"]


# -- what is not cached ---------------------------------------------------------------------------


@pytest.mark.usefixtures("rel")
def test_a_collection_longer_than_the_bound_is_not_cached(
    engine: Engine,
    cache_factory: CacheFactory,
    backend: str,
    plain: sessionmaker[PlainSession],
    sql: SQLCounter,
) -> None:
    small = cache_factory(backend, max_collection=2)
    for model in CACHED:
        small.register(model)
    Session = sessionmaker(engine, class_=CachingSession, cache=small)  # noqa: N806
    with Session() as s:
        s.add_all([Board(id=1), Board(id=2)])
        s.add_all([Post(id=i, board_id=1 if i < 4 else 2) for i in range(1, 6)])
        s.commit()
    agree(plain, Session, posts_of(1))  # three posts: loaded every time
    settle(Session, posts_of(2), sql)  # two: cached
    stats = small.stats()["models"]["Board.posts"]
    assert stats["oversized"] >= 1 and stats["fills"] == 1  # MariaDB: only fresh loads count
    with Session() as s:
        board = s.get(Board, 1)
        with expect_sql(sql, selects=1):
            assert [p.id for p in board.posts] == [1, 2, 3]


@pytest.mark.usefixtures("rel")
def test_loader_options_on_the_parent_skip_the_cache(
    Session: sessionmaker[CachingSession],  # noqa: N803
    cache: IdentityCache,
    sql: SQLCounter,
) -> None:
    seed(Session)
    settle(Session, roles_of(1), sql)
    skipped = cache.stats()["models"]["Member.roles"]["skipped"]
    with Session() as s:
        member = s.scalars(select(Member).where(Member.id == 1).options(defer(Member.name))).one()
        with expect_sql(sql, selects=1):  # the options travel to the lazy load: the database
            assert [r.id for r in member.roles] == [1, 2]
    assert cache.stats()["models"]["Member.roles"]["skipped"] == skipped + 1


@pytest.mark.usefixtures("rel")
def test_a_collection_whose_target_row_was_evicted_is_reloaded(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
    sql: SQLCounter,
) -> None:
    seed(Session)
    settle(Session, roles_of(1), sql)
    cache.evict(Role, 2)
    with Session() as s:
        member = s.get(Member, 1)
        with expect_sql(sql, selects=1):  # the collection's SELECT, which fills the row again
            assert [r.id for r in member.roles] == [1, 2]
    settle(Session, roles_of(1), sql)
    assert agree(plain, Session, roles_of(1)) == [("Role", (1,)), ("Role", (2,))]


@pytest.mark.usefixtures("rel")
def test_relationships_that_cannot_be_evicted_exactly_are_never_cached(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    cache: IdentityCache,
) -> None:
    registry = cache.registry
    assert registry.relationship_kind(Board.posts.property) is not None
    assert registry.relationship_kind(Board.pinned_posts.property) is None  # custom criteria
    assert registry.relationship_kind(Board.post_query.property) is None  # dynamic
    assert registry.relationship_kind(Post.board.property) is None  # many-to-one: the row cache
    assert uncacheable(Board.pinned_posts.property) == (
        "its join condition is not plain column equality"
    )
    boards(Session)
    with Session() as s:
        s.get(Post, 2).pinned = True
        s.commit()

    def pinned(s: Any) -> Any:
        return names(s.get(Board, 1).pinned_posts)

    assert agree(plain, Session, pinned) == [("Post", (2,))]
    with Session() as s:
        s.get(Post, 2).pinned = False  # no foreign key changed: only the criteria
        s.commit()
    assert agree(plain, Session, pinned) == []


def test_register_narrows_the_cached_relationships(
    engine: Engine, cache_factory: CacheFactory, backend: str
) -> None:
    ensure_tables(engine)
    narrow = cache_factory(backend)
    for model in CACHED:
        narrow.register(model, relationships=["users"] if model is Role else ())
    registry = narrow.registry
    assert registry.relationship_kind(Role.users.property) is not None
    assert registry.relationship_kind(Role.abilities.property) is None
    assert registry.relationship_kind(Member.roles.property) is None
    assert {k.name for k in registry.relationship_kinds()} == {"Role.users"}
    with pytest.raises(TypeError):
        narrow.register(Role, relationships="users")
    with pytest.raises(CacheError, match="no relationship named userz"):
        narrow.register(Role, relationships=["userz"])


@pytest.mark.usefixtures("rel")
def test_a_change_the_session_cannot_see_is_evicted_by_hand(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    engine: Engine,
    cache: IdentityCache,
    sql: SQLCounter,
) -> None:
    seed(Session)
    settle(Session, roles_of(1), sql)
    settle(Session, roles_of(2), sql)
    with engine.begin() as conn:  # unseen, like a database-side cascade or a trigger
        conn.execute(delete(user_roles).where(user_roles.c.role_id == 2))
    with Session() as s:
        member = s.get(Member, 1)
        with expect_sql(sql, 0):
            assert [r.id for r in member.roles] == [1, 2]  # stale: the documented limit
    assert cache.evict_collection(Member, "roles", 1)
    assert agree(plain, Session, roles_of(1)) == [("Role", (1,))]
    with Session() as s:
        assert cache.evict_collection(s.get(Member, 2), "roles")
    cache.evict_collection(Member, "roles")  # every collection of the relationship
    assert agree(plain, Session, roles_of(2)) == []
    with pytest.raises(NotRegistered):
        cache.evict_collection(Board, "pinned_posts")


# -- races ----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("rel")
def test_a_membership_change_committed_during_a_miss_is_never_hidden_by_its_fill(
    Session: sessionmaker[CachingSession],  # noqa: N803
    plain: sessionmaker[PlainSession],
    engine: Engine,
    db: str,
) -> None:
    if db == "sqlite":
        pytest.skip("the reader's open cursor holds SQLite's lock: the writer cannot commit")
    seed(Session)
    changed: list[bool] = []

    def commit_a_change(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # right after the reader's SELECT of member 3's roles ran, before its fill
        if changed or "rel_user_roles.user_id" not in statement:
            return
        changed.append(True)
        with Session() as other:
            member = other.get(Member, 3)
            member.roles.append(other.get(Role, 1))
            other.commit()

    event.listen(engine, "after_cursor_execute", commit_a_change)
    try:
        with Session() as s:
            assert s.get(Member, 3).roles == []  # what the SELECT saw: the old membership
    finally:
        event.remove(engine, "after_cursor_execute", commit_a_change)
    assert changed
    assert agree(plain, Session, roles_of(3)) == [("Role", (1,))]
