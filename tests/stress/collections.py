"""The ``collections`` scenario: relationship collections read lazily and eagerly while their
membership changes.

Six parents, eight tags, a few dozen children:

- ``Parent.children`` (one-to-many through ``Child.parent_id``), ``Parent.ordered_children`` (the
  same rows ordered by ``position``), ``Parent.tags`` and ``Tag.parents`` (many-to-many through a
  link table): lazily loaded, so answered from the cache when warm;
- the same collections loaded by ``selectinload``: by a ``select()`` of several parents (never
  answered from the cache), and by ``get(Parent, pk, options=...)``, answered from the cache as
  that load (a hit carries out the options) where it holds the parent, its collections and their
  rows;
- children by primary key (``get``) and by their unique ``name``
  (``select(Child).where(Child.name == ...)``, a lookup by a unique column:
  ``register(Child, unique=["name"])``).

Writers change membership: add a child, delete one, move one between parents (by its foreign
key, its many-to-one, or the two collections), reorder one, add and remove tags through either
side's collection, Core INSERT and DELETE on the link table, ORM bulk UPDATE (moving children;
WHERE ... IN and executemany by primary key) and bulk DELETE on the child table, rollbacks and
savepoint rollbacks.

**The oracle.** A collection's membership changes only while its owner's row is locked
(``SELECT ... FOR UPDATE`` on the parent, and on the tag for a link row; parents before tags, in
id order). Holding the locks, a writer reads the current membership with locking reads (fresh
under READ COMMITTED and REPEATABLE READ alike), draws its version from the global counter, makes
its change, and records, per changed collection, the membership it *meant* to leave: what the
locking read saw plus its change. Versions therefore follow commit order per collection. A read
records the membership it saw; the analysis takes, among the committed versions with that
membership whose ``commit()`` had been called before the read ended, the newest, and judges it
as the mixed workload judges a row version (:func:`tests.stress.checker.analyse`): **stale** if a
newer version had returned before the read started, **dirty** if the membership was never
committed (rolled back, or never meant by anyone). A write that is lost (the ORM emitted nothing
because the row it was given was older than the database's) leaves the database at a membership
no version recorded: later reads are reported stale or dirty, and at quiescence the database's
membership differs from the newest version (counted as a **lost update**).

Inside a writer holding the locks, a collection the ORM lazily loads (to append to or remove from
it) must equal the locking read, as it does without the cache (the load runs after the locks are
held, on either database); anything else is a *wrong answer* (counted with the mismatches).

At quiescence every collection read through the cache (twice: the first may fill) must equal the
database, and every child row too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Integer,
    String,
    Table,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship, selectinload

from sa_cache import CachingSession

from .checker import (
    Base,
    Conflict,
    Records,
    Report,
    Scenario,
    Scope,
    VersionCounter,
    Worker,
    WriteRecord,
    analyse,
    clock,
    make_cache,
    make_engine,
    populate,
)

PARENTS = tuple(range(1, 7))
TAGS = tuple(range(1, 9))
CHILDREN_PER_PARENT = 4
MAX_CHILDREN = 9  # per parent: an add beyond it is a conflict, so the table stays small

# collection ids in the oracle: one "row" per collection, apart from the child rows' ids
CHILDREN, TAGS_OF, PARENTS_OF = -1000, -2000, -3000
CHILD_ROW = 10_000_000  # + child id: the child rows' ids in the oracle (apart from Hot's)

link = Table(
    "sa_cache_checker_parent_tag",
    Base.metadata,
    Column("parent_id", Integer, ForeignKey("sa_cache_checker_parent.id"), primary_key=True),
    Column("tag_id", Integer, ForeignKey("sa_cache_checker_tag.id"), primary_key=True),
)


class Parent(Base):
    """Never updated: a parent's own write would evict its collections and hide a missed
    eviction. Writers only lock it."""

    __tablename__ = "sa_cache_checker_parent"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    children: Mapped[list[Child]] = relationship(back_populates="parent", lazy="select")
    ordered_children: Mapped[list[Child]] = relationship(
        order_by="(Child.position, Child.id)", viewonly=True, lazy="select"
    )
    tags: Mapped[list[Tag]] = relationship(secondary=link, back_populates="parents", lazy="select")


class Tag(Base):
    __tablename__ = "sa_cache_checker_tag"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    parents: Mapped[list[Parent]] = relationship(
        secondary=link, back_populates="tags", lazy="select"
    )


class Child(Base):
    """Ids come from the global counter (unique, known before the insert); ``name`` is unique;
    ``version`` is stamped by every write of the row, for the row analysis."""

    __tablename__ = "sa_cache_checker_child"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(ForeignKey("sa_cache_checker_parent.id"))
    position: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(40), unique=True)
    parent: Mapped[Parent] = relationship(back_populates="children")


def child_name(child: int) -> str:
    return f"child-{child}"


# (collection, version, membership, commit called, commit returned, kind)
CollectionWrite = tuple[int, int, tuple[int, ...], int, int, str]
# (collection, membership seen, ordered, started, ended, kind)
CollectionRead = tuple[int, tuple[int, ...], bool, int, int, str]


class Change:
    """What one transaction means to leave: per collection its membership, per child row its
    state (the transaction's version, or None when deleted)."""

    def __init__(self) -> None:
        self.children: dict[int, list[tuple[int, int]]] = {}  # parent: [(position, child)]
        self.tags: dict[int, set[int]] = {}  # parent: tag ids
        self.parents: dict[int, set[int]] = {}  # tag: parent ids
        self.rows: dict[int, bool] = {}  # child: whether it still exists
        self.objects: list[Child] = []  # the children it writes through the ORM (held: the
        # identity map is weak, and a clean child would leave it before its version is stamped)

    def keep(self, obj: Child) -> None:
        self.rows[obj.id] = True
        self.objects.append(obj)

    def memberships(self) -> list[tuple[int, tuple[int, ...]]]:
        found = [(CHILDREN - p, tuple(c for _, c in sorted(m))) for p, m in self.children.items()]
        found += [(TAGS_OF - p, tuple(sorted(m))) for p, m in self.tags.items()]
        found += [(PARENTS_OF - t, tuple(sorted(m))) for t, m in self.parents.items()]
        return found


class CollectionWorker(Worker):
    read_fraction = 0.6
    read_kinds = {
        "children": 14,
        "ordered_children": 10,
        "tags": 12,
        "tag_parents": 8,
        "selectin": 8,
        "selectin_get": 5,
        "child_get": 8,
        "child_by_name": 4,  # a lookup by a unique column
        "transaction": 20,
    }
    in_transaction_kinds = {
        "children": 3,
        "ordered_children": 2,
        "tags": 2,
        "tag_parents": 2,
        "selectin": 1,
        "child_get": 2,
    }
    write_kinds = {
        "add_child": 10,
        "remove_child": 5,
        "move_child": 25,
        "reorder": 8,
        "tag_add": 10,
        "tag_remove": 10,
        "link_insert": 5,
        "link_delete": 5,
        "bulk_move": 6,
        "bulk_delete": 3,
        "collection_rollback": 6,
        "collection_savepoint_rollback": 6,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.known_children: list[int] = []  # child ids seen lately, for reads by id and name

    # -- reads ----------------------------------------------------------------------------

    def read_one(self, session: Session, kind: str, scope: Scope) -> None:
        getattr(self, "look_" + kind)(session, scope)

    def seen(
        self, scope: Scope, collection: int, members: Iterable[Any], ordered: bool, kind: str
    ) -> None:
        ids = tuple(m.id for m in members)
        if not ordered:
            ids = tuple(sorted(ids))
        if collection > CHILDREN - 100:
            self.learn(ids)
            for child in ids:  # loaded with the collection: a later get answers from the map
                scope.rows.setdefault(CHILD_ROW + child, scope.rows[collection])
        self.out.extra["collection_reads"].append(
            (collection, ids, ordered, scope.started(collection), clock(), scope.label + kind)
        )

    def learn(self, children: Iterable[int]) -> None:
        self.known_children.extend(children)
        del self.known_children[:-60]

    def look_parent(self, session: Session, scope: Scope, collection: int) -> Parent:
        parent = self.rng.choice(PARENTS)
        scope.begin([collection - parent])
        obj = session.get(Parent, parent)
        assert obj is not None
        return obj

    def look_children(self, session: Session, scope: Scope) -> None:
        parent = self.look_parent(session, scope, CHILDREN)
        self.seen(scope, CHILDREN - parent.id, parent.children, False, "children")

    def look_ordered_children(self, session: Session, scope: Scope) -> None:
        parent = self.look_parent(session, scope, CHILDREN)
        self.seen(scope, CHILDREN - parent.id, parent.ordered_children, True, "ordered_children")

    def look_tags(self, session: Session, scope: Scope) -> None:
        parent = self.look_parent(session, scope, TAGS_OF)
        self.seen(scope, TAGS_OF - parent.id, parent.tags, False, "tags")

    def look_tag_parents(self, session: Session, scope: Scope) -> None:
        tag = self.rng.choice(TAGS)
        scope.begin([PARENTS_OF - tag])
        obj = session.get(Tag, tag)
        assert obj is not None
        self.seen(scope, PARENTS_OF - tag, obj.parents, False, "tag_parents")

    def look_selectin(self, session: Session, scope: Scope) -> None:
        parents = sorted(self.rng.sample(PARENTS, self.rng.randint(1, 3)))
        scope.begin([CHILDREN - p for p in parents] + [TAGS_OF - p for p in parents])
        statement = (
            select(Parent)
            .where(Parent.id.in_(parents))
            .options(selectinload(Parent.ordered_children), selectinload(Parent.tags))
        )
        for obj in session.scalars(statement):
            self.seen(scope, CHILDREN - obj.id, obj.ordered_children, True, "selectin")
            self.seen(scope, TAGS_OF - obj.id, obj.tags, False, "selectin")

    def look_selectin_get(self, session: Session, scope: Scope) -> None:
        parent = self.rng.choice(PARENTS)
        scope.begin([CHILDREN - parent, TAGS_OF - parent])
        options = [selectinload(Parent.children), selectinload(Parent.tags)]
        obj = session.get(Parent, parent, options=options)
        assert obj is not None
        self.seen(scope, CHILDREN - parent, obj.children, False, "selectin_get")
        self.seen(scope, TAGS_OF - parent, obj.tags, False, "selectin_get")

    def pick_child(self) -> int | None:
        return self.rng.choice(self.known_children) if self.known_children else None

    def child_read(self, scope: Scope, child: int, obj: Child | None, kind: str) -> None:
        version = None if obj is None else obj.version
        self.out.extra["child_reads"].append(
            (
                CHILD_ROW + child,
                version,
                scope.started(CHILD_ROW + child),
                clock(),
                scope.label + kind,
            )
        )

    def look_child_get(self, session: Session, scope: Scope) -> None:
        child = self.pick_child()
        if child is None:
            return self.look_children(session, scope)
        scope.begin([CHILD_ROW + child])
        self.child_read(scope, child, session.get(Child, child), "child_get")

    def look_child_by_name(self, session: Session, scope: Scope) -> None:
        """A child by its unique ``name``, answered from the cache by the unique-column lookup
        (the scenario registers ``Child`` with ``unique=["name"]``)."""
        child = self.pick_child()
        if child is None:
            return self.look_children(session, scope)
        scope.begin([CHILD_ROW + child])
        obj = session.scalars(select(Child).where(Child.name == child_name(child))).first()
        self.child_read(scope, child, obj, "child_by_name")

    # -- locks and locking reads ------------------------------------------------------------

    def lock_parents(self, session: Session, rows: list[int]) -> list[Parent]:
        """Lock parents (then tags, by :meth:`lock_tags`) in id order."""
        statement = (
            select(Parent)
            .where(Parent.id.in_(sorted(set(rows))))
            .order_by(Parent.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        return list(session.scalars(statement))

    def lock_tags(self, session: Session, tags: list[int]) -> list[Tag]:
        statement = (
            select(Tag)
            .where(Tag.id.in_(sorted(set(tags))))
            .order_by(Tag.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        return list(session.scalars(statement))

    def children_of(self, session: Session, change: Change, parent: int) -> list[tuple[int, int]]:
        statement = (
            select(Child.position, Child.id).where(Child.parent_id == parent).with_for_update()
        )
        members = sorted((position, child) for position, child in session.execute(statement))
        change.children[parent] = list(members)
        self.learn(child for _, child in members)
        return members

    def tags_of(self, session: Session, change: Change, parent: int) -> set[int]:
        statement = select(link.c.tag_id).where(link.c.parent_id == parent).with_for_update()
        change.tags[parent] = set(session.scalars(statement))
        return set(change.tags[parent])

    def parents_of(self, session: Session, change: Change, tag: int) -> set[int]:
        statement = select(link.c.parent_id).where(link.c.tag_id == tag).with_for_update()
        change.parents[tag] = set(session.scalars(statement))
        return set(change.parents[tag])

    def locked_child(self, session: Session, child: int, record: bool = True) -> Child:
        """The child row through ``get``: the cache may answer (the row is locked by the locking
        read of its parent's children, but the identity map does not hold it). ``record``: False
        where the transaction itself may have written the row (its own version is no dirty
        read)."""
        scope = Scope(snapshot=False, label="locked.")
        scope.begin([CHILD_ROW + child])
        obj = session.get(Child, child)
        if record:
            self.child_read(scope, child, obj, "child_get")
        if obj is None:
            self.out.wrong_answers.append(
                f"wrong answer: get(Child, {child}) found no row while its parent was locked "
                "and a locking read had just returned it"
            )
            raise Conflict
        return obj

    def loaded(self, what: str, members: Iterable[Any], expected: set[int]) -> None:
        """A collection the ORM loaded inside a locked transaction must equal the locking read."""
        got = {m.id for m in members}
        if got != expected:
            self.out.wrong_answers.append(
                f"wrong answer: {what} loaded {sorted(got)} inside a transaction holding its "
                f"lock; a locking read there saw {sorted(expected)}"
            )
            raise Conflict

    # -- recording --------------------------------------------------------------------------

    def commit_change(self, session: Session, change: Change, version: int, kind: str) -> None:
        called = clock()
        try:
            session.commit()
        except Exception:
            self.record(change, version, "collection_uncertain")
            raise
        returned = clock()
        for collection, members in change.memberships():
            self.out.extra["collection_writes"].append(
                (collection, version, members, called, returned, kind)
            )
        for child, exists in change.rows.items():
            state = version if exists else None
            self.out.extra["child_writes"].append(
                (CHILD_ROW + child, version, state, called, returned, kind)
            )
        self.out.outcomes["committed"] += 1

    def record(self, change: Change, version: int, name: str) -> None:
        """``name``: collection_aborted or collection_uncertain."""
        for collection, members in change.memberships():
            self.out.extra[name].append((collection, version, members))
        for child, exists in change.rows.items():
            self.out.extra[name.replace("collection", "child")].append(
                (CHILD_ROW + child, version, version if exists else None)
            )

    # -- writes -----------------------------------------------------------------------------

    def write_add_child(self) -> None:
        with self.writing() as session:
            change = Change()
            self.add_child(session, change, self.rng.choice(PARENTS))
            self.commit_change(session, change, self.stamp(session, change), "add_child")

    def stamp(self, session: Session, change: Change) -> int:
        """Draw the transaction's version (every lock is held) and stamp the changed children."""
        session.flush()
        version = self.next_version()
        for obj in change.objects:
            obj.version = version
        session.flush()
        return version

    def add_child(self, session: Session, change: Change, parent: int) -> None:
        (owner,) = self.lock_parents(session, [parent])
        members = self.children_of(session, change, parent)
        if len(members) >= MAX_CHILDREN:
            raise Conflict
        child = self.next_version()
        position = self.rng.randint(0, 99)
        obj = Child(id=child, position=position, version=0, name=child_name(child))
        if self.rng.random() < 0.5:
            obj.parent_id = parent
            session.add(obj)
        else:
            self.loaded(f"Parent {parent}.children", owner.children, {c for _, c in members})
            owner.children.append(obj)
        change.children[parent].append((position, child))
        change.keep(obj)

    def write_remove_child(self) -> None:
        parent = self.rng.choice(PARENTS)
        with self.writing() as session:
            change = Change()
            self.lock_parents(session, [parent])
            members = self.children_of(session, change, parent)
            if not members:
                raise Conflict
            position, child = self.rng.choice(members)
            session.delete(self.locked_child(session, child))
            change.children[parent].remove((position, child))
            change.rows[child] = False
            self.commit_change(session, change, self.stamp(session, change), "remove_child")

    def write_move_child(self) -> None:
        with self.writing() as session:
            change = Change()
            how = self.move_child(session, change)
            self.commit_change(session, change, self.stamp(session, change), "move_child." + how)

    def move_child(self, session: Session, change: Change) -> str:
        """Move a child of one parent to another: the read-modify-write under FOR UPDATE that a
        stale row would turn into a lost write (the ORM emits nothing for a foreign key the row
        it was given already holds)."""
        source, target = self.rng.sample(PARENTS, 2)
        owners = {p.id: p for p in self.lock_parents(session, [source, target])}
        members = self.children_of(session, change, source)
        theirs = self.children_of(session, change, target)
        if not members or len(theirs) >= MAX_CHILDREN:
            raise Conflict
        position, child = self.rng.choice(members)
        obj = self.locked_child(session, child)
        how = self.choose({"foreign_key": 2, "many_to_one": 1, "collections": 1})
        if how == "foreign_key":
            obj.parent_id = target
        elif how == "many_to_one":
            obj.parent = owners[target]
        else:
            self.loaded(
                f"Parent {source}.children", owners[source].children, {c for _, c in members}
            )
            self.loaded(
                f"Parent {target}.children", owners[target].children, {c for _, c in theirs}
            )
            owners[source].children.remove(obj)
            owners[target].children.append(obj)
        change.children[source].remove((position, child))
        change.children[target].append((position, child))
        change.keep(obj)
        return how

    def write_reorder(self) -> None:
        parent = self.rng.choice(PARENTS)
        with self.writing() as session:
            change = Change()
            self.lock_parents(session, [parent])
            members = self.children_of(session, change, parent)
            if not members:
                raise Conflict
            position, child = self.rng.choice(members)
            new = self.rng.randint(0, 99)
            obj = self.locked_child(session, child)
            obj.position = new
            change.children[parent].remove((position, child))
            change.children[parent].append((new, child))
            change.keep(obj)
            self.commit_change(session, change, self.stamp(session, change), "reorder")

    def tag_link(self, session: Session, change: Change, add: bool, orm: bool) -> None:
        """Link (or unlink) a parent and a tag, through one side's collection or by Core."""
        parent = self.rng.choice(PARENTS)
        (owner,) = self.lock_parents(session, [parent])
        tags = self.tags_of(session, change, parent)
        choices = sorted(set(TAGS) - tags if add else tags)
        if not choices:
            raise Conflict
        tag = self.rng.choice(choices)
        (obj,) = self.lock_tags(session, [tag])  # parents before tags: no lock cycle
        parents = self.parents_of(session, change, tag)
        if orm and self.rng.random() < 0.5:
            self.loaded(f"Parent {parent}.tags", owner.tags, tags)
            (owner.tags.append if add else owner.tags.remove)(obj)
        elif orm:
            self.loaded(f"Tag {tag}.parents", obj.parents, parents)
            (obj.parents.append if add else obj.parents.remove)(owner)
        elif add:
            session.execute(insert(link).values(parent_id=parent, tag_id=tag))
        else:
            session.execute(delete(link).where(link.c.parent_id == parent, link.c.tag_id == tag))
        (change.tags[parent].add if add else change.tags[parent].discard)(tag)
        (change.parents[tag].add if add else change.parents[tag].discard)(parent)

    def write_link(self, kind: str, add: bool, orm: bool) -> None:
        with self.writing() as session:
            change = Change()
            self.tag_link(session, change, add, orm)
            self.commit_change(session, change, self.stamp(session, change), kind)

    def write_tag_add(self) -> None:
        self.write_link("tag_add", add=True, orm=True)

    def write_tag_remove(self) -> None:
        self.write_link("tag_remove", add=False, orm=True)

    def write_link_insert(self) -> None:
        self.write_link("link_insert", add=True, orm=False)

    def write_link_delete(self) -> None:
        self.write_link("link_delete", add=False, orm=False)

    def write_bulk_move(self) -> None:
        source, target = self.rng.sample(PARENTS, 2)
        with self.writing() as session:
            change = Change()
            self.lock_parents(session, [source, target])
            members = self.children_of(session, change, source)
            theirs = self.children_of(session, change, target)
            room = MAX_CHILDREN - len(theirs)
            if not members or room <= 0:
                raise Conflict
            moved = self.rng.sample(members, min(room, len(members), self.rng.randint(1, 3)))
            version = self.next_version()
            ids = [child for _, child in moved]
            if self.rng.random() < 0.5:
                statement = update(Child).where(Child.id.in_(ids))
                session.execute(statement.values(parent_id=target, version=version))
                kind = "bulk_move"
            else:  # ORM bulk UPDATE by primary key (executemany)
                rows = [{"id": c, "parent_id": target, "version": version} for c in ids]
                session.execute(update(Child), rows)
                kind = "bulk_move_by_pk"
            for member in moved:
                change.children[source].remove(member)
                change.children[target].append(member)
                change.rows[member[1]] = True
            self.commit_change(session, change, version, kind)

    def write_bulk_delete(self) -> None:
        parent = self.rng.choice(PARENTS)
        with self.writing() as session:
            change = Change()
            self.lock_parents(session, [parent])
            members = self.children_of(session, change, parent)
            if not members:
                raise Conflict
            gone = self.rng.sample(members, min(len(members), self.rng.randint(1, 2)))
            version = self.next_version()
            session.execute(delete(Child).where(Child.id.in_([c for _, c in gone])))
            for member in gone:
                change.children[parent].remove(member)
                change.rows[member[1]] = False
            self.commit_change(session, change, version, "bulk_delete")

    def write_collection_rollback(self) -> None:
        with self.writing() as session:
            change = Change()
            if self.rng.random() < 0.5:
                self.move_child(session, change)
            else:
                self.tag_link(session, change, self.rng.random() < 0.5, orm=True)
            self.record(change, self.stamp(session, change), "collection_aborted")
            session.rollback()
            self.out.outcomes["rolled back"] += 1

    def write_collection_savepoint_rollback(self) -> None:
        """A move committed, and a change to the same collections rolled back to a savepoint."""
        with self.writing() as session:
            change = Change()
            self.move_child(session, change)
            version = self.stamp(session, change)
            nested = session.begin_nested()
            inner = Change()
            inner.children = {p: list(m) for p, m in change.children.items()}
            parent = self.rng.choice(sorted(change.children))
            if change.children[parent]:
                position, child = self.rng.choice(change.children[parent])
                obj = self.locked_child(session, child, record=False)
                obj.position = position + 1
                inner.children[parent].remove((position, child))
                inner.children[parent].append((position + 1, child))
                inner.keep(obj)
            child = self.next_version()
            added = Child(id=child, parent_id=parent, position=0, version=0, name=child_name(child))
            session.add(added)
            inner.children[parent].append((0, child))
            inner.keep(added)
            self.record(inner, self.stamp(session, inner), "collection_aborted")
            nested.rollback()
            self.out.outcomes["rolled back to a savepoint"] += 1
            self.commit_change(session, change, version, "collection_savepoint_rollback")


def truth(session: Session) -> dict[int, tuple[int, ...]]:
    """Every collection's membership in the database (children in position order)."""
    found: dict[int, tuple[int, ...]] = {CHILDREN - p: () for p in PARENTS}
    found |= {TAGS_OF - p: () for p in PARENTS} | {PARENTS_OF - t: () for t in TAGS}
    rows = session.execute(select(Child.parent_id, Child.id).order_by(Child.position, Child.id))
    for parent, child in rows:
        found[CHILDREN - parent] += (child,)
    for parent, tag in session.execute(select(link.c.parent_id, link.c.tag_id)):
        found[TAGS_OF - parent] += (tag,)
        found[PARENTS_OF - tag] += (parent,)
    return {c: m if c > TAGS_OF + 100 else tuple(sorted(m)) for c, m in found.items()}


class CollectionScenario(Scenario):
    name = "collections"
    summary = (
        "lazy and selectin loads of one-to-many, ordered and many-to-many collections while "
        "writers add, delete, move and reorder children, link and unlink tags (ORM, Core, bulk), "
        "roll back and roll back to savepoints"
    )
    models = (Parent, Tag, Child)
    register_options = {Child: {"unique": ["name"]}}  # noqa: RUF012 (read only)
    worker_class: type[Worker] = CollectionWorker

    def __init__(self) -> None:
        self.initial: list[CollectionWrite] = []
        self.initial_children: list[WriteRecord] = []

    def populate(self, engine: Engine, versions: VersionCounter) -> list[WriteRecord]:
        records = populate(engine, versions)
        children = []
        for parent in PARENTS:
            for n in range(CHILDREN_PER_PARENT):
                child = versions.next()
                children.append(
                    {
                        "id": child,
                        "parent_id": parent,
                        "position": 10 * n,
                        "version": child,
                        "name": child_name(child),
                    }
                )
        links = [{"parent_id": p, "tag_id": t} for p in PARENTS for t in TAGS if (p + t) % 3 == 0]
        with engine.begin() as conn:
            conn.execute(insert(Parent), [{"id": p, "name": f"p{p}"} for p in PARENTS])
            conn.execute(insert(Tag), [{"id": t, "name": f"t{t}"} for t in TAGS])
            conn.execute(insert(Child), children)
            conn.execute(insert(link), links)
        with Session(engine) as session:
            memberships = truth(session)
        now = clock()
        self.initial = [(c, 0, m, now, now, "initial") for c, m in memberships.items()]
        self.initial_children = [
            (CHILD_ROW + c["id"], c["version"], c["version"], now, now, "initial") for c in children
        ]
        return records

    def judge(self, url: str, redis_url: str, prefix: str, records: Records, report: Report):
        extra = records.extra
        writes: list[CollectionWrite] = self.initial + extra["collection_writes"]
        stale, dirty, examples = judge_collections(
            writes,
            extra["collection_reads"],
            extra["collection_aborted"],
            extra["collection_uncertain"],
        )
        row_stale, row_dirty, row_examples = judge_children(self.initial_children, records)
        report.stale += stale + row_stale
        report.dirty += dirty + row_dirty
        report.examples += examples + row_examples
        report.reads += len(extra["collection_reads"]) + len(extra["child_reads"])
        report.notes.append(
            f"{len(extra['collection_reads'])} collection reads and {len(extra['child_reads'])} "
            f"child row reads; {len(extra['collection_writes'])} collection versions committed"
        )
        lost, mismatched, lines = check_collections(url, redis_url, prefix, writes, records)
        report.lost_updates += lost
        report.mismatches += mismatched
        report.examples += lines[:10]


def judge_collections(
    writes: list[CollectionWrite],
    reads: list[CollectionRead],
    aborted: list[tuple[int, int, tuple[int, ...]]],
    uncertain: list[tuple[int, int, tuple[int, ...]]],
) -> tuple[int, int, list[str]]:
    """Stale and dirty collection reads: each read is given the newest committed version with
    the membership it saw (whose commit had begun before it ended; else the oldest, or an
    aborted one, or none), then judged as a row version is."""
    # (collection, membership, ordered) -> the committed writes with it, in version order;
    # unordered reads compare sorted memberships
    committed: dict[tuple[int, tuple[int, ...], bool], list[CollectionWrite]] = {}
    for write in sorted(writes, key=lambda w: w[1]):
        committed.setdefault((write[0], write[2], True), []).append(write)
        committed.setdefault((write[0], tuple(sorted(write[2])), False), []).append(write)
    gone: dict[tuple[int, tuple[int, ...], bool], int] = {}
    for collection, version, members in aborted:
        gone.setdefault((collection, members, True), version)
        gone.setdefault((collection, tuple(sorted(members)), False), version)
    maybe = {(c, m, True) for c, _, m in uncertain} | {
        (c, tuple(sorted(m)), False) for c, _, m in uncertain
    }
    resolved = Records()
    resolved.writes = [(c, v, v, called, returned, k) for c, v, _, called, returned, k in writes]
    resolved.aborted = [(c, v) for c, v, _ in aborted]
    never = -1
    for collection, members, ordered, started, ended, kind in reads:
        key = (collection, members, ordered)
        matches = committed.get(key, [])
        begun = [w[1] for w in matches if w[3] < ended]
        if begun:
            version = max(begun)
        elif matches:
            version = matches[0][1]
        elif key in maybe:
            continue
        elif key in gone:
            version = gone[key]
        else:  # a membership no transaction ever meant
            version, never = never, never - 1
        resolved.reads.append((collection, version, started, ended, kind))
    stale, dirty, examples, _ = analyse(resolved, [])
    return stale, dirty, [f"{line} (collection {describe(line)})" for line in examples]


def describe(line: str) -> str:
    """Which collection an example of :func:`analyse` names (its "row" is a collection id)."""
    for word in line.split():
        if word.lstrip("-").isdigit() and int(word) < 0:
            collection = int(word)
            for base, name in (
                (PARENTS_OF, "Tag.parents"),
                (TAGS_OF, "Parent.tags"),
                (CHILDREN, "Parent.children"),
            ):
                if collection <= base:
                    return f"{name} of {base - collection}"
    return "?"


def judge_children(initial: list[WriteRecord], records: Records) -> tuple[int, int, list[str]]:
    """Stale and dirty reads of child rows (by id, by name, and under a writer's locks)."""
    rows = Records()
    rows.writes = records.extra["child_writes"]
    rows.aborted = [(row, version) for row, version, _ in records.extra["child_aborted"]]
    rows.uncertain = records.extra["child_uncertain"]
    rows.reads = records.extra["child_reads"]
    known = {record[0] for record in initial + rows.writes}
    dirty = [read for read in rows.reads if read[0] not in known and read[1] is not None]
    rows.reads = [read for read in rows.reads if read[0] in known]
    stale, more_dirty, examples, _ = analyse(rows, initial)
    examples += [
        f"dirty: {read[4]} of child {read[0] - CHILD_ROW} saw version {read[1]} of a "
        "row never written"
        for read in dirty[:3]
    ]
    return stale, more_dirty + len(dirty), [e.replace(" row ", " child row ") for e in examples]


def _row(child: Child | None) -> tuple[int, int, int] | None:
    return None if child is None else (child.parent_id, child.position, child.version)


def check_collections(
    url: str, redis_url: str, prefix: str, writes: list[CollectionWrite], records: Records
) -> tuple[int, int, list[str]]:
    """(lost writes, mismatches, lines) once nothing runs: the database's memberships against
    the newest committed versions, and every collection and child row read through a fresh
    caching session (twice: the first may fill) against the database."""
    engine = make_engine(url, 2)
    with Session(engine) as plain:
        actual = truth(plain)
        rows = {c.id: (c.parent_id, c.position, c.version) for c in plain.scalars(select(Child))}
    newest: dict[int, CollectionWrite] = {}
    for write in writes:
        if write[0] not in newest or write[1] > newest[write[0]][1]:
            newest[write[0]] = write
    maybe = {c for c, _, _ in records.extra["collection_uncertain"]}
    lost = 0
    lines = []
    for collection, write in sorted(newest.items()):
        expected = write[2] if collection > TAGS_OF + 100 else tuple(sorted(write[2]))
        if actual[collection] != expected and collection not in maybe:
            lost += 1
            lines.append(
                f"lost write: {describe(str(collection))} is {list(actual[collection])} in the "
                f"database, but its newest version {write[1]} ({write[5]}) left "
                f"{list(expected)}"
            )
    cache = make_cache(
        redis_url, prefix, None, CollectionScenario.models, CollectionScenario.register_options
    )
    bad: dict[int, str] = {}
    ids = sorted({row - CHILD_ROW for row, *_ in records.extra["child_writes"]} | set(rows))
    for _ in range(2):
        with CachingSession(engine, cache=cache) as session:
            for parent in PARENTS:
                obj = session.get(Parent, parent)
                assert obj is not None
                got = {
                    CHILDREN - parent: tuple(sorted(c.id for c in obj.children)),
                    TAGS_OF - parent: tuple(sorted(t.id for t in obj.tags)),
                }
                ordered = tuple(c.id for c in obj.ordered_children)
                if ordered != actual[CHILDREN - parent]:
                    bad[CHILDREN - parent] = f"ordered children of {parent}: {ordered}"
                for collection, members in got.items():
                    if members != tuple(sorted(actual[collection])):
                        bad[collection] = f"{describe(str(collection))}: {members}"
            for tag in TAGS:
                found = session.get(Tag, tag)
                assert found is not None
                members = tuple(sorted(p.id for p in found.parents))
                if members != actual[PARENTS_OF - tag]:
                    bad[PARENTS_OF - tag] = f"Tag.parents of {tag}: {members}"
        for child in ids:
            with CachingSession(engine, cache=cache) as session:
                obj = session.get(Child, child)
                got_row = _row(obj)
            if got_row != rows.get(child):
                bad[CHILD_ROW + child] = f"child {child}: {got_row}, the database {rows.get(child)}"
            with CachingSession(engine, cache=cache) as session:  # by its unique name
                named = select(Child).where(Child.name == child_name(child))
                found = session.scalars(named).first()
                got_row = _row(found)
            if got_row != rows.get(child):
                bad[CHILD_ROW + child] = (
                    f"child {child} by name: {got_row}, the database {rows.get(child)}"
                )
    engine.dispose()
    for collection, text in sorted(bad.items()):
        truth_text = "" if collection >= CHILD_ROW else f", the database {list(actual[collection])}"
        lines.append(f"mismatch: a cached read of {text}{truth_text}")
    return lost, len(bad), lines
