"""The ``near`` scenario: the mixed workload with every process's cache holding a near cache.

Within a process a commit is never followed by an older answer: such a read is a failure, as in
every scenario. Across processes a read may miss a commit of another process until that
commit's tracking message has arrived (docs/near-cache.md): such reads are counted apart as
*stale across processes*, with how long after the missed commit returned each began, and they
are failures too if that is longer than :data:`BOUND` seconds (the near cache's ``max_age``: the
longest its pings let an entry be served without hearing from Redis). The report's note gives
their count and the latest lag, the figure docs/near-cache.md compares with the benchmark's.
"""

from __future__ import annotations

from typing import Any

from sa_cache import IdentityCache, NearCache
from sa_cache.near import NearStore

from .checker import Job, ReadRecord, Records, Report, Scenario, VersionCounter, WriteRecord

SETTINGS = NearCache()
BOUND = SETTINGS.max_age  # seconds


def _process(kind: str) -> str:
    return kind.rpartition("@")[2]


class NearScenario(Scenario):
    name = "near"
    summary = (
        "the mixed workload with a near cache in every process: 0 stale within a process, "
        f"another process's commit missed for at most {BOUND} s (counted apart, with its lag)"
    )
    databases = ("postgresql",)
    cache_options = {"near_cache": SETTINGS}  # noqa: RUF012 (read only)

    def worker(self, job: Job, factory: Any, versions: VersionCounter, n: int, snapshot: bool):
        worker = super().worker(job, factory, versions, n, snapshot)
        worker.tag = f"@p{job.index}"  # on its writes' and reads' kinds: which process
        return worker

    def finished(self, job: Job, cache: IdentityCache, records: Records) -> None:
        store = cache.store
        if isinstance(store, NearStore):
            store.close()  # its counters stay readable: run_job reports them as near_*

    def excuse(self, records: Records):
        bound = int(BOUND * 1e9)
        self.lags: list[int] = []  # ns: how long after the missed commit returned each began

        def across_processes(read: ReadRecord, missed: WriteRecord) -> bool:
            if _process(read[4]) == _process(missed[5]):
                return False  # this process's own commit: never excused
            lag = read[2] - missed[4]
            if lag > bound:
                return False
            self.lags.append(lag)
            return True

        return across_processes

    def judge(self, url: str, redis_url: str, prefix: str, records: Records, report: Report):
        lags = sorted(getattr(self, "lags", []))
        latest = f"{lags[-1] / 1e6:.3f} ms" if lags else "-"
        report.notes.append(
            f"stale across processes (not failures, each within {BOUND} s of the missed "
            f"commit): {len(lags)}, the latest beginning {latest} after it returned"
        )


def withhold_messages(cache: IdentityCache) -> None:
    """Break the near cache on purpose: tracking messages arrive and are not applied."""
    store = cache.store
    assert isinstance(store, NearStore)
    store.invalidations._on_keys = lambda keys: None
