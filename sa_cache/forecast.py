"""Which single-key reads will most likely miss, so their lease can be taken in the read's own
round trip.

A cold miss costs three round trips when the read and the lease are separate: the read, the
lease with a re-read, the fill with the lease's release. Reading with the lease (the store's
``acquire``: ``SET NX`` of the lease and ``MGET`` of the generation and the key, one round trip)
saves one, but a hit read that way took a lease it must release (a second round trip) and writes
to the store on every read. So the lease is read along only where a miss is expected
(docs/protocol.md, "Round trips"):

- a key this process evicted (a commit here wrote its tombstone): its next read here misses,
  unless another process filled it meanwhile;
- a kind whose recent single-key reads all but always missed (a cold cache, a kind mostly read
  once): an exponentially weighted miss ratio above 0.9, reached after some twenty misses in a
  row and left at the first hit, so a hit pays the lease's release at most once in a while.

A wrong forecast costs a round trip, never correctness: the read with the lease classifies what
it read exactly as a plain read does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from .kinds import CachedKind

#: Weight of the latest single-key read in a kind's miss ratio, and the ratio above which the
#: kind's reads take their lease along: 22 misses in a row turn the forecast to "miss" (from a
#: ratio of 0), and one hit turns it back.
WEIGHT: Final = 0.1
THRESHOLD: Final = 0.9
#: Keys evicted here that are remembered (the oldest are forgotten first).
EVICTED_KEYS: Final = 4096


class MissForecast:
    """See the module docstring. Shared by every session of one cache; thread-safe enough:
    a lost update under a race costs one forecast, never an answer."""

    __slots__ = ("_ratio", "_evicted")

    def __init__(self) -> None:
        self._ratio: dict[CachedKind, float] = {}
        self._evicted: dict[str, None] = {}

    def expects_miss(self, kind: CachedKind, key: str) -> bool:
        """Whether the next read of ``key`` (of ``kind``) most likely misses; a key evicted here
        is forecast once."""
        if self._evicted and self._evicted.pop(key, 0) is None:
            return True
        return self._ratio.get(kind, 0.0) > THRESHOLD

    def observed(self, kind: CachedKind, missed: bool) -> None:
        """A single-key read of ``kind`` hit or missed."""
        ratio = self._ratio.get(kind, 0.0)
        self._ratio[kind] = ratio + WEIGHT * ((1.0 if missed else 0.0) - ratio)

    def evicted(self, keys: Iterable[str]) -> None:
        """This process wrote tombstones at ``keys``."""
        evicted = self._evicted
        for key in keys:
            evicted[key] = None
        while len(evicted) > EVICTED_KEYS:
            try:
                del evicted[next(iter(evicted))]
            except (KeyError, RuntimeError, StopIteration):  # another thread got there first
                break
