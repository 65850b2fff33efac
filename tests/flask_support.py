"""Fixtures for the Flask tests: the example application (``docs/examples/flask_app.py``, not part
of the package) on a real database (its own database per run, apart from the core tests' tables)
and a real cache, its SQL counted by tests/counting.py's :class:`SQLCounter` (assert on a
request with ``expect_sql``)."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.engine import Engine

from .conftest import MARIADB_SERVER, PG_SERVER, REDIS_URL, RUN_ID, require_service
from .counting import SQLCounter, counting_sql
from .databases import create_database, drop_database

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
#: the example's module name, as ``flask --app docs/examples/flask_app.py`` and
#: ``gunicorn --pythonpath docs/examples 'flask_app:create_app()'`` import it
EXAMPLE_MODULE = "flask_app"


def _load_example() -> ModuleType:
    module = sys.modules.get(EXAMPLE_MODULE)
    if module is None:
        spec = importlib.util.spec_from_file_location(EXAMPLE_MODULE, EXAMPLES / "flask_app.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[EXAMPLE_MODULE] = module  # importable by name, as the CLI's MODEL imports it
        spec.loader.exec_module(module)
    return module


example_app = _load_example()
example_db = example_app.db

FLASK_DB = f"{RUN_ID}_flask"
FAST_HASH = "pbkdf2:sha256:1000"  # the example defaults to scrypt; tests log in a lot
PASSWORDS = {email: password for email, _, password, _ in example_app.DEMO_USERS}

_urls: dict[str, str] = {}


@pytest.fixture(scope="session", name="flask_databases")
def flask_databases_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    yield _urls
    if "postgresql" in _urls:
        drop_database(PG_SERVER, FLASK_DB)
    if "mariadb" in _urls:
        drop_database(MARIADB_SERVER, FLASK_DB)


def flask_database_url(kind: str, urls: dict[str, str], tmp_root: str) -> str:
    if kind not in urls:
        if kind == "sqlite":
            urls[kind] = f"sqlite:///{tmp_root}/{FLASK_DB}.sqlite"
        elif kind == "postgresql":
            require_service("postgresql", 5432)
            urls[kind] = create_database(PG_SERVER, FLASK_DB)
        else:
            require_service("mariadb", 3306)
            urls[kind] = create_database(MARIADB_SERVER, FLASK_DB)
    return urls[kind]


def new_prefix() -> str:
    return f"{RUN_ID}_flask_{uuid.uuid4().hex[:8]}"


def cache_config(backend: str, prefix: str | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {"SA_CACHE_PREFIX": prefix or new_prefix()}
    if backend == "redis":
        require_service("redis", 6379)
        config["SA_CACHE_URL"] = REDIS_URL
    return config


def make_example_app(url: str, **config: Any) -> Flask:
    return example_app.create_app(
        {
            "TESTING": True,
            "SECRET_KEY": "test",
            "SQLALCHEMY_DATABASE_URI": url,
            "PASSWORD_HASH_METHOD": FAST_HASH,
            **config,
        }
    )


def reset_database(app: Flask) -> None:
    with app.app_context():
        example_db.create_all()
        with example_db.engine.begin() as conn:
            for table in reversed(example_db.metadata.sorted_tables):
                conn.execute(table.delete())
        example_app.seed()


def close_app(app: Flask) -> None:
    from sa_cache.integrations.flask import EXTENSION_KEY

    state = app.extensions[EXTENSION_KEY]
    if state.publisher is not None:
        state.publisher.stop(final=False)
    if hasattr(state.cache.store, "client"):
        state.cache.store.delete_prefix(state.cache.prefix + ":")
    with app.app_context():
        for engine in example_db.engines.values():
            engine.dispose()


def is_user_select(statement: str) -> bool:
    """A SELECT from the users table (the user loader's, not a role check's)."""
    return statement.lstrip().upper().startswith("SELECT") and "FROM users" in statement


class Browser:
    """A test client that logs in; a request that fails with a 5xx fails the test. What a request
    sends to the database: ``with expect_sql(sql, ...): browser.get(...)``."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.client: FlaskClient = app.test_client()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = getattr(self.client, method)(path, **kwargs)
        assert response.status_code < 500, response.get_data(as_text=True)
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        return self._request("get", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self._request("post", path, **kwargs)

    def login(self, email: str) -> Browser:
        response = self.post("/login", data={"email": email, "password": PASSWORDS[email]})
        assert response.status_code == 302, response.get_data(as_text=True)
        return self


@pytest.fixture(name="example")
def example_fixture(
    db: str,
    backend: str,
    flask_databases: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Flask, SQLCounter]]:
    """The example app on database ``db`` and cache ``backend``, and the counter of every
    statement its engine sends during the test."""
    url = flask_database_url(db, flask_databases, str(tmp_path_factory.getbasetemp()))
    app = make_example_app(url, **cache_config(backend))
    reset_database(app)
    with counting_sql(db_engine(app)) as sql:
        yield app, sql
    close_app(app)


def db_engine(app: Flask) -> Engine:
    with app.app_context():
        return example_db.engine
