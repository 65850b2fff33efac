"""Mapped classes for tests/test_unique_lookups.py, on their own metadata (created and emptied by
:func:`ensure_tables`): accounts looked up by email (compared exactly on every database), by a
login the database compares loosely (SQLite ``NOCASE``, PostgreSQL ``char(n)``, MariaDB's
default case-insensitive, pad-space collation) and by a composite (tenant, handle); invoices
that name their account by email (a many-to-one through a unique non-primary-key column); and
profiles, each of one account (a one-to-one whose reverse is ``uselist=False``)."""

from __future__ import annotations

from sqlalchemy import CHAR, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UniqueBase(DeclarativeBase):
    pass


#: compared by exact value everywhere: MariaDB's binary collation that does not pad
EXACT = String(100).with_variant(String(100, collation="utf8mb4_nopad_bin"), "mariadb", "mysql")
#: compared loosely everywhere: case-insensitive or blank-padded
LOOSE = (
    String(50)
    .with_variant(String(50, collation="NOCASE"), "sqlite")
    .with_variant(CHAR(20), "postgresql")
)


class Account(UniqueBase):
    __tablename__ = "uq_accounts"
    __table_args__ = (UniqueConstraint("tenant", "handle"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(EXACT, unique=True)
    login: Mapped[str | None] = mapped_column(LOOSE, unique=True)
    tenant: Mapped[int] = mapped_column(Integer, default=1)
    handle: Mapped[str] = mapped_column(String(50).with_variant(
        String(50, collation="utf8mb4_nopad_bin"), "mariadb", "mysql"
    ))
    name: Mapped[str] = mapped_column(String(50))
    profile: Mapped[Profile | None] = relationship(back_populates="account", uselist=False)


class Invoice(UniqueBase):
    __tablename__ = "uq_invoices"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    account_email: Mapped[str] = mapped_column(EXACT, ForeignKey("uq_accounts.email"))
    total: Mapped[int] = mapped_column(Integer)
    account: Mapped[Account] = relationship()


class Profile(UniqueBase):
    __tablename__ = "uq_profiles"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    account_id: Mapped[int] = mapped_column(ForeignKey("uq_accounts.id"), unique=True)
    bio: Mapped[str] = mapped_column(String(50))
    account: Mapped[Account] = relationship(back_populates="profile")


def ensure_tables(engine: Engine) -> None:
    UniqueBase.metadata.create_all(engine)
    with engine.begin() as conn:
        for table in reversed(UniqueBase.metadata.sorted_tables):
            conn.execute(table.delete())
