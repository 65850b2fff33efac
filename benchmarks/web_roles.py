"""The roles-and-abilities web benchmark: ``python -m benchmarks.web_roles [--quick]``.

For each database (PostgreSQL and MariaDB; their own database ``sa_cache_bench_web``), the
application of :mod:`benchmarks.roles_app` runs under gunicorn (4 sync workers, pool_size=5,
max_overflow=10) in its three variants at once: no cache, Flask-Caching ``memoize`` of the user
loader, sa_cache. 50 concurrent clients (asyncio, one connection per request, as gunicorn's sync
workers close each one) request the login-required ``/abilities`` page as users picked at random;
bursts of each variant alternate, in a shuffled order each round, so that the machine's noise is
shared. Measured per variant: requests per second, p50/p99 latency, errors, SQL statements, pool
checkouts and transactions per request (the app's response headers), and the mean number of
connections idle in a transaction during the variant's bursts (``pg_stat_activity``;
``information_schema.innodb_trx`` joined to ``processlist`` on MariaDB), sampled every 20 ms
(150 ms on MariaDB).

Also measured: the CPU time the workers spent per request (from /proc, so the machine's other
load does not count). ``--quick``: 2 workers, 8 clients, 1 s bursts, for the smoke test.

Writes ``benchmarks/results/web-roles-<date>.json`` and ``.md`` (``--output DIR`` elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.databases import SERVERS, create_database, drop_database

from . import env
from .roles_app import VARIANTS, populate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DB_NAME = "sa_cache_bench_web"
WORKERS = 4
CLIENTS = 50
#: seconds between two idle-in-transaction samples. InnoDB refreshes what innodb_trx shows only
#: when nobody read it for 100 ms: sampled more often, MariaDB reports nothing at all
SAMPLE_EVERY = {"postgresql": 0.02, "mariadb": 0.15}
LABELS = {
    "none": "no cache",
    "memoize": "Flask-Caching memoize",
    "sa_cache": "sa_cache",
}
IDLE_IN_TRANSACTION = {
    "postgresql": "SELECT count(*) FROM pg_stat_activity"
    " WHERE datname = :db AND state = 'idle in transaction'",
    "mariadb": "SELECT count(*) FROM information_schema.innodb_trx t"
    " JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id"
    " WHERE p.db = :db AND p.command = 'Sleep'",
}


@dataclass
class Settings:
    users: int  # rows in bench_users
    logged_in: int  # users the clients request as
    warm_passes: int  # at most, per variant: passes over the logged-in users until one sends no SQL
    rounds: int
    burst: float  # seconds per variant and round
    trials: int  # staleness trials (benchmarks/staleness.py) against the sa_cache variant
    clients: int = CLIENTS
    workers: int = WORKERS

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(
                users=100,
                logged_in=20,
                warm_passes=4,
                rounds=1,
                burst=1.0,
                trials=4,
                clients=8,
                workers=2,
            )
        return cls(users=5000, logged_in=500, warm_passes=6, rounds=5, burst=8.0, trials=100)


@dataclass
class VariantResult:
    rps: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    sql: int = 0
    checkouts: int = 0
    transactions: int = 0
    idle_samples: list[int] = field(default_factory=list)
    cpu_seconds: float = 0.0  # the gunicorn workers' CPU time during the timed bursts

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        n = max(self.requests, 1)
        return {
            "rps": statistics.median(self.rps) if self.rps else 0.0,
            "rps_rounds": [round(r, 1) for r in self.rps],
            "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
            "requests": self.requests,
            "errors": self.errors,
            "sql_per_request": self.sql / n,
            "checkouts_per_request": self.checkouts / n,
            "transactions_per_request": self.transactions / n,
            "idle_in_transaction_mean": (
                statistics.mean(self.idle_samples) if self.idle_samples else 0.0
            ),
            "idle_in_transaction_max": max(self.idle_samples, default=0),
            "worker_cpu_ms_per_request": 1000 * self.cpu_seconds / n,
        }


# -- gunicorn --------------------------------------------------------------------------------


def gunicorn_command(port: int, workers: int) -> list[str]:
    gunicorn = Path(sys.executable).parent / "gunicorn"
    help_text = subprocess.run(
        [str(gunicorn), "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    # newer gunicorns open a control socket in ~/.gunicorn, shared by concurrent runs: not here
    no_control = ["--no-control-socket"] if "--no-control-socket" in help_text else []
    return [
        str(gunicorn), "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
        "--graceful-timeout", "5", "--log-level", "warning", *no_control,
        "benchmarks.roles_app:create_app()",
    ]  # fmt: skip


class Server:
    """One variant of the application under gunicorn, its output in ``log``."""

    def __init__(
        self, variant: str, database_url: str, prefix: str, workers: int, log: Path,
        redis_url: str = env.REDIS_URL, **extra_env: str,
    ) -> None:  # fmt: skip
        from tests.redis_server import free_port

        self.variant = variant
        self.workers = workers
        self.port = free_port()
        self.log_path = log
        environ = {
            **os.environ,
            "BENCH_VARIANT": variant,
            "BENCH_DATABASE_URL": database_url,
            "BENCH_REDIS_URL": redis_url,
            "BENCH_CACHE_PREFIX": prefix,
            "PYTHONPATH": str(ROOT),
            **extra_env,
        }
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            gunicorn_command(self.port, workers),
            cwd=ROOT,
            env=environ,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not env.port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gunicorn ({variant}) did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)  # polling a port with a deadline

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the workers of this server have used so far."""
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended meanwhile
                continue
            if int(fields[1]) == self.proc.pid:  # ppid; utime and stime follow at 11 and 12
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def tracebacks(self) -> bool:
        return "Traceback" in self.log_path.read_text(errors="replace")


