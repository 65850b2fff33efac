"""Flask, Flask-SQLAlchemy and Flask-Login integration: ``from sa_cache.integrations.flask import
SACache``.

Adding the cache to an existing Flask-SQLAlchemy 3.1 application takes three lines::

    from sa_cache.integrations.flask import SACache                  # 1
    db = SQLAlchemy(model_class=Base, **SACache.sqlalchemy_options())   # 2 (your existing line)
    sacache = SACache(app, db)                                       # 3 (or sacache.init_app)

after which ``db.session.get``, ``db.get_or_404``, ``Model.query.get``, ``Session.merge`` and
lazy many-to-one loads of every model of ``db`` are served from the cache, and the rows a
request's transaction changed are evicted when it commits. Flask-SQLAlchemy builds its session
from ``session_options["class_"]`` and ``query_class`` (it passes ``db`` to the session
positionally); the options name a session class that mixes :class:`sa_cache.CachingSessionMixin`
into ``flask_sqlalchemy.session.Session`` and a query class combining Flask-SQLAlchemy's
``Query`` with :class:`sa_cache.CachingQuery`. Nothing of Flask-SQLAlchemy is patched.

The session looks its cache up in ``current_app.extensions["sa_cache"]`` when it is created, so
one ``db`` can serve several applications, each with its own cache, and the session class can
be chosen before any application exists. Without an application context a session of that
class is an ordinary, uncached session.

Configuration, read once by :meth:`SACache.init_app`:

``SA_CACHE_URL``
    ``redis://``, ``rediss://`` or ``unix://`` URL. Unset: the in-process backend, which is
    coherent only within one process; a :class:`IncoherentCacheWarning` is issued when the
    application runs (or will run) in several worker processes.
``SA_CACHE_PREFIX``
    first part of every key (default ``sa_cache``).
``SA_CACHE_DEFAULT_TTL``
    seconds a cached row lives (default 3600).
``SA_CACHE_SOCKET_TIMEOUT``
    Redis connect and read timeout in seconds (default 0.25).
``SA_CACHE_SIGNING_KEY``
    a secret, or a list of secrets (the first signs, all verify), to HMAC-sign every cached
    value; unset: values are not signed.
``SA_CACHE_STATS_INTERVAL``
    seconds between publications of this process's counters into Redis, where
    ``flask sa-cache stats`` sums every process (default 5; 0 disables).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click
import flask_sqlalchemy.query
import flask_sqlalchemy.session
from flask import Flask, current_app, has_app_context
from flask.cli import AppGroup
from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect
from sqlalchemy import types as sqltypes
from sqlalchemy.orm import Mapper, Session

from sa_cache import cli as sa_cli
from sa_cache.cache import IdentityCache
from sa_cache.errors import redact
from sa_cache.session import CachingQuery, CachingSessionMixin
from sa_cache.shared_stats import StatsPublisher

log = logging.getLogger("sa_cache")

T = TypeVar("T")

EXTENSION_KEY = "sa_cache"
_MAX_INT_ID = 2**63 - 1
_INT_ID = re.compile(r"-?[0-9]{1,19}\Z")


class IncoherentCacheWarning(RuntimeWarning):
    """The in-process backend is used where several processes serve the application."""


class FlaskCachingQuery(flask_sqlalchemy.query.Query, CachingQuery[Any]):
    """``Model.query``: Flask-SQLAlchemy's ``get_or_404``, ``paginate``... plus ``get_many``.
    ``Query.get`` reaches the cache through the session."""


def _current_cache() -> IdentityCache | None:
    if not has_app_context():
        return None
    state = current_app.extensions.get(EXTENSION_KEY)
    if not isinstance(state, _State):
        return None
    state.sync_models()
    return state.cache


@functools.cache
def caching_session_class(base: type[Session] = flask_sqlalchemy.session.Session) -> type[Any]:
    """``base`` with :class:`sa_cache.CachingSessionMixin` mixed in, taking its cache from the
    current application unless ``cache=`` is passed. One class per ``base``."""
    if issubclass(base, CachingSessionMixin):
        return base

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if "cache" not in kwargs:
            kwargs["cache"] = _current_cache()
        super(cls, self).__init__(*args, **kwargs)

    cls: type[Any] = type(
        f"Caching{base.__name__}",
        (CachingSessionMixin, base),
        {"__init__": __init__, "__module__": __name__, "__doc__": base.__doc__},
    )
    return cls


class _State:
    """What one application's extension holds: app.extensions["sa_cache"]."""

    def __init__(self, sacache: SACache, cache: IdentityCache, db: Any, models: Any) -> None:
        self.sacache = sacache
        self.cache = cache
        self.db = db
        self.models = models
        self.pid = os.getpid()
        self.publisher: StatsPublisher | None = None
        self.classes: dict[str, type[Any]] = {}  # every class registered, by name
        self._seen: frozenset[Mapper[Any]] = frozenset()
        self._lock = threading.Lock()
        self._fork_warned = False

    def _candidates(self) -> Iterable[Mapper[Any]]:
        registries = []
        if self.models is None:
            if self.db is not None:
                registries.append(self.db.Model.registry)
        elif hasattr(self.models, "registry"):
            registries.append(self.models.registry)
        else:
            for model in self.models:
                mapper = inspect(model)
                if isinstance(mapper, Mapper):
                    yield mapper
        yield from self.sacache._explicit
        for registry in registries:
            yield from registry.mappers

    def sync_models(self) -> None:
        """Register models mapped since the last call (models may be defined after init_app)."""
        mappers = frozenset(self._candidates())
        if mappers == self._seen:
            return
        with self._lock:
            for mapper in mappers - self._seen:
                if self.cache.model_for(mapper) is None:
                    try:
                        ttl = self.sacache._ttls.get(mapper.class_)
                        self.cache.register(mapper.class_, ttl=ttl)
                    except Exception as exc:  # one odd model must not break every session
                        log.warning("sa_cache: not caching %s: %s", mapper.class_.__name__, exc)
                        continue
                self.classes[mapper.class_.__name__] = mapper.class_
                for sub in mapper.base_mapper.self_and_descendants:
                    self.classes.setdefault(sub.class_.__name__, sub.class_)
            self._seen = mappers

    def resolve(self, name: str) -> type[Any]:
        """A registered class by class name or table name."""
        self.sync_models()
        if name in self.classes:
            return self.classes[name]
        for cls in self.classes.values():
            if inspect(cls).local_table.name == name:
                return cls
        for cls_name, cls in self.classes.items():
            if cls_name.lower() == name.lower():
                return cls
        known = ", ".join(sorted(self.classes)) or "none"
        raise click.BadParameter(f"no cached model named {name!r} (known: {known})")

    def before_request(self) -> None:
        if self.publisher is not None:
            self.publisher.ensure_running()
        elif self.forked_in_process and not self._fork_warned:
            self._fork_warned = True
            warnings.warn(
                "sa_cache: this worker process was forked after its in-process cache was "
                "created; each worker now has its own copy, and a change committed in one "
                "is not seen by the others. Set SA_CACHE_URL to a Redis URL.",
                IncoherentCacheWarning,
                stacklevel=2,
            )

    @property
    def forked_in_process(self) -> bool:
        return self.pid != os.getpid() and not hasattr(self.cache.store, "client")


