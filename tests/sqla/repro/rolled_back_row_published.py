"""A session bound to a Connection whose (outer) transaction inserted a row with Core: its get()
misses, loads the uncommitted row and fills the cache with it; the outer transaction rolls
back, and another session's get() is then answered with a row that never existed.
(Found while reading test/orm/test_query.py::GetTest::test_unicode.)"""

from _common import User, setup
from sqlalchemy import insert

for with_cache in (False, True):
    session, sql = setup(with_cache)
    engine = session().bind
    with engine.connect() as conn:
        conn.execute(insert(User), {"id": 9, "name": "never committed"})
        with session(bind=conn) as s:
            s.get(User, 9)  # sees the uncommitted row on its connection
        conn.rollback()
    with session() as s:
        print(
            f"cache={with_cache}: after the rollback, get(User, 9) -> "
            f"{getattr(s.get(User, 9), 'name', None)!r}"
        )
