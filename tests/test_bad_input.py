"""Issue 6, point 6: bad input to the API gets the answer, or the exception type, that a plain
SQLAlchemy Session gives on the same database, or a clear sa_cache error (CacheError,
NotRegistered, TypeError, ValueError naming the problem); never an exception from inside the
cache. The expected answer is computed here with a plain Session, never hard-coded: PostgreSQL
raises DataError where SQLite and MariaDB answer None, and the cache must not hide or change it.
"""

from __future__ import annotations

import decimal
import math
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.orm import sessionmaker

import sa_cache
from sa_cache import CacheError, NotRegistered

from .models import Address, Membership, Token, User

pytestmark = pytest.mark.filterwarnings("ignore:fully NULL primary key identity:Warning")

TOKEN = uuid.UUID("00000000-0000-4000-8000-0000000000ff")
SA_CACHE_DIR = str(Path(sa_cache.__file__).parent)


class NotMapped:
    pass


@pytest.fixture
def rows(engine) -> None:
    with PlainSession(engine) as s:
        s.add_all([User(id=1, name="one"), User(id=2, name="two")])
        s.add(Membership(org="a", member=1, role="r"))
        s.add(Token(id=TOKEN, label="t"))
        s.add(Address(id=1, city="x"))
        s.commit()


def summary(value: Any) -> Any:
    """What a caller sees, comparable across sessions."""
    if isinstance(value, list):
        return [summary(v) for v in value]
    if value is None:
        return None
    state = getattr(value, "_sa_instance_state", None)
    if state is not None:
        return (type(value).__name__, tuple(state.mapper.primary_key_from_instance(value)))
    return repr(value)


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", what was returned) or ("raised", exception type, the DBAPI error's type)."""
    try:
        return ("ok", summary(call()))
    except Exception as exc:
        assert_not_from_inside_the_cache(exc)
        return ("raised", (type(exc), type(getattr(exc, "orig", None))))


def assert_not_from_inside_the_cache(exc: BaseException) -> None:
    """An exception raised inside sa_cache must be one it raises on purpose."""
    frames = traceback.extract_tb(exc.__traceback__)
    if frames and frames[-1].filename.startswith(SA_CACHE_DIR):
        assert isinstance(exc, CacheError | TypeError | ValueError), (
            f"{type(exc).__name__} from inside sa_cache: {exc}\n"
            + "".join(traceback.format_tb(exc.__traceback__))
        )


# -- Session.get ---------------------------------------------------------------------------------

GET_CASES: dict[str, tuple[Any, Any]] = {
    "none": (User, None),
    "huge_int": (User, 2**70),
    "int64_overflow": (User, 2**63),
    "negative": (User, -1),
    "exponent_text": (User, "1e3"),
    "padded_text": (User, " 1"),
    "text_with_newline": (User, "1\n"),
    "plain_text": (User, "1"),
    "garbage_text": (User, "abc"),
    "empty_text": (User, ""),
    "nan": (User, float("nan")),
    "infinity": (User, math.inf),
    "fractional_float": (User, 1.5),
    "integral_float": (User, 1.0),
    "decimal": (User, decimal.Decimal("2")),
    "decimal_nan": (User, decimal.Decimal("NaN")),
    "bool": (User, True),
    "bytes": (User, b"1"),
    "list": (User, [1]),
    "dict": (User, {"id": 2}),
    "wrong_dict_key": (User, {"uid": 2}),
    "too_many_values": (User, (1, 2)),
    "empty_tuple": (User, ()),
    "object": (User, object()),
    "composite_short": (Membership, ("a",)),
    "composite_long": (Membership, ("a", 1, 2)),
    "composite_wrong_type": (Membership, ("a", "x")),
    "composite_as_text": (Membership, "a:1"),
    "composite_ok": (Membership, ("a", 1)),
    "uuid_text": (Token, str(TOKEN)),
    "uuid_garbage": (Token, "not-a-uuid"),
    "uuid_int": (Token, 255),
    "unregistered_model": (Address, 1),
    "unregistered_model_bad_pk": (Address, "abc"),
    "not_mapped": (NotMapped, 1),
    "not_a_class": (None, 1),
}


