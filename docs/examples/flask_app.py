"""A typical Flask application on sa_cache: users with roles (many-to-many), login, a login-required
page, a role-protected page, and admin actions that change a user's roles, email and active
flag. There is no memoize, no pickle and no ``delete_memoized`` anywhere: ``load_user`` is
``db.session.get`` (through ``sacache.user_loader``), served from the cache, and every change is
evicted by the commit that makes it.

It is not part of the installed package: run it from a checkout (configuration comes from
``FLASK_*`` environment variables)::

    export FLASK_SA_CACHE_URL=redis://127.0.0.1:6379/0     # unset: the in-process cache
    .venv/bin/flask --app docs/examples/flask_app.py init-db
    .venv/bin/gunicorn -w 4 -b 127.0.0.1:8000 --pythonpath docs/examples 'flask_app:create_app()'

then log in at http://127.0.0.1:8000/login as ``alice@example.com`` / ``alice-password``
(admin). Every response carries ``X-Worker-Pid`` and ``X-SQL-Statements`` (the statements the
request sent to the database).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from functools import wraps
from typing import Any

import click
from flask import Blueprint, Flask, abort, g, has_app_context, redirect, request, url_for
from flask.typing import ResponseReturnValue
from flask_login import LoginManager, UserMixin, current_user, login_required, login_user
from flask_login import logout_user as flask_logout_user
from flask_sqlalchemy import SQLAlchemy
from sa_cache.integrations.flask import SACache
from sqlalchemy import Boolean, Column, ForeignKey, String, Table, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from werkzeug.security import check_password_hash, generate_password_hash
from werkzeug.wrappers import Response


class Base(DeclarativeBase):
    pass


# The integration: the import above, the options here, SACache() and init_app in create_app.
db = SQLAlchemy(model_class=Base, **SACache.sqlalchemy_options())
sacache = SACache()
login_manager = LoginManager()
login_manager.login_view = "example.login"

user_roles = Table(
    "user_roles",
    Base.metadata,
    Column("user_id", ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("role_id", ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True),
)


class Role(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "roles"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)


class User(UserMixin, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200), unique=True)
    name: Mapped[str] = mapped_column(String(100))
    password_hash: Mapped[str] = mapped_column(String(255))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    roles: Mapped[list[Role]] = relationship(secondary=user_roles, order_by=Role.name)

    @property
    def is_active(self) -> bool:  # type: ignore[override]
        return self.active

    def has_role(self, name: str) -> bool:
        # the collection and its roles come from the cache once warm: no SQL, no connection
        return any(role.name == name for role in self.roles)


# Was: @login_manager.user_loader + @cache.memoize(timeout=5) + pickle + delete_memoized.
# Deactivating a user logs them out of every worker on their next request.
sacache.user_loader(login_manager, User, require_active=True)


bp = Blueprint("example", __name__)


def role_required(role: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(view)
        @login_required
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if not current_user.has_role(role):
                abort(403)
            return view(*args, **kwargs)

        return wrapped

    return decorate


@bp.get("/")
def index() -> ResponseReturnValue:
    if current_user.is_authenticated:
        return f"Hello, {current_user.name}.\n"
    return "Hello, stranger. Log in at /login.\n"


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    if request.method == "GET":
        return (
            '<form method="post"><input name="email"> <input name="password" type="password">'
            ' <label><input name="remember" type="checkbox"> remember me</label>'
            " <button>Log in</button></form>\n"
        )
    email = request.form.get("email", "")
    user = db.session.scalar(select(User).where(User.email == email))
    if user is None or not check_password_hash(
        user.password_hash, request.form.get("password", "")
    ):
        return "Wrong email or password.\n", 401
    if not login_user(user, remember=bool(request.form.get("remember"))):
        return "This account is disabled.\n", 403
    return redirect(request.args.get("next") or url_for("example.me"))


@bp.post("/logout")
def logout() -> ResponseReturnValue:
    flask_logout_user()  # nothing to invalidate: the cache holds rows, not sessions
    return redirect(url_for("example.index"))


@bp.get("/me")
@login_required
def me() -> ResponseReturnValue:
    """The login-required page: on a warm request, no SQL at all."""
    return {"id": current_user.id, "email": current_user.email, "name": current_user.name}


@bp.get("/reports")
@role_required("reports")
def reports() -> ResponseReturnValue:
    """The role-protected page: the user and the role check both from the cache once warm."""
    return {"reports": ["signups", "revenue"], "for": current_user.email}


@bp.get("/admin/users")
@role_required("admin")
def admin_users() -> ResponseReturnValue:
    users = db.session.scalars(select(User).order_by(User.id))
    return {
        "users": [
            {
                "id": u.id,
                "email": u.email,
                "active": u.active,
                "roles": [r.name for r in u.roles],
            }
            for u in users
        ]
    }


@bp.post("/admin/users/<int:user_id>/roles")
@role_required("admin")
def admin_set_roles(user_id: int) -> ResponseReturnValue:
    """The admin action: replace a user's roles. No cache call: the commit evicts."""
    user = db.get_or_404(User, user_id)
    names = request.form.getlist("role")
    user.roles = list(db.session.scalars(select(Role).where(Role.name.in_(names))))
    db.session.commit()
    return {"id": user.id, "roles": [r.name for r in user.roles]}


