"""An ORM UPDATE/DELETE calls a custom Session.get_bind() once more with the cache on (sa_cache
asks for the bind to learn the dialect), and the extra call has no clause= (a routing session
that routes by statement sees a different call).
(test/orm/dml/test_orm_upd_del_basic.py::UpdateDeleteTest::test_routing_session,
test/orm/test_query.py::SessionBindTest::test_bulk_update_no_sync and friends)"""

from _common import User, setup
from sqlalchemy import update
from sqlalchemy.orm import Session

from sa_cache import CachingSessionMixin

calls: list[str] = []


class RoutingSession(CachingSessionMixin, Session):
    def get_bind(self, mapper=None, *, clause=None, **kw):
        calls.append(type(clause).__name__)
        return super().get_bind(mapper, clause=clause, **kw)


for with_cache in (False, True):
    factory, sql = setup(with_cache)
    probe = factory()
    with RoutingSession(probe.bind, cache=probe.cache) as s:
        calls.clear()
        s.execute(update(User).where(User.id == 7).values(name="x"))
        print(f"cache={with_cache}: get_bind calls, by clause type: {calls}")