#: Spellings the cache normalises on purpose (tests/test_keys.py): where a plain Session cannot
#: bind them (pysqlite and a Decimal, the non-native Uuid type and a str) the cache answers what
#: the normalised key answers, cold or warm, instead of the driver's error.
NORMALISED = {"decimal": (User, 2), "uuid_text": (Token, TOKEN)}


def expected_get(engine: Any, case: str, model: Any, pk: Any) -> tuple[str, Any]:
    with PlainSession(engine) as plain:
        expected = outcome(lambda: plain.get(model, pk))
    if expected[0] == "raised" and case in NORMALISED:
        with PlainSession(engine) as plain:
            expected = outcome(lambda: plain.get(*NORMALISED[case]))
    return expected


@pytest.mark.usefixtures("rows")
@pytest.mark.parametrize("case", list(GET_CASES))
def test_get_answers_what_a_plain_session_answers(engine, Session, case):
    model, pk = GET_CASES[case]
    expected = expected_get(engine, case, model, pk)
    for attempt in range(2):  # the second may be served from the cache
        with Session() as s:
            assert outcome(lambda s=s: s.get(model, pk)) == expected, (case, attempt)
    with PlainSession(engine) as plain:
        expected = outcome(lambda: plain.query(model).get(pk))
    if expected[0] == "raised" and case in NORMALISED:
        expected = expected_get(engine, case, model, pk)
    with Session() as s:
        assert outcome(lambda: s.query(model).get(pk)) == expected, case


# -- get_many ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("rows")
def test_get_many_answers_each_entry_as_get_on_a_plain_session_would(engine, Session):
    answers = {
        case: expected_get(engine, case, model, pk)
        for case, (model, pk) in GET_CASES.items()
        if model is User
    }
    fine = [GET_CASES[c][1] for c, a in answers.items() if a[0] == "ok"]
    failing = [c for c, a in answers.items() if a[0] == "raised"]
    expected = [answers[c][1] for c, a in answers.items() if a[0] == "ok"]
    for _ in range(2):
        with Session() as s:
            assert summary(s.get_many(User, fine)) == expected
    for case in failing:  # an entry a plain get raises for: get_many raises the same
        with Session() as s:
            assert (
                outcome(lambda s=s, c=case: s.get_many(User, [1, GET_CASES[c][1]])) == answers[case]
            ), case


@pytest.mark.parametrize("entity", [NotMapped, None, "User"], ids=["not_mapped", "none", "text"])
def test_get_many_of_what_is_not_a_mapped_class_raises_as_get_does(engine, Session, entity):
    with PlainSession(engine) as plain:
        expected = outcome(lambda: plain.get(entity, 1))
    with Session() as s:
        assert outcome(lambda: s.get_many(entity, [1])) == expected


BULK_CASES: dict[str, tuple[str, tuple[Any, ...]]] = {
    "update_not_mapped": ("bulk_update_mappings", (NotMapped, [{"id": 1}])),
    "update_none": ("bulk_update_mappings", (None, [{"id": 1}])),
    "update_mappings_none": ("bulk_update_mappings", (User, None)),
    "insert_table_name": ("bulk_insert_mappings", ("users", [{"id": 1}])),
    "save_plain_object": ("bulk_save_objects", ([object()],)),
    "save_none": ("bulk_save_objects", (None,)),
}


@pytest.mark.parametrize("case", list(BULK_CASES))
def test_the_legacy_bulk_methods_fail_on_bad_input_as_a_plain_session_does(engine, Session, case):
    method, args = BULK_CASES[case]
    with PlainSession(engine) as plain:
        expected = outcome(lambda: getattr(plain, method)(*args))
    assert expected[0] == "raised"
    with Session() as s:
        assert outcome(lambda: getattr(s, method)(*args)) == expected


