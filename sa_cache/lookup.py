"""One session's cache lookups: read, lease, wait and write back, in one place.

A :class:`Lookups` is the whole per-session state of the cache (the session module holds one and
nothing else): the misses waiting for their load (observations), the lease the current ``get``
holds, the fills a ``get_many`` batches, what the current transaction changed
(:class:`~sa_cache.tracking.TransactionChanges`), and a store time read before its snapshot
began (``snapshot_bound``), against which later misses in a REPEATABLE READ transaction prove
their fills (docs/protocol.md, "Later fills in a snapshot").

The sequence for one key, as :mod:`sa_cache.session` drives it:

1. :meth:`Lookups.read`: one round trip for the keys and their kind's generation; hits and known
   absences are answered, each miss is remembered as an :class:`~sa_cache.protocol.Observation`
   if the session may fill it (the session decides that: it depends on the transaction). A
   read may carry keys it expects to need next (a collection's members' rows,
   :meth:`Lookups.read_one_along`, :meth:`Lookups.read_kinds_along`): they answer nothing, count
   nothing and are remembered nowhere until a later step of the same lookup needs them
   (:class:`ReadAlong`);
2. :meth:`Lookups.lease_or_wait`: for a single-key miss, take the key's lease (re-reading the key
   in the same round trip, and in a snapshot transaction the store's clock) or wait for the
   caller holding it to fill it. The waiting is injected (``sleep``), so an asyncio path can
   await instead of blocking;
3. the database load happens in SQLAlchemy; :meth:`Lookups.loaded` (from the ``load`` event) and
   :meth:`Lookups.loaded_nothing` write back what it found, conditionally, releasing the lease;
4. :meth:`Lookups.done` releases a lease whose load never came (it raised, or loaded nothing
   cacheable), so waiters need not time out.

Nothing here touches an identity map: answers go back to the session, which places them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, NamedTuple, Protocol

from sqlalchemy import event
from sqlalchemy.orm import InstanceState

from .guarded import GuardedStore
from .kinds import Answer, CachedKind
from .protocol import (
    Freshness,
    Observation,
    absent_fill,
    classify,
    fill_for,
    may_fill_over,
    proves_no_eviction_since,
    undated_generation,
)
from .registry import Registry
from .store import Clock, Fill, Release
from .tracking import TransactionChanges

#: First and longest pause between two polls of a key another caller is loading.
FIRST_POLL: Final = 0.001
LONGEST_POLL: Final = 0.025

Sleep = Callable[[float], None]
#: ``rule(kind, context)`` decides, at a read's first miss, (what the load will read, may it cache
#: an absence); the session supplies it, since the answer depends on its transaction.
FillRule = Callable[[CachedKind, Any], tuple[Freshness, bool]]


class ReadAlong(NamedTuple):
    """Keys read along with a lookup's own keys in its round trip, at ``observed_at``
    (:meth:`Lookups.read_kinds_along`): their stored bytes and opened payloads by key, and the
    ``generations`` of their kinds as that round trip read them. Nothing in it is an answer
    until :meth:`Lookups.read_kinds` (or :meth:`Lookups.read_along`) settles the keys a lookup
    turns out to need."""

    generations: dict[CachedKind, bytes]
    entries: dict[str, tuple[bytes | None, bytes | None]]
    observed_at: float


class Settings(Protocol):
    """What lookups read from :class:`~sa_cache.IdentityCache` (which satisfies this)."""

    guarded: GuardedStore
    registry: Registry
    lease_wait: float
    lease_ttl: float
    max_fill_age: float
    negative_ttl: float
    tombstone_ttl: float


def lease_key(key: str) -> str:
    """The lease on a key: inside the key's hash tag, so in the key's cluster slot."""
    return key + ":lease"


class Lookups:
    """The cache state of one session; see the module docstring."""

    __slots__ = ("cache", "changes", "pending", "batch", "current", "sleep", "snapshot_bound")

    def __init__(self, cache: Settings, sleep: Sleep = time.sleep) -> None:
        self.cache = cache
        self.changes = TransactionChanges()
        #: misses waiting for their load, by identity key
        self.pending: dict[Any, Observation] = {}
        #: fills collected by a get_many, written back in one round trip; None outside one
        self.batch: list[tuple[CachedKind, Fill]] | None = None
        #: the identity key of the single-key lookup under way
        self.current: Any = None
        self.sleep = sleep
        #: a store time read before the transaction's snapshot began (None: none known); later
        #: misses in the snapshot fill only what is proven no older than it
        self.snapshot_bound: float | None = None

    # -- reading -----------------------------------------------------------------------------

    def read(
        self,
        kind: CachedKind,
        wanted: Sequence[tuple[str, tuple[Any, ...], Any]],
        fill_rule: FillRule,
        context: Any = None,
    ) -> list[Answer | None]:
        """Read ``wanted`` (key, normalised pk, identity key) in one round trip.

        Returns, per key, its answer or None for a miss; a miss is remembered (so the load that
        follows can be written back) when ``fill_rule(kind, context)`` allows it."""
        now = time.monotonic()
        read = self.cache.guarded.read([kind], [key for key, _, _ in wanted])
        if read is None:
            return [None] * len(wanted)
        (generation,), stored, payloads = read
        kinds = [kind] * len(wanted)
        return self._settle_kinds(
            kinds, {kind: generation}, wanted, stored, payloads, now, fill_rule, context
        )

    def _observe(
        self,
        kind: CachedKind,
        key: str,
        identity_key: Any,
        raw: bytes | None,
        payload: bytes | None,
        generation: bytes,
        now: float,
        may_fill: Freshness,
        negative_ok: bool,
    ) -> None:
        """Remember a miss for the load that follows to fill, where it may; where it may not,
        forget what an earlier read of the key remembered (:meth:`_supersede`)."""
        if may_fill is not Freshness.NEVER and may_fill_over(payload, generation):
            self.pending[identity_key] = Observation(
                kind, key, raw, generation, now, negative_ok, freshness=may_fill
            )
        else:
            self._supersede(identity_key)

    def _supersede(self, identity_key: Any) -> None:
        """Forget an earlier miss's observation of a key read again (releasing its lease): its
        freshness was judged then, and the transaction may have begun its snapshot since (an
        eager level's read, then SQL). Left in place, a later load of the key would fill with
        it (or a lease would take it for one that begins the snapshot) although the read that
        came after said nothing may be filled."""
        observation = self.pending.pop(identity_key, None)
        if observation is not None and observation.lease is not None:
            self.write_back([], observation)

    def _freshness_for(
        self, fill_rule: FillRule, kind: CachedKind, context: Any
    ) -> tuple[Freshness, bool]:
        """``fill_rule``'s answer for a miss of ``kind``, given what the transaction already
        knows of its snapshot's start."""
        may_fill, negative_ok = fill_rule(kind, context)
        if self.snapshot_bound is None:
            if may_fill is Freshness.IN_SNAPSHOT:
                may_fill = Freshness.NEVER  # no bound on its start to prove against
        elif may_fill is Freshness.BEGINS_SNAPSHOT:
            may_fill = Freshness.FRESH  # the bound is known already
        return may_fill, negative_ok

    def read_kinds(
        self,
        kinds: Sequence[CachedKind],
        wanted: Sequence[tuple[str, tuple[Any, ...], Any]],
        fill_rule: FillRule,
        context: Any = None,
        along: ReadAlong | None = None,
    ) -> list[Answer | None]:
        """As :meth:`read`, for keys of several kinds (``kinds[i]`` is the kind of
        ``wanted[i]``), still in one round trip: a hit completing its eager relationships reads
        every collection of a level, then every row they name, this way. A miss is remembered
        as :meth:`read` remembers it, for the load that follows (SQLAlchemy's lazy loader or a
        refresh) to fill.

        With ``along`` (keys this lookup's earlier round trip read along), the keys it holds
        are answered from it, counted and remembered as of that round trip, and only the
        others are read (none: no round trip)."""
        if along is None:
            return self.read_kinds_along(kinds, wanted, fill_rule, context)[0]
        entries, generations = along.entries, along.generations
        held = [
            i
            for i, (kind, (key, _, _)) in enumerate(zip(kinds, wanted, strict=True))
            if key in entries and kind in generations
        ]
        if not held:
            return self.read_kinds_along(kinds, wanted, fill_rule, context)[0]
        answers: list[Answer | None] = [None] * len(wanted)
        settled = self._settle_kinds(
            [kinds[i] for i in held],
            generations,
            [wanted[i] for i in held],
            [entries[wanted[i][0]][0] for i in held],
            [entries[wanted[i][0]][1] for i in held],
            along.observed_at,
            fill_rule,
            context,
        )
        for i, answer in zip(held, settled, strict=True):
            answers[i] = answer
        rest = sorted(set(range(len(wanted))).difference(held))
        if rest:
            others = self.read_kinds_along(
                [kinds[i] for i in rest], [wanted[i] for i in rest], fill_rule, context
            )[0]
            for i, answer in zip(rest, others, strict=True):
                answers[i] = answer
        return answers

    def read_kinds_along(
        self,
        kinds: Sequence[CachedKind],
        wanted: Sequence[tuple[str, tuple[Any, ...], Any]],
        fill_rule: FillRule,
        context: Any = None,
        along_kinds: Sequence[CachedKind] = (),
        along: Sequence[tuple[str, tuple[Any, ...], Any]] = (),
    ) -> tuple[list[Answer | None], ReadAlong | None]:
        """:meth:`read_kinds`, reading the keys ``along`` (``along_kinds[i]`` the kind of
        ``along[i]``: rows a lookup expects to need next, such as the members a collection is
        guessed to name) in the same round trip: the answers, and what was read along (None
        if nothing was, or the store failed).

        What is read along answers nothing here, counts neither as a hit nor as a miss and
        leaves no observation: only the keys the lookup turns out to need are settled, by
        :meth:`read_kinds` with ``along``, as a read of them would settle them."""
        now = time.monotonic()
        distinct = list(dict.fromkeys([*kinds, *along_kinds]))
        keys = [key for key, _, _ in wanted]
        if along:
            keys += [key for key, _, _ in along]
        read = self.cache.guarded.read(distinct, keys)
        if read is None:
            return [None] * len(wanted), None
        generations = dict(zip(distinct, read[0], strict=True))
        (_, stored, payloads), count = read, len(wanted)
        answers = self._settle_kinds(
            kinds, generations, wanted, stored[:count], payloads[:count], now, fill_rule, context
        )
        if not along:
            return answers, None
        read_rows = zip(stored[count:], payloads[count:], strict=True)
        entries = dict(zip(keys[count:], read_rows, strict=True))
        return answers, ReadAlong(generations, entries, now)

    def _settle_kinds(
        self,
        kinds: Sequence[CachedKind],
        generations: dict[CachedKind, bytes],
        wanted: Sequence[tuple[str, tuple[Any, ...], Any]],
        stored: Sequence[bytes | None],
        payloads: Sequence[bytes | None],
        now: float,
        fill_rule: FillRule,
        context: Any,
    ) -> list[Answer | None]:
        """The answers of ``wanted`` from what one round trip read at ``now`` (``stored`` and
        ``payloads``; ``kinds[i]`` the kind of ``wanted[i]``, under its generation in
        ``generations``): each counted as a hit or a miss, each miss remembered for its load as
        :meth:`read` describes."""
        rules: dict[CachedKind, tuple[Freshness, bool]] = {}
        answers: list[Answer | None] = []
        for kind, (key, pk, identity_key), raw, payload in zip(
            kinds, wanted, stored, payloads, strict=True
        ):
            generation = generations[kind]
            answer = classify(kind, generation, payload, pk)
            answers.append(answer)
            if answer is not None:
                kind.stats.hits += 1
                self._supersede(identity_key)
                continue
            kind.stats.misses += 1
            rule = rules.get(kind)
            if rule is None:
                rule = rules[kind] = self._freshness_for(fill_rule, kind, context)
            self._observe(kind, key, identity_key, raw, payload, generation, now, *rule)
        return answers

    def read_one(
        self,
        kind: CachedKind,
        key: str,
        pk: tuple[Any, ...],
        identity_key: Any,
        fill_rule: FillRule,
        context: Any = None,
    ) -> Answer | None:
        """A single-key lookup: :meth:`read`, then on a miss :meth:`lease_or_wait` (three round
        trips for a miss with its fill). Where a miss is forecast (:mod:`sa_cache.forecast`),
        the lease is taken in the read's own round trip instead (two), and a hit read that way
        releases it (two). The hit path of every ``get``: one call down to the guarded read."""
        guarded = self.cache.guarded
        if self.cache.lease_wait > 0 and guarded.expects_miss(kind, key):
            answered, answer = self._read_leased(kind, key, pk, identity_key, fill_rule, context)
            if answered:
                guarded.forecast.observed(kind, answer is None)
                return answer
        # :meth:`read` of the one key, inline: the same round trip and the same decisions,
        # without the lists
        now = time.monotonic()
        read = guarded.read((kind,), (key,))
        if read is not None:
            (generation,), (raw,), (payload,) = read
            answer = classify(kind, generation, payload, pk)
            if answer is not None:
                kind.stats.hits += 1
                if self.pending:  # nothing to supersede on most hits: no call
                    self._supersede(identity_key)
                guarded.forecast.observed(kind, False)
                return answer
            kind.stats.misses += 1
            may_fill, negative_ok = self._freshness_for(fill_rule, kind, context)
            self._observe(
                kind, key, identity_key, raw, payload, generation, now, may_fill, negative_ok
            )
        guarded.forecast.observed(kind, True)
        return self.lease_or_wait(kind, pk, identity_key)

    def read_one_along(
        self,
        kind: CachedKind,
        key: str,
        pk: tuple[Any, ...],
        identity_key: Any,
        fill_rule: FillRule,
        context: Any = None,
        along_kind: CachedKind | None = None,
        along: Sequence[tuple[str, tuple[Any, ...], Any]] = (),
    ) -> tuple[Answer | None, ReadAlong | None]:
        """:meth:`read_one`, reading the keys ``along`` (of ``along_kind``: the rows a cached
        collection is guessed to name) in the same round trip: the answer, and on a hit what
        was read along, for :meth:`read_along` to answer from.

        What is read along answers nothing here, counts neither as a hit nor as a miss and
        leaves no observation: only the keys the answer turns out to need are settled, by
        :meth:`read_along`, as a read of them would settle them. Where a miss is forecast,
        nothing is read along: the lease is taken in the read's round trip, and rows read
        along would most likely serve nothing."""
        if along_kind is None or not along:
            return self.read_one(kind, key, pk, identity_key, fill_rule, context), None
        guarded = self.cache.guarded
        if self.cache.lease_wait > 0 and guarded.expects_miss(kind, key):
            answered, answer = self._read_leased(kind, key, pk, identity_key, fill_rule, context)
            if answered:
                guarded.forecast.observed(kind, answer is None)
                return answer, None
        answers, read_along = self.read_kinds_along(
            [kind],
            [(key, pk, identity_key)],
            fill_rule,
            context,
            [along_kind] * len(along),
            along,
        )
        answer = answers[0]
        guarded.forecast.observed(kind, answer is None)
        if answer is None:
            return self.lease_or_wait(kind, pk, identity_key), None
        return answer, read_along

    def read_along(
        self,
        along: ReadAlong | None,
        kind: CachedKind,
        wanted: Sequence[tuple[str, tuple[Any, ...], Any]],
        fill_rule: FillRule,
        context: Any = None,
    ) -> list[Answer | None]:
        """:meth:`read` of keys of one kind, answering those ``along`` holds from it (read by
        this same lookup's earlier round trip, :meth:`read_one_along`) as
        :meth:`read_kinds` does."""
        if along is None:
            return self.read(kind, wanted, fill_rule, context)
        return self.read_kinds([kind] * len(wanted), wanted, fill_rule, context, along)

    def _read_leased(
        self,
        kind: CachedKind,
        key: str,
        pk: tuple[Any, ...],
        identity_key: Any,
        fill_rule: FillRule,
        context: Any,
    ) -> tuple[bool, Answer | None]:
        """:meth:`read_one` with the lease taken in the read's round trip: (whether it answered,
        the answer or None for a miss); not answered where nothing may be filled (no lease is
        wanted), for :meth:`read_one` to read the usual way. Where the kind's generation does not
        exist yet, a plain read after the lease creates it (the lease is kept: the observation
        is that read's). The store's clock comes in the lease's round trip where the
        transaction's snapshot needs it, as :meth:`lease_or_wait` reads it."""
        now = time.monotonic()
        freshness, negative_ok = self._freshness_for(fill_rule, kind, context)
        if freshness is Freshness.NEVER:
            return False, None
        guarded = self.cache.guarded
        lease = guarded.acquire(
            kind,
            key,
            lease_key(key),
            self.cache.lease_ttl,
            timed=freshness is not Freshness.FRESH,
            ttls=freshness is Freshness.IN_SNAPSHOT,
        )
        if lease is None:
            return True, None  # the store failed: load, as after a failed read
        owned, generation, stored, payload, clock = lease
        if generation is None:  # the kind's first read: a plain read creates its generation
            read = guarded.read([kind], [key])
            if read is None:
                if owned is not None:
                    guarded.fill([], [Release(lease_key(key), owned)])
                return True, None
            (generation,), (stored,), (payload,) = read
        answer = classify(kind, generation, payload, pk)
        self._supersede(identity_key)
        if answer is not None:
            if owned is not None:  # a hit after all: nobody needs the lease
                guarded.fill([], [Release(lease_key(key), owned)])
            kind.stats.hits += 1
            return True, answer
        kind.stats.misses += 1
        self.current = identity_key
        if not may_fill_over(payload, generation):  # a commit elsewhere holds it: load
            if owned is not None:
                guarded.fill([], [Release(lease_key(key), owned)])
            return True, None
        observation = Observation(
            kind, key, stored, generation, now, negative_ok, freshness=freshness
        )
        if owned is None:
            self.pending[identity_key] = observation
            return True, self._wait_for_fill(kind, pk, identity_key)
        if freshness is not Freshness.FRESH:
            observation = self._judge(observation, clock, generation, payload)
        self.pending[identity_key] = observation._replace(lease=owned)
        return True, None

    def lease_or_wait(
        self, kind: CachedKind, pk: tuple[Any, ...], identity_key: Any
    ) -> Answer | None:
        """After a single-key miss: take the key's lease and let the caller load it (None), or
        wait for the caller who has it; an answer if the key was filled meanwhile.

        Taking the lease re-reads the key in the same round trip, so a caller whose miss came
        just before another caller's fill is answered by that fill, not by a second load. In a
        snapshot transaction the same round trip reads the store's clock: before the snapshot
        begins, as its lower bound; after, to prove the fill no older than the key's last
        eviction (:meth:`_judge`)."""
        self.current = identity_key
        if self.cache.lease_wait <= 0 or identity_key not in self.pending:
            return None
        observation = self.pending[identity_key]
        lease = self.cache.guarded.acquire(
            kind,
            observation.key,
            lease_key(observation.key),
            self.cache.lease_ttl,
            timed=observation.freshness is not Freshness.FRESH,
            ttls=observation.freshness is Freshness.IN_SNAPSHOT,
        )
        if lease is None:
            return None  # the store failed: load (the fill will most likely fail too)
        owned, generation, stored, payload, clock = lease
        if generation is not None and (stored, generation) != (
            observation.stored,
            observation.generation,
        ):
            answer = classify(kind, generation, payload, pk)
            if answer is not None:
                del self.pending[identity_key]
                if owned is not None:
                    self.cache.guarded.fill([], [Release(lease_key(observation.key), owned)])
                self._answered_after_all(kind)
                return answer
            if not may_fill_over(payload, generation):  # a commit elsewhere holds it: load
                del self.pending[identity_key]
                if owned is not None:
                    self.cache.guarded.fill([], [Release(lease_key(observation.key), owned)])
                return None
            observation = observation._replace(
                stored=stored, generation=generation, observed_at=time.monotonic()
            )
        if owned is not None:
            if observation.freshness is not Freshness.FRESH:
                observation = self._judge(observation, clock, generation, payload)
            self.pending[identity_key] = observation._replace(lease=owned)
            return None
        self.pending[identity_key] = observation
        return self._wait_for_fill(kind, pk, identity_key)

    def _judge(
        self,
        observation: Observation,
        clock: Clock | None,
        generation: bytes | None,
        payload: bytes | None,
    ) -> Observation:
        """``observation`` as the store's ``clock``, read with ``generation`` and ``payload`` (the
        key's bytes the fill will compare against) in the lease's round trip, lets it fill.

        Before the snapshot begins, that store time is a lower bound on its start, kept for the
        transaction. After, the fill goes ahead only if the store proves that nothing evicted the
        key or its kind since that bound (:func:`~sa_cache.protocol.proves_no_eviction_since`).
        Without a clock (a store that has none) an observation stays as it was: a load that
        begins the snapshot still fills, one inside it does not."""
        if clock is None:
            return observation
        if observation.freshness is Freshness.BEGINS_SNAPSHOT:
            if self.snapshot_bound is None:
                self.snapshot_bound = clock.now
            return observation._replace(freshness=Freshness.FRESH)
        if self.snapshot_bound is None:
            return observation
        cache = self.cache
        # every TTL a value in the key is written with: tombstone, absence, row, and a hold
        # (written for max_fill_age, see sa_cache/connections.py)
        shortest_ttl = min(
            cache.tombstone_ttl, cache.negative_ttl, observation.kind.ttl, cache.max_fill_age
        )
        keeps_ttl = payload is None and cache.guarded.store.capabilities.keeps_ttl
        if proves_no_eviction_since(
            self.snapshot_bound, clock, generation, payload, shortest_ttl, keeps_ttl
        ):
            return observation._replace(freshness=Freshness.FRESH)
        if generation is not None and undated_generation(clock, generation):
            cache.guarded.date_generation(observation.kind, generation)  # for later transactions
        return observation

    def _wait_for_fill(
        self, kind: CachedKind, pk: tuple[Any, ...], identity_key: Any
    ) -> Answer | None:
        """Another caller holds the lease and is loading: poll for its fill. If the lease goes
        away without a fill, try to take it; if the wait times out, read the database without
        filling (the thundering herd costs one load, not one per caller)."""
        guarded = self.cache.guarded
        observation = self.pending[identity_key]
        key, lease = observation.key, lease_key(observation.key)
        deadline = time.monotonic() + self.cache.lease_wait
        delay = FIRST_POLL
        while time.monotonic() < deadline:
            self.sleep(delay)
            delay = min(delay * 2, LONGEST_POLL)
            read = guarded.read([kind], [key, lease])
            if read is None:
                break
            (generation,), (stored, held), (payload, _) = read
            answer = classify(kind, generation, payload, pk)
            if answer is not None:
                del self.pending[identity_key]
                self._answered_after_all(kind)
                return answer
            if not may_fill_over(payload, generation):
                break  # a commit elsewhere holds it: load without filling
            if held is None:  # released without a fill: take it over
                self.pending[identity_key] = observation._replace(
                    stored=stored, generation=generation, observed_at=time.monotonic()
                )
                return self.lease_or_wait(kind, pk, identity_key)
        self.pending.pop(identity_key, None)  # timed out: load without filling
        return None

    @staticmethod
    def _answered_after_all(kind: CachedKind) -> None:
        kind.stats.misses -= 1
        kind.stats.hits += 1

    # -- writing back --------------------------------------------------------------------------

    def loaded(self, identity_key: Any, loaded: Any) -> None:
        """A load produced ``loaded`` for ``identity_key``: fill it if a miss was waiting."""
        observation = self.pending.pop(identity_key, None)
        if observation is None:
            return
        fill = None
        if not self.changes.wrote:
            fill = fill_for(observation, loaded, time.monotonic(), self.cache.max_fill_age)
        if self.batch is not None:
            if fill is not None:
                self.batch.append((observation.kind, fill))
        else:
            self.write_back([] if fill is None else [(observation.kind, fill)], observation)

    def loaded_nothing(self, identity_key: Any) -> None:
        """A ``get`` went to the database and found no row: remember that (negative caching)."""
        observation = self.pending.pop(identity_key, None)
        if observation is not None:
            self.write_back(self.absent_fills([observation]), observation)

    def absent_fills(self, observations: Iterable[Observation]) -> list[tuple[CachedKind, Fill]]:
        if self.changes.wrote:
            return []
        now, cache = time.monotonic(), self.cache
        fills = []
        for observation in observations:
            fill = absent_fill(observation, cache.negative_ttl, now, cache.max_fill_age)
            if fill is not None:
                fills.append((observation.kind, fill))
        return fills

    def write_back(
        self, fills: list[tuple[CachedKind, Fill]], observation: Observation | None = None
    ) -> None:
        """Apply fills in one round trip, releasing the lease the observation held, if any."""
        release = []
        if observation is not None and observation.lease is not None:
            release = [Release(lease_key(observation.key), observation.lease)]
        if fills or release:
            self.cache.guarded.fill(fills, release)

    def done(self) -> None:
        """A single-key lookup ended: drop its observation if no load consumed it, releasing its
        lease so waiters need not time out."""
        identity_key, self.current = self.current, None
        if identity_key is None:
            return
        observation = self.pending.pop(identity_key, None)
        if observation is not None:
            self.write_back([], observation)  # releases its lease, if it holds one

    def transaction_ended(self) -> None:
        self.changes.reset()
        self.snapshot_bound = None
        self.pending.clear()


def _on_load(state: InstanceState[Any], context: Any) -> None:
    if context is None:  # placed by the cache itself
        return
    lookups = getattr(context.session, "_sa_cache", None)
    if lookups is not None and lookups.pending:
        lookups.loaded(state.key, state)


def listen_for_loads(cls: type[Any]) -> None:
    """Write back what every load of ``cls`` (and its subclasses) brings, where a miss waits."""
    if not event.contains(cls, "load", _on_load):
        event.listen(cls, "load", _on_load, propagate=True, raw=True)
