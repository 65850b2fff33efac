"""Mapped classes for tests/test_eager_hits.py, on their own metadata: the same shapes as
tests/models_relationships.py with every relationship loaded with its parent. Users with roles
with abilities (``selectin`` many-to-many, two levels); boards with ``joined`` posts,
``subquery`` notes and ``immediate`` tags (one-to-many); a post's author (a ``joined``
many-to-one, served by the row cache) whose roles load in turn; a role's ``joined`` creator
(whose cycle rule looks at its own SELECT only); and a self-referential tree
whose ``selectin`` children stop after ``join_depth`` levels; shelves and books related only by
``noload``, which a load sets without SQL. The ``Lazy*`` classes are the users, roles and
abilities again with every relationship lazy (the mapping's default): whatever they load with
their row, loader options ask for."""

from __future__ import annotations

from sqlalchemy import Column, ForeignKey, String, Table
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class EagerBase(DeclarativeBase):
    pass


user_roles = Table(
    "eager_user_roles",
    EagerBase.metadata,
    Column("user_id", ForeignKey("eager_users.id"), primary_key=True),
    Column("role_id", ForeignKey("eager_roles.id"), primary_key=True),
)

role_abilities = Table(
    "eager_role_abilities",
    EagerBase.metadata,
    Column("role_id", ForeignKey("eager_roles.id"), primary_key=True),
    Column("ability_id", ForeignKey("eager_abilities.id"), primary_key=True),
)


class Ability(EagerBase):
    __tablename__ = "eager_abilities"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class Role(EagerBase):
    __tablename__ = "eager_roles"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    creator_id: Mapped[int | None] = mapped_column(ForeignKey("eager_users.id"))
    #: joined in the roles' own SELECT, which starts at the role: loaded though its target's
    #: class is on the path from a user
    creator: Mapped[User | None] = relationship(lazy="joined", foreign_keys=[creator_id])
    abilities: Mapped[list[Ability]] = relationship(
        secondary=role_abilities, order_by=Ability.id, lazy="selectin"
    )
    #: back to the users: a load from a user stops here (its target is on the path)
    users: Mapped[list[User]] = relationship(
        secondary=user_roles, order_by="User.id", lazy="selectin", viewonly=True
    )


class User(EagerBase):
    __tablename__ = "eager_users"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    roles: Mapped[list[Role]] = relationship(
        secondary=user_roles, order_by=Role.id, lazy="selectin"
    )


class Post(EagerBase):
    __tablename__ = "eager_posts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    board_id: Mapped[int | None] = mapped_column(ForeignKey("eager_boards.id"))
    author_id: Mapped[int | None] = mapped_column(ForeignKey("eager_users.id"))
    author: Mapped[User | None] = relationship(lazy="joined")


class Note(EagerBase):
    __tablename__ = "eager_notes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    board_id: Mapped[int | None] = mapped_column(ForeignKey("eager_boards.id"))


class Tag(EagerBase):
    __tablename__ = "eager_tags"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    board_id: Mapped[int | None] = mapped_column(ForeignKey("eager_boards.id"))
    #: ``immediate`` back to the board, a cycle: set only from the session, without SQL
    board: Mapped[Board | None] = relationship(lazy="immediate", viewonly=True)


class Board(EagerBase):
    __tablename__ = "eager_boards"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50), default="")
    posts: Mapped[list[Post]] = relationship(order_by=Post.id, lazy="joined")
    notes: Mapped[list[Note]] = relationship(order_by=Note.id, lazy="subquery")
    tags: Mapped[list[Tag]] = relationship(order_by=Tag.id, lazy="immediate")


class Node(EagerBase):
    __tablename__ = "eager_nodes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("eager_nodes.id"))
    children: Mapped[list[Node]] = relationship(order_by="Node.id", lazy="selectin", join_depth=2)


class Book(EagerBase):
    __tablename__ = "eager_books"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    shelf_id: Mapped[int | None] = mapped_column(ForeignKey("eager_shelves.id"))
    #: ``noload``: a load sets it to None without SQL
    shelf: Mapped[Shelf | None] = relationship(lazy="noload", viewonly=True)


class Shelf(EagerBase):
    __tablename__ = "eager_shelves"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    #: ``noload`` (deprecated in SQLAlchemy 2.1, still mapped): a load sets it empty without SQL
    books: Mapped[list[Book]] = relationship(order_by=Book.id, lazy="noload")


lazy_user_roles = Table(
    "eager_lazy_user_roles",
    EagerBase.metadata,
    Column("user_id", ForeignKey("eager_lazy_users.id"), primary_key=True),
    Column("role_id", ForeignKey("eager_lazy_roles.id"), primary_key=True),
)

lazy_role_abilities = Table(
    "eager_lazy_role_abilities",
    EagerBase.metadata,
    Column("role_id", ForeignKey("eager_lazy_roles.id"), primary_key=True),
    Column("ability_id", ForeignKey("eager_lazy_abilities.id"), primary_key=True),
)


class LazyAbility(EagerBase):
    __tablename__ = "eager_lazy_abilities"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class LazyRole(EagerBase):
    __tablename__ = "eager_lazy_roles"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    creator_id: Mapped[int | None] = mapped_column(ForeignKey("eager_lazy_users.id"))
    creator: Mapped[LazyUser | None] = relationship(foreign_keys=[creator_id])
    abilities: Mapped[list[LazyAbility]] = relationship(
        secondary=lazy_role_abilities, order_by=LazyAbility.id
    )
    users: Mapped[list[LazyUser]] = relationship(
        secondary=lazy_user_roles, order_by="LazyUser.id", viewonly=True
    )


class LazyUser(EagerBase):
    __tablename__ = "eager_lazy_users"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    roles: Mapped[list[LazyRole]] = relationship(secondary=lazy_user_roles, order_by=LazyRole.id)


CACHED = (
    Ability,
    Role,
    User,
    Post,
    Note,
    Tag,
    Board,
    Node,
    Book,
    Shelf,
    LazyAbility,
    LazyRole,
    LazyUser,
)


def ensure_tables(engine: Engine) -> None:
    EagerBase.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(Node.__table__.update().values(parent_id=None))  # MariaDB checks each row
        for table in reversed(EagerBase.metadata.sorted_tables):
            conn.execute(table.delete())
