"""The Flask-Login request benchmark: the app of :mod:`benchmarks.flask_app`, cached (sa_cache on
Redis) and uncached, each served by gunicorn on 127.0.0.1, driven by a bounded number of requests
from a thread pool on loopback. Both servers run at once and bursts alternate between them."""

from __future__ import annotations

import http.client
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import env

ROOT = Path(__file__).resolve().parent.parent
CLIENT_THREADS = 4
WORKERS = 2


@dataclass
class WebResult:
    rps: list[float] = field(default_factory=list)
    sql_per_request: float = 0.0
    cold_sql_per_request: float = 0.0
    errors: int = 0

    @property
    def median_rps(self) -> float:
        return statistics.median(self.rps) if self.rps else float("nan")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, database_url: str, cache_url: str, prefix: str) -> None:
        self.port = _free_port()
        environ = dict(os.environ)
        environ.update(
            BENCH_DATABASE_URL=database_url, BENCH_CACHE=cache_url, BENCH_CACHE_PREFIX=prefix
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--workers",
                str(WORKERS),
                "--bind",
                f"127.0.0.1:{self.port}",
                "--log-level",
                "warning",
                "benchmarks.flask_app:create_app()",
            ],  # fmt: skip
            cwd=ROOT,
            env=environ,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}")
            if env.port_open(self.port):
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("gunicorn did not start within 20 s")

    def request(self, path: str, cookie: str | None = None) -> tuple[int, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            headers = {"User-Agent": "sa_cache-bench"}
            if cookie:
                headers["Cookie"] = cookie
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()

    def login(self, user_id: int) -> str:
        status, headers = self.request(f"/login/{user_id}")
        if status != 200 or "set-cookie" not in headers:
            raise RuntimeError(f"login failed: {status}")
        return headers["set-cookie"].split(";", 1)[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _burst(
    server: Server, cookies: list[str], count: int, pool: ThreadPoolExecutor
) -> tuple[float, list[int], int]:
    def one(i: int) -> tuple[int, int]:
        status, headers = server.request("/me", cookies[i % len(cookies)])
        return status, int(headers.get("x-sql-count", "-1"))

    start = time.perf_counter()
    replies = list(pool.map(one, range(count)))
    elapsed = time.perf_counter() - start
    errors = sum(1 for status, _ in replies if status != 200)
    return count / elapsed, [sql for _, sql in replies], errors


def run(database_url: str, db: str, quick: bool, rng: random.Random) -> dict[str, WebResult]:
    users = 20 if quick else 200
    rounds = 2 if quick else 7
    burst = 60 if quick else 600
    prefix = f"{env.RUN}_{db}_app"
    servers: dict[str, Server] = {}
    results = {"uncached": WebResult(), "cached": WebResult()}
    try:
        servers["uncached"] = Server(database_url, "", prefix)
        servers["cached"] = Server(database_url, env.REDIS_URL, prefix)
        ids = rng.sample(range(1, 10_001), users)
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            for name, server in servers.items():
                cookies = [server.login(uid) for uid in ids]
                server.cookies = cookies  # type: ignore[attr-defined]
                # the first request per user: a cache miss for the cached app
                _, sql, errors = _burst(server, cookies, len(cookies), pool)
                results[name].cold_sql_per_request = statistics.mean(sql)
                results[name].errors += errors
                _burst(server, cookies, len(cookies), pool)  # both apps warm
            for _ in range(rounds):
                order = list(servers)
                rng.shuffle(order)
                sqls: dict[str, list[int]] = {}
                for name in order:
                    server = servers[name]
                    rps, sql, errors = _burst(server, server.cookies, burst, pool)  # type: ignore[attr-defined]
                    results[name].rps.append(rps)
                    results[name].errors += errors
                    sqls.setdefault(name, []).extend(sql)
                for name, values in sqls.items():
                    results[name].sql_per_request = statistics.mean(values)
    finally:
        for server in servers.values():
            server.stop()
        client = env.counted_client(env.RoundTrips())
        env.delete_prefix(client, prefix)
        client.close()
    return results


def describe(quick: bool) -> dict[str, int]:
    return {
        "workers": WORKERS,
        "threads": CLIENT_THREADS,
        "users": 20 if quick else 200,
        "rounds": 2 if quick else 7,
        "burst": 60 if quick else 600,
    }
