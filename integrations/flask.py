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

Configuration, read once by :meth:`SACache.init_app`, which first gives every key below its
default with ``app.config.setdefault`` (so afterwards ``app.config`` lists them all; ``None``
means "not set"):

``SA_CACHE_URL``
    ``redis://``, ``rediss://``, ``unix://``, ``redis+cluster://`` or ``redis+sentinel://``
    URL. Unset: the in-process backend, which is coherent only within one process; a
    :class:`IncoherentCacheWarning` is issued when the application runs (or will run) in
    several worker processes.
``SA_CACHE_PREFIX``
    first part of every key (unset: ``sa_cache``).
``SA_CACHE_DEFAULT_TTL``
    seconds a cached row lives (unset: 3600).
``SA_CACHE_SOCKET_TIMEOUT``
    Redis connect and read timeout in seconds (unset: 0.25).
``SA_CACHE_SIGNING_KEY``
    a secret, or a list of secrets (the first signs, all verify), to HMAC-sign every cached
    value; unset: values are not signed.
``SA_CACHE_OPTIONS``
    a dict of keyword arguments for :class:`sa_cache.IdentityCache`, passed unchanged, so that
    every setting is reachable: ``{"lease_wait": 0.2, "negative_ttl": 30, "tombstone_ttl":
    600, "retries": 2, "breaker_threshold": 5, "breaker_cooldown": 10}``; ``backend`` is the
    URL (or a dogpile ``CacheRegion``). A name ``IdentityCache`` does not take fails at
    ``init_app`` with :class:`ValueError`.
``SA_CACHE_STATS_INTERVAL``
    seconds between publications of this process's counters into Redis, where
    ``flask sa-cache stats`` sums every process (default 5; 0 disables).

Precedence: the five explicit keys above ``SA_CACHE_OPTIONS`` default to ``None``; one that is
set (not ``None``, and for the URL and the signing key not empty) wins over the same setting in
``SA_CACHE_OPTIONS`` (``SA_CACHE_URL`` over ``backend``, ``SA_CACHE_PREFIX`` over ``prefix``,
``SA_CACHE_DEFAULT_TTL`` over ``ttl``, ``SA_CACHE_SOCKET_TIMEOUT`` over ``socket_timeout``,
``SA_CACHE_SIGNING_KEY`` over ``signing_key``), as Flask-SQLAlchemy's
``SQLALCHEMY_DATABASE_URI`` wins over ``SQLALCHEMY_ENGINE_OPTIONS["url"]``. A setting given by
neither has ``IdentityCache``'s default.

