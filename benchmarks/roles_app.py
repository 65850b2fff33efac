"""The roles-and-abilities application: Flask + Flask-SQLAlchemy + Flask-Login, users with 1-3
roles, roles with 2-5 abilities (two many-to-many tables), and a login-required page that walks
``current_user.roles`` and each role's ``abilities``: the request most Flask applications make on
every page. Served by gunicorn for :mod:`benchmarks.web_roles` and tests/test_flask_staleness.py::

    BENCH_VARIANT=sa_cache BENCH_DATABASE_URL=postgresql+psycopg://... \\
        gunicorn -w 4 'benchmarks.roles_app:create_app()'

The models and the views are the same code in every variant; only the lines that build ``db`` and
the user loader differ (``BENCH_VARIANT``):

- ``none``: no cache; the loader is ``db.session.get(User, int(user_id))``.
- ``memoize``: Flask-Caching ``@cache.memoize`` of that loader on Redis, the way applications
  cache the user today: the pickled user is put back with ``db.session.merge(user, load=False)``
  (a detached instance cannot lazy-load its roles) and ``delete_memoized`` runs after a change to
  the user. Roles and abilities still come from the database.
- ``sa_cache``: the README's three lines ("Flask in three lines"), nothing else.

Other settings: ``BENCH_DATABASE_URL``; ``BENCH_REDIS_URL`` (default: the local Redis);
``BENCH_CACHE_PREFIX`` (the Redis key prefix of either cache); ``BENCH_BREAK=evictions`` (the
sa_cache variant with commits evicting nothing: the staleness test's proof that it can fail).

Every response carries ``X-Worker-Pid`` and what the request cost the database:
``X-SQL-Statements`` (counted by tests/counting.py's ``counting_sql``), ``X-Pool-Checkouts`` and
``X-Transactions`` (connections checked out of the pool, transactions begun). The POST views that
change roles and abilities have no authorisation: the application is a benchmark, bound to
127.0.0.1.
"""

from __future__ import annotations

import os
import random
from typing import Any

from flask import Flask, g, has_app_context, jsonify, request
from flask.typing import ResponseReturnValue
from flask_login import LoginManager, UserMixin, current_user, login_required, login_user
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import Column, ForeignKey, String, Table, event, insert, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from werkzeug.wrappers import Response

from tests.counting import SQLCounter

VARIANTS = ("none", "memoize", "sa_cache")
REDIS_URL = "redis://127.0.0.1:6379/0"
SECRET_KEY = "benchmark-only-not-secret"  # one key for every variant: a cookie works on all
ROLES = 30
ABILITIES = 80


class Base(DeclarativeBase):
    """The models' base: ``SQLAlchemy(model_class=Base)`` shares its registry, so the models below
    are ``db``'s models in every variant, and module-level, so Flask-Caching can pickle a user."""


user_roles = Table(
    "bench_user_roles",
    Base.metadata,
    Column("user_id", ForeignKey("bench_users.id", ondelete="CASCADE"), primary_key=True),
    Column("role_id", ForeignKey("bench_roles.id", ondelete="CASCADE"), primary_key=True),
)
role_abilities = Table(
    "bench_role_abilities",
    Base.metadata,
    Column("role_id", ForeignKey("bench_roles.id", ondelete="CASCADE"), primary_key=True),
    Column("ability_id", ForeignKey("bench_abilities.id", ondelete="CASCADE"), primary_key=True),
)


class Ability(Base):
    __tablename__ = "bench_abilities"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(60))


class Role(Base):
    __tablename__ = "bench_roles"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(60))
    abilities: Mapped[list[Ability]] = relationship(secondary=role_abilities, order_by=Ability.id)


