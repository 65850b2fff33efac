"""The cache's value format: msgpack, never pickle.

A value is one typed entry, stored as a msgpack array ``[FORMAT_VERSION, kind, fields...]``:

- :class:`RowEntry` ``(schema_hash, generation, class_tag, [column values...])``: a cached row;
- :class:`AbsentEntry` ``(generation,)``: "no row has this key" (negative caching);
- :class:`Tombstone` ``(token, ttl_ms)``: written by an eviction; the token is random, so two
  evictions never write the same bytes and a fill that observed one cannot overwrite the other.
  ``ttl_ms`` is the TTL it was written with, so a reader can tell from its remaining TTL when it
  was written (docs/protocol.md, "later fills"); a tombstone of the older format ``(token,)``
  decodes with ``ttl_ms=None``: unknown.

Further kinds of cached things (relationship collections, query results) add an entry class and
a kind number with :func:`entry_kind`; :func:`decode` knows every registered kind.

Only column values are stored (the dehydrated row, as Hibernate's second-level cache does), so a
value is a few dozen bytes, carries no code, and is safe to decode from an untrusted store.
Anything that fails to decode is reported as :data:`CORRUPT` and treated as a miss.

Column values round-trip exactly: datetimes keep their tzinfo (a ``ZoneInfo`` by its key, any
other zone by its fixed offset), Decimals keep their exponent, and Enum members are stored by name
and restored through their column's enum class.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import os
import uuid
import zoneinfo
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, TypeVar

import msgpack
from sqlalchemy import types as sqltypes
from sqlalchemy.schema import Column

FORMAT_VERSION: Final = 1
#: The kind numbers stored in the second field of every value.
ROW: Final = 0
ABSENT: Final = 1
TOMBSTONE: Final = 2
HOLD: Final = 3

_EXT_DATETIME = 1
_EXT_DATE = 2
_EXT_TIME = 3
_EXT_TIMEDELTA = 4
_EXT_DECIMAL = 5
_EXT_UUID = 6
_EXT_BIGINT = 7


def _tz_suffix(value: dt.datetime | dt.time) -> str:
    tz = value.tzinfo
    if isinstance(tz, zoneinfo.ZoneInfo) and tz.key:
        return "|" + tz.key
    return ""


def _default(value: Any) -> msgpack.ExtType:
    kind = type(value)
    if kind is dt.datetime:
        text = value.isoformat() + _tz_suffix(value)
        return msgpack.ExtType(_EXT_DATETIME, text.encode())
    if kind is dt.date:
        return msgpack.ExtType(_EXT_DATE, value.isoformat().encode())
    if kind is dt.time:
        return msgpack.ExtType(_EXT_TIME, (value.isoformat() + _tz_suffix(value)).encode())
    if kind is dt.timedelta:
        packed = msgpack.packb([value.days, value.seconds, value.microseconds])
        return msgpack.ExtType(_EXT_TIMEDELTA, packed)
    if kind is decimal.Decimal:
        return msgpack.ExtType(_EXT_DECIMAL, str(value).encode())
    if kind is uuid.UUID:
        return msgpack.ExtType(_EXT_UUID, value.bytes)
    if kind is int:  # only reached for ints msgpack cannot hold in 64 bits
        return msgpack.ExtType(_EXT_BIGINT, str(value).encode())
    raise TypeError(f"sa_cache cannot store a value of type {kind.__name__}")


def _split_tz(text: str) -> tuple[str, zoneinfo.ZoneInfo | None]:
    iso, sep, key = text.partition("|")
    return iso, (zoneinfo.ZoneInfo(key) if sep else None)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_DATETIME:
        iso, zone = _split_tz(data.decode())
        value = dt.datetime.fromisoformat(iso)
        return value if zone is None else value.astimezone(zone)
    if code == _EXT_DATE:
        return dt.date.fromisoformat(data.decode())
    if code == _EXT_TIME:
        iso, zone = _split_tz(data.decode())
        time_value = dt.time.fromisoformat(iso)
        return time_value if zone is None else time_value.replace(tzinfo=zone)
    if code == _EXT_TIMEDELTA:
        days, seconds, micros = msgpack.unpackb(data)
        return dt.timedelta(days=days, seconds=seconds, microseconds=micros)
    if code == _EXT_DECIMAL:
        return decimal.Decimal(data.decode())
    if code == _EXT_UUID:
        return uuid.UUID(bytes=data)
    if code == _EXT_BIGINT:
        return int(data.decode())
    raise ValueError(f"unknown msgpack extension type {code}")


#: The exact types of decoded values that nothing can change in place (a datetime's zone is a
#: ``ZoneInfo`` or a fixed offset, both immutable): a decoded row holding only these may be handed
#: to any number of sessions at once (:meth:`sa_cache.rows.CachedModel.recall`).
IMMUTABLE_TYPES: Final = frozenset(
    {type(None), bool, int, float, str, bytes, dt.datetime, dt.date, dt.time, dt.timedelta}
    | {decimal.Decimal, uuid.UUID}
)


_packer_options: dict[str, Any] = {"default": _default, "use_bin_type": True}


def pack(value: Any) -> bytes:
    """msgpack with the extension types above; raises TypeError for what cannot round-trip."""
    result: bytes = msgpack.packb(value, **_packer_options)
    return result


class RowEntry(NamedTuple):
    """A cached row: its column values, the shape they were stored in, and the generation of
    its model the reader observed before the database read."""

    schema_hash: bytes
    generation: bytes
    class_tag: Any
    values: list[Any]


class AbsentEntry(NamedTuple):
    """No row has this key, as of ``generation``."""

    generation: bytes


class Tombstone(NamedTuple):
    """An eviction: random bytes no fill can have observed before the eviction was written, and
    the TTL (milliseconds) it was written with, or None where an older writer did not say."""

    token: bytes
    ttl_ms: int | None = None


Entry = Any  # one of the NamedTuple classes registered with entry_kind
E = TypeVar("E", bound=tuple[Any, ...])

_new_tuple = tuple.__new__
_KINDS: dict[type, int] = {}
#: kind -> (class, number of fields, number of fields without a default)
_CLASSES: dict[int, tuple[type, int, int]] = {}


def entry_kind(kind: int) -> Callable[[type[E]], type[E]]:
    """Register an entry class (a NamedTuple) under ``kind``, the number stored in its value.
    Fields with a default were added later: a value written without them decodes with the
    default."""

    def register(cls: type[E]) -> type[E]:
        if kind in _CLASSES and _CLASSES[kind][0] is not cls:
            raise ValueError(f"entry kind {kind} is already {_CLASSES[kind][0].__name__}")
        _KINDS[cls] = kind
        fields = len(cls._fields)  # type: ignore[attr-defined]
        _CLASSES[kind] = (cls, fields, fields - len(cls._field_defaults))  # type: ignore[attr-defined]
        return cls

    return register


entry_kind(ROW)(RowEntry)
entry_kind(ABSENT)(AbsentEntry)
entry_kind(TOMBSTONE)(Tombstone)


@entry_kind(HOLD)
class Hold(NamedTuple):
    """A commit under way on another connection: a miss, like a tombstone, but one no reader may
    fill over (the database may still return the row as it was before that commit)."""

    token: bytes


def encode(entry: Entry) -> bytes:
    """The stored form of ``entry``; raises TypeError for a value that cannot round-trip."""
    return pack([FORMAT_VERSION, _KINDS[type(entry)], *entry])


def decode(raw: bytes) -> Entry | None:
    """The entry ``raw`` holds, or None for anything that is not an entry of this format version
    (garbage, another version, an unknown kind, the wrong number of fields)."""
    try:
        value = msgpack.unpackb(raw, ext_hook=_ext_hook, raw=False, use_list=True)
    except Exception:
        return None
    if (
        type(value) is not list
        or len(value) < 2
        or type(value[0]) is not int  # True == 1 and 1.0 == 1: not our version or kind
        or type(value[1]) is not int
        or value[0] != FORMAT_VERSION
    ):
        return None
    known = _CLASSES.get(value[1])
    if known is None:
        return None
    cls, fields, required = known
    given = len(value) - 2
    if given == fields:
        return _new_tuple(cls, value[2:])  # the NamedTuple, without its Python-level __new__
    if required <= given < fields:  # written before its later fields existed: their defaults
        return cls(*value[2:])
    return None


def ttl_ms(seconds: float) -> int:
    """A TTL in whole milliseconds, as stores apply it (never 0: that would mean no TTL)."""
    return max(1, int(seconds * 1000))


def new_tombstone(ttl: float) -> bytes:
    """A fresh tombstone that will be written with ``ttl`` seconds to live, and says so."""
    return encode(Tombstone(os.urandom(8), ttl_ms(ttl)))


def new_generation() -> bytes:
    """A generation token: random, so a generation key lost from the store never comes back."""
    return os.urandom(8)


#: A held generation: a commit replacing the whole kind is under way; nothing of the kind may be
#: filled until it is replaced by an ordinary one (or expires). One byte longer than an ordinary
#: token, so no random token is ever mistaken for one.
_HELD_GENERATION_MARK: Final = b"H"


def new_hold() -> bytes:
    return encode(Hold(os.urandom(8)))


def new_held_generation() -> bytes:
    return _HELD_GENERATION_MARK + os.urandom(8)


def is_held_generation(generation: bytes) -> bool:
    return len(generation) == 9 and generation[:1] == _HELD_GENERATION_MARK


# Per-column adapters: the few types whose Python value msgpack cannot carry by itself, and the
# types whose own processing decides their Python value (TypeDecorator, PickleType).


ValueAdapter = Callable[[Any], Any]


class Uncacheable(Exception):
    """Raised by an adapter of a column that cannot be adapted without a dialect."""


def _needs_dialect(col_type: Any) -> bool:
    """Whether the type's own processing decides its Python value, so the cache stores the
    database-level value and runs that processing on a hit (with the session's dialect).
    ``Interval`` is a TypeDecorator of SQLAlchemy's own whose values (timedeltas) round-trip
    exactly as they are."""
    return isinstance(col_type, sqltypes.TypeDecorator) and not isinstance(
        col_type, sqltypes.Interval
    )


def needs_dialect(column: Column[Any]) -> bool:
    return _needs_dialect(column.type)


def column_cacheable(column: Column[Any]) -> bool:
    """Whether a column's values can be stored and restored exactly as a load restores them.

    A TypeDecorator is mirrored through its own ``process_bind_param`` / ``process_result_value``
    (a PickleType through its pickler, on the bytes it stores in the database); one that
    overrides ``bind_processor`` or ``result_processor`` itself works at the driver's level,
    which the cache cannot mirror, so its column is not cached (it loads on access after a hit).
    """
    col_type: Any = column.type
    while _needs_dialect(col_type):
        cls = type(col_type)
        if isinstance(col_type, sqltypes.PickleType):
            if (
                cls.bind_processor is not sqltypes.PickleType.bind_processor
                or cls.result_processor is not sqltypes.PickleType.result_processor
                or cls.process_bind_param is not sqltypes.TypeDecorator.process_bind_param
                or cls.process_result_value is not sqltypes.TypeDecorator.process_result_value
            ):
                return False
        elif (
            cls.bind_processor is not sqltypes.TypeDecorator.bind_processor
            or cls.result_processor is not sqltypes.TypeDecorator.result_processor
        ):
            return False
        col_type = col_type.impl_instance
    return True


def _unusable(value: Any) -> Any:
    raise Uncacheable("this column's values need the dialect they were stored with")


def _decorator_adapters(
    col_type: Any, dialect: Any
) -> tuple[ValueAdapter | None, ValueAdapter | None]:
    """(to_store, from_store) of one TypeDecorator on ``dialect``: the database-level value it
    binds, and the Python value it makes of one, as a load does."""
    if dialect is None:
        return _unusable, _unusable
    if isinstance(col_type, sqltypes.PickleType):
        dumps, loads, protocol = col_type.pickler.dumps, col_type.pickler.loads, col_type.protocol

        def to_impl(value: Any) -> Any:
            return None if value is None else dumps(value, protocol)

        def from_impl(value: Any) -> Any:
            return None if value is None else loads(value)

        impl: Any = col_type.impl_instance
    else:
        cls = type(col_type)
        bind = cls.process_bind_param is not sqltypes.TypeDecorator.process_bind_param
        result = cls.process_result_value is not sqltypes.TypeDecorator.process_result_value
        process_bind, process_result = col_type.process_bind_param, col_type.process_result_value

        def to_impl(value: Any) -> Any:
            return process_bind(value, dialect) if bind else value

        def from_impl(value: Any) -> Any:
            return process_result(value, dialect) if result else value

        impl = col_type.load_dialect_impl(dialect)
    impl_to, impl_from = _type_adapters(impl, dialect)
    if impl_to is None or impl_from is None:
        return to_impl, from_impl
    impl_to_store, impl_from_store = impl_to, impl_from

    def to_store(value: Any) -> Any:
        return impl_to_store(to_impl(value))

    def from_store(value: Any) -> Any:
        return from_impl(impl_from_store(value))

    return to_store, from_store


def _type_adapters(col_type: Any, dialect: Any) -> tuple[ValueAdapter | None, ValueAdapter | None]:
    if _needs_dialect(col_type):
        return _decorator_adapters(col_type, dialect)
    if isinstance(col_type, sqltypes.Enum) and col_type.enum_class is not None:
        enum_class = col_type.enum_class

        def to_store(value: Any) -> Any:
            return value.name if isinstance(value, enum_class) else value

        def from_store(value: Any) -> Any:
            return enum_class[value] if type(value) is str else value

        return to_store, from_store
    return None, None


def column_adapters(
    column: Column[Any], dialect: Any = None
) -> tuple[ValueAdapter | None, ValueAdapter | None]:
    """(to_store, from_store) for one column, or (None, None) when values pass through as they are.

    Enum members are stored by name: their class is known from the column, never from the data.
    A TypeDecorator column (:func:`needs_dialect`) stores the value its type binds for the database
    on ``dialect`` and runs the type's result processing on it when read back, so any decorator
    restores exactly what a load gives; without a dialect its adapters refuse to run.
    """
    return _type_adapters(column.type, dialect)


def schema_hash(class_path: str, columns: Sequence[tuple[str, Column[Any]]]) -> bytes:
    """A fingerprint of a mapper's cached columns and their types, stored inside every row.

    Kept in the value rather than the key, so processes of two deploys share keys and evict each
    other's entries; an entry of the other shape is simply a miss that gets overwritten.
    """
    text = (
        class_path
        + "\n"
        + "\n".join(
            f"{attr}={col.table.name}.{col.name}:{col.type!r}:{col.nullable}"
            for attr, col in columns
        )
    )
    return hashlib.sha256(text.encode()).digest()[:8]
