"""The example application (users, roles, login, an admin page) driven through Flask's test
client, on SQLite, PostgreSQL and MariaDB, with Redis and with the in-process backend: SQL per
request, changes served on the next request, and cookies that can never cause a 500."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import sa_cache.integrations
from sa_cache.integrations.flask import EXTENSION_KEY
from sqlalchemy import event

from .counting import counting_sql, expect_sql
from .flask_support import (  # noqa: F401 - fixtures
    EXAMPLES,
    Browser,
    cache_config,
    close_app,
    db_engine,
    example_app,
    example_db,
    example_fixture,
    flask_databases_fixture,
    is_user_select,
    make_example_app,
)

User = example_app.User

BOB = "bob@example.com"
ALICE = "alice@example.com"
CAROL = "carol@example.com"


def user_id(app, email):
    with app.app_context():
        return example_db.session.scalar(example_db.select(User.id).where(User.email == email))


def test_the_example_is_documentation_not_part_of_the_package():
    assert example_app.__file__ == str(EXAMPLES / "flask_app.py")
    assert importlib.util.find_spec("sa_cache.integrations.example_app") is None
    package = Path(sa_cache.integrations.__file__).parent
    assert sorted(p.name for p in package.glob("*.py")) == [
        "__init__.py",
        "flask.py",
        "flask_login.py",
    ]


def test_a_warm_request_loads_the_user_with_no_sql(example):
    app, sql = example
    bob = Browser(app).login(BOB)
    sql.reset()
    bob.get("/me")  # cold: the loader misses and fills
    assert sql.count <= 1, sql.statements
    for _ in range(3):
        with expect_sql(sql, 0):
            response = bob.get("/me")
        assert response.status_code == 200
        assert response.json["email"] == BOB
    stats = app.extensions[EXTENSION_KEY].cache.stats()["models"]["User"]
    assert stats["hits"] >= 3


WARM_PASSES = 10


def test_a_warm_role_check_touches_no_database_connection(example):
    """The user, the user's roles collection and each role come from the cache: a warm request
    sends no SQL, checks no connection out of the pool and begins no transaction."""
    app, sql = example
    engine = db_engine(app)
    checkouts: list[object] = []
    begun: list[object] = []
    carol = Browser(app).login(CAROL)
    bob = Browser(app).login(BOB)
    # the first pass fills the user and the collection, the next the roles the collection's
    # SELECT loaded (no observation to fill against the first time); under MariaDB's REPEATABLE
    # READ a request fills only what its snapshot can prove fresh, one level per pass
    for _ in range(WARM_PASSES):
        sql.reset()
        carol.get("/reports")
        bob.get("/reports")
        if sql.count == 0:
            break

    def checked_out(*args: object) -> None:
        checkouts.append(args)

    def began(conn: object) -> None:
        begun.append(conn)

    event.listen(engine.pool, "checkout", checked_out)
    event.listen(engine, "begin", began)
    try:
        with expect_sql(sql, 0):
            assert carol.get("/reports").status_code == 200
            assert bob.get("/reports").status_code == 403  # an empty collection, cached too
    finally:
        event.remove(engine.pool, "checkout", checked_out)
        event.remove(engine, "begin", began)
    assert checkouts == [] and begun == []


def test_a_role_change_by_the_admin_is_served_on_the_next_request(example):
    app, _ = example
    alice = Browser(app).login(ALICE)
    bob = Browser(app).login(BOB)
    bob_id = user_id(app, BOB)
    bob.get("/me")
    assert bob.get("/reports").status_code == 403
    response = alice.post(f"/admin/users/{bob_id}/roles", data={"role": ["reports"]})
    assert response.json["roles"] == ["reports"]
    assert bob.get("/reports").status_code == 200
    alice.post(f"/admin/users/{bob_id}/roles", data={"role": []})
    assert bob.get("/reports").status_code == 403


def test_a_change_to_the_user_row_is_served_on_the_next_request(example):
    app, sql = example
    alice = Browser(app).login(ALICE)
    bob = Browser(app).login(BOB)
    bob_id = user_id(app, BOB)
    bob.get("/me")
    with expect_sql(sql, 0):
        assert bob.get("/me").json["email"] == BOB
    alice.post(f"/admin/users/{bob_id}", data={"email": "robert@example.com", "name": "Robert"})
    with expect_sql(sql, 1) as sent:  # evicted by the commit: a miss
        response = bob.get("/me")
    assert response.json == {"id": bob_id, "email": "robert@example.com", "name": "Robert"}
    assert is_user_select(sent.statements[0])
    with expect_sql(sql, 0):
        assert bob.get("/me").json["email"] == "robert@example.com"
    alice.post(f"/admin/users/{bob_id}", data={"active": "0"})
    response = bob.get("/me")  # deactivated: logged out on the very next request
    assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_logout_needs_no_cache_call(example):
    app, sql = example
    cache = app.extensions[EXTENSION_KEY].cache
    bob = Browser(app).login(BOB)
    bob.get("/me")
    bob.get("/me")
    before = cache.stats()
    with expect_sql(sql, 0):
        response = bob.post("/logout")
    assert response.status_code == 302
    after = cache.stats()  # Flask-Login's logout_user reads the user once (a hit); no writes
    assert {k: after[k] for k in ("misses", "fills", "evictions")} == {
        k: before[k] for k in ("misses", "fills", "evictions")
    }
    assert bob.get("/me").status_code == 302
    bob.login(BOB)
    assert bob.get("/me").json["email"] == BOB


MALFORMED = ["abc", "", "1.5", "0x10", " 1", "1\n", "\u0663", "9" * 20, str(2**63), "-5", "1e3"]


def test_a_malformed_id_in_the_cookie_is_logged_out_never_a_500(example):
    app, sql = example
    browser = Browser(app)
    for cookie_id in MALFORMED:
        with browser.client.session_transaction() as session:
            session["_user_id"] = cookie_id
            session["_fresh"] = True
        sql.reset()
        response = browser.get("/me")  # Browser asserts the status is below 500
        assert response.status_code == 302, cookie_id
        assert sql.count <= 1, (cookie_id, sql.statements)


def test_a_stale_id_in_the_cookie_is_logged_out_never_a_500(example):
    app, sql = example
    alice = Browser(app).login(ALICE)
    carol = Browser(app).login(CAROL)
    carol_id = user_id(app, CAROL)
    carol.get("/me")
    alice.post(f"/admin/users/{carol_id}/delete")
    assert carol.get("/me").status_code == 302  # deleted: a miss, then absent
    with expect_sql(sql, 0):  # the absence itself is cached
        assert carol.get("/me").status_code == 302
    for far in (str(2**31 + 7), str(2**40)):  # beyond a 32-bit INTEGER column: no error either
        with carol.client.session_transaction() as session:
            session["_user_id"] = far
        assert carol.get("/me").status_code == 302


def test_model_query_get_and_get_or_404_are_cached(example):
    app, sql = example
    bob_id = user_id(app, BOB)
    with app.app_context():
        assert User.query.get(bob_id).email == BOB
    with expect_sql(sql, 0), app.app_context():
        assert User.query.get(bob_id).email == BOB
        assert example_db.get_or_404(User, bob_id).email == BOB
        assert example_db.session.get(User, str(bob_id)).email == BOB
        assert [u.email for u in User.query.get_many([bob_id, bob_id])] == [BOB, BOB]


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_two_processes_sharing_redis_serve_each_others_changes(example, backend):
    """Two application instances, each with its own cache object, are two processes' worth of
    state: with Redis, a commit in one is served by the other on its next request."""
    app, _ = example
    prefix = app.extensions[EXTENSION_KEY].cache.prefix
    other = make_example_app(app.config["SQLALCHEMY_DATABASE_URI"], **cache_config(backend, prefix))
    try:
        bob = Browser(other).login(BOB)
        bob.get("/me")
        with counting_sql(db_engine(other)) as other_sql, expect_sql(other_sql, 0):
            assert bob.get("/me").json["email"] == BOB
        alice = Browser(app).login(ALICE)
        alice.post(f"/admin/users/{user_id(app, BOB)}", data={"email": "bobby@example.com"})
        assert bob.get("/me").json["email"] == "bobby@example.com"
    finally:
        close_app(other)
