"""What the store holds, read straight from it: the tests look at entries, generations and the
cache's statistics through these, defined once."""

from __future__ import annotations

from typing import Any

from sa_cache import IdentityCache, codec

from .models import User


def row_key(cache: IdentityCache, model: type[Any], *pk: Any) -> str:
    return cache.model_for(model.__mapper__).keys.row_key(pk)  # type: ignore[union-attr]


def raw_entry(cache: IdentityCache, key: str) -> bytes | None:
    """The bytes the store holds at ``key`` (None: nothing)."""
    return cache.store.get_many([key])[0]


def entry_kind(cache: IdentityCache, model: type[Any], *pk: Any) -> Any:
    """What the store holds for one row: None, or the entry's class (codec.RowEntry,
    codec.AbsentEntry, codec.Tombstone; None also for bytes that decode to no entry)."""
    raw = raw_entry(cache, row_key(cache, model, *pk))
    entry = None if raw is None else codec.decode(raw)
    return None if entry is None else type(entry)


def wire_fields(raw: bytes | None) -> list[Any]:
    """A stored value as the msgpack array it is stored as: ``[version, kind, fields...]``."""
    entry = codec.decode(raw or b"")
    assert entry is not None, "not an entry of this format"
    kinds = {codec.RowEntry: codec.ROW, codec.AbsentEntry: codec.ABSENT}
    return [codec.FORMAT_VERSION, kinds.get(type(entry), codec.TOMBSTONE), *entry]


def generation(cache: IdentityCache, model: type[Any]) -> bytes | None:
    key = cache.model_for(model.__mapper__).keys.generation_key  # type: ignore[union-attr]
    return cache.store.get_many([key])[0]


def stat(cache: IdentityCache, name: str, model: type[Any] = User) -> int:
    """One per-model counter of ``cache.stats()``."""
    return int(cache.stats()["models"][model.__name__][name])
