"""Connections that several sessions share: what was written on them, and evicting it when the
transaction that really commits does so.

A session bound to a :class:`~sqlalchemy.engine.Connection` shares the connection's transaction
with whoever else uses it: another session on the same connection, or the application that began
the transaction and joined the session to it (SQLAlchemy's "join an external transaction"
recipe, ``join_transaction_mode``). Two things follow, both tracked here per connection (in
``Connection.info``, so they follow the database connection rather than a session):

- **Writes are seen by every session on the connection.** A session on a connection another
  session has written on reads that session's uncommitted rows through it, so it neither answers
  from the cache nor fills it until the connection's transaction ends
  (:func:`written_by_others`). A session running inside a transaction it did not begin already
  skips the cache (``_orm.runs_in_outside_transaction``).
- **A session's own commit is held too.** SQLAlchemy evicts in the session's ``after_commit``,
  after the database commit. In between, a reader that learnt of the commit through the database
  (it waited for a lock the writer held, or loaded a row the writer committed) must not get the
  old row from the cache: in plain SQLAlchemy it would read the new one, and a read-modify-write
  built on the old one loses the write. So a session that wrote registers its live changes on
  each connection it runs on (:func:`hold_at_commit`), and the connection's root commit holds
  them first; the eviction in ``after_commit`` then replaces the holds with tombstones. A
  transaction that wrote nothing cached holds nothing and costs no round trip.
- **Changes become durable at the connection's root commit**, not at a joined session's commit.
  The joined session still evicts at its own commit (harmless: its rows are not committed yet, so
  a reader can only load and cache the old, committed row, which is still right) and hands its
  keys to the connection (:func:`defer`). SQLAlchemy reports the root commit only *before* the
  database commit (``ConnectionEvents.commit``), so there the keys get **holds**: tombstones no
  reader may fill over (:func:`sa_cache.protocol.hold_writes`), so nobody caches the old row
  during the commit. After the commit, at the first of the owning session's ``after_commit``, the
  connection's next ``begin`` and its return to the pool, they are evicted again with ordinary
  tombstones and fills resume. A hold whose eviction never comes (the process died) expires after
  the cache's ``max_fill_age``. A root rollback forgets the connection's changes.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

from sqlalchemy import event
from sqlalchemy.engine import Connection

from .guarded import GuardedStore
from .kinds import CachedKind

_STATE: Final = "sa_cache"


class _Changes:
    """What one cache must evict for a connection's transaction."""

    __slots__ = ("keys", "kinds", "hold_ttl")

    def __init__(self, hold_ttl: float) -> None:
        self.keys: dict[str, CachedKind] = {}
        self.kinds: set[CachedKind] = set()
        self.hold_ttl = hold_ttl


class Uncommitted(Protocol):
    """A session transaction's changes as they grow (``sa_cache.tracking.TransactionChanges``)."""

    keys: dict[str, CachedKind]
    bulk_models: set[CachedKind]


class _ConnectionState:
    """Per database connection: who wrote in its current transaction, what that transaction
    must evict (per cache), what its last commit still has to evict, and the changes of the
    sessions running their own transactions on it, held at its commit."""

    __slots__ = ("writers", "uncommitted", "committed", "owners")

    def __init__(self) -> None:
        self.writers: set[int] = set()  # id() of the sessions that wrote
        self.uncommitted: dict[GuardedStore, _Changes] = {}
        self.committed: dict[GuardedStore, _Changes] = {}
        #: id(changes) -> (store, the changes, how long a hold blocks fills at most)
        self.owners: dict[int, tuple[GuardedStore, Uncommitted, float]] = {}


def _state(connection: Connection) -> _ConnectionState:
    info = connection.info
    state = info.get(_STATE)
    if state is None:
        state = info[_STATE] = _ConnectionState()
    if not event.contains(connection, "commit", _before_commit):
        event.listen(connection, "commit", _before_commit)
        event.listen(connection, "rollback", _rolled_back)
        event.listen(connection, "begin", _began)
    pool = connection.engine.pool
    if not event.contains(pool, "checkin", _checked_in):
        event.listen(pool, "checkin", _checked_in)
    return state


def wrote(connection: Connection, session: Any) -> None:
    """``session`` wrote on ``connection`` in its current transaction."""
    _state(connection).writers.add(id(session))


def written_by_others(connection: Connection, session: Any) -> bool:
    """Whether a session other than ``session`` wrote on ``connection`` in its current
    transaction (its uncommitted rows are visible through the connection)."""
    state = connection.info.get(_STATE)
    return state is not None and bool(state.writers - {id(session)})


def defer(
    connection: Connection,
    guarded: GuardedStore,
    keys: dict[str, CachedKind],
    kinds: set[CachedKind],
    hold_ttl: float,
) -> None:
    """Evict ``keys`` and ``kinds`` when ``connection``'s root transaction commits."""
    changes = _state(connection).uncommitted.setdefault(guarded, _Changes(hold_ttl))
    changes.keys.update(keys)
    changes.kinds.update(kinds)


def hold_at_commit(
    connection: Connection, guarded: GuardedStore, changes: Uncommitted, hold_ttl: float
) -> None:
    """Hold what ``changes`` names, as it is then, just before ``connection``'s root commit; the
    session's own ``after_commit`` evicts it after."""
    _state(connection).owners[id(changes)] = (guarded, changes, hold_ttl)


def after_commit(connection: Connection) -> None:
    """A session that owns ``connection``'s transaction committed it: evict what the sessions
    joined to it changed."""
    state = connection.info.get(_STATE)
    if state is not None and state.committed:
        _deliver(state)


def _before_commit(connection: Connection) -> None:
    state: _ConnectionState | None = connection.info.get(_STATE)
    if state is None:
        return
    state.writers.clear()
    if state.committed:  # an earlier commit's eviction never ran: run it before the hold
        _deliver(state)
    owners, state.owners = state.owners, {}
    for guarded, live, hold_ttl in owners.values():
        guarded.hold(live.keys, live.bulk_models, hold_ttl)
    for guarded, changes in state.uncommitted.items():
        guarded.hold(changes.keys, changes.kinds, changes.hold_ttl)
    state.committed, state.uncommitted = state.uncommitted, {}


def _rolled_back(connection: Connection) -> None:
    state: _ConnectionState | None = connection.info.get(_STATE)
    if state is not None:
        state.writers.clear()
        state.uncommitted.clear()
        state.owners.clear()


def _began(connection: Connection) -> None:
    state: _ConnectionState | None = connection.info.get(_STATE)
    if state is not None and state.committed:
        _deliver(state)


def _checked_in(dbapi_connection: Any, record: Any) -> None:
    state: _ConnectionState | None = record.info.get(_STATE) if record is not None else None
    if state is None:
        return
    if state.committed:
        _deliver(state)
    state.writers.clear()
    state.uncommitted.clear()
    state.owners.clear()


def _deliver(state: _ConnectionState) -> None:
    committed, state.committed = state.committed, {}
    for guarded, changes in committed.items():
        guarded.evict(dict(changes.keys), changes.kinds)
