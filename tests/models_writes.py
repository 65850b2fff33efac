"""Classes the write-fidelity tests need and tests/models.py lacks: a second, unregistered class
mapped to the cached ``users`` table through a ``Table`` of another metadata. It maps the
existing table (created by tests/models.py), so :func:`ensure_tables` creates nothing."""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Integer, MetaData, String, Table
from sqlalchemy.orm import DeclarativeBase, Mapped


class WritesBase(DeclarativeBase):
    metadata = MetaData()


#: the ``users`` table of tests/models.py, declared again in another metadata
users_again = Table(
    "users",
    WritesBase.metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("name", String(50)),
    Column("active", Boolean, default=True),
    Column("version", Integer, default=1),
)


class UserRecord(WritesBase):
    """Never registered: its writes are writes of the cached User rows all the same."""

    __table__ = users_again
    id: Mapped[int]
    name: Mapped[str]
