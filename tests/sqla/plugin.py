"""Run SQLAlchemy's own ORM test suite with every Session a caching one.

Loaded with ``-p tests.sqla.plugin`` (``PYTHONPATH`` = the repository root) when pytest runs from
SQLAlchemy's source tree; ``scripts/sqla_suite.sh`` does all of that. Public sa_cache API only:
``IdentityCache()``, ``cache.register``, ``cache.model_for``, ``cache.stats``,
``CachingSessionMixin``, ``CachingQuery``.

What it does, per test (from the start of its setup to the end of its teardown):

- ``sqlalchemy.orm.Session.__new__`` is replaced, so that constructing *any* Session -- through
  ``fixture_session()``, ``Session(...)``, ``sessionmaker(...)()``, ``scoped_session``, a test's
  own Session subclass, ``from sqlalchemy.orm.session import Session`` -- builds an instance of
  ``type(name, (CachingSessionMixin, cls), ...)`` instead: the documented way to add the cache to
  a Session class. The class is made once per test and per requested class; making it runs
  ``CachingSessionMixin.__init_subclass__``, which installs sa_cache's session listeners on it.
  That is the only *public* way to get them back after SQLAlchemy's ``RemoveORMEventsGlobally``
  fixture cleared every session event at the end of the previous test (the listeners live on the
  class; putting them back on ``CachingSession`` itself needs the internal
  ``sa_cache.tracking.listen``).
- The instance gets ``cache=`` the test's own ``IdentityCache()`` (in-process store, made at the
  first session of the test) and ``query_cls=CachingQuery`` unless the test passed one.
- Before each session is built, every mapper of every live registry
  (``sqlalchemy.orm.mapperlib._mapper_registries``) not yet registered with the test's cache is
  registered. ``register`` also puts back the ``load`` listener the instance-event clearing
  removed. Classes the cache refuses are counted by exception type.

``SA_CACHE_SUITE_MODE``:

- ``plain`` (default): the above. Rows are cached only by sa_cache's own rule: a primary-key
  lookup that missed, in a transaction that has not written.
- ``fill-all``: additionally, each primary-key lookup that misses the identity map first warms the
  cache from the *committed* database state through a second engine on the same SQLite file
  (so its SQL is invisible to the test's SQL assertions), with a separate caching session doing
  the same ``get``. The test's lookup is then answered from the cache whenever sa_cache's rules
  allow it: the rows loaded earlier in the test, by this or another session, are hits. Needs a
  file database (``--dburi sqlite:////path/x.db``); on ``:memory:`` it degrades to ``plain``.
- ``off``: load the plugin but change nothing (for checking the plugin itself).

``SA_CACHE_SUITE_IGNORE_SQL=1`` turns SQLAlchemy's statement assertions
(``assertsql.SQLAsserter.assert_``, behind ``assert_sql_count``, ``assert_sql_execution``,
``sql_execution_asserter``...) into no-ops: a test that fails with the cache but passes with this
differs only in its SQL.

``SA_CACHE_SUITE_XFAIL=1`` marks the tests listed in ``expected_sql_differences.txt`` and
``harness_artifacts.txt`` (next to this file) for the current mode as non-strict xfail.

``SA_CACHE_SUITE_STATS=path`` writes a JSON summary at the end: cache counters, sessions built,
refused registrations, warm-ups, and the tests in which the cache answered at least one lookup
(``cache_*`` counters include the fill-all warm-up session's lookups, ``test_hits`` /
``test_misses`` do not).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

MODE = os.environ.get("SA_CACHE_SUITE_MODE", "plain")
IGNORE_SQL = os.environ.get("SA_CACHE_SUITE_IGNORE_SQL") == "1"
XFAIL = os.environ.get("SA_CACHE_SUITE_XFAIL") == "1"
STATS_PATH = os.environ.get("SA_CACHE_SUITE_STATS")
EXPECTED_FILES = {
    Path(__file__).with_name("expected_sql_differences.txt"): "SQL differs",
    Path(__file__).with_name("harness_artifacts.txt"): "harness artifact",
}
MODES = ("plain", "fill-all", "off")

# the backend suffix SQLAlchemy puts in __backend__ class names, e.g. "_sqlite+pysqlite_3_40_1"
_BACKEND_SUFFIX = re.compile(r"_sqlite\+pysqlite_[0-9_]+")


def normalise_nodeid(nodeid: str) -> str:
    return _BACKEND_SUFFIX.sub("", nodeid)


class _TestState:
    """What the harness keeps for the running test."""

    def __init__(self) -> None:
        self.active = False
        self.nodeid = ""
        self.cache: Any = None
        self.classes: dict[type, type] = {}
        self.seen_mappers: set[Any] = set()
        self.warm_class: Any = None
        self.warm_engine: Any = None
        self.warm_hits = 0
        self.warm_misses = 0

    def reset(self, nodeid: str) -> None:
        self.__init__()  # type: ignore[misc]
        self.nodeid = nodeid
        self.active = True


STATE = _TestState()
TOTALS: Counter[str] = Counter()
REFUSED: Counter[str] = Counter()
REFUSED_EXAMPLES: dict[str, str] = {}
TESTS_WITH_HITS: list[str] = []
WARM_ERRORS: Counter[str] = Counter()


# -- the patch ------------------------------------------------------------------------------------


def _install() -> None:
    from sqlalchemy.orm import Session

    from sa_cache import CachingQuery, CachingSessionMixin

    real_new = Session.__dict__.get("__new__")
    assert real_new is None, "sqlalchemy.orm.Session defines __new__: revisit the harness"

    def __new__(cls: type, *args: Any, **kwargs: Any) -> Any:
        if STATE.active and not issubclass(cls, CachingSessionMixin):
            cls = _caching_class(cls)
        return object.__new__(cls)

    Session.__new__ = staticmethod(__new__)  # type: ignore[method-assign,assignment]

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if "cache" not in kwargs:
            kwargs["cache"] = _cache()
        kwargs.setdefault("query_cls", CachingQuery)
        super(self._sa_suite_class, self).__init__(*args, **kwargs)

    def _caching_class(cls: type) -> type:
        made = STATE.classes.get(cls)
        if made is None:
            bases: tuple[type, ...] = (CachingSessionMixin, cls)
            if MODE == "fill-all":
                bases = (_WarmingLookups, *bases)
            made = type(
                cls.__name__,
                bases,
                {
                    "__init__": __init__,
                    "__module__": cls.__module__,
                    "__qualname__": cls.__qualname__,
                },
            )
            made._sa_suite_class = made  # type: ignore[attr-defined]
            STATE.classes[cls] = made
            TOTALS["session_classes_made"] += 1
        TOTALS["sessions"] += 1
        return made

    globals()["_RealSession"] = Session


def _cache() -> Any:
    from sa_cache import IdentityCache

    if STATE.cache is None:
        STATE.cache = IdentityCache()
    _register_all(STATE.cache)
    return STATE.cache


def _register_all(cache: Any) -> None:
    from sqlalchemy.orm import mapperlib

    seen = STATE.seen_mappers
    for registry in list(mapperlib._mapper_registries):
        for mapper in list(registry.mappers):
            if mapper in seen:
                continue
            seen.add(mapper)
            if cache.model_for(mapper) is not None:
                continue
            try:
                cache.register(mapper.class_)
                TOTALS["registered"] += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported
                name = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                REFUSED[type(exc).__name__] += 1
                REFUSED_EXAMPLES.setdefault(type(exc).__name__, f"{STATE.nodeid}: {name}")


# -- fill-all --------------------------------------------------------------------------------------


class _WarmingLookups:
    """Before a primary-key lookup that misses the identity map, ``get`` the same row through a
    second caching session on a second engine (same SQLite file, committed data only), so the
    cache holds it if sa_cache's rules let that session fill it."""

    def _identity_lookup(
        self,
        mapper: Any,
        primary_key_identity: Any,
        identity_token: Any = None,
        *args: Any,
        **kw: Any,
    ) -> Any:
        try:
            _warm(self, mapper, primary_key_identity, identity_token)
        except Exception as exc:  # noqa: BLE001 - a warm-up never changes the test
            WARM_ERRORS[type(exc).__name__] += 1
        return super()._identity_lookup(  # type: ignore[misc]
            mapper, primary_key_identity, identity_token, *args, **kw
        )


