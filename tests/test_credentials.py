"""Issue 6, point 7: ``rediss://`` and credentials in the URL work, a wrong password degrades to
the database without raising, and a password never appears in a log record, a repr, the stats or
the ``sa-cache`` console script's output.

Each test starts its own redis-server on a spare loopback port (with TLS, or with a password and
an ACL user); the shared Redis on 6379 is not used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session as PlainSession
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache

from .conftest import require_service, start_tls_server
from .counting import expect_sql
from .models import User
from .redis_server import RedisServer, free_port

PASSWORD = "pw-Zq7-hunter2"
ALICE_PASSWORD = "al1ce-Xy9-secret"
WRONG = "wrong-Kk3-guess"
SECRETS = (PASSWORD, ALICE_PASSWORD, WRONG)


@pytest.fixture
def users(engine) -> None:
    with PlainSession(engine) as s:
        s.add_all([User(id=1, name="one"), User(id=2, name="two")])
        s.commit()


@pytest.fixture(scope="module")
def tls_server(tls_files: str) -> Iterator[tuple[RedisServer, str]]:
    server = start_tls_server(tls_files)
    yield server, tls_files
    server.stop()


@pytest.fixture(scope="module")
def auth_server() -> Iterator[RedisServer]:
    require_service("redis", 6379)
    server = RedisServer("--requirepass", PASSWORD).start()
    admin = server.client(password=PASSWORD)
    admin.acl_setuser(
        "alice", enabled=True, passwords=[f"+{ALICE_PASSWORD}"], keys=["*"], commands=["+@all"]
    )
    admin.close()
    yield server
    server.stop()


#: every cache here (from ``cache_factory``, under a prefix of its own: the servers outlive a test)
SOCKET_TIMEOUT = 0.5


def assert_hits(engine: Any, cache: IdentityCache, sql: Any) -> None:
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)  # noqa: N806
    with Session() as s:
        assert s.get(User, 1).name == "one"
    with expect_sql(sql, selects=1):  # user 2 is a miss once, user 1 a hit twice
        with Session() as s:
            assert s.get(User, 1).name == "one"
            assert [u.name for u in s.get_many(User, [1, 2])] == ["one", "two"]
        with Session() as s:
            assert s.get(User, 2).name == "two"
    stats = cache.stats()
    assert stats["errors"] == 0 and stats["hits"] >= 2


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"a password leaked into: {text[:300]!r}"


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    parts = []
    for record in caplog.records:
        parts.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(repr(record.exc_info[1]))
    return "\n".join(parts)


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    for name in ("sa_cache", "redis", "dogpile", ""):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


# -- TLS -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("db", ["sqlite"])
@pytest.mark.usefixtures("users")
@pytest.mark.parametrize("verify", ["ca", "no_verification"])
def test_a_rediss_url_connects_over_tls_and_serves_hits(
    engine, sql, tls_server, cache_factory, verify
):
    server, folder = tls_server
    query = f"ssl_ca_certs={folder}/ca.crt" if verify == "ca" else "ssl_cert_reqs=none"
    url = f"rediss://127.0.0.1:{server.port}/0?{query}"
    cache = cache_factory(url, socket_timeout=SOCKET_TIMEOUT)
    assert_hits(engine, cache, sql)


@pytest.mark.parametrize("db", ["sqlite"])
@pytest.mark.usefixtures("users")
def test_a_plain_connection_to_a_tls_port_degrades_to_the_database(
    engine, sql, tls_server, cache_factory
):
    server, _ = tls_server
    cache = cache_factory(f"redis://127.0.0.1:{server.port}/0", socket_timeout=SOCKET_TIMEOUT)
    with sessionmaker(engine, class_=CachingSession, cache=cache)() as s:
        assert s.get(User, 1).name == "one"
    assert cache.stats()["errors"] >= 1


# -- credentials -----------------------------------------------------------------------------------


def auth_url(server: RedisServer, user: str, password: str, scheme: str = "redis") -> str:
    return f"{scheme}://{user}:{password}@127.0.0.1:{server.port}/0"


@pytest.mark.parametrize("db", ["sqlite"])
@pytest.mark.usefixtures("users")
@pytest.mark.parametrize(
    "user, password", [("", PASSWORD), ("default", PASSWORD), ("alice", ALICE_PASSWORD)]
)
def test_credentials_in_the_url_authenticate_and_appear_in_no_log_or_repr(
    engine, sql, auth_server, all_logs, cache_factory, user, password
):
    cache = cache_factory(auth_url(auth_server, user, password), socket_timeout=SOCKET_TIMEOUT)
    assert_hits(engine, cache, sql)
    assert_no_secret(log_text(all_logs), repr(cache), str(cache.stats()), repr(cache.store))


@pytest.mark.parametrize("db", ["sqlite"])
@pytest.mark.usefixtures("users")
@pytest.mark.parametrize(
    "url",
    [
        "redis://:{wrong}@127.0.0.1:{port}/0",
        "redis://alice:{wrong}@127.0.0.1:{port}/0",
        "redis://nobody:{wrong}@127.0.0.1:{port}/0",
        "redis://127.0.0.1:{port}/0?password={wrong}",
        "redis://:{wrong}@127.0.0.1:{free}/0",  # nothing listening
    ],
    ids=["default_user", "acl_user", "unknown_user", "password_in_query", "refused"],
)
def test_a_wrong_password_degrades_to_the_database_and_is_never_shown(
    engine, sql, auth_server, all_logs, cache_factory, url
):
    url = url.format(wrong=WRONG, port=auth_server.port, free=free_port())
    cache = cache_factory(url, socket_timeout=SOCKET_TIMEOUT)
    Session = sessionmaker(engine, class_=CachingSession, cache=cache)  # noqa: N806
    for _ in range(2):
        with Session() as s:
            assert s.get(User, 1).name == "one"
            assert [u.name for u in s.get_many(User, [1, 2])] == ["one", "two"]
            s.get(User, 2).name = "changed"
            s.commit()  # the eviction fails too: journaled, never raised
        with Session() as s:
            s.get(User, 2).name = "two"
            s.commit()
    stats = cache.stats()
    assert stats["errors"] >= 1 and stats["hits"] == 0
    text = log_text(all_logs)
    assert "cache backend unavailable" in text  # logged, once
    assert_no_secret(text, repr(cache), str(stats), repr(cache.store), repr(cache.region))


def test_an_unsupported_url_is_refused_without_showing_its_password():
    with pytest.raises(ValueError) as raised:
        IdentityCache(f"memcached://admin:{PASSWORD}@127.0.0.1:11211")
    assert "***" in str(raised.value)
    assert_no_secret(str(raised.value), repr(raised.value))


# -- the console script ---------------------------------------------------------------------


def cli_verbs() -> set[str]:
    from sa_cache import cli

    return set(getattr(cli.main, "commands", {}))


@pytest.mark.skipif(
    not {"stats", "evict", "flush"} & cli_verbs(), reason="sa-cache has no stats/evict/flush verbs"
)
@pytest.mark.parametrize(
    "password, works", [(PASSWORD, True), (WRONG, False)], ids=["right", "wrong"]
)
def test_the_console_script_never_prints_the_password(auth_server, all_logs, password, works):
    from click.testing import CliRunner

    from sa_cache import cli

    url = auth_url(auth_server, "", password)
    runner = CliRunner()
    prefix = f"sa_cache_cred_{os.getpid()}"
    invocations = {
        "stats": ["stats", "--redis-url", url, "--prefix", prefix],
        "stats_json": ["stats", "--redis-url", url, "--prefix", prefix, "--json"],
        "evict": ["evict", "--redis-url", url, "--prefix", prefix, "users", "1"],
        "flush": ["flush", "--redis-url", url, "--prefix", prefix],
        "bad_scheme": ["stats", "--redis-url", f"http://u:{password}@127.0.0.1:1/0"],
        "from_env": ["stats", "--prefix", prefix],
    }
    ran = 0
    for name, args in invocations.items():
        if args[0] not in cli_verbs():
            continue
        ran += 1
        result = runner.invoke(cli.main, args, env={"SA_CACHE_URL": url})
        output = result.output + (repr(result.exception) if result.exception else "")
        assert_no_secret(output)
        if name == "bad_scheme":
            assert result.exit_code != 0
        elif works:
            assert result.exit_code == 0, (name, output)
        else:
            assert result.exit_code != 0, (name, output)  # a clear failure, not a traceback
            assert not isinstance(result.exception, Exception) or isinstance(
                result.exception, SystemExit
            ), (name, output)
    assert ran
    assert_no_secret(log_text(all_logs))
