"""Flask-Login helpers: a ``user_loader`` that never turns a bad cookie into a 500.

``from sa_cache.integrations.flask_login import safe_user_loader``::

    login_manager.user_loader(safe_user_loader(User, db.session, require_active=True))

(:meth:`sa_cache.integrations.flask.SACache.user_loader` does the same and registers it.)

The id Flask-Login reads from the session cookie is a string. It is normalised exactly as
:mod:`sa_cache.keys` normalises a primary key for the cache (``coercer_for`` / ``normalise``), so
the loader and ``session.get(User, 42)`` share one cache entry, and an id the cache's coercer
refuses (``"abc"``, ``"1.5"``, ``" 1"`` for an integer key, not a UUID for a UUID key) is None
without a query. Integer ids are also bounded to 64 bits (a larger value would make the database
driver raise), and a database error about the value itself (a ``DataError``: an id beyond a
32-bit column on PostgreSQL, say) is None too, after rolling the session back. A deleted user is
None, as always, and is cached as absent. An error that is not the cookie's fault (the database is
down) still propagates.

Columns whose type :mod:`sa_cache.keys` cannot read from text (a ``TypeDecorator``, a date...) get
the id as Flask-Login gave it, and SQLAlchemy decides; errors about the value are None as above.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect
from sqlalchemy.orm import Mapper

from sa_cache.keys import UNCACHEABLE, coercer_for, normalise

log = logging.getLogger("sa_cache")

T = TypeVar("T")

#: the largest magnitude of an integer id (BIGINT); beyond it the driver raises
MAX_INT_ID = 2**63 - 1
#: probes telling whether sa_cache.keys reads this column's values from text at all
_TEXT_PROBES = ("0", str(uuid.UUID(int=0)))


def id_parser(model: type[Any]) -> Callable[[Any], Any]:
    """For ``model`` (one primary-key column), a function from Flask-Login's id to the value to
    pass to ``session.get``, or None when the id cannot be one of this model's keys."""
    mapper = inspect(model, raiseerr=False)
    if not isinstance(mapper, Mapper) or len(mapper.primary_key) != 1:
        raise TypeError("user_loader needs a mapped class with a single-column primary key")
    coercers = (coercer_for(mapper.primary_key[0]),)
    if all(coercers[0](probe) is UNCACHEABLE for probe in _TEXT_PROBES):
        return lambda user_id: user_id  # keys cannot judge this type: SQLAlchemy decides

    def parse(user_id: Any) -> Any:
        try:
            pk = normalise(coercers, (user_id,))
        except ValueError:  # an integer string beyond Python's digit limit
            return None
        if pk is None:
            return None
        value = pk[0]
        if type(value) is int and not -MAX_INT_ID <= value <= MAX_INT_ID:
            return None
        return value

    return parse


def safe_user_loader(
    model: type[T],
    session: Callable[[], Any],
    *,
    require_active: bool = False,
) -> Callable[[str], T | None]:
    """A Flask-Login ``user_loader`` for ``model``: ``session().get(model, id)`` (served from the
    cache with a caching session), None for a malformed, out-of-range or deleted id.

    :param session: ``db.session``, a ``scoped_session``, or any zero-argument callable returning
        the Session to load with (called on every load).
    :param require_active: also None for a user whose ``is_active`` is false, so deactivating
        someone logs them out of every process on their next request.
    """
    parse = id_parser(model)

    def load_user(user_id: str) -> T | None:
        pk = parse(user_id)
        if pk is None:
            return None
        target = session()
        try:
            user: T | None = target.get(model, pk)
        except sa_exc.StatementError as exc:
            if isinstance(exc, sa_exc.DBAPIError) and not isinstance(exc, sa_exc.DataError):
                raise  # the database is down or broken: not the cookie's fault
            target.rollback()
            log.info("sa_cache: user id %r rejected by the database", str(user_id)[:64])
            return None
        if require_active and user is not None and not getattr(user, "is_active", True):
            return None
        return user

    return load_user
