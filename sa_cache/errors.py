"""The errors sa_cache raises on purpose, and the one way it writes text that might hold a secret.

Kept apart from everything else so any module (and the Flask integration) can import them
without importing the cache itself.
"""

from __future__ import annotations

import re

_CREDENTIALS = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


class CacheError(Exception):
    """Base class of the errors sa_cache raises on purpose."""


class NotRegistered(CacheError, LookupError):
    """The model was never passed to :meth:`IdentityCache.register`."""


class UnsupportedBackend(CacheError, TypeError):
    """The configured store or dogpile.cache backend cannot give the guarantees sa_cache needs."""


def redact(text: str) -> str:
    """``text`` with any password in a URL replaced, for logs and reprs."""
    return _CREDENTIALS.sub(r"\1***@", text)
