"""The cache protocol as pure decisions: from bytes already read to answers, fills and evictions.

No I/O here. :mod:`sa_cache.lookup` reads and writes through :mod:`sa_cache.guarded`; this
module decides what the bytes it read mean and which bytes it may write (docs/protocol.md has the
races each rule closes):

- a **read** of a key and its kind's generation gives an answer (hit, known absent) or a miss;
  a miss remembers exactly what it saw as an :class:`Observation`;
- a **fill** stores a freshly loaded value only if the key still holds the observed bytes (the
  store's compare-and-set) and only if the load finished well inside the tombstone TTL;
- an **eviction** overwrites keys with fresh random tombstones (so any fill that observed the
  old value fails) and replaces generations (evicting a whole kind in O(1));
- a **later fill** in a snapshot transaction (REPEATABLE READ) goes ahead only with a proof
  from the store's clock that nothing evicted its key since the snapshot began
  (:func:`proves_no_eviction_since`);
- a **hold**, written just before a commit whose end sa_cache cannot see, is a tombstone no
  reader may fill over (and a held generation, for a whole kind), until the eviction after it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from typing import Any, Final, NamedTuple

from . import codec
from .codec import AbsentEntry, Hold, Tombstone
from .kinds import REJECTED, Answer, CachedKind
from .store import Clock, Fill, Write

log = logging.getLogger("sa_cache")

#: Seconds a generation key lives. Fixed, so its write time can be read off its remaining TTL; a
#: generation that expires is re-created with a new random token (a cold cache, nothing worse).
GENERATION_TTL: Final = 30 * 24 * 3600
#: Seconds of doubt added to every comparison of store times: TTLs are kept in whole
#: milliseconds (Redis rounds a write's and a PTTL's time down to one), and a pipeline's commands
#: run microseconds apart.
CLOCK_MARGIN: Final = 0.002


class Freshness(enum.Enum):
    """What the load after a miss reads, as the session judges it at the miss."""

    #: nothing may be filled (the transaction wrote, or its snapshot cannot be bounded)
    NEVER = "never"
    #: data at least as new as the observation: fill
    FRESH = "fresh"
    #: fresh, and the load may begin a snapshot (REPEATABLE READ) later misses will read: the
    #: store time read before it is a lower bound on that snapshot's start
    BEGINS_SNAPSHOT = "begins snapshot"
    #: a snapshot that began earlier: fill only what :func:`proves_no_eviction_since` allows
    IN_SNAPSHOT = "in snapshot"


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
    #: what the load reads; an IN_SNAPSHOT observation is never filled (until proven FRESH)
    freshness: Freshness = Freshness.FRESH


def classify(
    kind: CachedKind, generation: bytes, payload: bytes | None, ident: tuple[Any, ...]
) -> Answer | None:
    """The answer ``payload`` (an entry's bytes, signature already checked) gives a lookup of
    ``ident``, or None for a miss. Undecodable or untrustworthy entries count as ``rejected``."""
    if payload is None:
        return None
    recalled = kind.recall(payload, generation, ident)  # these very bytes, decoded before
    if recalled is not None:
        return recalled
    entry = codec.decode(payload)
    if type(entry) is Hold:
        return None
    answer = REJECTED if entry is None else kind.answer(entry, generation, ident)
    if answer is REJECTED:
        kind.stats.rejected += 1
        return None
    if answer is not None:
        kind.remember(payload, entry, answer)
    return answer


def may_fill_over(payload: bytes | None, generation: bytes) -> bool:
    """Whether a miss that read ``payload`` under ``generation`` may fill: not while a commit
    elsewhere holds the key or its kind (:func:`hold_writes`)."""
    if codec.is_held_generation(generation):
        return False
    return payload is None or type(codec.decode(payload)) is not Hold


def fill_for(
    observation: Observation, loaded: Any, now: float, max_fill_age: float
) -> Fill | None:
    """The conditional write that caches ``loaded`` after ``observation``, or None if it must
    not be cached (too late, not cacheable, a value the format cannot carry, an old snapshot)."""
    if (
        now - observation.observed_at > max_fill_age
        or observation.freshness is Freshness.IN_SNAPSHOT
    ):
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
    if (
        not observation.negative_ok
        or now - observation.observed_at > max_fill_age
        or observation.freshness is Freshness.IN_SNAPSHOT
    ):
        return None
    value = codec.encode(AbsentEntry(observation.generation))
    return Fill(observation.key, observation.stored, value, negative_ttl)


def hold_writes(
    keys: Iterable[str], kinds: Iterable[CachedKind], hold_ttl: float
) -> tuple[list[Write], list[Write]]:
    """(holds, held generations): written just before a database commit that sa_cache cannot
    follow to its end (the root commit of a connection shared by sessions). Any fill that observed
    the old value fails against them, as against a tombstone, and no reader fills over them, so
    nobody caches the row as the database returns it until that commit is done; the eviction
    after the commit replaces them. ``hold_ttl`` bounds how long they block fills if that
    eviction never comes."""
    holds = [Write(key, codec.new_hold(), hold_ttl) for key in keys]
    generations = [
        Write(kind.keys.generation_key, codec.new_held_generation(), hold_ttl) for kind in kinds
    ]
    return holds, generations


def written_before(bound: float, now: float, ttl: float | None, left: float | None) -> bool:
    """Whether a key written with ``ttl`` seconds to live, which has ``left`` of them at the store
    time ``now``, was written before the store time ``bound`` (by more than the clock's doubt).
    Unknown (no TTL, an unknown one, an absent key) is not before."""
    if ttl is None or left is None:
        return False
    return now - (ttl - left) + CLOCK_MARGIN < bound


def proves_no_eviction_since(
    bound: float,
    clock: Clock,
    generation: bytes | None,
    payload: bytes | None,
    shortest_ttl: float,
    keeps_ttl: bool,
) -> bool:
    """Whether nothing evicted a key, or its kind, after the store time ``bound`` (a lower bound
    on the start of the reader's snapshot), judged from one round trip that read the kind's
    ``generation`` (None if gone) and the key (``payload``: its opened bytes, None if absent) with
    the store's ``clock`` (``clock.left``: the generation's remaining TTL, then the key's).

    Then every commit that evicted the key is in the snapshot, and a fill from it is no older
    than the cache's knowledge (the proof is in docs/protocol.md, "Later fills in a snapshot"):

    - the generation was written before ``bound`` (a whole-kind eviction writes a new one), and
    - the key holds a tombstone written before ``bound`` (every tombstone says its TTL), or is
      absent on a store that drops nothing early (``keeps_ttl``) less than ``shortest_ttl``
      (the shortest TTL anything in the key is written with) after ``bound``: a tombstone
      written after ``bound`` would still be there.

    Anything else (a held generation or key, a row or an absence of an older generation, a
    tombstone of the older format, undecodable bytes) proves nothing."""
    generation_left, key_left = clock.left
    if generation is None or codec.is_held_generation(generation):
        return False  # gone, or held (written with a TTL of its own): no write time to read
    if not written_before(bound, clock.now, GENERATION_TTL, generation_left):
        return False
    if payload is None:
        return keeps_ttl and clock.now - bound + CLOCK_MARGIN < shortest_ttl
    entry = codec.decode(payload)
    if type(entry) is not Tombstone or type(entry.ttl_ms) is not int:
        return False
    return written_before(bound, clock.now, entry.ttl_ms / 1000, key_left)


def undated_generation(clock: Clock, generation: bytes | None) -> bool:
    """Whether the timed round trip found an ordinary generation with no TTL (written by a version
    before generations had one): it can never be dated, so no later fill of its kind is ever
    proven until it is given its TTL (:meth:`~sa_cache.guarded.GuardedStore.date_generation`)."""
    return (
        generation is not None
        and not codec.is_held_generation(generation)
        and bool(clock.left)
        and clock.left[0] is None
    )


def eviction_writes(
    keys: Iterable[str], kinds: Iterable[CachedKind], tombstone_ttl: float
) -> tuple[list[Write], list[Write]]:
    """(tombstones, generations): a fresh tombstone for every key and a fresh generation for every
    kind. New random bytes each time, so a fill that observed an earlier eviction fails against
    this one. Tombstones are entries (signed when signing is on); generations are bare tokens."""
    tombstones = [Write(key, codec.new_tombstone(tombstone_ttl), tombstone_ttl) for key in keys]
    generations = [
        Write(k.keys.generation_key, codec.new_generation(), GENERATION_TTL) for k in kinds
    ]
    return tombstones, generations