class User(UserMixin, Base):
    __tablename__ = "bench_users"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(60))
    email: Mapped[str] = mapped_column(String(120))
    roles: Mapped[list[Role]] = relationship(secondary=user_roles, order_by=Role.id)


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """The application; ``config`` overrides the ``BENCH_*`` environment variables (same names)."""
    settings = {
        "BENCH_VARIANT": os.environ.get("BENCH_VARIANT", "sa_cache"),
        "BENCH_DATABASE_URL": os.environ.get("BENCH_DATABASE_URL", "sqlite://"),
        "BENCH_REDIS_URL": os.environ.get("BENCH_REDIS_URL", REDIS_URL),
        "BENCH_CACHE_PREFIX": os.environ.get("BENCH_CACHE_PREFIX", "sa_cache_bench_roles"),
        "BENCH_BREAK": os.environ.get("BENCH_BREAK", ""),
        **(config or {}),
    }
    variant = settings["BENCH_VARIANT"]
    if variant not in VARIANTS:
        raise ValueError(f"BENCH_VARIANT must be one of {', '.join(VARIANTS)}, not {variant!r}")

    app = Flask("sa_cache_bench_roles")
    app.config.update(
        SECRET_KEY=SECRET_KEY,
        SQLALCHEMY_DATABASE_URI=settings["BENCH_DATABASE_URL"],
        SQLALCHEMY_ENGINE_OPTIONS=(
            {}
            if settings["BENCH_DATABASE_URL"].startswith("sqlite")
            else {"pool_size": 5, "max_overflow": 10}
        ),
        SA_CACHE_URL=settings["BENCH_REDIS_URL"] or None,
        SA_CACHE_PREFIX=settings["BENCH_CACHE_PREFIX"],
    )
    login_manager = LoginManager()

    if variant == "sa_cache":
        from sa_cache.integrations.flask import SACache  # 1

        db = SQLAlchemy(model_class=Base, **SACache.sqlalchemy_options())  # 2
    else:
        db = SQLAlchemy(model_class=Base)
    db.init_app(app)
    login_manager.init_app(app)

    if variant == "sa_cache":
        sacache = SACache(app, db)  # 3

        load_user = sacache.user_loader(login_manager, User)  # instead of a user_loader
        app.extensions["bench_load_user"] = load_user
        if settings["BENCH_BREAK"] == "evictions":
            from tests.stress.checker import drop_evictions

            drop_evictions(sacache.cache)
    elif variant == "memoize":
        from flask_caching import Cache

        cache = Cache(
            app,
            config={
                "CACHE_TYPE": "RedisCache",
                "CACHE_REDIS_URL": settings["BENCH_REDIS_URL"],
                "CACHE_KEY_PREFIX": settings["BENCH_CACHE_PREFIX"] + ":",
                "CACHE_DEFAULT_TIMEOUT": 300,
            },
        )

        @cache.memoize(timeout=300)
        def cached_user(user_id: str) -> Any:
            return db.session.get(User, int(user_id))

        @login_manager.user_loader
        def load_memoized_user(user_id: str) -> Any:
            user = cached_user(user_id)
            return None if user is None else db.session.merge(user, load=False)

        app.extensions["bench_forget_user"] = lambda uid: cache.delete_memoized(
            cached_user, str(uid)
        )
    else:

        @login_manager.user_loader
        def load_plain_user(user_id: str) -> Any:
            return db.session.get(User, int(user_id))

    add_views(app, db)
    count_costs(app, db)
    return app


def add_views(app: Flask, db: SQLAlchemy) -> None:
    @app.get("/login/<int:user_id>")
    def log_in(user_id: int) -> ResponseReturnValue:
        user = db.get_or_404(User, user_id)
        login_user(user)
        return "ok"

    @app.get("/abilities")
    @login_required
    def abilities() -> ResponseReturnValue:
        """What the user may do: every role, and every ability of each."""
        return jsonify(
            user=current_user.id,
            roles={role.name: [a.name for a in role.abilities] for role in current_user.roles},
        )

    @app.post("/users/<int:user_id>/roles")
    def set_roles(user_id: int) -> ResponseReturnValue:
        user = db.get_or_404(User, user_id)
        ids = [int(i) for i in request.form.getlist("role")]
        user.roles = list(db.session.scalars(select(Role).where(Role.id.in_(ids))))
        db.session.commit()
        forget = app.extensions.get("bench_forget_user")
        if forget is not None:
            forget(user_id)
        return {"user": user_id, "roles": sorted(ids)}

    @app.post("/roles/<int:role_id>/abilities")
    def set_abilities(role_id: int) -> ResponseReturnValue:
        role = db.get_or_404(Role, role_id)
        ids = [int(i) for i in request.form.getlist("ability")]
        role.abilities = list(db.session.scalars(select(Ability).where(Ability.id.in_(ids))))
        db.session.commit()
        return {"role": role_id, "abilities": sorted(ids)}


