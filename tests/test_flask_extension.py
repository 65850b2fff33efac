"""The Flask extension itself: the three-line setup, configuration, the incoherence warning, plain
SQLAlchemy ``scoped_session`` apps, the Flask-Login helper, the CLI and the shared counters."""

from __future__ import annotations

import functools
import inspect
import json
import socket
import time
import uuid
import warnings
from collections import Counter
from typing import Any

import flask_login
import pytest
import redis
import sa_cache.integrations.flask as flask_extension
from click.testing import CliRunner
from flask import Config, Flask
from flask_sqlalchemy import SQLAlchemy
from sa_cache.integrations.flask import (
    CONFIG_DEFAULTS,
    EXTENSION_KEY,
    IncoherentCacheWarning,
    SACache,
)
from sa_cache.integrations.flask_login import safe_user_loader
from sqlalchemy import String, TypeDecorator, Uuid, create_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    mapped_column,
    scoped_session,
    sessionmaker,
)

from sa_cache import CachingSession, IdentityCache
from sa_cache.cli import main
from sa_cache.shared_stats import StatsPublisher, read_shared_stats, stats_key

from .conftest import REDIS_URL, require_service
from .counting import counting_sql, expect_sql
from .flask_support import (  # noqa: F401 - fixtures
    EXAMPLES,
    Browser,
    cache_config,
    close_app,
    db_engine,
    example_app,
    flask_databases_fixture,
    make_example_app,
    new_prefix,
    reset_database,
)


@pytest.fixture
def redis_client():
    require_service("redis", 6379)
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def sqlite_app(tmp_path, redis_client):
    """The example app on a SQLite file with Redis, for the CLI tests."""
    app = make_example_app(f"sqlite:///{tmp_path}/cli.sqlite", **cache_config("redis"))
    reset_database(app)
    yield app
    close_app(app)


# -- the three lines ----------------------------------------------------------------------------


def test_three_lines_make_db_session_and_model_query_cached(tmp_path):
    class Base(DeclarativeBase):
        pass

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path}/three.sqlite"
    db = SQLAlchemy(app, model_class=Base, **SACache.sqlalchemy_options())  # line 2 (edited)
    sacache = SACache(app, db)  # line 3 (line 1 is the import)

    class Thing(db.Model):  # mapped after init_app: still cached
        id: Mapped[int] = mapped_column(primary_key=True)
        label: Mapped[str] = mapped_column(String(20))

    with app.app_context():
        db.create_all()
        db.session.add(Thing(id=1, label="one"))
        db.session.commit()
        engine = db.engine
    with counting_sql(engine) as sql:
        with expect_sql(sql, 1), app.app_context():  # the first, cold lookup
            assert db.session.get(Thing, 1).label == "one"
        with expect_sql(sql, 0):
            with app.app_context():
                assert db.session.get(Thing, 1).label == "one"
                assert Thing.query.get(1).label == "one"
                assert db.get_or_404(Thing, 1).label == "one"
            with app.app_context():
                assert Thing.query.get(1).label == "one"
                assert Thing.query.get_many([1]) == [db.session.get(Thing, 1)]
    with app.app_context():  # the rest of Flask-SQLAlchemy's Query still works
        assert Thing.query.filter_by(label="one").paginate(page=1, per_page=5).total == 1
    assert sacache.cache.stats()["models"]["Thing"]["hits"] >= 4


def test_init_app_refuses_a_db_whose_session_would_not_be_cached():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
    db = SQLAlchemy(app)
    with pytest.raises(TypeError, match="sqlalchemy_options"):
        SACache(app, db)


def test_session_options_keep_your_own_options_and_session_class():
    import flask_sqlalchemy.session

    class MySession(flask_sqlalchemy.session.Session):
        pass

    options = SACache.session_options(class_=MySession, expire_on_commit=False)
    assert options["expire_on_commit"] is False
    assert issubclass(options["class_"], MySession)
    assert SACache.session_options(class_=MySession)["class_"] is options["class_"]


