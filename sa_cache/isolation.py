"""Isolation levels whose promises a cache hit would break, and how to tell a connection's level.

A cache hit answers without SQL, so it neither starts the transaction's snapshot nor takes the
locks a SELECT would. At READ COMMITTED that changes nothing a transaction can rely on. Where the
database promises more, it does:

- **PostgreSQL REPEATABLE READ and SERIALIZABLE** promise first-updater-wins (and SERIALIZABLE,
  serializability): a transaction that read a row and then updates it after a concurrent commit
  of that row fails with a serialization error. A hit does not start the snapshot, so the
  snapshot starts at the later UPDATE, after the concurrent commit, which then succeeds and
  overwrites the other transaction's committed update (a lost update).
- **MariaDB SERIALIZABLE** turns every plain SELECT into a locking read; a hit takes no lock.
- **MariaDB REPEATABLE READ with** ``innodb_snapshot_isolation`` (off by default in 10.x, on from
  11.6) makes a write to a row changed after the snapshot began fail, as PostgreSQL does.

Inside such transactions the cache neither answers nor fills (lookups count as ``skipped``): the
promise holds with the cache as without it, at the price of those transactions' hits.
REPEATABLE READ without that setting (MariaDB's and MySQL's default) promises neither, and keeps
its hits; see docs/protocol.md.

The level a lookup's load would run at is the level of the connection the session's transaction
holds for the mapper, or, before it holds one, of the engine the session would use: its
``isolation_level`` execution option or the dialect's default, learnt at the engine's first
connect. A MariaDB engine's ``innodb_snapshot_isolation`` is read once per connection pool,
through the DBAPI (so no SQL statement event sees it).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Final

from sqlalchemy.engine import Connection, Engine

#: Levels at which each dialect promises what a hit would break (MariaDB's REPEATABLE READ only
#: with innodb_snapshot_isolation).
_PROMISING: Final = {
    "postgresql": frozenset({"REPEATABLE READ", "SERIALIZABLE"}),
    "mysql": frozenset({"SERIALIZABLE"}),
    "mariadb": frozenset({"SERIALIZABLE"}),
}
_SNAPSHOT_ISOLATION_LEVEL: Final = "REPEATABLE READ"
#: Levels that take a snapshot per statement: a transaction's later reads are as fresh as "now".
PER_STATEMENT_SNAPSHOTS: Final = frozenset({"READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"})

_lock = threading.Lock()
#: innodb_snapshot_isolation per connection pool (engines made by ``execution_options`` share it)
_snapshot_isolation: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def promises_what_hits_break(bind: Engine | Connection) -> bool:
    """Whether a transaction on ``bind`` (the engine a load would check out a connection from, or
    a connection it holds) runs at a level whose promise a cache hit would break."""
    dialect = bind.dialect
    levels = _PROMISING.get(dialect.name)
    if levels is None:
        return False
    level = bind.get_execution_options().get("isolation_level")
    if level is None:
        if isinstance(bind, Connection):
            level = bind.default_isolation_level
        else:
            level = getattr(dialect, "default_isolation_level", None)
            if level is None:  # the engine never connected: connect once to learn it
                _probe(bind)
                level = getattr(dialect, "default_isolation_level", None)
    if level is None:
        return True  # unknown: assume the promise
    level = _named(level)
    if level in levels:
        return True
    return level == _SNAPSHOT_ISOLATION_LEVEL and dialect.name in ("mysql", "mariadb") and (
        _innodb_snapshot_isolation(bind.engine)
    )


def begins_snapshot(bind: Engine | Connection) -> bool:
    """Whether a transaction's first statement on ``bind`` may begin a snapshot that its later
    statements keep reading: REPEATABLE READ, SERIALIZABLE, or a level not known yet (the engine
    never connected). Not the per-statement levels, and not pysqlite, whose default mode runs
    SELECTs outside a transaction. Read from the bind's ``isolation_level`` execution option or
    its dialect's default, so no SQL is sent."""
    if bind.dialect.name == "sqlite":
        return False
    level = bind.get_execution_options().get("isolation_level")
    # the dialect learns its default at the engine's first connect: until then it has none
    level = level or getattr(bind.dialect, "default_isolation_level", None)
    return level is None or _named(level) not in PER_STATEMENT_SNAPSHOTS


def _named(level: Any) -> str:
    """An isolation level as SQLAlchemy names it (``repeatable_read`` is REPEATABLE READ)."""
    return str(level).upper().replace("_", " ")


def _innodb_snapshot_isolation(engine: Engine) -> bool:
    pool = engine.pool
    known = _snapshot_isolation.get(pool)
    if known is None:
        known = _probe(engine)
    return known


def _probe(engine: Engine) -> bool:
    """Connect through the DBAPI (the dialect learns its default level at the first connect)
    and, on MySQL and MariaDB, read ``innodb_snapshot_isolation``; False where the server has no
    such variable (MySQL, MariaDB before 10.6.18)."""
    found = False
    raw = engine.raw_connection()
    try:
        if engine.dialect.name in ("mysql", "mariadb"):
            cursor = raw.cursor()
            try:
                cursor.execute("SELECT @@innodb_snapshot_isolation")
                row = cursor.fetchone()
                found = bool(row and int(row[0]))
            except Exception:
                found = False
            finally:
                cursor.close()
            raw.rollback()
    finally:
        raw.close()
    with _lock:
        _snapshot_isolation[engine.pool] = found
    return found