# -- the clients -----------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


async def fetch(
    port: int, path: str, cookie: str = "", method: str = "GET", form: str = ""
) -> Reply:
    """One request on its own connection (gunicorn's sync workers close it after the reply)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "User-Agent: sa_cache-bench",
                 "Connection: close"]  # fmt: skip
        if cookie:
            lines.append(f"Cookie: {cookie}")
        if method == "POST":
            lines += ["Content-Type: application/x-www-form-urlencoded",
                      f"Content-Length: {len(form)}"]  # fmt: skip
        writer.write(("\r\n".join(lines) + "\r\n\r\n" + form).encode())
        data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(status_line.split()[1]), headers, body)


async def login(port: int, user_id: int) -> str:
    reply = await fetch(port, f"/login/{user_id}")
    if reply.status != 200 or "set-cookie" not in reply.headers:
        raise RuntimeError(f"login as {user_id} failed: {reply.status}")
    return reply.headers["set-cookie"].split(";", 1)[0]


async def burst(
    port: int, cookies: list[str], clients: int, seconds: float | None, count: int | None,
    result: VariantResult | None, rng: random.Random,
) -> float:  # fmt: skip
    """``clients`` concurrent clients requesting ``/abilities`` for ``seconds`` (or ``count``
    requests in all); returns the requests per second."""
    done = 0
    deadline = time.monotonic() + seconds if seconds is not None else None

    async def client(index: int) -> None:
        nonlocal done
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return
            if count is not None:
                if done >= count:
                    return
                cookie = cookies[done % len(cookies)]
            else:
                cookie = rng.choice(cookies)
            done += 1
            started = time.perf_counter()
            try:
                reply = await fetch(port, "/abilities", cookie)
            except OSError:
                if result is not None:
                    result.errors += 1
                continue
            if result is None:
                continue
            result.latencies.append(time.perf_counter() - started)
            result.requests += 1
            if reply.status != 200:
                result.errors += 1
            result.sql += int(reply.headers.get("x-sql-statements", 0))
            result.checkouts += int(reply.headers.get("x-pool-checkouts", 0))
            result.transactions += int(reply.headers.get("x-transactions", 0))

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return done / (time.perf_counter() - started)


class IdleSampler:
    """Counts the connections idle in a transaction on the benchmark's database, every
    :data:`SAMPLE_EVERY` seconds, in a thread, between :meth:`start` and :meth:`stop`."""

    def __init__(self, db: str, database_url: str) -> None:
        self.engine = create_engine(database_url, isolation_level="AUTOCOMMIT", pool_size=1)
        self.query = text(IDLE_IN_TRANSACTION[db])
        self.every = SAMPLE_EVERY[db]
        self.name = make_url(database_url).database
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, into: list[int]) -> None:
        self.samples = into
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.engine.connect() as conn:
            while not self._stop.wait(self.every):
                self.samples.append(int(conn.execute(self.query, {"db": self.name}).scalar_one()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def close(self) -> None:
        self.engine.dispose()


# -- one database ----------------------------------------------------------------------------


def run_database(db: str, settings: Settings, rng: random.Random, log_dir: Path) -> dict[str, Any]:
    from .staleness import Trials  # which imports this module

    url = create_database(SERVERS[db], DB_NAME)
    servers: dict[str, Server] = {}
    sampler = None
    prefix = f"{env.RUN}_web_{db}"
    try:
        populate(url, settings.users)
        for variant in VARIANTS:
            log = log_dir / f"{db}-{variant}.log"
            servers[variant] = Server(variant, url, f"{prefix}_{variant}", settings.workers, log)
        sampler = IdleSampler(db, url)
        results = {variant: VariantResult() for variant in VARIANTS}
        staleness: dict[str, int] = {}
        ids = rng.sample(range(1, settings.users + 1), settings.logged_in)

        async def drive() -> None:
            first = servers["none"].port  # one secret key: a cookie works on every variant
            cookies = [await login(first, uid) for uid in ids]
            for server in servers.values():  # warm: each user once per pass, every variant
                for _ in range(settings.warm_passes if server.variant == "sa_cache" else 1):
                    warming = VariantResult()
                    await burst(server.port, cookies, settings.clients, None, len(cookies),
                                warming, rng)  # fmt: skip
                    if warming.sql == 0:
                        break
            for _ in range(settings.rounds):
                order = list(servers)
                rng.shuffle(order)
                for variant in order:
                    sampler.start(results[variant].idle_samples)
                    cpu = servers[variant].cpu_seconds()
                    try:
                        rps = await burst(servers[variant].port, cookies, settings.clients,
                                          settings.burst, None, results[variant], rng)  # fmt: skip
                    finally:
                        sampler.stop()
                    results[variant].rps.append(rps)
                    results[variant].cpu_seconds += servers[variant].cpu_seconds() - cpu
            trials = Trials(servers["sa_cache"], url, rng)
            try:
                trials.cookies = dict(zip(ids, cookies, strict=True))
                await trials.run(settings.trials, ids[:50])
            finally:
                trials.close()
            staleness.update(
                staleness_trials=settings.trials, staleness_answers=trials.answers,
                stale_answers=len(trials.stale),
            )  # fmt: skip

        asyncio.run(drive())
    finally:
        for server in servers.values():
            server.stop()
        if sampler is not None:
            sampler.close()
        client = env.counted_client(env.RoundTrips())
        env.delete_prefix(client, prefix)
        client.close()
        drop_database(SERVERS[db], DB_NAME)
    out = {variant: r.summary() for variant, r in results.items()}
    out["sa_cache"].update(staleness)
    for variant, server in servers.items():
        out[variant]["tracebacks"] = server.tracebacks()
    base = out["none"]["rps"] or float("nan")
    for variant in VARIANTS:
        out[variant]["rps_vs_none"] = out[variant]["rps"] / base
    return out


# -- the report ------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"# Roles-and-abilities web benchmark, {meta['date']}",
        "",
        f"`{meta['command']}` on {meta['machine']} (shared with other work and noisy: read the "
        f"ratios within one run, not the absolute figures), load average "
        f"{meta['load_average'][0]} before and {meta['load_average'][1]} after, "
        f"{meta['seconds']:.0f} s. gunicorn {meta['gunicorn']}, {meta['settings']['workers']} sync "
        f"workers per variant, pool_size=5 max_overflow=10, {meta['settings']['clients']} "
        f"concurrent clients, {meta['settings']['users']} users (1-3 roles each, roles with 2-5 "
        f"abilities), requests as {meta['settings']['logged_in']} of them at random, "
        f"{meta['settings']['rounds']} rounds of {meta['settings']['burst']} s per variant.",
        "",
    ]
    for db, variants in results["databases"].items():
        lines += [
            f"## {db}",
            "",
            "| variant | req/s | vs no cache | p50 ms | p99 ms | errors | SQL / req "
            "| checkouts / req | transactions / req | idle in transaction (mean / max) "
            "| worker CPU ms / req |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for variant, r in variants.items():
            lines.append(
                f"| {LABELS[variant]} | {_f(r['rps'], 0)} | {r['rps_vs_none']:.2f}x "
                f"| {_f(r['p50_ms'])} | {_f(r['p99_ms'])} | {r['errors']} "
                f"| {r['sql_per_request']:.2f} | {r['checkouts_per_request']:.2f} "
                f"| {r['transactions_per_request']:.2f} "
                f"| {r['idle_in_transaction_mean']:.2f} / {r['idle_in_transaction_max']} "
                f"| {r['worker_cpu_ms_per_request']:.1f} |"
            )
        lines.append("")
    lines += ["## Targets", "", "| target | measured | |", "|---|---|---|"]
    for db, variants in results["databases"].items():
        s = variants["sa_cache"]
        zero = (s["sql_per_request"], s["checkouts_per_request"], s["transactions_per_request"])
        lines.append(
            f"| {db}: warm sa_cache request: 0 SQL, 0 checkouts, 0 transactions "
            f"| {zero[0]:.2f} / {zero[1]:.2f} / {zero[2]:.2f} per request "
            f"| **{'met' if zero == (0, 0, 0) else 'missed'}** |"
        )
        lines.append(
            f"| {db}: a change to a user's roles or a role's abilities through one worker, seen "
            f"by every worker's next request ({s['staleness_trials']} trials) "
            f"| {s['stale_answers']} stale of {s['staleness_answers']} answers "
            f"| **{'met' if s['stale_answers'] == 0 else 'missed'}** |"
        )
        if db == "postgresql":
            lines.append(
                f"| {db}: sa_cache >= 2x the uncached req/s | {_f(s['rps'], 0)} vs "
                f"{_f(variants['none']['rps'], 0)} = {s['rps_vs_none']:.2f}x "
                f"| **{'met' if s['rps_vs_none'] >= 2 else 'missed'}** |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.web_roles", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--output", type=Path, default=RESULTS, help="directory for results")
    parser.add_argument("--databases", default="postgresql,mariadb", help="comma-separated")
    args = parser.parse_args(argv)
    settings = Settings.make(args.quick)
    if not env.port_open(6379):
        print("Redis is not running on 127.0.0.1:6379", file=sys.stderr)
        return 2
    started = time.monotonic()
    load_before = os.getloadavg()
    rng = random.Random(42)
    databases: dict[str, Any] = {}
    notes = []
    with tempfile.TemporaryDirectory(prefix="sa_cache_web_roles_") as tmp:
        for db in [d.strip() for d in args.databases.split(",") if d.strip()]:
            if not env.available(db):
                notes.append(f"{db} was not running on 127.0.0.1: left out of this run.")
                continue
            print(f"[{time.monotonic() - started:6.1f}s] {db}...", flush=True)
            databases[db] = run_database(db, settings, rng, Path(tmp))
    if not databases:
        print("no database available", file=sys.stderr)
        return 2
    today = dt.date.today().isoformat()
    results = {
        "meta": {
            "date": today,
            "command": "python -m benchmarks.web_roles" + (" --quick" if args.quick else ""),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
            "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "python": platform.python_version(),
            "gunicorn": version("gunicorn"),
            "flask_caching": version("Flask-Caching"),
            "sqlalchemy": version("SQLAlchemy"),
            "settings": asdict(settings),
            "seconds": time.monotonic() - started,
            "notes": notes,
        },
        "databases": databases,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    stem = f"web-roles-{today}" + ("-quick" if args.quick else "")
    (args.output / f"{stem}.json").write_text(json.dumps(results, indent=1))
    report = markdown(results)
    (args.output / f"{stem}.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
