"""The example application (the seeds' scenario) driven through Flask's test client, on SQLite,
PostgreSQL and MariaDB, with Redis and with the in-process backend: SQL per request, changes
served on the next request, and cookies that can never cause a 500."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import sa_cache.integrations
from sa_cache.integrations.flask import EXTENSION_KEY

from .flask_support import (  # noqa: F401 - fixtures
    EXAMPLES,
    Browser,
    SQLLog,
    cache_config,
    close_app,
    db_engine,
    example_app,
    example_db,
    example_fixture,
    flask_databases_fixture,
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
    bob = Browser(app, sql).login(BOB)
    bob.get("/me")  # cold: the loader misses and fills
    assert bob.statements <= 1
    for _ in range(3):
        response = bob.get("/me")
        assert response.status_code == 200
        assert response.json["email"] == BOB
        assert bob.statements == 0, bob.last
    stats = app.extensions[EXTENSION_KEY].cache.stats()["models"]["User"]
    assert stats["hits"] >= 3


def test_a_role_check_costs_one_select_and_never_one_for_the_user(example):
    app, sql = example
    carol = Browser(app, sql).login(CAROL)
    carol.get("/reports")
    response = carol.get("/reports")
    assert response.status_code == 200
    assert carol.statements == 1  # the roles collection; the user came from the cache
    assert "user_roles" in carol.last[0]
    assert not any("FROM users\n" in s or s.rstrip().endswith("FROM users") for s in carol.last)
    bob = Browser(app, sql).login(BOB)
    bob.get("/me")
    assert bob.get("/reports").status_code == 403
    assert bob.statements == 1


def test_a_role_change_by_the_admin_is_served_on_the_next_request(example):
    app, sql = example
    alice = Browser(app, sql).login(ALICE)
    bob = Browser(app, sql).login(BOB)
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
    alice = Browser(app, sql).login(ALICE)
    bob = Browser(app, sql).login(BOB)
    bob_id = user_id(app, BOB)
    bob.get("/me")
    assert bob.get("/me").json["email"] == BOB and bob.statements == 0
    alice.post(f"/admin/users/{bob_id}", data={"email": "robert@example.com", "name": "Robert"})
    response = bob.get("/me")
    assert response.json == {"id": bob_id, "email": "robert@example.com", "name": "Robert"}
    assert len(sql.user_selects()) and bob.statements == 1  # evicted by the commit: a miss
    assert bob.get("/me").json["email"] == "robert@example.com" and bob.statements == 0
    alice.post(f"/admin/users/{bob_id}", data={"active": "0"})
    response = bob.get("/me")  # deactivated: logged out on the very next request
    assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_logout_needs_no_cache_call(example):
    app, sql = example
    cache = app.extensions[EXTENSION_KEY].cache
    bob = Browser(app, sql).login(BOB)
    bob.get("/me")
    bob.get("/me")
    before = cache.stats()
    response = bob.post("/logout")
    assert response.status_code == 302
    assert bob.statements == 0
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
    browser = Browser(app, sql)
    for cookie_id in MALFORMED:
        with browser.client.session_transaction() as session:
            session["_user_id"] = cookie_id
            session["_fresh"] = True
        response = browser.get("/me")  # Browser asserts the status is below 500
        assert response.status_code == 302, cookie_id
        assert browser.statements <= 1, cookie_id


def test_a_stale_id_in_the_cookie_is_logged_out_never_a_500(example):
    app, sql = example
    alice = Browser(app, sql).login(ALICE)
    carol = Browser(app, sql).login(CAROL)
    carol_id = user_id(app, CAROL)
    carol.get("/me")
    alice.post(f"/admin/users/{carol_id}/delete")
    assert carol.get("/me").status_code == 302  # deleted: a miss, then absent
    assert carol.get("/me").status_code == 302
    assert carol.statements == 0  # the absence itself is cached
    for far in (str(2**31 + 7), str(2**40)):  # beyond a 32-bit INTEGER column: no error either
        with carol.client.session_transaction() as session:
            session["_user_id"] = far
        assert carol.get("/me").status_code == 302


def test_model_query_get_and_get_or_404_are_cached(example):
    app, sql = example
    bob_id = user_id(app, BOB)
    with app.app_context():
        assert User.query.get(bob_id).email == BOB
    sql.statements.clear()
    with app.app_context():
        assert User.query.get(bob_id).email == BOB
        assert example_db.get_or_404(User, bob_id).email == BOB
        assert example_db.session.get(User, str(bob_id)).email == BOB
        assert [u.email for u in User.query.get_many([bob_id, bob_id])] == [BOB, BOB]
    assert sql.statements == []


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_two_processes_sharing_redis_serve_each_others_changes(example, backend):
    """Two application instances, each with its own cache object, are two processes' worth of
    state: with Redis, a commit in one is served by the other on its next request."""
    app, sql = example
    prefix = app.extensions[EXTENSION_KEY].cache.prefix
    other = make_example_app(app.config["SQLALCHEMY_DATABASE_URI"], **cache_config(backend, prefix))
    try:
        other_sql = SQLLog(db_engine(other))
        bob = Browser(other, other_sql).login(BOB)
        bob.get("/me")
        assert bob.get("/me").json["email"] == BOB and bob.statements == 0
        alice = Browser(app, sql).login(ALICE)
        alice.post(f"/admin/users/{user_id(app, BOB)}", data={"email": "bobby@example.com"})
        assert bob.get("/me").json["email"] == "bobby@example.com"
    finally:
        close_app(other)