def test_config_keys_are_applied(redis_client):
    app = Flask(__name__)
    prefix = new_prefix()
    app.config.update(
        SA_CACHE_URL=REDIS_URL,
        SA_CACHE_PREFIX=prefix,
        SA_CACHE_DEFAULT_TTL=120,
        SA_CACHE_SOCKET_TIMEOUT=0.5,
    )
    sacache = SACache(app)
    cache = sacache.cache
    assert cache.prefix == prefix and cache.ttl == 120
    options = cache.store.client.connection_pool.connection_kwargs
    assert options["socket_timeout"] == 0.5
    assert app.extensions[EXTENSION_KEY].publisher is not None


class CountingConfig(Config):
    """app.config, counting how often each key is read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: Counter[str] = Counter()

    def __getitem__(self, key: str) -> Any:
        self.reads[key] += 1
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.reads[key] += 1
        return super().get(key, default)

    def setdefault(self, key: str, default: Any = None) -> Any:
        self.reads[key] += 1
        return super().setdefault(key, default)


class CountingApp(Flask):
    config_class = CountingConfig


def test_init_app_setdefaults_every_config_key_and_reads_each_once(redis_client):
    app = CountingApp(__name__)
    prefix = new_prefix()
    app.config.update(SA_CACHE_URL=REDIS_URL, SA_CACHE_PREFIX=prefix)
    sacache = SACache(app)
    reads = {key: n for key, n in app.config.reads.items() if key.startswith("SA_CACHE_")}
    assert reads == dict.fromkeys(CONFIG_DEFAULTS, 1)
    assert app.config["SA_CACHE_PREFIX"] == prefix  # set by the app: kept
    mine = ("SA_CACHE_URL", "SA_CACHE_PREFIX")
    assert {k: app.config[k] for k in CONFIG_DEFAULTS if k not in mine} == {
        "SA_CACHE_DEFAULT_TTL": None,
        "SA_CACHE_SOCKET_TIMEOUT": None,
        "SA_CACHE_SIGNING_KEY": None,
        "SA_CACHE_OPTIONS": {},
        "SA_CACHE_STATS_INTERVAL": 5.0,
    }
    cache = sacache.cache  # None: IdentityCache's own defaults
    assert (cache.prefix, cache.ttl, cache.guarded._signer) == (prefix, 3600, None)
    assert app.extensions[EXTENSION_KEY].publisher.interval == 5.0
    app.config["SA_CACHE_DEFAULT_TTL"] = 1  # read once: a later change is not applied
    assert sacache.cache.ttl == 3600


def test_sa_cache_options_reaches_every_identity_cache_setting(monkeypatch, redis_client):
    options = {
        "lease_wait": 0.2,
        "negative_ttl": 30,
        "tombstone_ttl": 600,
        "retries": 4,
        "breaker_threshold": 7,
        "breaker_cooldown": 11.0,
    }
    app = Flask(__name__)
    app.config.update(SA_CACHE_URL=REDIS_URL, SA_CACHE_OPTIONS=options)
    cache = SACache(app).cache
    assert (cache.lease_wait, cache.negative_ttl, cache.tombstone_ttl) == (0.2, 30, 600)
    assert (cache.breaker.threshold, cache.breaker.cooldown) == (7, 11.0)
    retry = cache.store.client.connection_pool.connection_kwargs["retry"]
    assert retry._retries == 4
    assert app.config["SA_CACHE_OPTIONS"] == options  # not consumed

    # and every keyword IdentityCache takes, whatever the core adds, arrives unchanged
    real = flask_extension.IdentityCache
    received: dict[str, Any] = {}

    @functools.wraps(real)
    def spy(**kwargs: Any) -> Any:
        received.update(kwargs)
        return real()

    monkeypatch.setattr(flask_extension, "IdentityCache", spy)
    names = [
        p.name
        for p in inspect.signature(real).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    assert {"backend", "lease_wait", "retries", "breaker_cooldown"} <= set(names)
    everything = {name: object() for name in names}
    app = Flask(__name__)
    app.config["SA_CACHE_OPTIONS"] = everything
    SACache(app)
    assert received == everything


def test_explicit_config_keys_take_precedence_over_sa_cache_options():
    app = Flask(__name__)
    app.config.update(
        SA_CACHE_DEFAULT_TTL=120,
        SA_CACHE_PREFIX="explicit",
        SA_CACHE_OPTIONS={"ttl": 60, "prefix": "from_options", "negative_ttl": 5},
    )
    cache = SACache(app).cache
    assert (cache.ttl, cache.prefix, cache.negative_ttl) == (120, "explicit", 5)
    app = Flask(__name__)  # explicit keys unset: the options apply
    app.config["SA_CACHE_OPTIONS"] = {"ttl": 60, "prefix": "from_options"}
    cache = SACache(app).cache
    assert (cache.ttl, cache.prefix) == (60, "from_options")


def test_an_unknown_sa_cache_option_fails_at_init_app():
    app = Flask(__name__)
    app.config["SA_CACHE_OPTIONS"] = {"lease_wiat": 0.2, "negative_ttl": 5}
    with pytest.raises(ValueError, match=r"'lease_wiat' \(did you mean 'lease_wait'\?\)"):
        SACache(app)
    assert EXTENSION_KEY not in app.extensions  # nothing half-initialised
    app.config["SA_CACHE_OPTIONS"] = [("ttl", 5)]
    with pytest.raises(TypeError, match="SA_CACHE_OPTIONS must be a dict"):
        SACache(app)


def test_in_process_backend_warns_when_workers_cannot_share_it(monkeypatch):
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncoherentCacheWarning)
        SACache(Flask(__name__))  # one process: no warning
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    with pytest.warns(IncoherentCacheWarning, match="SA_CACHE_URL"):
        SACache(Flask(__name__))
    app = Flask(__name__)
    app.config["SA_CACHE_URL"] = "redis://127.0.0.1:6379/0"
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncoherentCacheWarning)
        SACache(app)  # Redis: coherent, no warning


# -- plain SQLAlchemy ---------------------------------------------------------------------------


def test_a_plain_scoped_session_app_with_flask_login(tmp_path):
    class Base(DeclarativeBase):
        pass

    class Account(flask_login.UserMixin, Base):
        __tablename__ = "accounts"
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str] = mapped_column(String(50))

    engine = create_engine(f"sqlite:///{tmp_path}/plain.sqlite")
    Base.metadata.create_all(engine)
    app = Flask(__name__)
    app.config["SECRET_KEY"] = "test"
    sacache = SACache(app, models=Base)
    Session = scoped_session(sessionmaker(engine, class_=CachingSession, cache=sacache.cache))  # noqa: N806
    app.teardown_appcontext(lambda exc: Session.remove())
    login_manager = flask_login.LoginManager(app)
    sacache.user_loader(login_manager, Account, session=Session)

    @app.post("/login/<int:pk>")
    def login(pk):
        flask_login.login_user(Session.get(Account, pk))
        return "ok"

    @app.get("/me")
    @flask_login.login_required
    def me():
        return flask_login.current_user.email

    with Session() as s:
        s.add(Account(id=1, email="plain@example.com"))
        s.commit()
    Session.remove()
    client = app.test_client()
    client.post("/login/1")
    assert client.get("/me").get_data(as_text=True) == "plain@example.com"
    with counting_sql(engine) as sql, expect_sql(sql, 0):
        assert client.get("/me").get_data(as_text=True) == "plain@example.com"
    with client.session_transaction() as session:
        session["_user_id"] = "nope"
    assert client.get("/me").status_code == 401


# -- the CLI ------------------------------------------------------------------------------------


def test_flush_removes_only_this_caches_keys(sqlite_app, redis_client):
    prefix = sqlite_app.config["SA_CACHE_PREFIX"]
    browser = Browser(sqlite_app).login("bob@example.com")
    browser.get("/me")
    neighbours = [f"{prefix}_other:x", f"{prefix}x", f"other:{prefix}:x", f"{prefix}"]
    for key in neighbours:
        redis_client.set(key, b"keep", ex=60)
    try:
        assert redis_client.keys(f"{prefix}:*")
        result = CliRunner().invoke(main, ["flush", "--redis-url", REDIS_URL, "--prefix", prefix])
        assert result.exit_code == 0, result.output
        assert redis_client.keys(f"{prefix}:*") == []
        assert all(redis_client.get(key) == b"keep" for key in neighbours)
        browser.get("/me")  # the app carries on: a miss, refilled
        with counting_sql(db_engine(sqlite_app)) as sql, expect_sql(sql, 0):
            assert browser.get("/me").status_code == 200
        result = sqlite_app.test_cli_runner().invoke(args=["sa-cache", "flush"])
        assert result.exit_code == 0 and "removed" in result.output
        assert redis_client.keys(f"{prefix}:*") == []
    finally:
        redis_client.delete(*neighbours)


@pytest.mark.parametrize("model", ["users", "flask_app:User"])
def test_console_evict_makes_the_next_request_a_miss(sqlite_app, model):
    prefix = sqlite_app.config["SA_CACHE_PREFIX"]
    browser = Browser(sqlite_app).login("bob@example.com")
    browser.get("/me")
    with counting_sql(db_engine(sqlite_app)) as sql:
        with expect_sql(sql, 0):
            assert browser.get("/me").status_code == 200
        bob_id = str(browser.get("/me").json["id"])
        args = ["evict", "--redis-url", REDIS_URL, "--prefix", prefix, model, bob_id]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        with expect_sql(sql, 1):  # evicted: loaded again
            browser.get("/me")
        with expect_sql(sql, 0):
            assert browser.get("/me").status_code == 200


def test_flask_evict_resolves_class_and_table_names(sqlite_app):
    browser = Browser(sqlite_app).login("bob@example.com")
    bob_id = str(browser.get("/me").json["id"])
    runner = sqlite_app.test_cli_runner()
    with counting_sql(db_engine(sqlite_app)) as sql:
        for name in ("User", "users"):
            with expect_sql(sql, 0):
                browser.get("/me")
            result = runner.invoke(args=["sa-cache", "evict", name, bob_id])
            assert result.exit_code == 0, result.output
            with expect_sql(sql, 1):
                browser.get("/me")
    result = runner.invoke(args=["sa-cache", "evict", "Nothing", "1"])
    assert result.exit_code != 0 and "no cached model" in result.output
    result = runner.invoke(args=["sa-cache", "evict", "User", "abc"])
    assert result.exit_code != 0 and "not a valid primary key" in result.output


def test_stats_sums_every_process(sqlite_app, redis_client):
    """Two application instances stand for two worker processes: each publishes its own deltas,
    and both the console script and ``flask sa-cache stats`` report the sum."""
    prefix = sqlite_app.config["SA_CACHE_PREFIX"]
    other = make_example_app(
        sqlite_app.config["SQLALCHEMY_DATABASE_URI"], **cache_config("redis", prefix)
    )
    try:
        for app in (sqlite_app, other):
            browser = Browser(app).login("bob@example.com")
            for _ in range(3):
                browser.get("/me")
        caches = [app.extensions[EXTENSION_KEY].cache for app in (sqlite_app, other)]
        expected = {k: sum(c.stats()[k] for c in caches) for k in ("hits", "misses", "fills")}
        assert expected["hits"] >= 4
        for app in (sqlite_app, other):
            assert app.extensions[EXTENSION_KEY].publisher.publish()
            assert app.extensions[EXTENSION_KEY].publisher.publish()  # no deltas: adds nothing
        args = ["stats", "--json", "--redis-url", REDIS_URL, "--prefix", prefix]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        shared = json.loads(result.output)
        assert {k: shared[k] for k in expected} == expected
        assert shared["models"]["User"]["hits"] == expected["hits"]
        assert shared["processes"] == 1  # two apps, one pid: one process field
        result = other.test_cli_runner().invoke(args=["sa-cache", "stats"])
        assert result.exit_code == 0, result.output
        assert "all processes" in result.output
        assert f"{expected['hits']:>11}" in result.output.splitlines()[-2]
    finally:
        close_app(other)


def test_the_publisher_thread_publishes_within_its_interval(redis_client):
    cache = IdentityCache(REDIS_URL, prefix=new_prefix())
    cache.register(example_app.User)
    publisher = StatsPublisher(cache, interval=0.05)
    try:
        cache.model_for(example_app.User.__mapper__).stats.hits += 7  # type: ignore[union-attr]
        publisher.ensure_running()
        deadline = time.monotonic() + 5
        while read_shared_stats(redis_client, cache.prefix)["hits"] != 7:
            assert time.monotonic() < deadline, "not published within 5 s"
            time.sleep(0.01)
        assert read_shared_stats(redis_client, cache.prefix, interval=0.05)["processes"] == 1
    finally:
        publisher.stop()
        assert read_shared_stats(redis_client, cache.prefix)["processes"] == 0
        redis_client.delete(stats_key(cache.prefix))


def test_a_dead_redis_never_breaks_publishing_or_leaks_the_password(caplog):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"redis://:hunter2secret@127.0.0.1:{port}/0"
    cache = IdentityCache(url, prefix="p")
    publisher = StatsPublisher(cache, interval=60)
    assert publisher.publish() is False
    result = CliRunner().invoke(main, ["stats", "--redis-url", url, "--prefix", "p"])
    assert result.exit_code != 0
    assert "hunter2secret" not in result.output + caplog.text
    result = CliRunner().invoke(main, ["flush", "--redis-url", url, "--prefix", "p"])
    assert result.exit_code != 0 and "hunter2secret" not in result.output
    result = CliRunner().invoke(main, ["evict", "--redis-url", url, "--prefix", "p", "users", "1"])
    assert result.exit_code != 0 and "hunter2secret" not in result.output + caplog.text


def test_the_flask_cli_on_the_in_process_backend_says_what_it_sees(tmp_path):
    app = make_example_app(f"sqlite:///{tmp_path}/mem.sqlite", SA_CACHE_PREFIX=uuid.uuid4().hex)
    reset_database(app)
    result = app.test_cli_runner().invoke(args=["sa-cache", "stats"])
    assert result.exit_code == 0 and "this process only" in result.output
    close_app(app)


def test_models_chooses_what_is_cached_and_register_adds_to_it():
    class Base(DeclarativeBase):
        pass

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
    db = SQLAlchemy(app, model_class=Base, **SACache.sqlalchemy_options())

    class Cached(db.Model):
        id: Mapped[int] = mapped_column(primary_key=True)

    class Uncached(db.Model):
        id: Mapped[int] = mapped_column(primary_key=True)

    class Later(db.Model):
        id: Mapped[int] = mapped_column(primary_key=True)

    sacache = SACache(app, db, models=[Cached])
    with app.app_context():
        db.create_all()
        db.session.add_all([Cached(id=1), Uncached(id=1), Later(id=1)])
        db.session.commit()
        sacache.register(Later, ttl=30)
        sacache.register(Cached, ttl=40)  # already cached: the TTL still applies
        # Cached and Later: one miss each, then hits; Uncached: a SELECT every time
        with counting_sql(db.engine) as sql, expect_sql(sql, 4):
            for _ in range(2):
                db.session.remove()
                for model in (Cached, Uncached, Later):
                    assert db.session.get(model, 1) is not None
        assert set(sacache.cache.stats()["models"]) == {"Cached", "Later"}
        assert sacache.cache.model_for(Later.__mapper__).ttl == 30
        assert sacache.cache.model_for(Cached.__mapper__).ttl == 40


def test_register_with_unique_caches_lookups_by_those_columns():
    class Base(DeclarativeBase):
        pass

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
    db = SQLAlchemy(app, model_class=Base, **SACache.sqlalchemy_options())

    class Login(db.Model):
        id: Mapped[int] = mapped_column(primary_key=True)
        email: Mapped[str] = mapped_column(String(50), unique=True)

    sacache = SACache(app, db, models=[Login])
    with app.app_context():
        db.create_all()
        db.session.add(Login(id=1, email="a@x"))
        db.session.commit()
        sacache.register(Login, unique=["email"])  # already cached: its unique lookups too
        # the column's collation, asked once; the first lookup caches which row holds the
        # value, the second the row; then no SQL
        expected = ["SELECT sql FROM sqlite_master", "SELECT", "SELECT"]
        with counting_sql(db.engine) as sql, expect_sql(sql, expected):
            for _ in range(4):
                db.session.remove()
                assert Login.query.filter_by(email="a@x").one().id == 1
        assert sacache.cache.stats()["models"]["Login.unique(email)"]["hits"] == 3


# -- which models are cached, and when ----------------------------------------------------------


def test_models_defined_after_init_app_are_cached_as_soon_as_they_are_mapped():
    class Base(DeclarativeBase):
        pass

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
    db = SQLAlchemy(app, model_class=Base, **SACache.sqlalchemy_options())
    sacache = SACache(app, db)

    class Late(db.Model):  # no session, no app context yet: registered by the class statement
        id: Mapped[int] = mapped_column(primary_key=True)

    class LateChild(Late):  # joins the hierarchy: named for `flask sa-cache evict`
        __tablename__ = "late_child"
        id: Mapped[int] = mapped_column(db.ForeignKey(Late.id), primary_key=True)

    cache = sacache.cache
    assert cache.model_for(Late.__mapper__) is not None
    assert cache.model_for(LateChild.__mapper__) is cache.model_for(Late.__mapper__)
    with app.app_context():
        assert app.extensions[EXTENSION_KEY].resolve("late_child") is LateChild


def test_models_mapped_later_on_another_registry_are_not_cached():
    class Base(DeclarativeBase):
        pass

    class Other(DeclarativeBase):
        pass

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
    db = SQLAlchemy(app, model_class=Base, **SACache.sqlalchemy_options())

    class Before(db.Model):
        id: Mapped[int] = mapped_column(primary_key=True)

    sacache = SACache(app, db)
    other_app = Flask(__name__)
    chosen = SACache(other_app, models=[Before])  # a fixed list: nothing is added to it

    class Mine(db.Model):
        id: Mapped[int] = mapped_column(primary_key=True)

    class Elsewhere(Other):
        __tablename__ = "elsewhere"
        id: Mapped[int] = mapped_column(primary_key=True)

    assert sacache.cache.model_for(Mine.__mapper__) is not None
    assert sacache.cache.model_for(Elsewhere.__mapper__) is None
    assert chosen.cache.model_for(Before.__mapper__) is not None
    assert chosen.cache.model_for(Mine.__mapper__) is None


def test_creating_a_session_scans_no_registry(monkeypatch, tmp_path):
    """Models are registered at init_app and by the mapper event, never by a scan of the
    registry each time a session is created."""
    from sqlalchemy.orm import decl_api

    class Base(DeclarativeBase):
        pass

    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path}/scan.sqlite"
    db = SQLAlchemy(app, model_class=Base, **SACache.sqlalchemy_options())

    class Early(db.Model):
        id: Mapped[int] = mapped_column(primary_key=True)

    sacache = SACache(app, db)
    with app.app_context():
        db.create_all()
        db.session.add(Early(id=1))
        db.session.commit()
    scans: list[object] = []
    mappers = decl_api.registry.mappers
    monkeypatch.setattr(
        decl_api.registry, "mappers", property(lambda reg: scans.append(reg) or mappers.fget(reg))
    )
    for _ in range(3):
        with app.app_context():
            assert db.session.get(Early, 1) is not None
            assert sacache.cache is app.extensions[EXTENSION_KEY].cache
    assert scans == []
    assert sacache.cache.stats()["models"]["Early"]["hits"] >= 2


# -- Flask-Login: integrations/flask_login.py ---------------------------------------------------


class LoginBase(DeclarativeBase):
    pass


class Member(flask_login.UserMixin, LoginBase):
    __tablename__ = "members"
    id: Mapped[int] = mapped_column(primary_key=True)
    active: Mapped[bool] = mapped_column(default=True)

    @property
    def is_active(self) -> bool:  # UserMixin's is_authenticated is is_active, too
        return self.active


class Device(flask_login.UserMixin, LoginBase):
    __tablename__ = "devices"
    id: Mapped[uuid.UUID] = mapped_column(Uuid(as_uuid=True), primary_key=True)


class Lowered(TypeDecorator[str]):
    """A type sa_cache.keys cannot read (its bind processing is its own)."""

    impl = String(20)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return None if value is None else str(value).lower()


class Badge(flask_login.UserMixin, LoginBase):
    __tablename__ = "badges"
    id: Mapped[str] = mapped_column(Lowered(), primary_key=True)


DEVICE = uuid.UUID("12345678-1234-5678-1234-567812345678")


@pytest.fixture
def members(tmp_path):
    """A scoped_session on SQLite with a cache, members 7 and 8, a device and a badge."""
    engine = create_engine(f"sqlite:///{tmp_path}/members.sqlite")
    LoginBase.metadata.create_all(engine)
    cache = IdentityCache()
    for model in (Member, Device, Badge):
        cache.register(model)
    Session = scoped_session(sessionmaker(engine, class_=CachingSession, cache=cache))  # noqa: N806
    with Session() as session:
        session.add_all([Member(id=7), Member(id=8), Device(id=DEVICE), Badge(id="abc")])
        session.commit()
    Session.remove()
    with counting_sql(engine) as sql:
        yield Session, cache, sql
    Session.remove()
    engine.dispose()


def test_the_safe_loader_turns_malformed_out_of_range_and_deleted_ids_into_none(members):
    Session, cache, sql = members  # noqa: N806
    load = safe_user_loader(Member, Session)
    malformed = ["abc", "", "1.5", "0x10", " 7", "7\n", "\u0667", "1e3", "7 OR 1=1", "None"]
    out_of_range = [str(2**63), str(-(2**63)), "9" * 20, "9" * 5000]  # 5000: past int()'s limit
    with expect_sql(sql, 0):  # refused without a query
        for user_id in malformed + out_of_range:
            assert load(user_id) is None, user_id
    assert load("7").id == 7
    with Session() as session:
        session.delete(session.get(Member, 8))
        session.commit()
    Session.remove()
    assert load("8") is None  # deleted
    assert load(str(2**63 - 1)) is None  # in range: asked, absent


def test_the_safe_loader_reads_ids_as_the_cache_keys_do(members):
    Session, cache, sql = members  # noqa: N806
    load = safe_user_loader(Member, Session)
    assert load("7").id == 7  # a miss, filled
    Session.remove()
    with expect_sql(sql, 0):
        for user_id in ("7", "007", "+7"):  # one primary key, one cache entry, as session.get
            assert load(user_id).id == 7
            Session.remove()
    assert cache.stats()["models"]["Member"]["hits"] == 3
    load_device = safe_user_loader(Device, Session)
    assert load_device(str(DEVICE).upper()).id == DEVICE
    assert load_device(DEVICE.hex).id == DEVICE
    with expect_sql(sql, 0):
        assert load_device("not-a-uuid") is None


def test_an_id_type_the_cache_keys_cannot_read_goes_to_sqlalchemy_as_it_is(members):
    Session, cache, sql = members  # noqa: N806
    load = safe_user_loader(Badge, Session)
    assert load("ABC").id == "abc"  # the TypeDecorator lowers it
    assert load("nobody") is None


def test_sacache_user_loader_registers_the_safe_loader(members):
    Session, cache, sql = members  # noqa: N806
    app = Flask(__name__)
    sacache = SACache(app, models=LoginBase)
    login_manager = flask_login.LoginManager(app)
    plain = Session()  # a Session as well as a scoped_session
    loader = sacache.user_loader(login_manager, Member, session=plain, require_active=True)
    assert login_manager._user_callback is loader
    assert loader("7") is plain.get(Member, 7) and loader("abc") is None
    plain.get(Member, 7).active = False
    plain.commit()
    assert loader("7") is None  # require_active
    assert safe_user_loader(Member, lambda: plain)("7").active is False
    with pytest.raises(TypeError, match="single-column primary key"):
        sacache.user_loader(login_manager, LoginBase)
