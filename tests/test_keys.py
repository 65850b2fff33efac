"""Keys. A key is readable (``prefix:{table:pk}``, the identity token after ``@``),
primary-key values are normalised through the column type so that every spelling of one row
shares one entry, a value that cannot be coerced gets exactly SQLAlchemy's own answer without the
cache being asked, and everything one row's protocol touches lives in one Redis Cluster slot."""

from __future__ import annotations

import decimal
import uuid
import warnings
from typing import Any

import pytest
from redis.crc import key_slot
from sqlalchemy import inspect
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache, codec
from sa_cache.keys import KeySpace
from sa_cache.lookup import lease_key

from .counting import expect_commands, expect_sql
from .entries import raw_entry
from .models import Membership, Token, User

TOKEN_ID = uuid.UUID("0f0e0d0c-0b0a-4908-8706-050403020100")


def kind(cache: IdentityCache, key: str) -> Any:
    """What the store holds at ``key``: None, or the entry's class (codec.RowEntry...)."""
    value = raw_entry(cache, key)
    return None if value is None else type(codec.decode(value))


def lookups(cache: IdentityCache) -> int:
    stats = cache.stats()
    return int(stats["hits"] + stats["misses"])


@pytest.fixture
def rows(Session: sessionmaker[CachingSession]) -> None:
    with Session() as s:
        s.add(User(id=1, name="alice"))
        s.add(User(id=2, name="bob"))
        s.add(Membership(org="acme", member=7, role="owner"))
        s.add(Membership(org="a:b{c}%d@e", member=8, role="odd"))
        s.add(Membership(org="a%3Ab%7Bc%7D%25d%40e", member=8, role="escaped-looking"))
        s.add(Token(id=TOKEN_ID, label="t"))
        s.commit()


# -- readable keys ------------------------------------------------------------------------------


@pytest.mark.usefixtures("rows")
def test_a_row_key_is_prefix_brace_table_colon_pk_brace(Session, cache, sql):
    with Session() as s:
        s.get(User, 1)
    key = f"{cache.prefix}:{{users:1}}"
    assert kind(cache, key) == codec.RowEntry
    assert cache.model_for(inspect(User)).keys.row_key((1,)) == key
    assert cache.model_for(inspect(User)).keys.generation_key == f"{cache.prefix}:gen:{{users}}"
    # the row, the model's generation, and (from the INSERT's commit) the other rows' tombstones
    with Session() as s:
        s.get(User, 404)
    assert kind(cache, f"{cache.prefix}:{{users:404}}") == codec.AbsentEntry
    assert kind(cache, f"{cache.prefix}:{{users:2}}") == codec.Tombstone
    assert cache.store.delete_prefix(f"{cache.prefix}:{{users:") == 3
    with expect_sql(sql, selects=1), Session() as s:  # it really was that key the lookup read
        s.get(User, 1)


@pytest.mark.usefixtures("rows")
def test_a_composite_key_joins_the_primary_key_in_mapper_order(Session, cache, sql):
    with Session() as s:
        assert s.get(Membership, ("acme", 7)).role == "owner"
    assert kind(cache, f"{cache.prefix}:{{memberships:acme:7}}") == codec.RowEntry
    with expect_sql(sql, 0), Session() as s:
        assert s.get(Membership, {"member": 7, "org": "acme"}).role == "owner"


@pytest.mark.usefixtures("rows")
def test_separators_in_a_string_key_are_percent_escaped_so_keys_never_collide(Session, cache, sql):
    with Session() as s:
        assert s.get(Membership, ("a:b{c}%d@e", 8)).role == "odd"
    with Session() as s:
        assert s.get(Membership, ("a%3Ab%7Bc%7D%25d%40e", 8)).role == "escaped-looking"
    odd = f"{cache.prefix}:{{memberships:a%3Ab%7Bc%7D%25d%40e:8}}"
    looks_escaped = f"{cache.prefix}:{{memberships:a%253Ab%257Bc%257D%2525d%2540e:8}}"
    assert kind(cache, odd) == kind(cache, looks_escaped) == codec.RowEntry
    with expect_sql(sql, 0), Session() as s:
        assert s.get(Membership, ("a:b{c}%d@e", 8)).role == "odd"
        assert s.get(Membership, ("a%3Ab%7Bc%7D%25d%40e", 8)).role == "escaped-looking"


