"""A hit on a hierarchy whose polymorphic_on is a SQL expression (case(...)), not a column:
placing the row refreshes the internal '_sa_polymorphic_on' property, and Session.refresh
raises KeyError. (test/orm/test_merge.py::PolymorphicOnTest::test_merge_polymorphic_on, fill-all)"""

from sqlalchemy import Column, Integer, MetaData, String, Table, case, create_engine
from sqlalchemy.orm import registry

from sa_cache import CachingSession, IdentityCache

metadata = MetaData()
employees = Table(
    "employees",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("type", String(1)),
    Column("data", String),
)


class Employee:
    pass


class Manager(Employee):
    pass


reg = registry(metadata=metadata)
base = reg.map_imperatively(
    Employee,
    employees,
    polymorphic_identity="employee",
    polymorphic_on=case({"E": "employee", "M": "manager"}, value=employees.c.type),
)
reg.map_imperatively(Manager, inherits=base, polymorphic_identity="manager")
engine = create_engine("sqlite://")
metadata.create_all(engine)
with engine.begin() as conn:
    conn.execute(employees.insert(), {"id": 55, "type": "M", "data": "original"})

for cache in (None, IdentityCache()):
    if cache is not None:
        cache.register(Employee)
    for attempt in ("miss", "hit"):
        with CachingSession(engine, cache=cache) as s:
            try:
                print(f"cache={cache is not None} {attempt}: {s.get(Employee, 55).data}")
            except Exception as exc:
                print(f"cache={cache is not None} {attempt}: raised {type(exc).__name__}: {exc}")
