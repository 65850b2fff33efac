"""Mapped classes for tests/test_fidelity_mappings.py: concrete inheritance, classes mapped to a
subquery, a CTE and a join, primary keys that the database compares loosely (a UUID kept as a
string, a SQLite ``NOCASE`` string, a blank-padded ``CHAR``), and TypeDecorator / PickleType
columns. Their own metadata, created by :func:`ensure_tables` on each engine and emptied."""

from __future__ import annotations

import enum
import uuid
from typing import Any

from sqlalchemy import (
    CHAR,
    Column,
    ForeignKey,
    Integer,
    PickleType,
    String,
    Table,
    TypeDecorator,
    Uuid,
    join,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.ext.declarative import ConcreteBase
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class MappingsBase(DeclarativeBase):
    pass


# -- concrete inheritance (a polymorphic base over a polymorphic_union) --------------------------


class Staff(ConcreteBase, MappingsBase):
    __tablename__ = "fm_staff"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    __mapper_args__ = {"polymorphic_identity": "staff", "concrete": True}


class Boss(Staff):
    __tablename__ = "fm_bosses"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    office: Mapped[str | None] = mapped_column(String(50))
    __mapper_args__ = {"polymorphic_identity": "boss", "concrete": True}


class Coder(Staff):
    __tablename__ = "fm_coders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    language: Mapped[str | None] = mapped_column(String(50))
    __mapper_args__ = {"polymorphic_identity": "coder", "concrete": True}


class Vessel(MappingsBase):
    """A base with a concrete subclass but no polymorphic loading: its lookups read its table."""

    __tablename__ = "fm_vessels"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class Ferry(Vessel):
    __tablename__ = "fm_ferries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    cars: Mapped[int | None] = mapped_column(Integer)
    __mapper_args__ = {"concrete": True}


# -- classes mapped to something that is not a table ---------------------------------------------

parts = Table(
    "fm_parts",
    MappingsBase.metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("name", String(50)),
)
part_notes = Table(
    "fm_part_notes",
    MappingsBase.metadata,
    Column("part_id", ForeignKey("fm_parts.id"), primary_key=True),
    Column("note", String(50)),
)


class Part(MappingsBase):
    __table__ = parts


class PartView(MappingsBase):
    """Mapped to a subquery of its table."""

    __table__ = select(parts).where(parts.c.id > 0).subquery("fm_part_view")
    __mapper_args__ = {"primary_key": [__table__.c.id]}


class PartCte(MappingsBase):
    """Mapped to a CTE."""

    __table__ = select(parts).cte("fm_part_cte")
    __mapper_args__ = {"primary_key": [__table__.c.id]}


class PartWithNote(MappingsBase):
    """Mapped to a join of two tables."""

    __table__ = join(parts, part_notes, parts.c.id == part_notes.c.part_id)
    __mapper_args__ = {"primary_key": [parts.c.id]}
    id = parts.c.id
    part_id = part_notes.c.part_id


UNTABLED = (PartView, PartCte, PartWithNote)


# -- primary keys compared loosely by the database -----------------------------------------------


class Badge(MappingsBase):
    """A UUID kept as a string: PostgreSQL compares it as a UUID, whatever its case."""

    __tablename__ = "fm_badges"
    id: Mapped[str] = mapped_column(Uuid(as_uuid=False), primary_key=True)
    label: Mapped[str] = mapped_column(String(20))


class Tag(MappingsBase):
    """A string key in SQLite's NOCASE collation (the database's default collation elsewhere)."""

    __tablename__ = "fm_tags"
    id: Mapped[str] = mapped_column(
        String(20).with_variant(String(20, collation="NOCASE"), "sqlite"), primary_key=True
    )
    label: Mapped[str] = mapped_column(String(20))


class Code(MappingsBase):
    """A blank-padded CHAR key: PostgreSQL (and MariaDB) ignore trailing spaces."""

    __tablename__ = "fm_codes"
    id: Mapped[str] = mapped_column(CHAR(8), primary_key=True)
    label: Mapped[str] = mapped_column(String(20))


SPELLINGS = (Badge, Tag, Code)


# -- exact round trip through the column type's own processing -----------------------------------


class Level(enum.IntEnum):
    low = 1
    high = 2


class LevelType(TypeDecorator[Level]):
    """An IntEnum stored as an integer."""

    impl = Integer
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else int(value)

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else Level(value)


class Shouting(TypeDecorator[str]):
    """Stored in capitals, read back in lower case: a load never gives what was assigned."""

    impl = String(50)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else value.upper()

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else value.lower() + "!"


class RawMarker(TypeDecorator[str]):
    """Processes at the driver's level (``result_processor``): the cache cannot mirror it."""

    impl = String(50)
    cache_ok = True

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        def process(value: Any) -> Any:
            return None if value is None else f"<{value}>"

        return process


class Keepsake(MappingsBase):
    __tablename__ = "fm_keepsakes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    pickled: Mapped[Any] = mapped_column(PickleType, nullable=True)
    level: Mapped[Level | None] = mapped_column(LevelType, nullable=True)
    token: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)


class Marker(MappingsBase):
    __tablename__ = "fm_markers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    label: Mapped[str] = mapped_column(String(20))
    raw: Mapped[str | None] = mapped_column(RawMarker, nullable=True)


class Shout(MappingsBase):
    __tablename__ = "fm_shouts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    shout: Mapped[str | None] = mapped_column(Shouting, nullable=True)


def ensure_tables(engine: Engine) -> None:
    MappingsBase.metadata.create_all(engine)
    with engine.begin() as conn:
        for table in reversed(MappingsBase.metadata.sorted_tables):
            conn.execute(table.delete())
