"""The few storage operations the cache protocol needs, and where they come from.

dogpile.cache gives sa_cache its configuration surface (regions, backends, key manglers) and its
connections, but its fill is an unconditional SET. Serving rows correctly needs more: a fill must
store only if the key still holds exactly what the miss observed, or a reader that loaded a row
before a commit could overwrite the eviction that commit made. :class:`Store` names those
operations; :mod:`sa_cache.backends` implements them over dogpile's memory and Redis backends.

Every multi-key operation is one round trip to the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from .errors import UnsupportedBackend

__all__ = ["Fill", "Store", "UnsupportedBackend", "Write"]


class Fill(NamedTuple):
    """Store ``value`` at ``key`` only if the key still holds ``expected`` (None: still absent)."""

    key: str
    expected: bytes | None
    value: bytes
    ttl: float


class Write(NamedTuple):
    """Store ``value`` at ``key`` unconditionally; ``ttl=None`` keeps it until it is replaced."""

    key: str
    value: bytes
    ttl: float | None


class Store(Protocol):
    """What sa_cache asks of a cache backend. Implementations must be thread-safe."""

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The raw values of ``keys`` (None where absent), in one round trip."""

    def fill_many(self, fills: Sequence[Fill], release: Sequence[str] = ()) -> list[bool]:
        """Apply each conditional fill atomically per key, then delete the ``release`` keys (the
        leases the fills were waited on for); one round trip for the batch."""

    def write_many(self, writes: Sequence[Write]) -> None:
        """Apply unconditional writes (tombstones, generation bumps) in one round trip."""

    def acquire(
        self, key: str, token: bytes, ttl: float, read: Sequence[str]
    ) -> tuple[bool, list[bytes | None]]:
        """Set ``key`` (a lease) unless it exists, and read ``read`` after that, in one round
        trip: whether this call set it, and the values read."""

    def init_generation(self, key: str, token: bytes) -> bytes:
        """Set ``key`` to ``token`` unless it exists; return whichever value it holds after."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key that starts with ``prefix``; return how many were removed."""