Models: with ``db`` (or a declarative base as ``models=``), the models already mapped are
registered by ``init_app``, and a model mapped later on the same registry is registered as its
mapper is constructed (SQLAlchemy's ``after_mapper_constructed`` event); nothing is scanned when
a session is created.

Flask-Login: :meth:`SACache.user_loader` registers
:func:`sa_cache.integrations.flask_login.safe_user_loader`.
"""

from __future__ import annotations

import difflib
import functools
import inspect as pyinspect
import logging
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import click
import flask_sqlalchemy.query
import flask_sqlalchemy.session
from flask import Flask, current_app, has_app_context
from flask.cli import AppGroup
from sqlalchemy import event, inspect
from sqlalchemy.orm import Mapper, Session

from sa_cache import CachingQuery, CachingSessionMixin, IdentityCache
from sa_cache import cli as sa_cli
from sa_cache.errors import redact
from sa_cache.shared_stats import StatsPublisher

from .flask_login import safe_user_loader

log = logging.getLogger("sa_cache")

T = TypeVar("T")

EXTENSION_KEY = "sa_cache"

#: every config key init_app reads, with the default it sets (None: not set)
CONFIG_DEFAULTS: dict[str, Any] = {
    "SA_CACHE_URL": None,
    "SA_CACHE_PREFIX": None,
    "SA_CACHE_DEFAULT_TTL": None,
    "SA_CACHE_SOCKET_TIMEOUT": None,
    "SA_CACHE_SIGNING_KEY": None,
    "SA_CACHE_OPTIONS": {},
    "SA_CACHE_STATS_INTERVAL": 5.0,
}


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
        self.pid = os.getpid()
        self.publisher: StatsPublisher | None = None
        self.classes: dict[str, type[Any]] = {}  # every class registered, by name
        self._lock = threading.RLock()
        self._fork_warned = False
        #: the registry whose models are cached, those mapped later too (None: a fixed list)
        self.registry: Any = None
        self._fixed: list[Mapper[Any]] = []
        if models is None:
            if db is not None:
                self.registry = db.Model.registry
        elif hasattr(models, "registry"):
            self.registry = models.registry
        else:
            for model in models:
                mapper = inspect(model)
                if isinstance(mapper, Mapper):
                    self._fixed.append(mapper)

    def register_existing(self) -> None:
        """At init_app: the models mapped so far (later ones arrive through :meth:`mapped`)."""
        mappers = [*self._fixed, *self.sacache._explicit]
        if self.registry is not None:
            mappers.extend(self.registry.mappers)
        for mapper in mappers:
            self.add(mapper)

    def mapped(self, mapper: Mapper[Any]) -> None:
        """A mapper was just constructed: cache it if it is on this application's registry, and
        name it for ``flask sa-cache evict`` if it joins a hierarchy already cached."""
        if self.registry is not None and mapper.registry is self.registry:
            self.add(mapper)
        elif self.cache.model_for(mapper) is not None:
            with self._lock:
                self.classes.setdefault(mapper.class_.__name__, mapper.class_)

    def add(self, mapper: Mapper[Any]) -> None:
        with self._lock:
            if self.cache.model_for(mapper) is None:
                try:
                    ttl = self.sacache._ttls.get(mapper.class_)
                    unique = self.sacache._uniques.get(mapper.class_)
                    self.cache.register(mapper.class_, ttl=ttl, unique=unique)
                except Exception as exc:  # one odd model must not break the application
                    log.warning("sa_cache: not caching %s: %s", mapper.class_.__name__, exc)
                    return
            self.classes[mapper.class_.__name__] = mapper.class_
            for sub in mapper.base_mapper.self_and_descendants:
                self.classes.setdefault(sub.class_.__name__, sub.class_)

    def resolve(self, name: str) -> type[Any]:
        """A registered class by class name or table name."""
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
        return self.pid != os.getpid() and not self.cache.store.capabilities.shared


#: the states of live applications, told about every mapper constructed after their init_app
_watching: weakref.WeakSet[_State] = weakref.WeakSet()
_watch_lock = threading.Lock()


def _on_mapped(mapper: Mapper[Any], class_: type[Any]) -> None:
    for state in list(_watching):
        state.mapped(mapper)


def _watch(state: _State) -> None:
    with _watch_lock:
        # SQLAlchemy >= 2.0.2: called at the end of Mapper(), i.e. by the class statement
        if not event.contains(Mapper, "after_mapper_constructed", _on_mapped):
            event.listen(Mapper, "after_mapper_constructed", _on_mapped)
        _watching.add(state)


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
        #: ``register(unique=...)``, by class
        self._uniques: dict[type[Any], Any] = {}
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
        config = {key: app.config.setdefault(key, default) for key, default in _defaults()}
        options = _cache_options(config)
        cache = IdentityCache(**options)
        state = _State(self, cache, db, models)
        url = options.get("backend")
        if not cache.store.capabilities.shared:  # the in-process backend
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
            interval = float(config["SA_CACHE_STATS_INTERVAL"] or 0)
            if interval > 0:
                state.publisher = StatsPublisher(cache, interval)
            if isinstance(url, str):
                log.debug("sa_cache: %s prefix %r", redact(url), cache.prefix)
        app.extensions[EXTENSION_KEY] = state
        app.before_request(state.before_request)
        app.cli.add_command(cli_group)
        self._apps = [ref for ref in self._apps if ref() is not None] + [weakref.ref(app)]
        _watch(state)  # first, so that a model mapped meanwhile is not missed
        state.register_existing()

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
        return self._state().cache

    def register(
        self, model: type[T] | None = None, *, ttl: float | None = None, unique: Any = None
    ) -> Any:
        """Cache ``model`` in every application of this extension (also a class decorator);
        ``unique``: its unique columns whose lookups are cached, as
        :meth:`sa_cache.IdentityCache.register` takes them."""
        if model is None:
            return lambda cls: self.register(cls, ttl=ttl, unique=unique)
        mapper = inspect(model)
        if not isinstance(mapper, Mapper):
            raise TypeError(f"{model!r} is not a mapped class")
        if isinstance(unique, str):
            raise TypeError("unique takes a list of attribute names (or True), not one string")
        if ttl is not None:
            self._ttls[model] = ttl
        if unique is not None:
            self._uniques[model] = unique
        self._explicit.append(mapper)
        for ref in self._apps:
            app = ref()
            if app is not None:
                state = self._state(app)
                if (ttl is not None or unique is not None) and state.cache.model_for(
                    mapper
                ) is not None:
                    # already cached: apply its TTL and unique columns
                    state.cache.register(
                        model, ttl=self._ttls.get(model), unique=self._uniques.get(model)
                    )
                state.add(mapper)
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
        """Register a Flask-Login ``user_loader`` for ``model`` and return it: the loader of
        :func:`sa_cache.integrations.flask_login.safe_user_loader`.

        It is ``session.get(model, id)`` (served from the cache), except that an id from the
        cookie that cannot be this model's primary key (not a number, out of range, not a UUID)
        is None without a query, and a database error about the value is None too: a malformed
        or stale cookie logs the visitor out, it never answers 500. A deleted user is None, as
        always, and is negatively cached. ``session`` (a Session or a ``scoped_session``)
        defaults to ``db.session``; ``require_active`` also turns a user whose ``is_active`` is
        false into None, so that deactivating someone logs them out of every process on their
        next request.
        """
        get_session: Callable[[], Any]
        if session is None:
            get_session = self._session
        elif callable(session):  # a scoped_session: its current Session
            get_session = session
        else:  # a Session
            get_session = lambda: session  # noqa: E731
        load_user = safe_user_loader(model, get_session, require_active=require_active)
        login_manager.user_loader(load_user)
        return load_user

    def _session(self) -> Any:
        db = self._state().db
        if db is None:
            raise RuntimeError("user_loader(..., session=Session) is needed without a db")
        return db.session


def _defaults() -> Iterable[tuple[str, Any]]:
    for key, default in CONFIG_DEFAULTS.items():
        yield key, (dict(default) if isinstance(default, dict) else default)


def _cache_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """``IdentityCache`` keyword arguments: ``SA_CACHE_OPTIONS``, overridden by the explicit keys
    that are set."""
    given = config["SA_CACHE_OPTIONS"]
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise TypeError(f"SA_CACHE_OPTIONS must be a dict, not {type(given).__name__}")
    accepted = _identity_cache_options()
    unknown = sorted(str(name) for name in given if name not in accepted)
    if unknown:
        hints = [
            f"{name!r} (did you mean {close[0]!r}?)"
            if (close := difflib.get_close_matches(name, accepted, n=1))
            else repr(name)
            for name in unknown
        ]
        raise ValueError(
            f"SA_CACHE_OPTIONS: IdentityCache takes no option {', '.join(hints)}; "
            f"its options are {', '.join(accepted)}"
        )
    options = dict(given)
    if config["SA_CACHE_URL"]:
        options["backend"] = config["SA_CACHE_URL"]
    if config["SA_CACHE_PREFIX"] is not None:
        options["prefix"] = str(config["SA_CACHE_PREFIX"])
    if config["SA_CACHE_DEFAULT_TTL"] is not None:
        options["ttl"] = float(config["SA_CACHE_DEFAULT_TTL"])
    if config["SA_CACHE_SOCKET_TIMEOUT"] is not None:
        options["socket_timeout"] = float(config["SA_CACHE_SOCKET_TIMEOUT"])
    if config["SA_CACHE_SIGNING_KEY"]:
        options["signing_key"] = config["SA_CACHE_SIGNING_KEY"]
    if options.get("backend") in ("memory://", "memory"):
        options["backend"] = None
    return options


def _identity_cache_options() -> list[str]:
    """The keyword arguments ``IdentityCache`` takes (read from its signature: the core decides)."""
    parameters = pyinspect.signature(IdentityCache).parameters.values()
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


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