class SACache:
    """The Flask extension. ``SACache(app, db)``, or ``sacache = SACache()`` and later
    ``sacache.init_app(app, db)``.

    :param db: the ``flask_sqlalchemy.SQLAlchemy`` instance, created with
        ``**SACache.sqlalchemy_options()``. Omit it for a plain SQLAlchemy application and use
        :attr:`cache` (``sessionmaker(engine, class_=CachingSession, cache=sacache.cache)``).
    :param models: which models are cached. None (the default): every model of ``db`` (mapped
        later too), plus any passed to :meth:`register`. A declarative base: every model mapped
        on it. An iterable of classes: exactly those (plus :meth:`register`).
    """

    #: Pass as ``query_class=`` to ``SQLAlchemy()`` (done by :meth:`sqlalchemy_options`).
    query_class = FlaskCachingQuery

    def __init__(self, app: Flask | None = None, db: Any = None, *, models: Any = None) -> None:
        self.db = db
        self.models = models
        self._explicit: list[Mapper[Any]] = []
        self._ttls: dict[type[Any], float] = {}
        self._apps: list[weakref.ref[Flask]] = []
        if app is not None:
            self.init_app(app, db, models=models)

    # -- wiring Flask-SQLAlchemy ------------------------------------------------------------

    @staticmethod
    def session_options(**options: Any) -> dict[str, Any]:
        """``session_options`` for ``SQLAlchemy()``: yours, with the session class made caching
        (your own ``class_``, a ``flask_sqlalchemy.session.Session`` subclass, is kept)."""
        base = options.pop("class_", flask_sqlalchemy.session.Session)
        return {**options, "class_": caching_session_class(base)}

    @staticmethod
    def sqlalchemy_options(**session_options: Any) -> dict[str, Any]:
        """Keyword arguments for ``SQLAlchemy()``: ``session_options`` and ``query_class``.

        ``SQLAlchemy(model_class=Base, **SACache.sqlalchemy_options(expire_on_commit=False))``
        """
        return {
            "session_options": SACache.session_options(**session_options),
            "query_class": FlaskCachingQuery,
        }

    # -- init_app ---------------------------------------------------------------------------

    def init_app(self, app: Flask, db: Any = None, *, models: Any = None) -> None:
        """Create this application's cache from its config and attach it."""
        db = db if db is not None else self.db
        models = models if models is not None else self.models
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError("SACache is already initialised on this application")
        if db is not None:
            factory = getattr(getattr(db, "session", None), "session_factory", None)
            session_class = getattr(factory, "class_", None)
            if not (
                isinstance(session_class, type) and issubclass(session_class, CachingSessionMixin)
            ):
                raise TypeError(
                    "db.session would not be cached: create the extension with "
                    "SQLAlchemy(..., **SACache.sqlalchemy_options())"
                )
        config = app.config
        url = config.get("SA_CACHE_URL") or None
        if url in ("memory://", "memory"):
            url = None
        cache = IdentityCache(
            url,
            prefix=str(config.get("SA_CACHE_PREFIX", "sa_cache")),
            ttl=float(config.get("SA_CACHE_DEFAULT_TTL", 3600)),
            socket_timeout=float(config.get("SA_CACHE_SOCKET_TIMEOUT", 0.25)),
            signing_key=config.get("SA_CACHE_SIGNING_KEY") or None,
        )
        state = _State(self, cache, db, models)
        if url is None:
            reason = _multiprocess_reason()
            if reason is not None:
                warnings.warn(
                    f"sa_cache: SA_CACHE_URL is not set, so each process has its own in-process "
                    f"cache and a change committed in one worker process is not seen by the "
                    f"others ({reason}). Set SA_CACHE_URL to a Redis URL.",
                    IncoherentCacheWarning,
                    stacklevel=2,
                )
        else:
            interval = float(config.get("SA_CACHE_STATS_INTERVAL", 5.0))
            if interval > 0:
                state.publisher = StatsPublisher(cache, interval)
            log.debug("sa_cache: %s prefix %r", redact(url), cache.prefix)
        app.extensions[EXTENSION_KEY] = state
        app.before_request(state.before_request)
        app.cli.add_command(cli_group)
        self._apps = [ref for ref in self._apps if ref() is not None] + [weakref.ref(app)]
        state.sync_models()

    def _state(self, app: Flask | None = None) -> _State:
        if app is None:
            if has_app_context():
                app = current_app._get_current_object()  # type: ignore[attr-defined]
            elif len(apps := [a for ref in self._apps if (a := ref()) is not None]) == 1:
                app = apps[0]
            else:
                raise RuntimeError(
                    "SACache: no application context, and not exactly one application"
                )
        assert app is not None
        state = app.extensions.get(EXTENSION_KEY)
        if not isinstance(state, _State) or state.sacache is not self:
            raise RuntimeError("SACache.init_app was not called for this application")
        return state

    @property
    def cache(self) -> IdentityCache:
        """The :class:`sa_cache.IdentityCache` of the current application (or of the only one)."""
        state = self._state()
        state.sync_models()
        return state.cache

    def register(self, model: type[T] | None = None, *, ttl: float | None = None) -> Any:
        """Cache ``model`` in every application of this extension (also a class decorator)."""
        if model is None:
            return lambda cls: self.register(cls, ttl=ttl)
        mapper = inspect(model)
        if not isinstance(mapper, Mapper):
            raise TypeError(f"{model!r} is not a mapped class")
        if ttl is not None:
            self._ttls[model] = ttl
        self._explicit.append(mapper)
        for ref in self._apps:
            app = ref()
            if app is not None:
                state = self._state(app)
                if ttl is not None and state.cache.model_for(mapper) is not None:
                    state.cache.register(model, ttl=ttl)  # already cached: apply its TTL
                state.sync_models()
        return model

    # -- Flask-Login ------------------------------------------------------------------------

    def user_loader(
        self,
        login_manager: Any,
        model: type[T],
        *,
        session: Any = None,
        require_active: bool = False,
    ) -> Callable[[str], T | None]:
        """Register a Flask-Login ``user_loader`` for ``model`` and return it.

        It is ``session.get(model, id)`` (served from the cache), except that an id from the
        cookie that cannot be this model's primary key (not a number, out of range, not a UUID)
        is None without a query, and a database error about the value is None too: a malformed
        or stale cookie logs the visitor out, it never answers 500. A deleted user is None, as
        always, and is negatively cached. ``session`` defaults to ``db.session``;
        ``require_active`` also turns a user whose ``is_active`` is false into None, so that
        deactivating someone logs them out of every process on their next request.
        """
        mapper = inspect(model)
        if not isinstance(mapper, Mapper) or len(mapper.primary_key) != 1:
            raise TypeError("user_loader needs a mapped class with a single-column primary key")
        parse = _id_parser(mapper.primary_key[0].type)

        def load_user(user_id: str) -> T | None:
            pk = parse(user_id)
            if pk is None:
                return None
            target = session if session is not None else self._session()
            try:
                user: T | None = target.get(model, pk)
            except sa_exc.StatementError as exc:
                if isinstance(exc, sa_exc.DBAPIError) and not isinstance(exc, sa_exc.DataError):
                    raise  # the database is down or broken: not the cookie's fault
                target.rollback()
                log.info("sa_cache: user id %r rejected by the database", user_id[:64])
                return None
            if require_active and user is not None and not getattr(user, "is_active", True):
                return None
            return user

        login_manager.user_loader(load_user)
        return load_user

    def _session(self) -> Any:
        db = self._state().db
        if db is None:
            raise RuntimeError("user_loader(..., session=Session) is needed without a db")
        return db.session


