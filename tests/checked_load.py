"""A checked load for the failover tests (a Cluster master killed, a Sentinel failover): a writer
commits ever-newer versions of rows through the cache while readers look them up, each read
checked against the version committed before it began, and a probe notes every lookup of one row
that the cache answered (no SQL). Every thread's exception is kept for the test, never swallowed.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache

from .counting import counting_sql
from .models import User


class CheckedLoad:
    """``with CheckedLoad(engine, cache, rows) as load:`` runs the load until the block ends.

    Users 1..``rows`` are added as version 0 first (the table is empty); ``probe_pk`` is the row
    the probe reads. Afterwards: ``reads`` (checked reads), ``stale`` ((pk, seen, committed
    before the read)), ``errors`` (exceptions of any thread) and ``hits_at`` (monotonic times
    of the probe's hits). ``more_probes``: rows probed by one more thread each (for a row's own
    hit ratio: ``probed[pk]``, the (monotonic time, hit) of each of its probe's reads).
    """

    def __init__(
        self,
        engine: Engine,
        cache: IdentityCache,
        rows: int,
        readers: int = 3,
        probe_pk: int = 1,
        more_probes: tuple[int, ...] = (),
    ) -> None:
        self.rows = rows
        self.committed = dict.fromkeys(range(1, rows + 1), 0)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.stale: list[tuple[int, int, int]] = []
        self.hits_at: list[float] = []
        self.reads = 0
        self._engine = engine
        self._cache = cache
        self._probe_engine = create_engine(engine.url.render_as_string(hide_password=False))
        self._Session = sessionmaker(engine, class_=CachingSession, cache=cache)
        self._ProbeSession = sessionmaker(self._probe_engine, class_=CachingSession, cache=cache)
        self._probe_pk = probe_pk
        self.probed: dict[int, list[tuple[float, bool]]] = {pk: [] for pk in more_probes}
        self._probe_engines = [
            create_engine(engine.url.render_as_string(hide_password=False)) for _ in more_probes
        ]
        self._threads = [self._guarded(self._write), self._guarded(self._probe)]
        self._threads += [
            self._guarded(lambda pk=pk, e=e: self._probe_row(pk, e))
            for pk, e in zip(more_probes, self._probe_engines, strict=True)
        ]
        self._threads += [
            self._guarded(lambda seed=i * rows // readers: self._read_from(seed))
            for i in range(readers)
        ]

    def __enter__(self) -> CheckedLoad:
        with sessionmaker(self._engine)() as s:
            s.add_all([User(id=i, name="v0") for i in range(1, self.rows + 1)])
            s.commit()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self._probe_engine.dispose()
        for engine in self._probe_engines:
            engine.dispose()

    def hit_ratio(self, pk: int, since: float, until: float) -> tuple[float, int]:
        """(hits / reads, reads) of ``pk``'s probe between two moments."""
        reads = [hit for at, hit in self.probed[pk] if since < at <= until]
        return (sum(reads) / len(reads) if reads else 0.0), len(reads)

    def hits_after(self, moment: float) -> int:
        return len([t for t in self.hits_at if t > moment])

    def longest_without_a_hit(self, since: float) -> float | None:
        """The longest stretch from ``since`` with no probe hit, or None if none came since."""
        after = [since] + [t for t in self.hits_at if t > since]
        if len(after) < 2:
            return None
        return max(b - a for a, b in zip(after, after[1:], strict=False))

    # -- the threads ---------------------------------------------------------------------------

    def _guarded(self, loop: Any) -> threading.Thread:
        def run() -> None:
            try:
                loop()
            except BaseException as exc:  # reported to the test, never swallowed
                self.errors.append(exc)
                self.stop.set()

        return threading.Thread(target=run)

    def _checked_read(self, session_class: Any, pk: int) -> None:
        before = self.committed[pk]
        with session_class() as s:
            got = int(s.get(User, pk).name[1:])
        self.reads += 1
        if got < before:
            self.stale.append((pk, got, before))

    def _write(self) -> None:
        version = 0
        while not self.stop.is_set():
            version += 1
            pk = version % self.rows + 1
            with self._Session() as s:
                s.get(User, pk).name = f"v{version}"
                s.commit()
            self.committed[pk] = version

    def _read_from(self, seed: int) -> None:
        pk = seed
        while not self.stop.is_set():
            pk = pk % self.rows + 1
            self._checked_read(self._Session, pk)

    def _probe_row(self, pk: int, engine: Engine) -> None:
        Session = sessionmaker(engine, class_=CachingSession, cache=self._cache)  # noqa: N806
        with counting_sql(engine) as sql:
            while not self.stop.is_set():
                sql.reset()
                self._checked_read(Session, pk)
                self.probed[pk].append((time.monotonic(), sql.count == 0))

    def _probe(self) -> None:
        with counting_sql(self._probe_engine) as sql:
            while not self.stop.is_set():
                sql.reset()
                self._checked_read(self._ProbeSession, self._probe_pk)
                if sql.count == 0:
                    self.hits_at.append(time.monotonic())