def _warm(session: Any, mapper: Any, pk: Any, token: Any) -> None:
    cache = session.cache
    if cache is None or token is not None or cache.model_for(mapper) is None:
        return
    if mapper.identity_key_from_primary_key(pk, token) in session.identity_map:
        return
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool
    from sqlalchemy.testing import config

    bind = session.get_bind(mapper)
    url = getattr(bind, "engine", bind).url
    if url != config.db.url or url.get_backend_name() != "sqlite":
        return
    if url.database in (None, "", ":memory:"):
        return
    if STATE.warm_engine is None:
        STATE.warm_engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": 0.2})
    if STATE.warm_class is None:  # per test, so __init_subclass__ installs sa_cache's listeners
        from sa_cache import CachingSessionMixin

        STATE.warm_class = type("WarmSession", (CachingSessionMixin, _RealSession), {})
    before = cache.stats()
    try:
        with STATE.warm_class(STATE.warm_engine, cache=cache) as warm:
            warm.get(mapper.class_, pk)
    finally:
        after = cache.stats()  # the warm session's own hits and misses are not the test's
        STATE.warm_hits += after["hits"] - before["hits"]
        STATE.warm_misses += after["misses"] - before["misses"]
    TOTALS["warm_gets"] += 1


_RealSession: Any = None


