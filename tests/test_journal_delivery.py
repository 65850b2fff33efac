"""Issue 12, point 4: an eviction one process could not write reaches the shared store without
that process reading again.

Every test runs against a redis-server of its own (tests/redis_server.py), hung with SIGSTOP.
The outage is the one the issue describes: a read times out, the breaker opens, and the commit's
eviction is bypassed: journaled without a byte sent, so the stale entry stays in Redis and
another process (here a second IdentityCache with its own connections, or a real subprocess)
would keep reading it. The delivery thread's wait is held by a :class:`Gate`, so each attempt
happens when the test lets it, never after a sleep.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from sa_cache import CachingSession, IdentityCache

from . import journal_exit_script
from .conftest import RUN_ID, register_all, require_service
from .counting import RedisCounter, counted_redis_region, expect_commands
from .models import Base, User
from .redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
SOCKET_TIMEOUT = 0.2
DEADLINE = 10.0  # seconds any wait for a condition may take before the test fails


class Gate:
    """A ``delivery_wait`` that holds the delivery thread until the test lets one attempt
    through; it records the seconds the thread asked to wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self._called = threading.Condition()
        self._go = threading.Semaphore(0)

    def __call__(self, seconds: float) -> None:
        with self._called:
            self.waits.append(seconds)
            self._called.notify_all()
        self._go.acquire()

    def wait_for_calls(self, calls: int) -> bool:
        with self._called:
            return self._called.wait_for(lambda: len(self.waits) >= calls, DEADLINE)

    def release(self) -> None:
        self._go.release()


def wait_until(condition: object, what: str) -> None:
    """Poll ``condition`` (a callable) until it holds, failing after DEADLINE seconds."""
    deadline = time.monotonic() + DEADLINE
    tick = threading.Event()
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        tick.wait(0.01)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    require_service("redis", 6379)
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"{RUN_ID}_{uuid.uuid4().hex[:8]}"


def process_cache(
    server: RedisServer, prefix: str, counter: RedisCounter, **options: float
) -> IdentityCache:
    """One "process": a cache with connections of its own to ``server``, counted by ``counter``."""
    region = counted_redis_region(counter, server.url, socket_timeout=SOCKET_TIMEOUT)
    options.setdefault("exit_flush_timeout", 0)  # the test run's own exit never waits on these
    return register_all(IdentityCache(region, prefix=prefix, **options))  # type: ignore[arg-type]


@pytest.fixture
def database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'journal.sqlite'}"
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    with sessionmaker(engine)() as s:
        s.add_all([User(id=pk, name=f"u{pk}") for pk in (1, 2)])
        s.commit()
    engine.dispose()
    return url


def sessions(cache: IdentityCache, database: str) -> sessionmaker[CachingSession]:
    return sessionmaker(create_engine(database), class_=CachingSession, cache=cache)


def name_of(Session: sessionmaker[CachingSession], pk: int) -> str:  # noqa: N803
    with Session() as s:
        return s.get(User, pk).name  # type: ignore[union-attr]


def journal_while_hung(server: RedisServer, Session: sessionmaker[CachingSession]) -> None:  # noqa: N803
    """Rename user 1 while the server hangs: the read times out and opens the breaker, the
    commit's eviction is bypassed and journaled, nothing reaches the server."""
    server.pause()
    try:
        with Session() as s:
            s.get(User, 1).name = "changed"  # type: ignore[union-attr]
            s.commit()
    finally:
        server.resume()