def _id_parser(column_type: Any) -> Callable[[Any], Any]:
    if isinstance(column_type, sqltypes.TypeDecorator):
        column_type = column_type.impl_instance
    if isinstance(column_type, sqltypes.Integer):

        def parse_int(value: Any) -> int | None:
            if type(value) is int:
                number = value
            elif isinstance(value, str) and _INT_ID.match(value):
                number = int(value)
            else:
                return None
            return number if -_MAX_INT_ID <= number <= _MAX_INT_ID else None

        return parse_int
    if isinstance(column_type, sqltypes.Uuid):
        as_uuid = column_type.as_uuid

        def parse_uuid(value: Any) -> Any:
            try:
                parsed = value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
            except ValueError:
                return None
            return parsed if as_uuid else str(parsed)

        return parse_uuid
    if isinstance(column_type, sqltypes.String):
        length = column_type.length

        def parse_str(value: Any) -> str | None:
            if not isinstance(value, str) or "\x00" in value:
                return None
            return None if length is not None and len(value) > length else value

        return parse_str
    return lambda value: value


def _multiprocess_reason() -> str | None:
    """Why this application is (or will be) served by several processes, if we can tell."""
    concurrency = os.environ.get("WEB_CONCURRENCY", "")
    if concurrency.isdigit() and int(concurrency) > 1:
        return f"WEB_CONCURRENCY={concurrency}"
    if "gunicorn.arbiter" in sys.modules:
        return "running under gunicorn"
    if "uwsgi" in sys.modules:
        return "running under uWSGI"
    return None


# -- flask sa-cache ... ----------------------------------------------------------------------

cli_group = AppGroup("sa-cache", help="The sa_cache identity-map cache of this application.")


def _app_state() -> _State:
    state = current_app.extensions.get(EXTENSION_KEY)
    if not isinstance(state, _State):
        raise click.ClickException("SACache is not initialised on this application")
    return state


@cli_group.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats_command(as_json: bool) -> None:
    """Counters of every process (with Redis), summed."""
    state = _app_state()
    sa_cli.print_stats(state.cache, as_json=as_json)


@cli_group.command("evict")
@click.argument("model")
@click.argument("pk", nargs=-1, required=True)
def evict_command(model: str, pk: tuple[str, ...]) -> None:
    """Evict one row: MODEL is a class or table name, PK its primary key (several values for a
    composite key)."""
    state = _app_state()
    cls = state.resolve(model)
    sa_cli.evict_row(state.cache, cls, pk)


@cli_group.command("flush")
def flush_command() -> None:
    """Remove every key of this cache (its prefix only, never FLUSHDB)."""
    sa_cli.flush_cache(_app_state().cache)
