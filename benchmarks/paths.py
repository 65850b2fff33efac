"""The ways to answer "give me user 42", each behind the same small interface.

(a) no cache, ``Session.get`` in a fresh session; (b) Flask-Caching ``@cache.memoize`` of a user
loader with its Redis backend, pickling the user (the seeds' approach); (c) a dogpile.cache
Redis region, pickle and ``session.merge(load=False)`` (SQLAlchemy's dogpile example approach);
(d) sa_cache on Redis; (e) sa_cache in process. The floors (a raw redis-py GET of sa_cache's own
payload, an identity-map hit) are measured in :mod:`benchmarks.micro`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from dogpile.cache.api import NO_VALUE
from flask import Flask
from flask_caching import Cache
from sqlalchemy import inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from sa_cache import CachingSession, IdentityCache

from . import env
from .models import User


class Path:
    key = ""
    label = ""
    uses_redis = False
    #: whether a commit needs the application to evict by hand
    manual_eviction = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.counter = env.RoundTrips()
        self.Session: sessionmaker[Any] = sessionmaker(engine)

    # one lookup in a fresh session (what a request does)
    def hit(self, uid: int) -> Any:
        with self.Session() as session:
            return session.get(User, uid)

    # one lookup in a session that already exists (the object is expunged afterwards)
    def lookup(self, session: Session, uid: int) -> Any:
        return session.get(User, uid)

    def get_many(self, ids: Sequence[int]) -> list[Any]:
        with self.Session() as session:
            found = {u.id: u for u in session.scalars(select(User).where(User.id.in_(ids)))}
            return [found.get(i) for i in ids]

    def warm(self, ids: Sequence[int]) -> None:
        pass

    def clear(self, ids: Sequence[int]) -> None:
        """Make the next lookup of each id a miss."""

    def evict_after_commit(self, ids: Sequence[int]) -> None:
        """What the application must do by hand after committing changes to these rows."""

    def close(self) -> None:
        pass


class NoCache(Path):
    key = "a"
    label = "(a) no cache"


class FlaskCachingMemoize(Path):
    key = "b"
    label = "(b) Flask-Caching memoize"
    uses_redis = True
    manual_eviction = True

    def __init__(self, engine: Engine, prefix: str) -> None:
        super().__init__(engine)
        self.prefix = prefix
        self.client = env.counted_client(self.counter)
        self.app = Flask("sa_cache_bench_memoize")
        self.cache = Cache(
            self.app,
            config={
                "CACHE_TYPE": "RedisCache",
                "CACHE_REDIS_HOST": self.client,
                "CACHE_KEY_PREFIX": prefix,
                "CACHE_DEFAULT_TIMEOUT": 3600,
            },
        )
        self.ctx = self.app.app_context()
        self.ctx.push()
        Session_ = self.Session

        @self.cache.memoize(timeout=3600)
        def load_user(user_id: str) -> Any:
            with Session_() as session:
                return session.get(User, int(user_id))

        self.load_user = load_user

    def hit(self, uid: int) -> Any:
        return self.load_user(str(uid))

    def lookup(self, session: Session, uid: int) -> Any:
        return self.load_user(str(uid))

    def get_many(self, ids: Sequence[int]) -> list[Any]:
        return [self.load_user(str(i)) for i in ids]  # memoize has no multi-get

    def warm(self, ids: Sequence[int]) -> None:
        for i in ids:
            self.load_user(str(i))

    def clear(self, ids: Sequence[int]) -> None:
        for i in ids:
            self.cache.delete_memoized(self.load_user, str(i))

    def evict_after_commit(self, ids: Sequence[int]) -> None:
        for i in ids:
            self.cache.delete_memoized(self.load_user, str(i))

    def close(self) -> None:
        env.delete_prefix(self.client, self.prefix)
        self.ctx.pop()


class DogpileMerge(Path):
    key = "c"
    label = "(c) dogpile + pickle + merge"
    uses_redis = True
    manual_eviction = True

    def __init__(self, engine: Engine, prefix: str) -> None:
        super().__init__(engine)
        self.prefix = prefix
        self.region = env.counted_region(self.counter, key_mangler=lambda k: prefix + k)

    def _load(self, session: Session, uid: int) -> Any:
        def create() -> Any:
            return session.get(User, uid)

        cached = self.region.get_or_create(f"user:{uid}", create)
        return None if cached is None else session.merge(cached, load=False)

    def hit(self, uid: int) -> Any:
        with self.Session() as session:
            return self._load(session, uid)

    def lookup(self, session: Session, uid: int) -> Any:
        return self._load(session, uid)

    def get_many(self, ids: Sequence[int]) -> list[Any]:
        with self.Session() as session:

            def create(*keys: str) -> list[Any]:
                wanted = [int(k.rsplit(":", 1)[1]) for k in keys]
                found = {u.id: u for u in session.scalars(select(User).where(User.id.in_(wanted)))}
                return [found.get(i) for i in wanted]

            values = self.region.get_or_create_multi([f"user:{i}" for i in ids], create)
            return [None if v is None else session.merge(v, load=False) for v in values]

    def warm(self, ids: Sequence[int]) -> None:
        for start in range(0, len(ids), 1000):
            self.get_many(ids[start : start + 1000])

    def clear(self, ids: Sequence[int]) -> None:
        self.region.delete_multi([f"user:{i}" for i in ids])

    def evict_after_commit(self, ids: Sequence[int]) -> None:
        self.region.delete_multi([f"user:{i}" for i in ids])

    def stored_bytes(self, uid: int) -> int:
        return int(self.region.actual_backend.writer_client.strlen(self.prefix + f"user:{uid}"))

    def close(self) -> None:
        env.delete_prefix(self.region.actual_backend.writer_client, self.prefix)


class SaCache(Path):
    def __init__(self, engine: Engine, cache: IdentityCache) -> None:
        super().__init__(engine)
        self.cache = cache
        cache.register(User)
        self.Session = sessionmaker(engine, class_=CachingSession, cache=cache)
        #: seconds of each ``GuardedStore.evict`` call (the commit's eviction)
        self.eviction_times: list[float] = []
        original = cache.guarded.evict

        def timed_evict(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.eviction_times.append(time.perf_counter() - start)

        cache.guarded.evict = timed_evict  # type: ignore[method-assign]

    def get_many(self, ids: Sequence[int]) -> list[Any]:
        with self.Session() as session:
            return session.get_many(User, ids)

    def warm(self, ids: Sequence[int]) -> None:
        for start in range(0, len(ids), 1000):
            self.get_many(ids[start : start + 1000])

    def clear(self, ids: Sequence[int]) -> None:
        for i in ids:
            self.cache.evict(User, i)

    def row_key(self, uid: int) -> str:
        model = self.cache.model_for(inspect(User))
        assert model is not None
        return model.keys.row_key((uid,))


class SaCacheRedis(SaCache):
    key = "d"
    label = "(d) sa_cache Redis"
    uses_redis = True

    def __init__(self, engine: Engine, prefix: str) -> None:
        self.prefix = prefix
        counter = env.RoundTrips()
        super().__init__(engine, IdentityCache(env.counted_region(counter), prefix=prefix))
        self.counter = counter
        self.client = self.cache.region.actual_backend.writer_client

    def raw_payload(self, uid: int) -> bytes:
        value = self.client.get(self.row_key(uid))
        assert value is not None and value is not NO_VALUE
        return bytes(value)

    def close(self) -> None:
        env.delete_prefix(self.client, self.prefix)


class SaCacheMemory(SaCache):
    key = "e"
    label = "(e) sa_cache in-process"

    def __init__(self, engine: Engine, prefix: str) -> None:
        super().__init__(engine, IdentityCache(prefix=prefix))
