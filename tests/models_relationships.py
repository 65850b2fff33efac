"""Mapped classes for tests/test_relationships.py, on their own metadata (created and emptied by
:func:`ensure_tables`), so the shared models are untouched: users with roles and roles with
abilities (many-to-many, ordered), boards with ordered posts (one-to-many), a tree of nodes
(self-referential), orders with lines (an association object with a composite key), and
relationships the cache must never answer (custom criteria, ``dynamic``)."""

from __future__ import annotations

from sqlalchemy import Boolean, Column, ForeignKey, String, Table, and_
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    DynamicMapped,
    Mapped,
    mapped_column,
    relationship,
)


class RelBase(DeclarativeBase):
    pass


user_roles = Table(
    "rel_user_roles",
    RelBase.metadata,
    Column("user_id", ForeignKey("rel_users.id"), primary_key=True),
    Column("role_id", ForeignKey("rel_roles.id"), primary_key=True),
)

role_abilities = Table(
    "rel_role_abilities",
    RelBase.metadata,
    Column("role_id", ForeignKey("rel_roles.id"), primary_key=True),
    Column("ability_id", ForeignKey("rel_abilities.id"), primary_key=True),
)


class Ability(RelBase):
    __tablename__ = "rel_abilities"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    #: unordered: an update of a role never changes it (only link rows and deletes do)
    roles: Mapped[list[Role]] = relationship(
        secondary=role_abilities, back_populates="abilities"
    )


class Role(RelBase):
    __tablename__ = "rel_roles"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    users: Mapped[list[Member]] = relationship(
        secondary=user_roles, back_populates="roles", order_by="Member.id"
    )
    abilities: Mapped[list[Ability]] = relationship(
        secondary=role_abilities, order_by=Ability.name, back_populates="roles"
    )


class Member(RelBase):
    """A user of the roles-and-abilities request."""

    __tablename__ = "rel_users"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    roles: Mapped[list[Role]] = relationship(
        secondary=user_roles, back_populates="users", order_by=Role.id
    )


class Post(RelBase):
    __tablename__ = "rel_posts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    board_id: Mapped[int | None] = mapped_column(ForeignKey("rel_boards.id"))
    rank: Mapped[int] = mapped_column(default=0)
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    board: Mapped[Board | None] = relationship(back_populates="posts")


class Board(RelBase):
    __tablename__ = "rel_boards"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50), default="")
    posts: Mapped[list[Post]] = relationship(
        back_populates="board", order_by=(Post.rank.desc(), Post.id)
    )
    #: custom criteria: a post's ``pinned`` decides membership; never cached
    pinned_posts: Mapped[list[Post]] = relationship(
        primaryjoin=lambda: and_(Board.id == Post.board_id, Post.pinned.is_(True)),
        viewonly=True,
        order_by=Post.id,
    )
    #: a query, never a loaded collection
    post_query: DynamicMapped[Post] = relationship(viewonly=True, lazy="dynamic")


class Node(RelBase):
    __tablename__ = "rel_nodes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("rel_nodes.id"))
    name: Mapped[str] = mapped_column(String(50), default="")
    children: Mapped[list[Node]] = relationship(back_populates="parent", order_by="Node.id")
    parent: Mapped[Node | None] = relationship(back_populates="children", remote_side=[id])


class Product(RelBase):
    __tablename__ = "rel_products"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50), default="")


class Line(RelBase):
    """The association object between an order and a product."""

    __tablename__ = "rel_lines"
    order_id: Mapped[int] = mapped_column(ForeignKey("rel_orders.id"), primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("rel_products.id"), primary_key=True)
    quantity: Mapped[int] = mapped_column(default=1)
    product: Mapped[Product] = relationship()


class Order(RelBase):
    __tablename__ = "rel_orders"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    lines: Mapped[list[Line]] = relationship(
        order_by=Line.product_id, cascade="all, delete-orphan"
    )


class Worker(RelBase):
    """A joined-inheritance hierarchy as a collection's target."""

    __tablename__ = "rel_workers"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    team_id: Mapped[int | None] = mapped_column(ForeignKey("rel_teams.id"))
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "worker"}


class Engineer(Worker):
    __tablename__ = "rel_engineers"
    id: Mapped[int] = mapped_column(ForeignKey("rel_workers.id"), primary_key=True)
    language: Mapped[str] = mapped_column(String(20), default="")
    #: a foreign key only the subclass has
    guild_id: Mapped[int | None] = mapped_column(ForeignKey("rel_teams.id"))
    __mapper_args__ = {"polymorphic_identity": "engineer"}


class Team(RelBase):
    __tablename__ = "rel_teams"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    workers: Mapped[list[Worker]] = relationship(order_by=Worker.id)
    #: a subclass as the target: its SELECT joins the subclass table
    engineers: Mapped[list[Engineer]] = relationship(
        order_by=Engineer.id, viewonly=True, foreign_keys=[Worker.team_id]
    )
    #: the subclass's own foreign key: a base instance has no such attribute
    guild: Mapped[list[Engineer]] = relationship(
        order_by=Engineer.id, foreign_keys=[Engineer.guild_id], viewonly=True
    )


CACHED = (Ability, Role, Member, Post, Board, Node, Product, Line, Order, Worker, Team)


def ensure_tables(engine: Engine) -> None:
    RelBase.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(Node.__table__.update().values(parent_id=None))  # MariaDB checks each row
        for table in reversed(RelBase.metadata.sorted_tables):
            conn.execute(table.delete())
