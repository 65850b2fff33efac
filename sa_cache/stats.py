"""Counter names, defined once: every other module, the CLI and the shared stats use these."""

from __future__ import annotations

from typing import Final

#: Per-model counters, in the order ``stats()`` and the CLI show them. ``skipped``: lookups the
#: cache did not answer because a cached row cannot honour what was asked (loader options, a
#: listener that may rewrite the statement); they went to the database and filled nothing.
#: ``oversized``: collections loaded but not cached, being longer than ``max_collection``.
MODEL_COUNTERS: Final = (
    "hits", "misses", "fills", "evictions", "errors", "rejected", "skipped", "oversized"
)
#: Counters of the cache as a whole (store calls refused by the open circuit breaker).
CACHE_COUNTERS: Final = ("bypassed",)
#: Counters of the near cache (``stats()["near"]``): keys answered from memory, keys fetched
#: from Redis, keys dropped by a tracking message or a write, losses that dropped every entry.
NEAR_COUNTERS: Final = ("hits", "misses", "invalidations", "flushes")
#: Every counter ``IdentityCache.stats()`` reports at its top level.
ALL_COUNTERS: Final = MODEL_COUNTERS + CACHE_COUNTERS


class ModelStats:
    """Counters for one cached model; read through :meth:`sa_cache.IdentityCache.stats`."""

    __slots__ = MODEL_COUNTERS

    def __init__(self) -> None:
        self.hits = self.misses = self.fills = self.evictions = self.errors = self.rejected = 0
        self.skipped = self.oversized = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in MODEL_COUNTERS}
