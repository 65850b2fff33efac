"""The cache protocol as pure decisions: from bytes already read to answers, fills and evictions.

No I/O here. :mod:`sa_cache.lookup` reads and writes through :mod:`sa_cache.guarded`; this
module decides what the bytes it read mean and which bytes it may write (docs/protocol.md has the
races each rule closes):

- a **read** of a key and its kind's generation gives an answer (hit, known absent) or a miss;
  a miss remembers exactly what it saw as an :class:`Observation`;
- a **fill** stores a freshly loaded value only if the key still holds the observed bytes (the
  store's compare-and-set) and only if the load finished well inside the tombstone TTL;
- an **eviction** overwrites keys with fresh random tombstones (so any fill that observed the
  old value fails) and replaces generations (evicting a whole kind in O(1)).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

from . import codec
from .codec import AbsentEntry
from .kinds import REJECTED, Answer, CachedKind
from .store import Fill, Write

log = logging.getLogger("sa_cache")


class Observation(NamedTuple):
    """What a miss saw in the store: the fill may replace exactly this, and nothing newer."""

    kind: CachedKind
    key: str
    stored: bytes | None  # the exact stored bytes (signed, if signing is on)
    generation: bytes
    observed_at: float
    negative_ok: bool
    #: the owner token of the lease this miss holds (None: it holds none)
    lease: bytes | None = None


def classify(
    kind: CachedKind, generation: bytes, payload: bytes | None, ident: tuple[Any, ...]
) -> Answer | None:
    """The answer ``payload`` (an entry's bytes, signature already checked) gives a lookup of
    ``ident``, or None for a miss. Undecodable or untrustworthy entries count as ``rejected``."""
    if payload is None:
        return None
    entry = codec.decode(payload)
    answer = REJECTED if entry is None else kind.answer(entry, generation, ident)
    if answer is REJECTED:
        kind.stats.rejected += 1
        return None
    return answer


def fill_for(
    observation: Observation, loaded: Any, now: float, max_fill_age: float
) -> Fill | None:
    """The conditional write that caches ``loaded`` after ``observation``, or None if it must
    not be cached (too late, not cacheable, a value the format cannot carry)."""
    if now - observation.observed_at > max_fill_age:
        return None
    kind = observation.kind
    entry = kind.fill_entry(observation.generation, loaded)
    if entry is None:
        return None
    try:
        value = codec.encode(entry)
    except (TypeError, ValueError, OverflowError) as exc:
        log.warning("sa_cache: not caching a %s: %s", kind.name, exc)
        return None
    return Fill(observation.key, observation.stored, value, kind.ttl)


def absent_fill(
    observation: Observation, negative_ttl: float, now: float, max_fill_age: float
) -> Fill | None:
    """The conditional write that remembers "no such row" after ``observation``."""
    if not observation.negative_ok or now - observation.observed_at > max_fill_age:
        return None
    value = codec.encode(AbsentEntry(observation.generation))
    return Fill(observation.key, observation.stored, value, negative_ttl)


def eviction_writes(
    keys: Iterable[str], kinds: Iterable[CachedKind], tombstone_ttl: float
) -> tuple[list[Write], list[Write]]:
    """(tombstones, generations): a fresh tombstone for every key and a fresh generation for every
    kind. New random bytes each time, so a fill that observed an earlier eviction fails against
    this one. Tombstones are entries (signed when signing is on); generations are bare tokens."""
    tombstones = [Write(key, codec.new_tombstone(), tombstone_ttl) for key in keys]
    generations = [Write(k.keys.generation_key, codec.new_generation(), None) for k in kinds]
    return tombstones, generations