def count_costs(app: Flask, db: SQLAlchemy) -> None:
    """The response headers: statements, pool checkouts and transactions of this request. One
    listener each for the worker's life (gunicorn's sync workers serve one request at a time);
    :func:`close` removes them."""
    with app.app_context():
        engine = db.engine
    sql = SQLCounter()  # tests/counting.py's, as counting_sql listens with it

    def bump(name: str) -> None:
        if has_app_context():
            setattr(g, name, g.get(name, 0) + 1)

    def checkout(*args: Any) -> None:
        bump("bench_checkouts")

    def begin(conn: Any) -> None:
        bump("bench_begins")

    listeners = [
        (engine, "before_cursor_execute", sql),
        (engine.pool, "checkout", checkout),
        (engine, "begin", begin),
    ]
    for target, name, listener in listeners:
        event.listen(target, name, listener)
    app.extensions["bench_listeners"] = listeners

    @app.before_request
    def start_counting() -> None:
        sql.reset()

    @app.after_request
    def cost_headers(response: Response) -> Response:
        response.headers["X-Worker-Pid"] = str(os.getpid())
        response.headers["X-SQL-Statements"] = str(sql.count)
        response.headers["X-Pool-Checkouts"] = str(g.get("bench_checkouts", 0))
        response.headers["X-Transactions"] = str(g.get("bench_begins", 0))
        return response


def dataset(users: int, seed: int = 13) -> dict[str, list[dict[str, Any]]]:
    """Rows for every table: ``users`` users with 1-3 roles each, roles with 2-5 abilities."""
    rng = random.Random(seed)
    abilities = [{"id": i, "name": f"ability-{i}"} for i in range(1, ABILITIES + 1)]
    roles = [{"id": i, "name": f"role-{i}"} for i in range(1, ROLES + 1)]
    role_abilities = [
        {"role_id": r["id"], "ability_id": a}
        for r in roles
        for a in rng.sample(range(1, ABILITIES + 1), rng.randint(2, 5))
    ]
    people = [
        {"id": i, "name": f"user {i}", "email": f"user{i}@example.com"} for i in range(1, users + 1)
    ]
    user_roles = [
        {"user_id": u["id"], "role_id": r}
        for u in people
        for r in rng.sample(range(1, ROLES + 1), rng.randint(1, 3))
    ]
    return {
        "bench_abilities": abilities,
        "bench_roles": roles,
        "bench_role_abilities": role_abilities,
        "bench_users": people,
        "bench_user_roles": user_roles,
    }


def populate(database_url: str, users: int) -> None:
    """(Re)create the tables in ``database_url`` and fill them with :func:`dataset`."""
    app = create_app({"BENCH_VARIANT": "none", "BENCH_DATABASE_URL": database_url})
    db: SQLAlchemy = app.extensions["sqlalchemy"]
    with app.app_context():
        db.drop_all()
        db.create_all()
        tables = db.metadata.tables
        with db.engine.begin() as conn:
            for name, rows in dataset(users).items():
                for start in range(0, len(rows), 1000):
                    conn.execute(insert(tables[name]), rows[start : start + 1000])
    close(app)


def abilities_of(conn: Connection, user_id: int) -> dict[str, list[str]]:
    """What ``/abilities`` must answer for ``user_id``, read straight from the database."""
    rows = conn.execute(
        text(
            "SELECT r.name, a.name FROM bench_user_roles ur"
            " JOIN bench_roles r ON r.id = ur.role_id"
            " LEFT JOIN bench_role_abilities ra ON ra.role_id = r.id"
            " LEFT JOIN bench_abilities a ON a.id = ra.ability_id"
            " WHERE ur.user_id = :user_id ORDER BY r.id, a.id"
        ),
        {"user_id": user_id},
    )
    found: dict[str, list[str]] = {}
    for role, ability in rows:
        names = found.setdefault(role, [])
        if ability is not None:
            names.append(ability)
    return found


def close(app: Flask) -> None:
    """Release what :func:`create_app` opened: the listeners, the pool, sa_cache's publisher."""
    state = app.extensions.get("sa_cache")
    if state is not None and state.publisher is not None:
        state.publisher.stop(final=False)
    for target, name, listener in app.extensions["bench_listeners"]:
        event.remove(target, name, listener)
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()
