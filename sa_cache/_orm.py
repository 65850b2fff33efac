"""Every use of an SQLAlchemy internal, in one place.

``tests/test_orm_internals.py`` pins each behaviour relied on here, so an SQLAlchemy upgrade that
changes one fails there first, by name.

1. ``Session._identity_lookup`` is the one method that ``Session.get``, ``Session.get_one``,
   ``Query.get``, ``Session.merge`` and lazy many-to-one loads ("use_get") all pass through, and
   SQLAlchemy itself skips it for ``populate_existing``, ``with_for_update`` and
   ``always_refresh`` mappers: exactly the loads a cache must not answer. The horizontal-sharding
   extension overrides it for the same reason.
2. ``Session._get_impl`` receives the function that runs the SELECT after the identity lookup
   missed. Wrapping it lets a cached "this row does not exist" answer without SQL, and lets a
   SELECT that found nothing be remembered.
3. :func:`next_load_sees_fresh_snapshot` reads the connections a session's transaction holds,
   to refuse fills from a REPEATABLE READ snapshot older than the cache's state.
4. :func:`place_in_session` puts a cached row into the identity map the way
   ``loading._instance`` does for a fresh row (measured at ~4 µs against ~15 µs for
   ``make_transient_to_detached`` + ``Session.add``), then fires the same ``load`` and
   ``loaded_as_persistent`` events, so ``@reconstructor`` and user listeners see a cache hit as a
   load.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from sqlalchemy import inspect
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.base import PassiveFlag
from sqlalchemy.util import EMPTY_DICT

_SQL_ALLOWED: Final = PassiveFlag.SQL_OK | PassiveFlag.RELATED_OBJECT_OK

#: Returned by :meth:`IdentityLookupHooks.cache_lookup` when the cache knows the row is absent.
KNOWN_ABSENT: Final = object()


class IdentityLookupHooks:
    """Session mixin that turns SQLAlchemy's identity lookups into two plain hooks.

    ``cache_lookup`` is asked after the identity map missed and when SQL would be allowed; it
    returns an instance, None (go to the database) or :data:`KNOWN_ABSENT`. ``loaded_nothing`` is
    told when a ``get`` went to the database and found no row.
    """

    _sa_cache_last_absent: Any = None
    #: the normalised primary key the cache was asked for during the current ``get``
    _sa_cache_lookup_pk: Any = None

    def cache_lookup(
        self,
        mapper: Mapper[Any],
        primary_key_identity: Any,
        identity_token: Any,
        execution_options: Any,
    ) -> Any:
        return None

    def loaded_nothing(self, mapper: Mapper[Any], primary_key_identity: Any) -> None:
        return None

    def lookup_done(self) -> None:
        """Called when a ``get`` returns or raises, whatever happened in between."""
        return None

    def identity_map_lookup(
        self, mapper: Mapper[Any], primary_key_identity: Any, identity_token: Any = None
    ) -> Any:
        """The identity map alone (expired instances are refreshed, as SQLAlchemy does)."""
        return Session._identity_lookup(self, mapper, primary_key_identity, identity_token)  # type: ignore[arg-type]

    def _identity_lookup(
        self,
        mapper: Mapper[Any],
        primary_key_identity: Any,
        identity_token: Any = None,
        passive: PassiveFlag = PassiveFlag.PASSIVE_OFF,
        **kw: Any,
    ) -> Any:
        found = super()._identity_lookup(  # type: ignore[misc]
            mapper, primary_key_identity, identity_token, passive, **kw
        )
        if found is not None or passive & _SQL_ALLOWED != _SQL_ALLOWED:
            return found
        answer = self.cache_lookup(
            mapper,
            primary_key_identity,
            identity_token,
            kw.get("execution_options") or EMPTY_DICT,
        )
        if answer is KNOWN_ABSENT:
            self._sa_cache_last_absent = primary_key_identity
            return None
        return answer

    def _get_impl(
        self, entity: Any, primary_key_identity: Any, db_load_fn: Callable[..., Any], **kw: Any
    ) -> Any:
        self._sa_cache_last_absent = None
        self._sa_cache_lookup_pk = None

        def load_unless_known_absent(session: Any, statement: Any, pk: Any, **load_kw: Any) -> Any:
            if self._sa_cache_last_absent is not None:
                self._sa_cache_last_absent = None
                return None
            if self._sa_cache_lookup_pk is not None:
                # load what the cache was asked for, so a cold and a warm cache agree
                pk = list(self._sa_cache_lookup_pk)
            result = db_load_fn(session, statement, pk, **load_kw)
            if result is None:
                self.loaded_nothing(inspect(entity), pk)
            return result

        try:
            return super()._get_impl(  # type: ignore[misc]
                entity, primary_key_identity, load_unless_known_absent, **kw
            )
        finally:
            self.lookup_done()


_STATEMENT_SNAPSHOTS: Final = frozenset({"READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"})


def next_load_sees_fresh_snapshot(session: Session) -> bool:
    """Whether the session's next SELECT reads data at least as new as "now".

    True when its transaction holds no connection yet (the load will begin the snapshot), when
    every connection it holds takes a snapshot per statement (READ COMMITTED and weaker), or for a
    pysqlite connection that has not begun a transaction (its default mode runs each SELECT
    outside one). False for REPEATABLE READ and SERIALIZABLE transactions that have already read:
    their snapshot may predate an eviction the cache has already seen, and filling from it would
    put an old row back (``SessionTransaction._connections`` holds the connections).
    """
    transaction = session.get_transaction()
    if transaction is None:
        return True
    for connection, *_ in transaction._connections.values():
        level = connection.get_execution_options().get("isolation_level")
        if (level or connection.default_isolation_level) in _STATEMENT_SNAPSHOTS:
            continue
        if connection.dialect.name == "sqlite" and not getattr(
            connection.connection.dbapi_connection, "in_transaction", True
        ):
            continue
        return False
    return True


def session_populates_existing(session: Any) -> bool:
    """Whether the session was configured with ``execution_options={"populate_existing": True}``.

    ``Session.execution_options`` exists from SQLAlchemy 2.1; in 2.0 no session has it."""
    options = getattr(session, "execution_options", None)
    return bool(options and options.get("populate_existing"))


def place_in_session(
    session: Session,
    mapper: Mapper[Any],
    identity_key: Any,
    values: dict[str, Any],
    expired: frozenset[str],
) -> Any:
    """Make ``values`` a persistent instance of ``mapper`` in ``session``, as a load would."""
    instance = mapper.class_manager.new_instance()
    state = instance_state(instance)
    state.dict.update(values)
    if expired:
        state.expired_attributes.update(expired)
    state.key = identity_key
    state.identity_token = identity_key[2]
    state.session_id = session.hash_key
    session.identity_map._add_unpresent(state, identity_key)
    if state.manager.dispatch.load:
        state.manager.dispatch.load(state, None)
    if session.dispatch.loaded_as_persistent:
        session.dispatch.loaded_as_persistent(session, state)
    return instance
