"""The interface every kind of cached thing implements.

Rows (:class:`sa_cache.rows.CachedModel`) are the first kind; relationship collections and query
results are the next. A kind owns three things and nothing else:

- its **key space** (:class:`~sa_cache.keys.KeySpace`): where its entries live, and the
  generation key whose replacement evicts all of them at once;
- its **entries**: how a decoded entry (:mod:`sa_cache.codec`) answers a lookup, and which entry
  a fresh load is stored as;
- its **eviction rule**: which of its keys a changed instance makes stale.

Everything else is shared by all kinds and lives elsewhere: reading, leases and waiting
(:mod:`sa_cache.lookup`), the compare-and-set fill and tombstones (:mod:`sa_cache.protocol`),
the store and its failures (:mod:`sa_cache.guarded`), and SQLAlchemy interception
(:mod:`sa_cache.session`, :mod:`sa_cache.tracking`), which never names a kind. Adding a kind means
a class here, its entry classes in the codec, and registering it in
:class:`sa_cache.registry.Registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, Final, NamedTuple

from sqlalchemy.orm import InstanceState

from .codec import Entry
from .keys import KeySpace
from .stats import ModelStats


class Hit(NamedTuple):
    """A lookup answered from the cache: ``value`` in the form its kind places in a session
    (for rows: the attribute values), and the kind-specific ``shape`` to place it with."""

    shape: Any
    value: Any


#: A lookup answered from the cache with "there is no such thing".
ABSENT: Final = "absent"
#: An entry that decoded but is not valid for this kind (counted in ``rejected``); a miss.
REJECTED: Final = "rejected"
#: Yielded by :meth:`CachedKind.changed_keys` or :meth:`CachedKind.links_changed` when the stale
#: keys cannot be named: the whole kind is evicted at commit (its generation replaced).
WHOLE_KIND: Final = "\x00whole kind"

Answer = Hit | str  # a Hit or ABSENT


class CachedKind(ABC):
    """One kind of cached thing, for one registered model hierarchy."""

    name: str
    keys: KeySpace
    ttl: float
    stats: ModelStats

    @abstractmethod
    def answer(self, entry: Entry, generation: bytes, ident: tuple[Any, ...]) -> Answer | None:
        """What ``entry``, read under ``generation`` for the lookup of ``ident``, answers: a
        :class:`Hit`, :data:`ABSENT`, None for a plain miss (a tombstone, an entry of an earlier
        generation) or :data:`REJECTED` for an entry that must not be trusted."""

    def recall(self, payload: bytes, generation: bytes, ident: tuple[Any, ...]) -> Answer | None:
        """The answer :meth:`answer` gave for exactly these bytes before, if this kind kept it
        and it still holds for ``generation`` and ``ident``, without decoding them again; None:
        not known, decode (:func:`sa_cache.protocol.classify` does). Kinds keep nothing by
        default."""
        return None

    def remember(self, payload: bytes, entry: Entry, answer: Answer) -> None:
        """``payload`` decoded to ``entry`` and answered ``answer`` (a hit or an absence): a
        kind may keep it for :meth:`recall`."""
        return None

    @abstractmethod
    def fill_entry(self, generation: bytes, loaded: Any) -> Entry | None:
        """The entry a fresh load is stored as, or None if it must not be cached."""

    @abstractmethod
    def changed_keys(
        self, state: InstanceState[Any], identity_keys: Iterable[Any]
    ) -> Iterable[str]:
        """The keys of this kind made stale when ``state`` changed; ``identity_keys`` are the
        identities it had before and after the change (two when its primary key changed)."""

    def links_changed(self, state: InstanceState[Any], deleted: bool) -> Iterable[str]:
        """The keys of this kind made stale by what a flush wrote for ``state`` outside its own
        row (the link rows of a many-to-many collection it changed; ``deleted``: the flush
        deleted it). Rows have none; relationship collections do."""
        return ()
