"""A short-lived process for tests/test_journal_delivery.py: it commits a change while its Redis
is hung, so the eviction is journaled, says so on stdout, and exits without reading again
once it reads a line on stdin (so the test can bring Redis back before or after).

``python -m tests.journal_exit_script REDIS_URL DB_URL PREFIX PK EXIT_FLUSH_TIMEOUT``

Its breaker's cooldown is long, so only the flush at exit can deliver the journal, never the
background thread; log records go to stderr as ``LEVEL:logger:message``.
"""

from __future__ import annotations

import logging
import sys

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache

from .models import User

NEW_NAME = "renamed while redis hung"


def main(redis_url: str, db_url: str, prefix: str, pk: str, exit_flush_timeout: str) -> None:
    logging.basicConfig(format="%(levelname)s:%(name)s:%(message)s", stream=sys.stderr)
    cache = IdentityCache(
        redis_url,
        prefix=prefix,
        socket_timeout=0.2,
        breaker_cooldown=60,
        exit_flush_timeout=float(exit_flush_timeout),
    )
    cache.register(User)
    Session = sessionmaker(create_engine(db_url), class_=CachingSession, cache=cache)  # noqa: N806
    with Session() as s:
        s.get(User, int(pk)).name = NEW_NAME  # the read times out: the breaker opens
        s.commit()  # the eviction is bypassed: journaled, nothing sent
    assert cache.stats()["journal"] == {"keys": 1, "models": 0}
    print("journaled", flush=True)
    sys.stdin.readline()


if __name__ == "__main__":
    main(*sys.argv[1:])
