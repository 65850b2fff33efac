"""A hit is the load SQLAlchemy would have done: what a lookup asks beyond a primary key.

Each test runs one scenario twice, through plain SQLAlchemy sessions and through caching
sessions whose cache already holds the rows, and requires the same answers and object states:
loader criteria added by a ``do_orm_execute`` listener (the multi-tenant recipe) or passed to
``get``, loader options on ``get``, relationships and expressions a load fills in, and the
autoflush a lookup's SELECT runs first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import event, inspect, literal
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    Session,
    noload,
    sessionmaker,
    with_expression,
    with_loader_criteria,
)
from sqlalchemy.orm.exc import DetachedInstanceError

from sa_cache import CachingSession, IdentityCache

from .counting import SQLCounter, expect_sql
from .lookup_models import CACHED, Child, Doc, Folder, Note, Owner, Tag, ensure_tables


@pytest.fixture
def fid_cache(engine: Engine, cache: IdentityCache) -> IdentityCache:
    ensure_tables(engine)
    for model in CACHED:
        cache.register(model)
    with Session(engine) as s:
        s.add_all([Owner(id=1, name="olga"), Folder(id=1, owner_id=1, title="f1")])
        s.add_all([Folder(id=2, owner_id=None, title="f2")])
        s.add_all([Tag(id=i, folder_id=1, label=f"t{i}") for i in (1, 2)])
        s.add_all([Child(id=i, folder_id=1, name=f"c{i}") for i in (1, 2, 3)])
        s.add_all([Note(id=1, folder_id=1, text="n1")])
        s.add_all([Doc(id=1, tenant="A", title="a1"), Doc(id=2, tenant="A", title="a2")])
        s.add_all([Doc(id=3, tenant="B", title="b3")])
        s.commit()
    return cache


def factories(engine: Engine, cache: IdentityCache) -> dict[str, sessionmaker[Any]]:
    return {
        "plain": sessionmaker(engine),
        "cached": sessionmaker(engine, class_=CachingSession, cache=cache),
    }


def warm(engine: Engine, cache: IdentityCache, model: type[Any], *pks: int) -> None:
    """Put these rows (or their absence) in the cache, one session each, no listener."""
    for pk in pks:
        with CachingSession(engine, cache=cache) as s:
            s.get(model, pk)


def same_for_both(
    engine: Engine, cache: IdentityCache, scenario: Callable[[sessionmaker[Any]], Any]
) -> Any:
    answers = {name: scenario(factory) for name, factory in factories(engine, cache).items()}
    assert answers["cached"] == answers["plain"]
    return answers["plain"]


def readable(instance: Any, names: list[str]) -> dict[str, Any]:
    """Attribute values as a caller reads them, after the session closed: collections as ids,
    objects by id, and what cannot be read named by its error."""
    out: dict[str, Any] = {}
    for name in names:
        try:
            value = getattr(instance, name)
        except DetachedInstanceError:
            out[name] = "DetachedInstanceError"
            continue
        if isinstance(value, list):
            out[name] = [item.id for item in value]
        elif hasattr(value, "__mapper__"):
            out[name] = value.id
        else:
            out[name] = value
    return out


# -- loader criteria -------------------------------------------------------------------------


def tenant_sessions(factory: sessionmaker[Any]) -> sessionmaker[Any]:
    """A copy of ``factory`` with SQLAlchemy's multi-tenant recipe: every SELECT of Doc filtered
    by the session's tenant."""
    factory = sessionmaker(class_=factory.class_, **factory.kw)

    @event.listens_for(factory, "do_orm_execute")
    def only_my_tenant(state: Any) -> None:
        if state.is_select and not state.is_column_load and not state.is_relationship_load:
            tenant = state.session.info["tenant"]
            state.statement = state.statement.options(
                with_loader_criteria(Doc, Doc.tenant == tenant, include_aliases=True)
            )

    return factory


def test_a_tenant_is_never_served_another_tenants_cached_row(engine, fid_cache, sql):
    warm(engine, fid_cache, Doc, 1, 2, 3)  # every row cached by an unfiltered session

    def scenario(factory: sessionmaker[Any]) -> list[Any]:
        sessions = tenant_sessions(factory)
        seen = []
        for tenant, pk in [("A", 1), ("B", 1), ("B", 2), ("A", 2), ("B", 3), ("A", 3)]:
            with sessions(info={"tenant": tenant}) as s:
                doc = s.get(Doc, pk)
                seen.append(None if doc is None else (doc.id, doc.tenant))
        return seen

    assert same_for_both(engine, fid_cache, scenario) == [
        (1, "A"), None, None, (2, "A"), (3, "B"), None
    ]  # fmt: skip
    assert fid_cache.stats()["models"]["Doc"]["skipped"] == 6


def test_an_absence_seen_by_one_tenant_never_hides_the_row_from_another(engine, fid_cache):
    def scenario(factory: sessionmaker[Any]) -> list[Any]:
        sessions = tenant_sessions(factory)
        with sessions(info={"tenant": "B"}) as s:
            first = s.get(Doc, 1)
        with sessions(info={"tenant": "A"}) as s:
            second = s.get(Doc, 1)
        with factory() as s:  # no tenant filter at all
            third = s.get(Doc, 1)
        return [first, None if second is None else second.id, None if third is None else third.id]

    assert same_for_both(engine, fid_cache, scenario) == [None, 1, 1]


