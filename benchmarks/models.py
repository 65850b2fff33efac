"""The one data set every path reads: 10 000 users, 10 columns (datetime, bool, text among them)."""

from __future__ import annotations

import datetime as dt
import random

from sqlalchemy import Boolean, DateTime, Float, Integer, String, Text, insert
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TABLE = "sa_cache_bench_users"
USERS = 10_000


class UserColumns:
    """The columns, as a mixin, so the plain model and the Flask-SQLAlchemy model are identical."""

    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(60))
    email: Mapped[str] = mapped_column(String(120))
    active: Mapped[bool] = mapped_column(Boolean)
    is_admin: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_login: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    login_count: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    bio: Mapped[str] = mapped_column(Text)


class Base(DeclarativeBase):
    pass


class User(UserColumns, Base):
    pass


def rows(count: int = USERS) -> list[dict[str, object]]:
    rng = random.Random(5)
    start = dt.datetime(2020, 1, 1, 12, 0, 0)
    out = []
    for i in range(1, count + 1):
        out.append(
            {
                "id": i,
                "name": f"user {i}",
                "email": f"user{i}@example.com",
                "active": i % 7 != 0,
                "is_admin": i % 50 == 0,
                "created_at": start + dt.timedelta(minutes=i * 17),
                "last_login": None if i % 5 == 0 else start + dt.timedelta(days=i % 900, hours=3),
                "login_count": rng.randint(0, 5000),
                "score": round(rng.random() * 100, 3),
                "bio": f"A short biography of user {i}. " * rng.randint(1, 3),
            }
        )
    return out


def populate(engine: Engine, count: int = USERS) -> None:
    """(Re)create the benchmark table in ``engine``'s database and fill it."""
    User.__table__.drop(engine, checkfirst=True)
    Base.metadata.create_all(engine)
    data = rows(count)
    with engine.begin() as conn:
        for start in range(0, len(data), 1000):
            conn.execute(insert(User.__table__), data[start : start + 1000])
