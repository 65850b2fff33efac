"""Shared scaffolding of the reproductions: two tables on SQLite in memory, a cache or not."""

from sqlalchemy import ForeignKey, StaticPool, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from sa_cache import CachingSession, IdentityCache


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    addresses: Mapped[list["Address"]] = relationship(back_populates="user")


class Address(Base):
    __tablename__ = "addresses"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    email: Mapped[str]
    user: Mapped[User] = relationship(back_populates="addresses")


def setup(with_cache: bool):
    """A fresh database with user 7 and address 1; the session factory; the SQL log."""
    engine = create_engine("sqlite://", poolclass=StaticPool)
    Base.metadata.create_all(engine)
    sql: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: sql.append(a[2].split()[0]))
    cache = None
    if with_cache:
        cache = IdentityCache()
        cache.register(User)
        cache.register(Address)

    def session(**kw):
        kw.setdefault("bind", engine)
        return CachingSession(cache=cache, **kw)

    with session() as s:
        s.add(User(id=7, name="fred", addresses=[Address(id=1, email="f@x")]))
        s.commit()
    sql.clear()
    return session, sql
