"""The cache's value format: msgpack, never pickle.

A value is one of three entries, each a msgpack array that starts with :data:`FORMAT_VERSION`:

- a row: ``[version, ROW, schema_hash, generation, class_tag, [column values...]]``
- an absent row (negative caching): ``[version, ABSENT, generation]``
- a tombstone written by an eviction: ``[version, TOMBSTONE, token]``; the token is random, so
  two evictions never write the same bytes and a fill that observed one cannot overwrite the other.

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
from typing import Any, Final

import msgpack
from sqlalchemy import types as sqltypes
from sqlalchemy.schema import Column

FORMAT_VERSION: Final = 1
ROW: Final = 0
ABSENT: Final = 1
TOMBSTONE: Final = 2

#: Returned by :func:`decode` for bytes that are not a valid entry of this format version.
CORRUPT: Final = ("corrupt",)

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


_packer_options: dict[str, Any] = {"default": _default, "use_bin_type": True}


def pack(value: Any) -> bytes:
    """msgpack with the extension types above; raises TypeError for what cannot round-trip."""
    result: bytes = msgpack.packb(value, **_packer_options)
    return result


def decode(raw: bytes) -> Any:
    """Decode one entry, or return :data:`CORRUPT` for anything not of this format version."""
    try:
        entry = msgpack.unpackb(raw, ext_hook=_ext_hook, raw=False, use_list=True)
    except Exception:
        return CORRUPT
    if (
        type(entry) is not list
        or len(entry) < 3
        or type(entry[0]) is not int  # True == 1 and 1.0 == 1: not our version or kind
        or type(entry[1]) is not int
        or entry[0] != FORMAT_VERSION
        or entry[1] not in (ROW, ABSENT, TOMBSTONE)
    ):
        return CORRUPT
    return entry


def encode_row(schema_hash: bytes, generation: bytes, class_tag: Any, values: list[Any]) -> bytes:
    return pack([FORMAT_VERSION, ROW, schema_hash, generation, class_tag, values])


def encode_absent(generation: bytes) -> bytes:
    return pack([FORMAT_VERSION, ABSENT, generation])


def new_tombstone() -> bytes:
    return pack([FORMAT_VERSION, TOMBSTONE, os.urandom(8)])


def new_generation() -> bytes:
    """A generation token: random, so a generation key lost from the store never comes back."""
    return os.urandom(8)


# Per-column adapters: the few types whose Python value msgpack cannot carry by itself.


ValueAdapter = Callable[[Any], Any]


def column_adapters(column: Column[Any]) -> tuple[ValueAdapter | None, ValueAdapter | None]:
    """(to_store, from_store) for one column, or (None, None) when values pass through as they are.

    Enum members are stored by name: their class is known from the column, never from the data.
    """
    col_type = column.type
    if isinstance(col_type, sqltypes.Enum) and col_type.enum_class is not None:
        enum_class = col_type.enum_class

        def to_store(value: Any) -> Any:
            return value.name if isinstance(value, enum_class) else value

        def from_store(value: Any) -> Any:
            return enum_class[value] if type(value) is str else value

        return to_store, from_store
    return None, None


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
