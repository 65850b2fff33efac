"""ORM UPDATE/DELETE: at 5d703f3, on a dialect with RETURNING, sa_cache replaced the caller's
synchronize_session ("evaluate", "auto") with "fetch" (first two values; fixed since); an
UPDATE/DELETE/INSERT wrapped in select().from_statement() raises AttributeError (third).
test/orm/dml/test_orm_upd_del_basic.py::UpdateDeleteTest::test_evaluate_before_delete,
::test_delete_invalid_evaluation, ::test_update_changes_resets_dirty;
test/orm/test_events.py::ORMExecuteTest::test_update_delete_flags"""

from _common import User, setup
from sqlalchemy import delete, func, select, update


def attempt(fn):
    try:
        fn()
        return "ok"
    except Exception as exc:
        return f"raised {type(exc).__name__}"


for with_cache in (False, True):
    session, sql = setup(with_cache)
    with session() as s:
        fred = s.get(User, 7)
        s.expire(fred, ["name"])  # "evaluate" cannot judge an expired attribute: it leaves fred
        s.execute(
            delete(User).where(User.name == "fred"),
            execution_options={"synchronize_session": "evaluate"},
        )
        in_session = fred in s
        s.rollback()
        invalid = attempt(
            lambda: s.execute(  # "evaluate" cannot evaluate a subquery: raises
                delete(User).where(User.name == select(func.max(User.name)).scalar_subquery()),
                execution_options={"synchronize_session": "evaluate"},
            )
        )
        s.rollback()
        wrapped = attempt(
            lambda: s.execute(
                select(User).from_statement(
                    update(User).where(User.id == 7).values(name="x").returning(User)
                )
            ).all()
        )
        print(
            f"cache={with_cache}: expired object still in session after evaluate delete: "
            f"{in_session}; un-evaluable criteria: {invalid}; from_statement(update): {wrapped}"
        )