def test_an_eviction_journaled_during_an_outage_reaches_redis_without_another_read(
    server, prefix, database
):
    counter = RedisCounter()
    writer = process_cache(server, prefix, counter, breaker_cooldown=1.0)
    reader = process_cache(server, prefix, RedisCounter())
    Writer, Reader = sessions(writer, database), sessions(reader, database)  # noqa: N806
    assert name_of(Reader, 1) == "u1"  # cached
    gate = writer.guarded.delivery_wait = Gate()

    journal_while_hung(server, Writer)

    assert gate.wait_for_calls(1), "no delivery thread is waiting to deliver the journal"
    assert gate.waits[0] <= 1.0  # the breaker's cooldown at most: its probe, not later
    assert writer.stats()["journal"] == {"keys": 1, "models": 0}
    assert name_of(Reader, 1) == "u1"  # Redis is back: the other process still reads the old row
    thread = writer.guarded._delivery
    assert thread is not None and thread.name == "sa_cache-journal" and thread.daemon
    wait_until(lambda: writer.breaker.retry_in() == 0, "the breaker to let a probe through")
    writer.store.client.ping()  # type: ignore[attr-defined]  # reconnected: no handshake counted
    with expect_commands(counter, {"SET": 1}, round_trips=1):  # the writer does not read
        gate.release()
        thread.join(DEADLINE)
    assert not thread.is_alive()  # the journal is empty: the thread is done
    assert writer.stats()["journal"] == {"keys": 0, "models": 0}
    assert writer.guarded._delivery is None
    assert name_of(Reader, 1) == "changed"


def test_the_delivery_thread_sends_nothing_while_the_breaker_refuses(server, prefix, database):
    counter = RedisCounter()
    writer = process_cache(server, prefix, counter, breaker_cooldown=30)
    Writer = sessions(writer, database)  # noqa: N806
    name_of(Writer, 1)
    gate = writer.guarded.delivery_wait = Gate()
    journal_while_hung(server, Writer)
    assert gate.wait_for_calls(1)
    assert 25 < gate.waits[0] <= 30  # it asked to wait for the breaker's probe
    bypassed = writer.stats()["bypassed"]
    try:
        with expect_commands(counter, {}):  # woken early: the open breaker refuses it
            gate.release()
            assert gate.wait_for_calls(2)
        assert writer.stats()["bypassed"] == bypassed + 1
        assert writer.stats()["journal"] == {"keys": 1, "models": 0}
    finally:
        writer.guarded.delivery_wait = time.sleep
        assert writer.deliver_evictions(DEADLINE)  # an explicit delivery does not wait for it
        gate.release()
    assert name_of(Writer, 1) == "changed"


def test_an_eviction_journaled_while_a_delivery_is_under_way_is_delivered_too(
    server, prefix, database
):
    writer = process_cache(server, prefix, RedisCounter(), breaker_cooldown=0)
    reader = process_cache(server, prefix, RedisCounter())
    Writer, Reader = sessions(writer, database), sessions(reader, database)  # noqa: N806
    assert [name_of(Reader, 1), name_of(Reader, 2)] == ["u1", "u2"]
    gate = writer.guarded.delivery_wait = Gate()
    journal_while_hung(server, Writer)
    assert gate.wait_for_calls(1)
    store = writer.store
    write_many = store.write_many
    model = writer.model_for(User.__mapper__)
    assert model is not None
    plain = sessionmaker(create_engine(database))

    def commit_again_once_the_write_landed(writes):
        """The delivery's write lands, the reader caches user 1 again; then another thread
        of the writer commits user 1 and user 2 and its evictions fail: journaled while the
        delivery has not yet forgotten what it sent."""
        store.write_many = write_many
        write_many(writes)
        assert name_of(Reader, 1) == "changed"  # filled after the delivered tombstone
        with plain() as s:
            s.get(User, 1).name = "changed again"
            s.get(User, 2).name = "changed too"
            s.commit()
        keys = {model.keys.row_key((pk,)): model for pk in (1, 2)}
        writer.guarded._journal_evictions(keys, set())

    store.write_many = commit_again_once_the_write_landed
    thread = writer.guarded._delivery
    assert thread is not None
    gate.release()
    assert gate.wait_for_calls(2), "the thread stopped with evictions still journaled"
    assert thread.is_alive() and writer.guarded._delivery is thread
    assert set(writer.guarded.journal()[0]) == {model.keys.row_key((pk,)) for pk in (1, 2)}
    gate.release()
    thread.join(DEADLINE)
    assert writer.guarded.journal() == ({}, set())
    assert [name_of(Reader, 1), name_of(Reader, 2)] == ["changed again", "changed too"]


