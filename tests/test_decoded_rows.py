"""A hit of bytes this process has decoded before is answered from the row kept decoded
(``rows.CachedModel.recall``): no msgpack and no shape checks again. The bytes decide the answer,
except the generation they were read under and the key looked up, which every hit checks again;
whatever the kept row does not fit is decided the full way, as if nothing were kept. Only rows
whose values nothing can change in place are kept, so no session's change reaches another's."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import JSON, Integer, inspect, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sa_cache import CachingSession, IdentityCache, codec, rows
from sa_cache.store import Write

from .counting import expect_sql
from .models import Color, Everything, User


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every payload the codec decodes from now on (the real decoder, watched)."""
    seen: list[bytes] = []
    real = codec.decode

    def watched(raw: bytes) -> Any:
        seen.append(raw)
        return real(raw)

    monkeypatch.setattr(codec, "decode", watched)
    return seen


def kept(cache: IdentityCache, model: type[Any] = User) -> dict[bytes, Any]:
    return cache.model_for(inspect(model))._decoded  # type: ignore[union-attr]


def row_key(cache: IdentityCache, model: type[Any], pk: int) -> str:
    return cache.model_for(inspect(model)).keys.row_key((pk,))  # type: ignore[union-attr]


def columns(instance: Any) -> dict[str, Any]:
    return {
        attr.key: getattr(instance, attr.key)
        for attr in inspect(type(instance)).column_attrs
        if attr.key in inspect(instance).dict
    }


@pytest.mark.usefixtures("users")
def test_a_second_hit_of_the_same_bytes_is_not_decoded_again_and_is_the_same_load(
    Session, cache, sql, decodes
):
    with expect_sql(sql, 0), Session() as s:
        first = s.get(User, 1)
        decoded = columns(first)
    assert len(decodes) == 1 and len(kept(cache)) == 1
    with expect_sql(sql, 0), Session() as s:
        again = s.get(User, 1)
        assert columns(again) == decoded
        assert {k: type(v) for k, v in columns(again).items()} == {
            k: type(v) for k, v in decoded.items()
        }
        state = inspect(again)
        assert state.persistent and not s.is_modified(again) and not state.modified
        assert again.loaded_by_reconstructor  # the load events fired, as after a decoded hit
    assert len(decodes) == 1  # the second hit read the same bytes and decoded nothing
    assert cache.stats()["models"]["User"]["hits"] >= 2


@pytest.mark.usefixtures("users")
def test_each_hit_of_kept_bytes_is_an_instance_of_its_own(Session, cache):
    with Session() as a, Session() as b:
        changed = a.get(User, 1)
        changed.name = "not flushed"
        other = b.get(User, 1)
        assert other is not changed and other.name == "u1"
        assert not b.is_modified(other)
    (entry,) = kept(cache).values()
    assert entry[3]["name"] == "u1"


@pytest.mark.usefixtures("users")
def test_kept_bytes_under_a_replaced_generation_are_a_miss(Session, cache, engine, sql, decodes):
    """A whole-model eviction replaces the generation and leaves the row's bytes in place: the
    kept row of those bytes must not answer."""
    with Session() as s:
        s.get(User, 1)
    with engine.begin() as connection:  # a change sa_cache does not see...
        connection.execute(update(User).where(User.id == 1).values(name="changed elsewhere"))
    assert cache.evict_model(User)  # ...evicted by replacing the model's generation
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(User, 1).name == "changed elsewhere"


@pytest.mark.usefixtures("users")
def test_kept_bytes_at_another_rows_key_are_rejected_as_decoded_ones_are(
    Session, cache, backend, sql
):
    with Session() as s:
        s.get(User, 1)
    copied = cache.store.get_many([row_key(cache, User, 1)])[0]
    assert copied in kept(cache)
    cache.store.write_many([Write(row_key(cache, User, 2), copied, None)])
    rejected = cache.stats()["models"]["User"]["rejected"]
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(User, 2).name == "u2"
    assert cache.stats()["models"]["User"]["rejected"] == rejected + 1


def test_a_row_of_mutable_values_is_decoded_for_every_hit(engine):
    """A JSON document is a dict: shared between two hits, an in-place change in one session
    (which SQLAlchemy does not track without ``sqlalchemy.ext.mutable``) would show in another."""

    class LocalBase(DeclarativeBase):
        pass

    cache = IdentityCache()

    @cache.register
    class Doc(LocalBase):
        __tablename__ = "decoded_docs"
        id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
        data: Mapped[dict[str, Any]] = mapped_column(JSON)

    LocalBase.metadata.create_all(engine)
    try:
        Session = sessionmaker(engine, class_=CachingSession, cache=cache)  # noqa: N806
        with Session() as s:
            s.add(Doc(id=1, data={"tags": ["a"]}))
            s.commit()
        with Session() as s:
            s.get(Doc, 1)  # fills
        with Session() as a, Session() as b:
            a.get(Doc, 1).data["tags"].append("in place")
            assert b.get(Doc, 1).data == {"tags": ["a"]}
        with Session() as s:
            assert s.get(Doc, 1).data == {"tags": ["a"]}
        assert not kept(cache, Doc)
    finally:
        LocalBase.metadata.drop_all(engine)


def test_a_row_whose_columns_need_an_adapter_is_decoded_for_every_hit(Session, cache):
    """An Enum restored through its class (and any TypeDecorator) is not the stored value: such
    a row goes the full way every time."""
    with Session() as s:
        s.add(Everything(id=1, color=Color.green))
        s.commit()
    for _ in range(3):
        with Session() as s:
            assert s.get(Everything, 1).color is Color.green
    assert not kept(cache, Everything)


def test_rows_kept_decoded_are_bounded(monkeypatch: pytest.MonkeyPatch, engine: Any) -> None:
    monkeypatch.setattr(rows, "DECODED_ROWS", 3)
    cache = IdentityCache()
    cache.register(User)
    with Session(engine) as plain:
        plain.add_all([User(id=i, name=f"u{i}") for i in range(1, 6)])
        plain.commit()
    Cached = sessionmaker(engine, class_=CachingSession, cache=cache)  # noqa: N806
    for _ in range(2):
        for pk in range(1, 6):
            with Cached() as s:
                assert s.get(User, pk).name == f"u{pk}"
    assert len(kept(cache)) == 3
    stored = cache.store.get_many([row_key(cache, User, pk) for pk in (3, 4, 5)])
    assert list(kept(cache)) == stored  # the latest kept, the oldest dropped first
