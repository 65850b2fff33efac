"""sa_cache: an SQLAlchemy identity-map cache behind dogpile.cache.

Primary-key lookups that miss the session's identity map (``Session.get``, ``Query.get``,
``Session.merge``, lazy many-to-one loads) are answered from a shared cache, and rows a
transaction changed are evicted when it commits.
"""

from .cache import IdentityCache, NearCache
from .errors import CacheError, NotRegistered
from .session import CachingQuery, CachingSession, CachingSessionMixin

__all__ = [
    "CacheError",
    "CachingQuery",
    "CachingSession",
    "CachingSessionMixin",
    "IdentityCache",
    "NearCache",
    "NotRegistered",
]
__version__ = "0.1.0"
