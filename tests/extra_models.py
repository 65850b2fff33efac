"""Mapped classes a few behaviour tests need and tests/models.py lacks: a second unique key (for
upserts), a delete-orphan collection without a backref, and a primary key the database assigns.
Their own metadata, so the shared schema is untouched; :func:`ensure_tables` creates them on first
use and empties them."""

from __future__ import annotations

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class ExtraBase(DeclarativeBase):
    pass


class Account(ExtraBase):
    __tablename__ = "extra_accounts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(50), unique=True)
    name: Mapped[str] = mapped_column(String(50))
    # no back_populates: removing a login from the list changes nothing on the login itself
    logins: Mapped[list[Login]] = relationship(cascade="all, delete-orphan")


class Login(ExtraBase):
    __tablename__ = "extra_logins"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    account_id: Mapped[int] = mapped_column(ForeignKey("extra_accounts.id"))


class Ticket(ExtraBase):
    __tablename__ = "extra_tickets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    title: Mapped[str] = mapped_column(String(50))


def ensure_tables(engine: Engine) -> None:
    ExtraBase.metadata.create_all(engine)
    with engine.begin() as conn:
        for table in reversed(ExtraBase.metadata.sorted_tables):
            conn.execute(table.delete())