@pytest.mark.parametrize("pks", [None, 5], ids=["none", "int"])
def test_get_many_of_what_is_not_iterable_is_a_type_error(Session, pks):
    with Session() as s, pytest.raises(TypeError, match="not iterable"):
        s.get_many(User, pks)


# -- evict -------------------------------------------------------------------------------------


@pytest.mark.usefixtures("rows")
@pytest.mark.parametrize(
    "args, error, names",
    [
        ((None,), TypeError, "None"),
        ((1,), TypeError, "1"),
        (("User", 1), TypeError, "'User'"),
        ((NotMapped, 1), TypeError, "NotMapped"),
        ((Address, 1), NotRegistered, "Address"),
        ((User, None), ValueError, "None"),
        ((User, "abc"), ValueError, "'abc'"),
        ((User, " 1"), ValueError, "' 1'"),
        ((User, float("nan")), ValueError, "nan"),
        ((User, (1, 2)), ValueError, "(1, 2)"),
        ((Membership, "a"), ValueError, "'a'"),
        ((User(id=9, name="transient"),), ValueError, "transient"),
        ((User.__mapper__,), TypeError, "Mapper"),
        ((User.__table__,), TypeError, "users"),
    ],
    ids=lambda v: repr(v)[:40] if not isinstance(v, type) else v.__name__,
)
def test_evict_with_bad_input_raises_a_clear_error(cache, args, error, names):
    with pytest.raises(error) as raised:
        cache.evict(*args)
    assert names in str(raised.value)
    assert_not_from_inside_the_cache(raised.value)


@pytest.mark.usefixtures("rows")
def test_evict_of_a_pending_instance_or_with_an_extra_primary_key_is_refused(Session, cache):
    with Session() as s:
        pending = User(id=7, name="pending")
        s.add(pending)
        with pytest.raises(ValueError, match="pending"):
            cache.evict(pending)
        with pytest.raises(TypeError, match="no primary key"):
            cache.evict(s.get(User, 1), 1)
        unregistered = s.get(Address, 1)
        with pytest.raises(NotRegistered, match="Address"):
            cache.evict(unregistered)


@pytest.mark.usefixtures("rows")
def test_evict_of_a_detached_or_deleted_instance_evicts_its_row(engine, Session, cache, sql):
    with Session() as s:
        detached = s.get(User, 1)
        deleted = s.get(User, 2)
    with PlainSession(engine) as plain:  # changes the cache cannot see
        plain.get(User, 1).name = "changed"
        plain.delete(plain.get(User, 2))
        plain.commit()
    cache.evict(detached)
    cache.evict(deleted)
    with Session() as s:
        assert s.get(User, 1).name == "changed"
        assert s.get(User, 2) is None
    cache.evict(User, 2**70)  # a valid integer key that no row has: nothing to evict, no error


@pytest.mark.parametrize(
    "target, error",
    [(None, TypeError), (NotMapped, TypeError), (Address, NotRegistered), ("User", TypeError)],
    ids=["none", "not_mapped", "unregistered", "text"],
)
def test_evict_model_and_register_with_bad_input_raise_clear_errors(cache, target, error):
    with pytest.raises(error) as raised:
        cache.evict_model(target)
    assert_not_from_inside_the_cache(raised.value)
    if error is TypeError and target is not None:  # register(None) is @register()
        with pytest.raises(TypeError) as raised:
            cache.register(target)
        assert repr(target) in str(raised.value)


def test_a_session_without_cache_or_with_a_wrong_cache_behaves_or_fails_clearly(engine):
    with sessionmaker(engine, class_=sa_cache.CachingSession)() as s:  # cache=None: plain
        assert s.get(User, 404) is None
    with pytest.raises(TypeError):
        sa_cache.IdentityCache(backend=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unsupported cache URL"):
        sa_cache.IdentityCache("memcached://127.0.0.1")


def test_get_many_refuses_a_string_instead_of_an_iterable_of_keys(Session):
    with Session() as s, pytest.raises(TypeError, match="not one string"):
        s.get_many(User, "12")
