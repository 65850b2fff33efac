"""The ``outage`` scenario: one process loses Redis for a while; the others keep going.

Worker process 0 reaches the shared Redis only through its own :class:`~.proxy.StallingProxy`
(its version counter, the checker's instrument, does not), and a thread of that process stalls
the proxy at random moments (:data:`STALL` seconds, every :data:`GAP` seconds) while every
process runs the mixed workload. During a stall that process's lookups go to the database and
its commits cannot evict: their evictions are journaled, and delivered once Redis answers again
(:mod:`sa_cache.guarded`). Other processes reading a row it changed before the delivery are
served the old entry: unavoidable, and not a failure. Such reads are counted apart as *stale
during outage*: the newest write the read missed came from process 0, that write's ``commit()``
returned after a stall began and was called before that stall ended plus the *delivery bound*,
and the read started before the stall ended plus the delivery bound. Every other stale read is a
failure.

The delivery bound is the mode's promise, read from the cache's settings: the breaker's cooldown
(no probe before it) plus one retry interval of the delivery thread (its backoff cap) plus one
attempt that was already waiting on the stalled connection (its socket timeouts). Process 0
ends by waiting that long after its last stall without reading anything; keys still undelivered
then are failures (``undelivered``).
"""

from __future__ import annotations

import random
import threading
from typing import Any

from sqlalchemy.engine import make_url

from sa_cache import IdentityCache, guarded

from .checker import (
    Hot,
    Job,
    ReadRecord,
    Records,
    Report,
    Scenario,
    VersionCounter,
    WriteRecord,
    clock,
)
from .proxy import StallingProxy, stall_for

STALL = (0.05, 0.8)  # seconds, uniform
GAP = (0.3, 1.5)  # seconds between stalls, uniform
SETTINGS: dict[str, Any] = {"socket_timeout": 0.25, "retries": 1, "breaker_cooldown": 1.0}
PROXIED = "@proxied"  # the tag of process 0's writes


def delivery_bound(cache: IdentityCache) -> float:
    """Seconds after an outage by which its journaled evictions are written: the breaker's
    cooldown, then at most one wait of the delivery thread (its backoff cap), plus one attempt
    already under way when the stall ended (a socket timeout for each of its tries)."""
    cooldown = cache.breaker.cooldown
    retry = max(cooldown, getattr(guarded, "DELIVERY_BACKOFF_CAP_FLOOR", 0.0))
    attempt = SETTINGS["socket_timeout"] * (1 + SETTINGS["retries"])
    return cooldown + retry + attempt


class OutageScenario(Scenario):
    name = "outage"
    summary = (
        "one process reaches Redis through a proxy that stalls at random while the others keep "
        "reading and writing (stale reads while its evictions cannot be delivered reported apart)"
    )
    cache_options = SETTINGS

    def __init__(self) -> None:
        self.proxy: StallingProxy | None = None
        self.windows: list[tuple[int, int]] = []
        self.stop = threading.Event()
        self.staller: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {}  # the per-process state is made in each process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def cache_url(self, job: Job) -> str:
        if job.index != 0:
            return job.redis_url
        url = make_url(job.redis_url)
        self.proxy = StallingProxy((url.host or "127.0.0.1", url.port or 6379))
        return url.set(host="127.0.0.1", port=self.proxy.port).render_as_string(hide_password=False)

    def worker(self, job: Job, factory: Any, versions: VersionCounter, n: int, snapshot: bool):
        worker = super().worker(job, factory, versions, n, snapshot)
        if job.index == 0:
            worker.tag = PROXIED
        return worker

    def started(self, job: Job, cache: IdentityCache) -> None:
        if self.proxy is None:
            return
        rng = random.Random(f"{job.seed}-stalls")
        proxy = self.proxy

        def stall_now_and_then() -> None:
            while not self.stop.wait(rng.uniform(*GAP)):
                self.windows.append(stall_for(proxy, rng.uniform(*STALL)))

        self.staller = threading.Thread(target=stall_now_and_then, daemon=True)
        self.staller.start()

    def finished(self, job: Job, cache: IdentityCache, records: Records) -> None:
        if self.proxy is None:
            return
        self.stop.set()
        assert self.staller is not None
        self.staller.join()
        bound = delivery_bound(cache)
        records.outages += self.windows
        records.delivery_bound = bound
        # wait, reading nothing, until the bound has passed since the last stall
        last = self.windows[-1][1] if self.windows else clock()
        while clock() < last + bound * 1e9 and any(cache.guarded.journal()):
            self.stop.wait(0.01)
        keys, kinds = cache.guarded.journal()
        records.undelivered = len(keys) + len(kinds)
        if records.undelivered:  # write it now, so the final comparison stays meaningful
            model = cache.model_for(Hot.__mapper__)
            assert model is not None
            cache.guarded.read([model], [model.keys.row_key((1,))])
        self.proxy.close()

    def excuse(self, records: Records):
        bound = int(records.delivery_bound * 1e9)
        windows = [(begin, end, end + bound) for begin, end in records.outages]
        self.lag = 0  # ns: how long after its stall ended the latest excused read began

        def during_outage(read: ReadRecord, missed: WriteRecord) -> bool:
            if not missed[5].endswith(PROXIED):
                return False
            for begin, end, until in windows:
                if missed[4] >= begin and missed[3] <= until and read[2] <= until:
                    self.lag = max(self.lag, read[2] - end)
                    return True
            return False

        return during_outage

    def judge(self, url: str, redis_url: str, prefix: str, records: Records, report: Report):
        report.outage_lag = getattr(self, "lag", 0) / 1e9
