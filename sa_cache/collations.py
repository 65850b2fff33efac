"""Whether a database compares a column's values exactly as the cache keys them.

A unique-column lookup is keyed by the value the caller asked for. That is only right where the
database's ``=`` on the column is equality of the exact value: then one value names at most one
row, and a change to a row can be matched to the one key it makes stale. Where the database's
equality is looser, ``'A@x'`` and ``'a@x '`` find the same row (MariaDB's default collations
ignore case and trailing spaces; ``citext``, nondeterministic PostgreSQL collations and SQLite's
``NOCASE``/``RTRIM`` ignore case or spaces), and a row would live under many keys, none of which
an update of it names. Normalising values as the database does is not attempted (it depends on
the collation's version and the server's Unicode tables): such columns are not served from the
cache, and each lookup of them is counted as ``skipped``.

The decision is the database's, not the model's (a table may have been created with another
collation than the model declares): it is read once per (engine, table, column) through the
DBAPI, on a connection of its own (so no snapshot of the caller's transaction begins; a pool of
one shared connection excepted), and kept for the life of the process.

Exact, per database:

- integers everywhere; UUIDs kept as ``uuid.UUID``;
- SQLite: a text column declared without ``COLLATE``, or ``COLLATE BINARY``;
- PostgreSQL: ``text`` / ``varchar`` (not ``char(n)``, blank-padded, nor ``citext``) whose
  collation is deterministic (``pg_collation.collisdeterministic``: equal means byte-equal);
- MariaDB / MySQL: ``varchar`` / ``text`` in a binary collation that does not pad (``*_nopad_bin``,
  or MySQL 8's ``*_0900_bin``); ``*_bin`` collations ignore trailing spaces, so not those;
- anything else (dates, numbers, enums, other databases): not exact.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy import types as sqltypes
from sqlalchemy.pool import SingletonThreadPool, StaticPool

_lock = threading.Lock()
#: engine -> {(schema, table, column): exact?}
_known: weakref.WeakKeyDictionary[Any, dict[tuple[Any, str, str], bool]] = (
    weakref.WeakKeyDictionary()
)


def compares_exactly(
    engine: Any, column: Any, own_connection: Callable[[], Any] | None = None
) -> bool:
    """Whether ``engine``'s database compares ``column`` (a table column) by exact value; asked
    once per engine and column, then remembered.

    Asked on a connection of its own, except where the engine's pool hands every checkout the
    one DBAPI connection (``StaticPool``, ``SingletonThreadPool``: in-memory SQLite): there
    returning a connection of its own would roll back the caller's transaction on it, so
    ``own_connection()`` (the caller's connection, left open) is used."""
    col_type = column.type
    if isinstance(col_type, sqltypes.TypeDecorator):
        return False
    if isinstance(col_type, sqltypes.Boolean):
        return False
    if isinstance(col_type, sqltypes.Integer):
        return True
    if isinstance(col_type, sqltypes.Uuid):
        return bool(col_type.as_uuid)
    if not isinstance(col_type, sqltypes.String) or isinstance(col_type, sqltypes.Enum):
        return False
    table = column.table
    where = (getattr(table, "schema", None), table.name, column.name)
    known = _known.get(engine)
    if known is not None and where in known:
        return known[where]
    try:
        if own_connection is not None and isinstance(
            engine.pool, StaticPool | SingletonThreadPool
        ):
            exact = _ask(own_connection(), *where)
        else:
            with engine.connect() as connection:
                exact = _ask(connection, *where)
    except Exception:
        exact = False  # a database that cannot say: not served
    with _lock:
        _known.setdefault(engine, {})[where] = exact
    return exact


def forget(engine: Any) -> None:
    """Forget what was learnt about ``engine`` (a table altered in place, say)."""
    with _lock:
        _known.pop(engine, None)


def _ask(connection: Any, schema: str | None, table: str, column: str) -> bool:
    name = connection.dialect.name
    if name == "sqlite":
        return _sqlite(connection, schema, table, column)
    if name == "postgresql":
        return _postgresql(connection, schema, table, column)
    if name in ("mysql", "mariadb"):
        return _mysql(connection, schema, table, column)
    return False


def _sqlite(connection: Any, schema: str | None, table: str, column: str) -> bool:
    master = "sqlite_master" if schema is None else f'"{schema}".sqlite_master'
    sql = connection.exec_driver_sql(
        f"SELECT sql FROM {master} WHERE type = 'table' AND name = ?", (table,)
    ).scalar()
    if not sql:
        return False
    body = sql[sql.index("(") + 1 : sql.rindex(")")]
    for definition in _top_level_parts(body):
        words = definition.strip().split(None, 1)
        if not words or words[0].strip('"`[]').lower() != column.lower():
            continue
        found = re.search(r"\bCOLLATE\s+[\"'`\[]?(\w+)", definition, re.IGNORECASE)
        return found is None or found.group(1).upper() == "BINARY"
    return False


def _top_level_parts(body: str) -> list[str]:
    """A CREATE TABLE's column definitions and constraints: split at commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(body):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    return parts


def _postgresql(connection: Any, schema: str | None, table: str, column: str) -> bool:
    qualified = table if schema is None else f"{schema}.{table}"
    row = connection.execute(
        text(
            "SELECT t.typname, c.collisdeterministic FROM pg_attribute a"
            " JOIN pg_type t ON t.oid = a.atttypid"
            " LEFT JOIN pg_collation c ON c.oid = a.attcollation"
            " WHERE a.attrelid = to_regclass(:qualified) AND a.attname = :column"
        ),
        {"qualified": f'"{qualified}"' if schema is None else qualified, "column": column},
    ).first()
    if row is None:
        return False
    type_name, deterministic = row
    return type_name in ("text", "varchar") and deterministic is not False


def _mysql(connection: Any, schema: str | None, table: str, column: str) -> bool:
    row = connection.execute(
        text(
            "SELECT DATA_TYPE, COLLATION_NAME FROM information_schema.COLUMNS"
            " WHERE TABLE_SCHEMA = COALESCE(:schema, DATABASE())"
            " AND TABLE_NAME = :table AND COLUMN_NAME = :column"
        ),
        {"schema": schema, "table": table, "column": column},
    ).first()
    if row is None:
        return False
    data_type, collation = (str(value or "").lower() for value in row)
    if data_type not in ("varchar", "text", "tinytext", "mediumtext", "longtext"):
        return False
    return collation.endswith("_nopad_bin") or collation.endswith("_0900_bin")
