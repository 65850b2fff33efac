"""A session bound to a Connection whose transaction inserted a row with Core (the "join a
session into an external transaction" recipe of test suites): get() answers None from an
absence cached earlier, although the row is visible on that connection.
(test/orm/test_query.py::GetTest::test_unicode, fill-all: the absence came from the warm-up)"""

from _common import User, setup
from sqlalchemy import insert

for with_cache in (False, True):
    session, sql = setup(with_cache)
    with session() as s:
        s.get(User, 8)  # no row 8: with the cache, the absence is remembered
    engine = s.bind
    with engine.connect() as conn:  # an outer transaction, as test fixtures use
        conn.execute(insert(User), {"id": 8, "name": "eight"})
        with session(bind=conn) as s2:
            print(f"cache={with_cache}: get(User, 8) -> {s2.get(User, 8)!r}")
        conn.rollback()