def test_a_schema_qualified_table_and_odd_names_are_escaped_too():
    from sqlalchemy import Column, Integer, MetaData, Table

    table = Table("we:ird{}", MetaData(), Column("id", Integer, primary_key=True), schema="s")
    space = KeySpace("p", table)
    assert space.row_key(("x:y", 2)) == "p:{s.we%3Aird%7B%7D:x%3Ay:2}"
    assert space.row_key((3,), "shard@1") == "p:{s.we%3Aird%7B%7D:3@shard%401}"
    assert space.generation_key == "p:gen:{s.we%3Aird%7B%7D}"


@pytest.mark.usefixtures("rows")
def test_an_identity_token_is_part_of_the_key_after_an_at_sign(Session, cache, sql):
    with PlainSession(Session.kw["bind"]) as plain:
        expected = plain.get(User, 1, identity_token="t1")
        assert inspect(expected).key == (User, (1,), "t1")  # SQLAlchemy keeps it on any engine
    with expect_sql(sql, selects=1), Session() as s:
        user = s.get(User, 1, identity_token="t1")
        assert user.name == "alice" and inspect(user).key == (User, (1,), "t1")
    assert kind(cache, f"{cache.prefix}:{{users:1@t1}}") == codec.RowEntry
    assert kind(cache, f"{cache.prefix}:{{users:1}}") == codec.Tombstone  # untouched
    # only the token-less lookup goes to the database
    with expect_sql(sql, selects=1), Session() as s:
        user = s.get(User, 1, identity_token="t1")
        assert inspect(user).key == (User, (1,), "t1")
        assert s.get(User, 1) is not user  # another identity


# -- normalisation ------------------------------------------------------------------------------


@pytest.mark.usefixtures("rows")
def test_every_spelling_of_an_integer_key_shares_one_entry(Session, cache, sql, backend):
    with Session() as s:
        user = s.get(User, "1")  # held: the identity map only keeps referenced instances
        assert user.name == "alice" and inspect(user).key == (User, (1,), None)
        assert s.get(User, "1") is user
    with expect_sql(sql, 0):
        for spelling in (1, "1", 1.0, "+1", "01"):
            with Session() as s:
                user = s.get(User, spelling)
                assert user.name == "alice" and inspect(user).key == (User, (1,), None)
    stats = cache.stats()["models"]["User"]
    assert stats["fills"] == 1 and stats["hits"] == 5


@pytest.mark.usefixtures("rows")
def test_the_identity_map_and_the_cache_agree_on_a_normalised_key(Session, sql):
    with Session() as s:
        first = s.get(User, 1)
        with expect_sql(sql, 0):
            assert s.get(User, "1") is first
            assert s.get(User, 1.0) is first
            assert s.query(User).get("1") is first


@pytest.mark.usefixtures("rows")
def test_a_uuid_key_given_as_a_uuid_or_as_text_shares_one_entry(Session, cache, sql, db):
    with Session() as s:
        assert s.get(Token, TOKEN_ID).label == "t"
    assert kind(cache, f"{cache.prefix}:{{tokens:{TOKEN_ID}}}") == codec.RowEntry
    with expect_sql(sql, 0), Session() as s:
        assert s.get(Token, TOKEN_ID).label == "t"
        s.expunge_all()
        assert s.get(Token, str(TOKEN_ID)).label == "t"
        s.expunge_all()
        assert s.get(Token, str(TOKEN_ID).upper()).label == "t"
    assert cache.stats()["models"]["Token"]["fills"] == 1


@pytest.mark.usefixtures("rows")
@pytest.mark.parametrize(
    "entity,spelling",
    [(Token, str(TOKEN_ID)), (Token, TOKEN_ID.hex), (User, decimal.Decimal(1))],
    ids=["uuid_text", "uuid_hex", "decimal"],
)
def test_a_spelling_the_cache_normalises_gets_the_same_answer_cold_and_warm(
    Session, engine, entity, spelling
):
    """A miss loads the normalised primary key, so a cold and a warm cache agree. Where a plain
    Session can load the spelling it agrees too; where it cannot (pysqlite cannot bind a Decimal,
    the non-native Uuid type cannot bind a str) the cache answers with the row instead of an
    error: the same answer the warm cache gives."""
    with Session() as s:
        cold = outcome(s, entity, spelling)
    with Session() as s:
        warm = outcome(s, entity, spelling)
    expected_identity = (TOKEN_ID,) if entity is Token else (1,)
    assert cold == warm == expected_identity
    with PlainSession(engine) as plain:
        plain_answer = outcome(plain, entity, spelling)
    if not isinstance(plain_answer, type):  # the plain Session did not raise
        assert plain_answer == cold