def test_without_a_hook_the_journal_is_delivered_once_redis_answers(server, prefix, database):
    writer = process_cache(server, prefix, RedisCounter(), breaker_cooldown=0.1)
    reader = process_cache(server, prefix, RedisCounter())
    Writer, Reader = sessions(writer, database), sessions(reader, database)  # noqa: N806
    assert name_of(Reader, 1) == "u1"
    journal_while_hung(server, Writer)
    wait_until(lambda: writer.guarded.journal() == ({}, set()), "the background delivery")
    assert name_of(Reader, 1) == "changed"


def fork(child: Callable[[Callable[[], None]], bool]) -> tuple[int, int]:
    """Fork. The child runs ``child(signal)`` and exits 0 if it returns True, 3 if False, 1 if it
    raises, with no test machinery after it (``os._exit``). The parent gets the child's pid and
    a file descriptor that turns readable when the child calls ``signal()``."""
    ready, done = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(ready)
            status = 0 if child(lambda: os.write(done, b"!") and None) else 3
        finally:
            os._exit(status)
    os.close(done)
    return pid, ready


def signalled(ready: int) -> bool:
    try:
        return bool(select.select([ready], [], [], DEADLINE)[0] and os.read(ready, 1) == b"!")
    finally:
        os.close(ready)


def exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def journal_empty_within_deadline(cache: IdentityCache) -> bool:
    """For a forked child, where no test helper runs: poll with a deadline."""
    deadline = time.monotonic() + DEADLINE
    while cache.guarded.journal() != ({}, set()) and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    return cache.guarded.journal() == ({}, set())


@pytest.mark.parametrize("then", ["journals", "reads"])
def test_a_forked_child_delivers_the_journal_it_inherited(server, prefix, database, then):
    writer = process_cache(server, prefix, RedisCounter(), breaker_cooldown=0.2)
    reader = process_cache(server, prefix, RedisCounter())
    Writer, Reader = sessions(writer, database), sessions(reader, database)  # noqa: N806
    assert name_of(Reader, 1) == "u1"
    gate = writer.guarded.delivery_wait = Gate()  # the parent's thread stays waiting
    journal_while_hung(server, Writer)
    assert gate.wait_for_calls(1)
    server.pause()

    def child(signal: Callable[[], None]) -> bool:
        writer.guarded.delivery_wait = time.sleep  # the parent's gate is not the child's
        if then == "journals":
            writer.evict(User, 2)  # bypassed or timed out: journaled in the child
        else:
            assert name_of(sessions(writer, database), 2) == "u2"  # its replay fails first
        signal()
        return journal_empty_within_deadline(writer)

    pid, ready = fork(child)
    try:
        assert signalled(ready), f"the child did not get as far as it {then}"
    finally:
        server.resume()
    assert exit_code(pid) == 0, "the child did not deliver its journal"
    assert name_of(Reader, 1) == "changed"
    assert len(gate.waits) == 1  # the parent's thread is still waiting: the child delivered
    thread = writer.guarded._delivery
    assert thread is not None
    writer.guarded.delivery_wait = time.sleep
    gate.release()  # the parent delivers its own copy too: a fresh tombstone again, harmless
    thread.join(DEADLINE)
    assert writer.guarded.journal() == ({}, set())


