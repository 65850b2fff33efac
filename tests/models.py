"""The mapped classes every behaviour test runs against: one metadata, created once per database."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    Interval,
    LargeBinary,
    Numeric,
    String,
    Text,
    Time,
    Uuid,
    func,
    select,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    column_property,
    deferred,
    mapped_column,
    reconstructor,
    relationship,
)


class Base(DeclarativeBase):
    pass


class Color(enum.Enum):
    red = "r"
    green = "g"


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    email: Mapped[str | None] = mapped_column(String(100))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    bio: Mapped[str | None] = deferred(mapped_column(Text))
    addresses: Mapped[list[Address]] = relationship(back_populates="user")

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.loaded_by_reconstructor = False

    @reconstructor
    def _on_load(self) -> None:
        self.loaded_by_reconstructor = True


class Address(Base):
    __tablename__ = "addresses"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    city: Mapped[str] = mapped_column(String(50), default="x")
    user: Mapped[User | None] = relationship(back_populates="addresses")


#: deferred: a load does not fill it either, so a hit needs no SQL (an undeferred one is loaded
#: on a hit as a load loads it: tests/test_fidelity_lookups.py)
User.address_count = column_property(  # type: ignore[attr-defined]
    select(func.count(Address.id)).where(Address.user_id == User.id).scalar_subquery(),
    deferred=True,
)


class Everything(Base):
    """One column of every common type, for the exact round-trip."""

    __tablename__ = "everything"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    i: Mapped[int | None] = mapped_column(BigInteger)
    s: Mapped[str | None] = mapped_column(String(200))
    b: Mapped[bool | None] = mapped_column(Boolean)
    f: Mapped[float | None] = mapped_column(Float)
    d: Mapped[decimal.Decimal | None] = mapped_column(Numeric(20, 6))
    dt_naive: Mapped[dt.datetime | None] = mapped_column(DateTime)
    dt_aware: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    day: Mapped[dt.date | None] = mapped_column(Date)
    t: Mapped[dt.time | None] = mapped_column(Time)
    td: Mapped[dt.timedelta | None] = mapped_column(Interval)
    u: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    color: Mapped[Color | None] = mapped_column(Enum(Color))
    raw: Mapped[bytes | None] = mapped_column(LargeBinary)
    doc: Mapped[Any] = mapped_column(JSON, nullable=True)


class Membership(Base):
    """Composite primary key, in an order that is not alphabetical."""

    __tablename__ = "memberships"
    org: Mapped[str] = mapped_column(String(20), primary_key=True)
    member: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    role: Mapped[str] = mapped_column(String(20))


class Token(Base):
    __tablename__ = "tokens"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    label: Mapped[str] = mapped_column(String(20))


class Employee(Base):
    """Joined-table inheritance."""

    __tablename__ = "employees"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    kind: Mapped[str] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "employee"}


class Engineer(Employee):
    __tablename__ = "engineers"
    id: Mapped[int] = mapped_column(ForeignKey("employees.id"), primary_key=True)
    language: Mapped[str | None] = mapped_column(String(20))
    __mapper_args__ = {"polymorphic_identity": "engineer"}


class Manager(Employee):
    __tablename__ = "managers"
    id: Mapped[int] = mapped_column(ForeignKey("employees.id"), primary_key=True)
    reports: Mapped[int | None] = mapped_column(Integer)
    __mapper_args__ = {"polymorphic_identity": "manager"}


class Vehicle(Base):
    """Single-table inheritance."""

    __tablename__ = "vehicles"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(20))
    wheels: Mapped[int | None] = mapped_column(Integer)
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "vehicle"}


class Car(Vehicle):
    __mapper_args__ = {"polymorphic_identity": "car"}


class Truck(Vehicle):
    __mapper_args__ = {"polymorphic_identity": "truck"}


CACHED = (User, Everything, Membership, Token, Employee, Vehicle)