def test_criteria_passed_to_get_are_honoured(engine, fid_cache):
    warm(engine, fid_cache, Doc, 1)

    def scenario(factory: sessionmaker[Any]) -> Any:
        with factory() as s:
            doc = s.get(Doc, 1, options=[with_loader_criteria(Doc, Doc.tenant == "B")])
            return doc

    assert same_for_both(engine, fid_cache, scenario) is None


# -- options on get --------------------------------------------------------------------------


def test_with_expression_on_get_is_evaluated(engine, fid_cache):
    warm(engine, fid_cache, Doc, 1)

    def scenario(factory: sessionmaker[Any]) -> Any:
        with factory() as s:
            return s.get(Doc, 1, options=[with_expression(Doc.score, literal(7))]).score

    assert same_for_both(engine, fid_cache, scenario) == 7


def test_a_loader_option_on_get_shapes_the_instance_as_on_a_load(engine, fid_cache):
    warm(engine, fid_cache, Folder, 1)

    def scenario(factory: sessionmaker[Any]) -> Any:
        with factory() as s:
            folder = s.get(Folder, 1, options=[noload(Folder.children)])
            return sorted(inspect(folder).unloaded), [c.id for c in folder.children]

    unloaded, children = same_for_both(engine, fid_cache, scenario)
    assert children == []  # noload: an empty collection, not the three children


# -- what a load fills in beyond the columns ----------------------------------------------------

FOLDER_ATTRIBUTES = ["title", "owner", "tags", "children", "notes", "child_count", "score"]


def load_folder(factory: sessionmaker[Any], pk: int) -> tuple[list[str], dict[str, Any]]:
    with factory() as s:
        folder = s.get(Folder, pk)
        unloaded = sorted(inspect(folder).unloaded)
    return unloaded, readable(folder, FOLDER_ATTRIBUTES)  # read after the session closed


@pytest.mark.parametrize("pk", [1, 2], ids=["with-relations", "without"])
def test_a_hit_leaves_the_instance_loaded_as_a_load_does(engine, fid_cache, sql, pk):
    sql.reset()
    cold = load_folder(factories(engine, fid_cache)["cached"], pk)  # a load, which fills
    miss_selects = sql.selects()
    hits = fid_cache.stats()["models"]["Folder"]["hits"]
    sql.reset()
    warm_answer = load_folder(factories(engine, fid_cache)["cached"], pk)
    hit_selects = sql.selects()
    assert fid_cache.stats()["models"]["Folder"]["hits"] == hits + 1
    plain = load_folder(factories(engine, fid_cache)["plain"], pk)
    assert cold == warm_answer == plain
    assert "DetachedInstanceError" not in plain[1].values()
    assert hit_selects <= miss_selects  # never more SQL than the miss


def test_a_lazy_many_to_one_hit_is_completed_as_its_load(engine, fid_cache):
    """Child -> Folder through a lazy load: the folder's eager attributes are loaded too."""
    warm(engine, fid_cache, Folder, 1)

    def scenario(factory: sessionmaker[Any]) -> Any:
        with factory() as s:
            folder = s.get(Tag, 1).folder  # a lazy many-to-one by primary key
        return readable(folder, FOLDER_ATTRIBUTES)

    assert same_for_both(engine, fid_cache, scenario)["children"] == [1, 2, 3]


def test_get_many_answers_eager_mappers_from_the_database_in_one_select(
    engine, fid_cache, sql: SQLCounter
):
    warm(engine, fid_cache, Folder, 1, 2)
    with CachingSession(engine, cache=fid_cache) as s, expect_sql(sql, selects=3):
        # the folders with their joins, then the selectin and the subquery loads
        folders = s.get_many(Folder, [1, 2])
    assert [f.title for f in folders] == ["f1", "f2"]
    assert fid_cache.stats()["models"]["Folder"]["skipped"] == 2


# -- autoflush ---------------------------------------------------------------------------------


def test_get_finds_an_object_just_added_despite_a_cached_absence(engine, fid_cache):
    warm(engine, fid_cache, Doc, 9)  # "no row 9" is cached

    def scenario(factory: sessionmaker[Any]) -> Any:
        with factory() as s:
            added = Doc(id=9, tenant="A", title="new")
            s.add(added)
            found = s.get(Doc, 9)
            answer = (found is added, inspect(added).persistent)
            s.rollback()
        return answer

    assert same_for_both(engine, fid_cache, scenario) == (True, True)


def test_without_autoflush_a_pending_object_is_not_found(engine, fid_cache):
    warm(engine, fid_cache, Doc, 9)

    def scenario(factory: sessionmaker[Any]) -> Any:
        with factory() as s:
            s.add(Doc(id=9, tenant="A", title="new"))
            with s.no_autoflush:
                found = s.get(Doc, 9)
            return found, inspect(s.new.copy().pop()).pending

    assert same_for_both(engine, fid_cache, scenario) == (None, True)


def test_a_change_pending_in_the_session_is_flushed_before_a_hit_is_answered(engine, fid_cache):
    """Autoflush runs even when the answer comes from the cache: its side effects (the UPDATE,
    errors of the flush) are those of the SELECT SQLAlchemy would have run."""
    warm(engine, fid_cache, Doc, 1, 2)

    def scenario(factory: sessionmaker[Any]) -> Any:
        with factory() as s:
            one = s.get(Doc, 1)
            one.title = "renamed"
            s.get(Doc, 2)  # the lookup flushes the rename first
            flushed = not s.dirty
            s.rollback()
        return flushed

    assert same_for_both(engine, fid_cache, scenario) is True

