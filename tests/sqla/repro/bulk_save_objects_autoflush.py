"""bulk_save_objects with an expired object: sa_cache reads its identity first, which refreshes the
expired primary key, and that load autoflushes the session: the pending and dirty objects passed
in are flushed by the unit of work (a SELECT, an INSERT, an UPDATE) before the bulk save, which
then sees only updates. Without the cache SQLAlchemy raises (no primary key in the expired row).
(test/orm/dml/test_bulk.py::BulkInsertUpdateTest::test_bulk_save_mappings_preserve_order)"""

from _common import User, setup
from sqlalchemy import inspect

for with_cache in (False, True):
    session, sql = setup(with_cache)
    with session() as s:
        u7 = s.get(User, 7)
        s.commit()  # expires u7
        u7.name = "changed"
        u8 = User(id=8, name="new")
        s.add(u8)
        sql.clear()
        try:
            s.bulk_save_objects([u7, u8])
            outcome = "ok"
        except Exception as exc:
            outcome = f"{type(exc).__name__}"
        print(f"cache={with_cache}: {outcome}; SQL {sql}; u8 persistent: {inspect(u8).persistent}")