@bp.post("/admin/users/<int:user_id>")
@role_required("admin")
def admin_update_user(user_id: int) -> ResponseReturnValue:
    """Change a user's email, name or active flag."""
    user = db.get_or_404(User, user_id)
    if "email" in request.form:
        user.email = request.form["email"]
    if "name" in request.form:
        user.name = request.form["name"]
    if "active" in request.form:
        user.active = request.form["active"] in ("1", "true", "on")
    db.session.commit()
    return {"id": user.id, "email": user.email, "active": user.active}


@bp.post("/admin/users/<int:user_id>/delete")
@role_required("admin")
def admin_delete_user(user_id: int) -> ResponseReturnValue:
    db.session.delete(db.get_or_404(User, user_id))
    db.session.commit()
    return {"deleted": user_id}


@bp.after_app_request
def tag_response(response: Response) -> Response:
    response.headers["X-Worker-Pid"] = str(os.getpid())
    response.headers["X-SQL-Statements"] = str(g.get("sql_statements", 0))
    return response


def _count_statement(*args: Any) -> None:
    if has_app_context():
        g.sql_statements = g.get("sql_statements", 0) + 1


DEMO_USERS = [
    ("alice@example.com", "Alice", "alice-password", ["admin", "reports"]),
    ("bob@example.com", "Bob", "bob-password", []),
    ("carol@example.com", "Carol", "carol-password", ["reports"]),
]


def seed(method: str | None = None) -> None:
    """Create the tables and the demo users (in the current application context)."""
    db.create_all()
    if db.session.scalar(select(User).limit(1)) is not None:
        return
    from flask import current_app

    method = method or current_app.config["PASSWORD_HASH_METHOD"]
    roles = {name: Role(name=name) for name in ("admin", "reports")}
    for email, name, password, role_names in DEMO_USERS:
        db.session.add(
            User(
                email=email,
                name=name,
                password_hash=generate_password_hash(password, method=method),
                roles=[roles[r] for r in role_names],
            )
        )
    db.session.commit()


@click.command("init-db")
def init_db_command() -> None:
    """Create the tables and the demo users alice (admin), bob and carol (reports)."""
    seed()
    click.echo("database ready: alice@example.com / alice-password is the admin")


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="dev-only: set FLASK_SECRET_KEY",
        SQLALCHEMY_DATABASE_URI="sqlite:///" + os.path.abspath("sa_cache_example.sqlite"),
        PASSWORD_HASH_METHOD="scrypt",
    )
    app.config.from_prefixed_env()  # FLASK_SA_CACHE_URL, FLASK_SQLALCHEMY_DATABASE_URI...
    if config:
        app.config.update(config)
    db.init_app(app)
    sacache.init_app(app, db)
    login_manager.init_app(app)
    app.register_blueprint(bp)
    app.cli.add_command(init_db_command)
    with app.app_context():
        event.listen(db.engine, "before_cursor_execute", _count_statement)
    return app
