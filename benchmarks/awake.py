"""How long a loopback round trip takes depends on whether the machine's CPUs were idle: in a
virtual machine whose idle vCPUs halt (this one's kernel runs ``cpuidle_haltpoll`` with
``haltpoll.guest_halt_poll_ns=0``: no polling before halting), every round trip to a server
sleeping on another vCPU pays that vCPU's wake-up, about ten times the round trip itself. On a
busy machine nobody pays it. A Redis hit and a raw GET share the round trip, so their ratio
swings with it: the same code measures far closer to the GET on an idle machine than on a busy
one, and the miss against an uncached lookup likewise.

``python -m benchmarks.awake`` measures a raw ``MGET`` round trip on one held connection both
ways: as the machine is, and with :func:`cpus_kept_awake` (one process spinning at the lowest
priority, which any runnable work preempts, so a vCPU never halts). As the machine is, a round
trip pays the wake-up only when the client and the server run on different vCPUs, which the
scheduler decides: rounds of one run can differ tenfold. The read
benchmarks take ``--awake`` to run with it (``benchmarks.readshapes``, ``benchmarks.missratio``),
so both regimes can be reported.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from .env import REDIS_URL, TIMEOUT

SPIN = "while True: pass"


@contextlib.contextmanager
def cpus_kept_awake() -> Iterator[None]:
    """One busy process at nice 19 for the duration: it takes only what nothing else wants."""
    spinner = subprocess.Popen(
        [sys.executable, "-c", SPIN], preexec_fn=lambda: os.nice(19)
    )  # fmt: skip
    try:
        time.sleep(0.2)  # scheduled at least once before the measurement starts
        yield
    finally:
        spinner.kill()
        spinner.wait()


def regime(args: list[str]) -> tuple[list[str], contextlib.AbstractContextManager[None]]:
    """``args`` without ``--awake``, and what to measure in: :func:`cpus_kept_awake` where
    ``--awake`` was given, the machine as it is otherwise."""
    if "--awake" in args:
        return [a for a in args if a != "--awake"], cpus_kept_awake()
    return args, contextlib.nullcontext()


def round_trip_us(samples: int = 3000) -> float:
    """The median round trip of an ``MGET`` of two absent keys, sent raw on a held connection."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=TIMEOUT)
    conn = client.connection_pool.get_connection()
    packed = conn.pack_commands([("MGET", "sa_cache_awake:a", "sa_cache_awake:b")])
    timings = []
    for i in range(samples + 200):
        started = time.perf_counter()
        conn.send_packed_command(packed)
        conn.read_response()
        if i >= 200:  # after a warm-up
            timings.append(time.perf_counter() - started)
    client.connection_pool.release(conn)
    client.close()
    return statistics.median(timings) * 1e6


def halt_polling() -> str:
    """The guest's halt-polling setting, where the kernel shows it."""
    path = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    try:
        return f"guest_halt_poll_ns={path.read_text().strip()}"
    except OSError:
        return "no haltpoll module"


def main() -> None:
    # the idle rounds first: a spinner can leave the client and the server scheduled on one
    # vCPU after it ends, where a round trip wakes no other vCPU at all
    idle = [round_trip_us() for _ in range(3)]
    with cpus_kept_awake():
        awake = [round_trip_us() for _ in range(3)]
    print(f"halt polling: {halt_polling()}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'raw MGET round trip, held connection':40} {'median us, 3 rounds':>30}")
    for name, rounds in (("as the machine is", idle), ("CPUs kept awake", awake)):
        print(f"{'  ' + name:40} {'  '.join(f'{us:8.1f}' for us in rounds):>30}")


if __name__ == "__main__":
    main()
