"""Mappings whose loads fill in more than their columns, and a multi-tenant table: what a cache
hit must reproduce (tests/test_fidelity_lookups.py). Their own metadata, created on first use."""

from __future__ import annotations

from sqlalchemy import ForeignKey, Integer, String, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    column_property,
    mapped_column,
    query_expression,
    relationship,
)


class LookupBase(DeclarativeBase):
    pass


class Owner(LookupBase):
    __tablename__ = "fid_owners"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class Child(LookupBase):
    __tablename__ = "fid_children"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    folder_id: Mapped[int] = mapped_column(ForeignKey("fid_folders.id"))
    name: Mapped[str] = mapped_column(String(50))


class Tag(LookupBase):
    __tablename__ = "fid_tags"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    folder_id: Mapped[int] = mapped_column(ForeignKey("fid_folders.id"))
    label: Mapped[str] = mapped_column(String(50))
    folder: Mapped[Folder] = relationship(back_populates="tags")


class Note(LookupBase):
    __tablename__ = "fid_notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    folder_id: Mapped[int] = mapped_column(ForeignKey("fid_folders.id"))
    text: Mapped[str] = mapped_column(String(50))


class Folder(LookupBase):
    """Every way a load fills in more than the row's own columns."""

    __tablename__ = "fid_folders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("fid_owners.id"))
    title: Mapped[str] = mapped_column(String(50))
    owner: Mapped[Owner | None] = relationship(lazy="joined")
    tags: Mapped[list[Tag]] = relationship(lazy="joined", order_by=Tag.id, back_populates="folder")
    children: Mapped[list[Child]] = relationship(lazy="selectin", order_by=Child.id)
    notes: Mapped[list[Note]] = relationship(lazy="subquery", order_by=Note.id)
    score: Mapped[int | None] = query_expression()


Folder.child_count = column_property(  # type: ignore[attr-defined]
    select(func.count(Child.id)).where(Child.folder_id == Folder.id).scalar_subquery()
)


class Doc(LookupBase):
    """A multi-tenant table: every SELECT of it is filtered by the session's tenant."""

    __tablename__ = "fid_docs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    tenant: Mapped[str] = mapped_column(String(10))
    title: Mapped[str] = mapped_column(String(50))
    score: Mapped[int | None] = query_expression()


CACHED = [Owner, Child, Tag, Note, Folder, Doc]


def ensure_tables(engine: Engine) -> None:
    LookupBase.metadata.create_all(engine)
    with engine.begin() as conn:
        for table in reversed(LookupBase.metadata.sorted_tables):
            conn.execute(table.delete())
