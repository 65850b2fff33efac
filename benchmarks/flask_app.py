"""A minimal Flask + Flask-SQLAlchemy + Flask-Login app, served by gunicorn for the request
benchmark: ``gunicorn 'benchmarks.flask_app:create_app()'``.

Environment: ``BENCH_DATABASE_URL``; ``BENCH_CACHE`` (a Redis URL for the sa_cache variant, empty
for the uncached one); ``BENCH_CACHE_PREFIX``. Every response carries ``X-SQL-Count``, the number
of statements the request sent to the database, counted by the tests' ``counting_sql``
(tests/counting.py).

sa_cache is plugged in through ``session_options`` with a Session class of its own (a subclass of
:class:`sa_cache.CachingSessionMixin` and Flask-SQLAlchemy's Session), not through
``integrations/flask.py``.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any

from flask import Flask
from flask_login import LoginManager, UserMixin, current_user, login_required, login_user
from flask_sqlalchemy import SQLAlchemy
from flask_sqlalchemy.session import Session as FlaskSession

from sa_cache import CachingSessionMixin, IdentityCache
from tests.counting import counting_sql

from .models import UserColumns


class CachingFlaskSession(CachingSessionMixin, FlaskSession):  # type: ignore[misc]
    pass


def create_app() -> Flask:
    url = os.environ["BENCH_DATABASE_URL"]
    cache_url = os.environ.get("BENCH_CACHE", "")
    app = Flask("sa_cache_bench_app")
    app.config.update(
        SECRET_KEY="benchmark-only-not-secret",
        SQLALCHEMY_DATABASE_URI=url,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 5},
    )
    if url.startswith("sqlite"):
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {}
    if cache_url:
        cache: IdentityCache | None = IdentityCache(
            cache_url, prefix=os.environ.get("BENCH_CACHE_PREFIX", "sa_cache_bench_app")
        )
        db = SQLAlchemy(session_options={"class_": CachingFlaskSession, "cache": cache})
    else:
        cache = None
        db = SQLAlchemy()

    class User(UserColumns, UserMixin, db.Model):  # type: ignore[name-defined,misc]
        pass

    if cache is not None:
        cache.register(User)
    db.init_app(app)
    login = LoginManager(app)

    @login.user_loader
    def load_user(user_id: str) -> Any:
        return db.session.get(User, int(user_id))

    # one counter for the worker's life, kept open on the app (gunicorn's sync workers serve one
    # request at a time), reset as each request begins: no listener added per request
    counting = ExitStack()
    with app.app_context():
        sql = counting.enter_context(counting_sql(db.engine))
    app.extensions["bench_sql_counting"] = counting

    @app.before_request
    def count_sql() -> None:
        sql.reset()

    @app.after_request
    def sql_header(response: Any) -> Any:
        response.headers["X-SQL-Count"] = str(sql.count)
        return response

    @app.route("/login/<int:user_id>")
    def log_in(user_id: int) -> str:
        user = db.session.get(User, user_id)
        login_user(user)
        return "ok"

    @app.route("/me")
    @login_required
    def me() -> str:
        return f"{current_user.id} {current_user.name}"

    return app