# -- values that cannot be coerced ------------------------------------------------------------


def outcome(session: Any, entity: type[Any], pk: Any) -> Any:
    """What a lookup gave: the identity of the row, None, or the type of the exception."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "fully NULL primary key identity" for None
            found = session.get(entity, pk)
    except Exception as exc:
        session.rollback()
        return type(exc)
    return None if found is None else inspect(found).identity


UNCOERCIBLE = {
    "text": (User, "abc"),
    "none": (User, None),
    "bool": (User, True),
    "fraction": (User, 1.5),
    "padded_text": (User, " 1"),
    "dict_of_unknown_attribute": (User, {"nope": 1}),
    "dict_for_composite": (Membership, {"org": "acme"}),
    "list_too_long": (User, [1, 2]),
    "tuple_too_short": (Membership, ("acme",)),
    "int_for_text_column": (Membership, (7, 7)),
    "not_a_uuid": (Token, "zzz"),
    "int_for_uuid": (Token, 5),
}


@pytest.mark.usefixtures("rows")
@pytest.mark.parametrize("entity,pk", UNCOERCIBLE.values(), ids=UNCOERCIBLE.keys())
def test_a_value_that_cannot_be_coerced_gets_sqlalchemys_answer_without_the_cache(
    Session, engine, cache, redis_counter, entity, pk
):
    with Session() as s:  # the cache holds user 1: a wrong coercion would be answered from it
        assert s.get(User, 1) is not None
    with PlainSession(engine) as plain:
        expected = outcome(plain, entity, pk)
    asked = lookups(cache)
    with expect_commands(redis_counter, {}):
        for _ in range(2):
            with Session() as s:
                assert outcome(s, entity, pk) == expected
    assert lookups(cache) == asked


# -- Redis Cluster --------------------------------------------------------------------------------


@pytest.mark.usefixtures("rows")
def test_a_rows_data_negative_entry_tombstone_and_lease_share_one_cluster_slot(Session, cache):
    key = f"{cache.prefix}:{{users:1}}"
    slot = key_slot(key.encode())
    assert slot == key_slot(b"users:1")  # the slot is the hash tag's: the per-row part
    assert slot == key_slot(b"another-prefix:{users:1}")
    assert slot == key_slot(lease_key(key).encode())
    assert key_slot(f"{cache.prefix}:{{users:2}}".encode()) == key_slot(b"users:2")

    seen = [kind(cache, key)]  # the INSERT's commit evicted it
    with Session() as s:
        s.get(User, 1)
    seen.append(kind(cache, key))
    with Session() as s:
        s.get(User, 1).name = "alicia"
        s.commit()
    seen.append(kind(cache, key))
    with Session() as s:
        s.delete(s.get(User, 1))
        s.commit()
    with Session() as s:
        assert s.get(User, 1) is None
    seen.append(kind(cache, key))
    assert seen == [codec.Tombstone, codec.RowEntry, codec.Tombstone, codec.AbsentEntry]


@pytest.mark.usefixtures("rows")
def test_a_composite_rows_hash_tag_holds_its_whole_primary_key(Session, cache):
    with Session() as s:
        s.get(Membership, ("acme", 7))
    key = f"{cache.prefix}:{{memberships:acme:7}}"
    assert kind(cache, key) == codec.RowEntry
    assert key_slot(key.encode()) == key_slot(b"memberships:acme:7")


def test_a_negative_entry_never_outlives_an_insert_the_database_would_match(Session, engine):
    """MariaDB's default collation (utf8mb4_general_ci) matches "ACME" to a row stored as "acme";
    the insert evicts only the key of its own spelling, so the other spelling's negative entry
    would keep answering None for up to negative_ttl."""
    with Session() as s:
        assert s.get(Membership, ("ACME", 9)) is None  # remembered as absent
    with Session() as s:
        s.add(Membership(org="acme", member=9, role="new"))
        s.commit()
    with PlainSession(engine) as plain:
        expected = outcome(plain, Membership, ("ACME", 9))
    with Session() as s:
        assert outcome(s, Membership, ("ACME", 9)) == expected
