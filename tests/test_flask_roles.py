"""The roles-and-abilities application (benchmarks/roles_app.py) driven through Flask's test
client on SQLite, PostgreSQL and MariaDB, with Redis and with the in-process store: the README's
three lines, and nothing else, make the page that walks ``current_user.roles`` and each role's
abilities answer with no SQL, no pool checkout and no transaction once warm; its answers are the
uncached application's; a malformed id in the cookie is an anonymous visitor, never a 500."""

from __future__ import annotations

import inspect
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from sqlalchemy import event

from benchmarks import roles_app
from benchmarks.env import delete_prefix

from .conftest import MARIADB_SERVER, PG_SERVER, REDIS_URL, RUN_ID
from .counting import RedisCounter, count_client, counting_sql, expect_commands, expect_sql
from .databases import create_database, drop_database

ROOT = Path(__file__).resolve().parent.parent
USERS = 12
WARM_PASSES = 6  # MariaDB's REPEATABLE READ fills one level (user, roles, abilities) per pass
SERVERS = {"postgresql": PG_SERVER, "mariadb": MARIADB_SERVER}
MALFORMED = ["abc", "", "1.5", " 1", "1\n", "\u0663", "9" * 30, str(2**63), "1 OR 1=1", "-0x1"]


@pytest.fixture(name="roles_url")
def roles_url_fixture(db: str, tmp_path: Path) -> Iterator[str]:
    if db == "sqlite":
        url = f"sqlite:///{tmp_path}/roles.sqlite"
    else:
        url = create_database(SERVERS[db], f"{RUN_ID}_roles")
    roles_app.populate(url, USERS)
    yield url
    if db != "sqlite":
        drop_database(SERVERS[db], f"{RUN_ID}_roles")


def make_app(url: str, variant: str, backend: str = "memory") -> Flask:
    prefix = f"{RUN_ID}_roles_{uuid.uuid4().hex[:8]}"
    return roles_app.create_app(
        {
            "BENCH_VARIANT": variant,
            "BENCH_DATABASE_URL": url,
            "BENCH_REDIS_URL": REDIS_URL if backend == "redis" else "",
            "BENCH_CACHE_PREFIX": prefix,
        }
    )


@pytest.fixture(name="apps")
def apps_fixture(roles_url: str, backend: str) -> Iterator[tuple[Flask, Flask]]:
    """The cached application and the uncached one, on the same database."""
    cached, plain = make_app(roles_url, "sa_cache", backend), make_app(roles_url, "none")
    yield cached, plain
    for app in (cached, plain):
        roles_app.close(app)
    if backend == "redis":
        client = redis.Redis.from_url(REDIS_URL)
        delete_prefix(client, cached.config["SA_CACHE_PREFIX"])
        client.close()


def engine_of(app: Flask) -> Any:
    with app.app_context():
        return app.extensions["sqlalchemy"].engine


def logged_in(app: Flask, user: int) -> Any:
    client = app.test_client()
    assert client.get(f"/login/{user}").status_code == 200
    return client


def abilities(client: Any) -> Any:
    response = client.get("/abilities")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json


def test_a_warm_roles_and_abilities_request_uses_no_database_connection(apps):
    cached, plain = apps
    users = range(1, USERS + 1)
    clients = {user: logged_in(cached, user) for user in users}
    uncached = {user: logged_in(plain, user) for user in users}
    engine = engine_of(cached)
    with counting_sql(engine) as sql:
        for _ in range(WARM_PASSES):
            sql.reset()
            for user in users:  # cold and warming: the answers are the uncached application's
                assert abilities(clients[user]) == abilities(uncached[user])
            if sql.count == 0:
                break
        checkouts: list[object] = []
        begun: list[object] = []

        def checked_out(*args: object) -> None:
            checkouts.append(args)

        def began(conn: object) -> None:
            begun.append(conn)

        event.listen(engine.pool, "checkout", checked_out)
        event.listen(engine, "begin", began)
        try:
            with expect_sql(sql, 0):
                for user in users:
                    answer = abilities(clients[user])
                    assert answer == abilities(uncached[user])
                    assert answer["roles"] and all(answer["roles"].values())
        finally:
            event.remove(engine.pool, "checkout", checked_out)
            event.remove(engine, "begin", began)
    assert checkouts == [] and begun == []
    response = clients[1].get("/abilities")  # the application's own headers say the same
    assert response.headers["X-SQL-Statements"] == "0"
    assert response.headers["X-Pool-Checkouts"] == "0"
    assert response.headers["X-Transactions"] == "0"


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
def test_a_warm_request_costs_two_round_trips_and_one_per_role(apps):
    """The user; the user's roles with their rows; each role's abilities with their rows (the
    rows this process last saw in a collection are read in the collection's round trip)."""
    cached, plain = apps
    users = range(1, USERS + 1)
    clients = {user: logged_in(cached, user) for user in users}
    expected = {user: abilities(logged_in(plain, user)) for user in users}
    with counting_sql(engine_of(cached)) as sql:
        for _ in range(WARM_PASSES):
            sql.reset()
            for user in users:
                assert abilities(clients[user]) == expected[user]
            if sql.count == 0:
                break
    backend = cached.extensions["sa_cache"].cache.region.actual_backend
    counter = RedisCounter()
    for client in {id(c): c for c in (backend.writer_client, backend.reader_client)}.values():
        count_client(counter, client)
    abilities(clients[1])  # the counted connection's handshake
    seen = set()
    for user in users:
        roles = len(expected[user]["roles"])
        seen.add(roles)
        with expect_commands(counter, {"MGET": 2 + roles}, round_trips=2 + roles):
            assert abilities(clients[user]) == expected[user]
    assert 2 in seen  # the benchmark's two-role request: 4 round trips (7 before)


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_a_malformed_id_in_the_cookie_is_an_anonymous_visitor_never_a_500(apps):
    cached, _ = apps
    client = cached.test_client()
    for cookie_id in MALFORMED:
        with client.session_transaction() as session:
            session["_user_id"] = cookie_id
            session["_fresh"] = True
        response = client.get("/abilities")
        assert response.status_code == 401, (cookie_id, response.get_data(as_text=True)[:300])
    with cached.app_context():
        assert cached.extensions["bench_load_user"]("1").id == 1
        assert cached.extensions["bench_load_user"]("abc") is None


def test_the_readme_three_lines_are_the_benchmark_application_s_only_change():
    """The README's Flask lines, the safe loader included, are the sa_cache variant of the
    roles application word for word; the models and the views are shared by every variant."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Flask in three lines\n.*?```python\n(.*?)```", readme, re.S)
    assert block is not None
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    lines = [line for line in lines if line]
    assert lines[-1] == "load_user = sacache.user_loader(login_manager, User)"
    assert "int(user_id)" not in block.group(1)
    source = inspect.getsource(roles_app.create_app)
    code = [line.split("#")[0].strip() for line in source.splitlines()]
    for line in lines:
        assert line in code, line
    assert "session_options" not in inspect.getsource(roles_app.add_views)