# -- pytest hooks ----------------------------------------------------------------------------------


def _expected() -> dict[str, str]:
    """Node id (normalised) -> reason, for the current mode."""
    out: dict[str, str] = {}
    for path, kind in EXPECTED_FILES.items():
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            modes, nodeid, *rest = line.split("\t")  # tab-separated: test ids may hold spaces
            reason = rest[0].strip().removeprefix("--").strip() if rest else ""
            if MODE in modes.split(","):
                out[normalise_nodeid(nodeid)] = f"{kind}: {reason}"
    return out


def pytest_configure(config: pytest.Config) -> None:
    if MODE not in MODES:
        raise pytest.UsageError(f"SA_CACHE_SUITE_MODE must be one of {MODES}, not {MODE!r}")
    if MODE != "off":
        _install()
    if IGNORE_SQL:
        from sqlalchemy.testing import assertsql

        assertsql.SQLAsserter.assert_ = lambda self, *rules: None  # type: ignore[method-assign]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not XFAIL or MODE == "off":
        return
    expected = _expected()
    for item in items:
        reason = expected.get(normalise_nodeid(item.nodeid))
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=f"sa_cache: {reason}", strict=False))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Any:
    STATE.reset(item.nodeid)
    try:
        return (yield)
    finally:
        _collect(item.nodeid)
        if STATE.warm_engine is not None:
            STATE.warm_engine.dispose()
        STATE.__init__()  # type: ignore[misc]


def _collect(nodeid: str) -> None:
    cache = STATE.cache
    if cache is None:
        return
    TOTALS["tests_with_cache"] += 1
    stats = cache.stats()
    for name, value in stats.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            TOTALS["cache_" + name] += value
    # the lookups of the test's own sessions (fill-all: without the warm-up session's)
    hits = stats.get("hits", 0) - STATE.warm_hits
    TOTALS["test_hits"] += hits
    TOTALS["test_misses"] += stats.get("misses", 0) - STATE.warm_misses
    if hits:
        TESTS_WITH_HITS.append(normalise_nodeid(nodeid))


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not STATS_PATH:
        return
    Path(STATS_PATH).write_text(
        json.dumps(
            {
                "mode": MODE,
                "ignore_sql": IGNORE_SQL,
                "totals": dict(TOTALS),
                "refused_registrations": dict(REFUSED),
                "refused_examples": REFUSED_EXAMPLES,
                "warm_errors": dict(WARM_ERRORS),
                "tests_with_hits": TESTS_WITH_HITS,
            },
            indent=1,
            sort_keys=True,
        )
    )


def pytest_report_header() -> str:
    import sa_cache

    return (
        f"sa_cache harness: mode={MODE} ignore_sql={IGNORE_SQL} xfail_expected={XFAIL} "
        f"sa_cache={sa_cache.__file__}"
    )
