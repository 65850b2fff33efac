"""Optional HMAC signing: with a secret configured, only entries signed for their own key by a
current secret are served; anything else is a miss that is counted, logged and overwritten."""

from __future__ import annotations

import logging

import pytest
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache, codec
from sa_cache.signing import Signer
from sa_cache.store import Write

from .conftest import register_all
from .counting import expect_sql
from .models import User


def signed_cache(backend_cache: IdentityCache, secret) -> IdentityCache:
    """Another IdentityCache on the same store and prefix, with signing configured."""
    cache = IdentityCache(backend_cache.region, prefix=backend_cache.prefix, signing_key=secret)
    if backend_cache.store.__class__.__name__ == "MemoryStore":
        cache.store = backend_cache.store
    register_all(cache)
    return cache


@pytest.fixture
def users(engine) -> None:
    with sessionmaker(engine)() as s:
        s.add_all([User(id=1, name="mallory", active=False), User(id=2, name="admin")])
        s.commit()


def key_of(cache: IdentityCache, pk: int) -> str:
    return cache.model_for(User.__mapper__).keys.row_key((pk,))


@pytest.mark.usefixtures("users")
def test_signed_entries_are_served(engine, cache, sql):
    signed = signed_cache(cache, "s3cret")
    Session = sessionmaker(engine, class_=CachingSession, cache=signed)
    with Session() as s:
        s.get(User, 1)
    with expect_sql(sql, 0), Session() as s:
        assert s.get(User, 1).name == "mallory"


@pytest.mark.usefixtures("users")
def test_an_entry_written_without_the_key_is_rejected_logged_and_overwritten(
    engine, cache, sql, caplog
):
    signed = signed_cache(cache, "s3cret")
    Session = sessionmaker(engine, class_=CachingSession, cache=signed)
    with Session() as s:
        s.get(User, 1)
    key = key_of(signed, 1)
    entry = codec.decode(Signer("s3cret").verify(key, signed.store.get_many([key])[0]))
    values = entry.values
    shape = signed.model_for(User.__mapper__).shape(User.__mapper__)
    values[shape.attrs.index("active")] = True  # the attacker flips the flag, without the secret
    forged = codec.encode(entry._replace(values=values))
    signed.store.write_many([Write(key, forged, None)])
    caplog.set_level(logging.WARNING, logger="sa_cache")
    with expect_sql(sql, selects=1), Session() as s:
        user = s.get(User, 1)
        assert user.active is False
    assert signed.stats()["rejected"] == 1
    assert any("bad or missing signature" in r.getMessage() for r in caplog.records)
    with expect_sql(sql, 0), Session() as s:  # the fill replaced the forgery
        assert s.get(User, 1).active is False


@pytest.mark.usefixtures("users")
def test_a_genuine_entry_copied_to_another_key_is_rejected(engine, cache, sql):
    signed = signed_cache(cache, "s3cret")
    Session = sessionmaker(engine, class_=CachingSession, cache=signed)
    with Session() as s:
        s.get(User, 2)
        s.get(User, 1)
    admin_entry = signed.store.get_many([key_of(signed, 2)])[0]
    signed.store.write_many([Write(key_of(signed, 1), admin_entry, None)])
    with expect_sql(sql, selects=1), Session() as s:
        assert s.get(User, 1).name == "mallory"


@pytest.mark.usefixtures("users")
def test_a_replayed_entry_is_rejected_once_it_has_expired(engine, cache, sql):
    signed = signed_cache(cache, "s3cret")
    key = key_of(signed, 1)
    Session = sessionmaker(engine, class_=CachingSession, cache=signed)
    with Session() as s:
        s.get(User, 1)
    genuine = Signer("s3cret").verify(key, signed.store.get_many([key])[0])
    stale_copy = Signer("s3cret").sign(key, genuine, ttl=-10)  # signed, but expired
    signed.store.write_many([Write(key, stale_copy, None)])
    with expect_sql(sql, selects=1), Session() as s:
        s.get(User, 1)


@pytest.mark.usefixtures("users")
def test_key_rotation_verifies_old_and_new_and_signs_with_new(engine, cache, sql):
    old = signed_cache(cache, "old")
    with sessionmaker(engine, class_=CachingSession, cache=old)() as s:
        s.get(User, 1)
    rotated = signed_cache(cache, ["new", "old"])
    with (
        expect_sql(sql, selects=1),
        sessionmaker(engine, class_=CachingSession, cache=rotated)() as s,
    ):
        s.get(User, 1)  # an entry signed with the old secret still verifies
        s.get(User, 2)  # a fill: signed with the new secret
    only_new = signed_cache(cache, "new")
    with (
        expect_sql(sql, selects=1),
        sessionmaker(engine, class_=CachingSession, cache=only_new)() as s,
    ):  # user 1 was signed with "old" only
        s.get(User, 2)
        s.get(User, 1)


def test_the_secret_never_appears_in_reprs_or_stats(cache):
    signed = signed_cache(cache, "hunter2-secret")
    assert "hunter2" not in repr(signed)
    assert "hunter2" not in repr(signed.guarded._signer)
    assert "hunter2" not in str(signed.stats())


def test_an_empty_secret_is_refused():
    with pytest.raises(ValueError):
        IdentityCache(signing_key="")


def test_the_flask_extension_reads_the_signing_key_from_config():
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy
    from sa_cache.integrations.flask import SACache

    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI="sqlite://", SA_CACHE_SIGNING_KEY=["new", "old"])
    db = SQLAlchemy(**SACache.sqlalchemy_options())
    db.init_app(app)
    sacache = SACache(app, db)
    with app.app_context():
        assert sacache.cache.guarded._signer is not None
        assert "new" not in repr(sacache.cache) and "old" not in repr(sacache.cache.guarded._signer)