def test_a_child_forked_while_its_parent_probes_is_not_locked_out_of_the_store(
    server, prefix, database
):
    writer = process_cache(server, prefix, RedisCounter(), breaker_cooldown=0.2)
    Writer = sessions(writer, database)  # noqa: N806
    name_of(Writer, 1)
    gate = writer.guarded.delivery_wait = Gate()
    journal_while_hung(server, Writer)
    assert gate.wait_for_calls(1)
    store = writer.store
    write_many = store.write_many
    probing, finish = threading.Event(), threading.Event()

    def held_probe(writes):  # the parent's delivery, the breaker's one probe, in flight
        probing.set()
        assert finish.wait(DEADLINE)
        return write_many(writes)

    store.write_many = held_probe
    wait_until(lambda: writer.breaker.retry_in() == 0, "the breaker to let a probe through")
    gate.release()
    assert probing.wait(DEADLINE)

    def child(signal: Callable[[], None]) -> bool:
        store.write_many = write_many  # the parent's probe never reports back here
        writer.guarded.delivery_wait = time.sleep
        signal()
        name_of(sessions(writer, database), 2)  # replays the journal: a probe of its own
        return journal_empty_within_deadline(writer)

    pid, ready = fork(child)
    try:
        assert signalled(ready)
        assert exit_code(pid) == 0, "the child never got a probe through"
    finally:
        writer.guarded.delivery_wait = time.sleep
        finish.set()
    thread = writer.guarded._delivery
    if thread is not None:
        thread.join(DEADLINE)
    assert writer.guarded.journal() == ({}, set())


def run_script(
    server: RedisServer, prefix: str, database: str, exit_flush_timeout: float
) -> subprocess.Popen[str]:
    """Start tests/journal_exit_script.py while the server hangs; return once it has journaled
    its eviction of user 1. It exits when it reads a line."""
    script = subprocess.Popen(
        [sys.executable, "-m", "tests.journal_exit_script", server.url, database, prefix, "1",
         str(exit_flush_timeout)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert script.stdout is not None
    line = script.stdout.readline()
    assert line == "journaled\n", script.communicate(timeout=DEADLINE)[1]
    return script


def test_a_script_that_exits_during_an_outage_flushes_its_journal_when_redis_is_back_in_time(
    server, prefix, database
):
    reader = process_cache(server, prefix, RedisCounter())
    Reader = sessions(reader, database)  # noqa: N806
    assert name_of(Reader, 1) == "u1"
    server.pause()
    try:
        script = run_script(server, prefix, database, exit_flush_timeout=DEADLINE)
        assert script.stdin is not None
        script.stdin.write("exit\n")
        script.stdin.flush()
    finally:
        server.resume()  # about when the script's flush at exit begins
    _, stderr = script.communicate(timeout=DEADLINE + 5)
    assert script.returncode == 0, stderr
    assert "ERROR" not in stderr
    assert name_of(Reader, 1) == journal_exit_script.NEW_NAME


@pytest.mark.parametrize("exit_flush_timeout", [0.3, 0])
def test_a_script_that_cannot_flush_at_exit_logs_one_error_naming_models_not_keys(
    server, prefix, database, exit_flush_timeout
):
    """At 0.3 s the server is still hung when the bound runs out; at 0 it is back before the
    script exits, but nothing is tried at exit, and the line is logged all the same."""
    reader = process_cache(server, prefix, RedisCounter())
    Reader = sessions(reader, database)  # noqa: N806
    assert name_of(Reader, 1) == "u1"
    server.pause()
    try:
        script = run_script(server, prefix, database, exit_flush_timeout)
        if exit_flush_timeout == 0:
            server.resume()
        started = time.monotonic()
        _, stderr = script.communicate("exit\n", timeout=DEADLINE)
        took = time.monotonic() - started
    finally:
        if server.paused:
            server.resume()
    assert script.returncode == 0, stderr
    assert took < exit_flush_timeout + 5  # the bound, a socket timeout, the interpreter's exit
    errors = [line for line in stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, stderr
    assert errors[0].startswith(
        "ERROR:sa_cache:sa_cache: 1 row eviction(s) (models: User) and 0 whole-model eviction(s)"
    )
    assert "stale until their TTL" in errors[0] and "sa-cache evict" in errors[0]
    assert prefix not in stderr and journal_exit_script.NEW_NAME not in stderr
    assert "u1" not in stderr
    if exit_flush_timeout == 0:  # nothing was sent: still stale, as the line says
        assert name_of(Reader, 1) == "u1"
