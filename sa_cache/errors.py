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


#: redis-py names the failing command of a pipeline with all its arguments, values included:
#: ``Command # 1 (SET key <value> PX 300000) of pipeline caused error: ...``
_PIPELINE_COMMAND = re.compile(
    r"(Command # \d+ \()(\S+).*?(\) of pipeline caused error:)", re.DOTALL
)
#: the longest store error message a log line carries
_MESSAGE_LIMIT = 300


def describe_error(exc: BaseException) -> str:
    """A store error for a log line or an exception message: its type and message, with URL
    passwords redacted and the arguments of a failing command (cached values, tombstones, keys)
    left out, keeping only the command's name."""
    message = _PIPELINE_COMMAND.sub(r"\1\2 ...\3", str(exc))
    message = redact(message)
    if len(message) > _MESSAGE_LIMIT:
        message = message[:_MESSAGE_LIMIT] + "..."
    return f"{type(exc).__name__}: {message}"
