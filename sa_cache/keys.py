"""Cache keys, and primary-key values normalised the way the database would see them.

A row's key is ``prefix:{table:pk}``: readable in ``redis-cli``, and the braces are a Redis Cluster
hash tag, so everything one row's protocol touches (its data, its negative entry and its
tombstone all live in the one key) stays in one slot. A model's generation lives in
``prefix:gen:{table}``; it is read together with the row but never written in the same atomic
step, so it may live in another slot.

Primary keys arrive as the caller typed them: ``session.get(User, "1")`` builds the identity key
``("1",)``. The identity map and the cache must agree on what a row is called, so each value is
coerced through its column's type here; a value we cannot coerce with certainty is reported as
:data:`UNCACHEABLE` and the lookup goes to SQLAlchemy untouched, so the caller gets exactly what
SQLAlchemy would give them.
"""

from __future__ import annotations

import decimal
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

from sqlalchemy import types as sqltypes
from sqlalchemy.schema import Table
from sqlalchemy.sql.elements import ColumnElement

#: Returned by a coercer when a value cannot be normalised with certainty.
UNCACHEABLE: Final = object()

Coercer = Callable[[Any], Any]

_INT_TEXT = re.compile(r"[+-]?[0-9]+\Z")
_ESCAPES = str.maketrans({"%": "%25", ":": "%3A", "{": "%7B", "}": "%7D", "@": "%40"})


def _coerce_int(value: Any) -> Any:
    kind = type(value)
    if kind is int:
        return value
    if kind is str:
        if not _INT_TEXT.match(value):
            return UNCACHEABLE
        try:
            return int(value)
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            return UNCACHEABLE
    if kind is float:
        return int(value) if value.is_integer() else UNCACHEABLE
    if kind is decimal.Decimal:
        return (
            int(value) if value.is_finite() and value == value.to_integral_value() else UNCACHEABLE
        )
    return UNCACHEABLE  # bool, None, anything else: let SQLAlchemy decide


def _coerce_str(value: Any) -> Any:
    return value if type(value) is str else UNCACHEABLE


def _coerce_uuid(value: Any) -> Any:
    if type(value) is uuid.UUID:
        return value
    if type(value) is str:
        try:
            return uuid.UUID(value)
        except ValueError:
            return UNCACHEABLE
    return UNCACHEABLE


def _exact(python_type: type) -> Coercer:
    def coerce(value: Any) -> Any:
        return value if type(value) is python_type else UNCACHEABLE

    return coerce


def _refuse(value: Any) -> Any:
    return UNCACHEABLE


def coercer_for(column: ColumnElement[Any]) -> Coercer:
    """The coercer for one primary-key column, chosen from its type."""
    col_type = column.type
    if isinstance(col_type, sqltypes.TypeDecorator):
        return _refuse  # its process_bind_param may map values in ways we cannot mirror
    if isinstance(col_type, sqltypes.Integer):
        return _coerce_int
    if isinstance(col_type, sqltypes.Uuid):
        return _coerce_uuid if col_type.as_uuid else _coerce_str
    if isinstance(col_type, sqltypes.String) and not isinstance(col_type, sqltypes.Enum):
        return _coerce_str
    try:
        python_type = col_type.python_type
    except NotImplementedError:
        return _refuse
    return _exact(python_type)


def normalise(coercers: Sequence[Coercer], pk: Sequence[Any]) -> tuple[Any, ...] | None:
    """Primary-key values coerced through their column types, or None if any cannot be."""
    if len(pk) != len(coercers):
        return None
    if len(coercers) == 1:  # the common case, on every lookup: no generator, no scan
        value = coercers[0](pk[0])
        return None if value is UNCACHEABLE else (value,)
    out = tuple([coerce(value) for coerce, value in zip(coercers, pk, strict=True)])
    return None if any(value is UNCACHEABLE for value in out) else out


def key_part(value: Any) -> str:
    """One primary-key value as it appears in a key; separators are escaped."""
    if type(value) is int:
        return str(value)
    return str(value).translate(_ESCAPES)


class KeySpace:
    """Names every key that belongs to one cached model (one table hierarchy)."""

    __slots__ = ("row_prefix", "generation_key")

    def __init__(self, prefix: str, table: Table, generation_table: Table | None = None) -> None:
        """Rows live under ``table``; the generation is ``generation_table``'s (by default the
        same): the concrete classes of one hierarchy share their base's generation, so one
        replacement evicts the whole hierarchy, whichever of its tables a statement names."""
        self.row_prefix = f"{prefix}:{{{_table_name(table)}:"
        gen_name = _table_name(table if generation_table is None else generation_table)
        self.generation_key = f"{prefix}:gen:{{{gen_name}}}"

    @classmethod
    def named(cls, prefix: str, name: str) -> KeySpace:
        """The key space of a kind keyed by something other than one table (a relationship's
        collections): ``prefix:{name:pk}``, its generation ``prefix:gen:{name}``."""
        space = cls.__new__(cls)
        escaped = name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
        space.row_prefix = f"{prefix}:{{{escaped}:"
        space.generation_key = f"{prefix}:gen:{{{escaped}}}"
        return space

    def row_key(self, pk: Sequence[Any], identity_token: Any = None) -> str:
        """The key of one row, from its already-normalised primary-key values."""
        if identity_token is None and len(pk) == 1 and type(pk[0]) is int:
            return f"{self.row_prefix}{pk[0]}}}"  # the common key, as key_part spells an int
        body = ":".join([key_part(v) for v in pk])
        if identity_token is not None:
            body = f"{body}@{key_part(identity_token)}"
        return f"{self.row_prefix}{body}}}"


def _table_name(table: Table) -> str:
    schema = getattr(table, "schema", None)  # a polymorphic union (a subquery) has none
    name = table.name if schema is None else f"{schema}.{table.name}"
    return name.translate(_ESCAPES)
