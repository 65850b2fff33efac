"""A class mapped to a subquery (or CTE) of a table: at 5d703f3 the first miss raised ValueError
from the fill instead of returning the row; since then register() refuses the class.
(test/orm/test_lazy_relations.py::LazyTest::test_map_to_cte_subq)"""

from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, insert, select
from sqlalchemy.orm import registry

from sa_cache import CachingSession, IdentityCache

metadata = MetaData()
users = Table("users", metadata, Column("id", Integer, primary_key=True), Column("name", String))
engine = create_engine("sqlite://")
metadata.create_all(engine)
with engine.begin() as conn:
    conn.execute(insert(users), {"id": 7, "name": "jack"})


class User:
    pass


registry().map_imperatively(User, select(users).subquery())

for cache in (None, IdentityCache()):
    if cache is not None:
        try:
            cache.register(User)
        except Exception as exc:  # a later fix: refused at registration
            print(f"register refused: {type(exc).__name__}: {exc}")
            continue
    with CachingSession(engine, cache=cache) as s:
        try:
            print(f"cache={cache is not None}: get -> {s.get(User, 7).name}")
        except Exception as exc:
            print(f"cache={cache is not None}: get raised {type(exc).__name__}: {exc}")
