"""A hit ignores the loader options of get / merge: selectinload(User.addresses) loads nothing.
(SQLAlchemy: test/orm/test_merge.py::MergeTest::test_loader_options)"""

from _common import User, setup
from sqlalchemy.orm import selectinload

for with_cache in (False, True):
    session, sql = setup(with_cache)
    with session() as s:
        s.get(User, 7)  # a miss: fills the cache
    with session() as s:
        u = s.get(User, 7, options=[selectinload(User.addresses)])  # a hit
        print(f"cache={with_cache}: addresses loaded by get: {'addresses' in u.__dict__}")
