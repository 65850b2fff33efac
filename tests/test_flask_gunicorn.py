"""The example application served by gunicorn with several worker processes against Redis: a
change made through one worker is served by every other worker on its next request, and
``sa-cache stats`` sums the counters of all of them."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
from click.testing import CliRunner

from sa_cache.cli import main

from .conftest import REDIS_URL, require_service
from .flask_support import (
    EXAMPLE_MODULE,
    EXAMPLES,
    FAST_HASH,
    PASSWORDS,
    close_app,
    make_example_app,
    new_prefix,
)
from .flask_support import reset_database as seed_database
from .redis_server import free_port

WORKERS = 3
DEADLINE = 30.0  # seconds for any one phase; the whole test takes a few


class Server:
    def __init__(self, port: int) -> None:
        self.port = port

    def request(self, method: str, path: str, cookie: str | None = None, form=None):
        body = urlencode(form, doseq=True) if form is not None else None
        headers = {"Connection": "close"}
        if cookie:
            headers["Cookie"] = cookie
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body, headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        assert response.status < 500, data
        return response.status, response, data

    def login(self, email: str) -> str:
        status, response, _ = self.request(
            "POST", "/login", form={"email": email, "password": PASSWORDS[email]}
        )
        assert status == 302
        return response.getheader("Set-Cookie").split(";")[0]


def wait_for_port(port: int, process: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        assert process.poll() is None, "gunicorn exited"
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)  # polling a port with a deadline, not ordering anything
    raise AssertionError(f"gunicorn did not listen on {port}")


def control_socket_option(gunicorn: Path) -> bool:
    """Newer gunicorns open a control socket in ~/.gunicorn, shared by concurrent runs: not here."""
    done = subprocess.run([str(gunicorn), "--help"], capture_output=True, text=True, timeout=30)
    return "--no-control-socket" in done.stdout


def test_a_change_through_one_worker_is_served_by_all_the_others(tmp_path: Path):
    require_service("redis", 6379)
    gunicorn = Path(sys.executable).parent / "gunicorn"
    if not gunicorn.exists():
        pytest.skip("gunicorn is not installed (pip install -e '.[dev]')")
    url = f"sqlite:///{tmp_path}/gunicorn.sqlite"
    prefix = new_prefix()
    setup = make_example_app(url, SA_CACHE_PREFIX=prefix)
    seed_database(setup)
    close_app(setup)
    port = free_port()
    env = {
        **os.environ,
        "FLASK_SQLALCHEMY_DATABASE_URI": url,
        "FLASK_SA_CACHE_URL": REDIS_URL,
        "FLASK_SA_CACHE_PREFIX": prefix,
        "FLASK_SA_CACHE_STATS_INTERVAL": "0.2",
        "FLASK_SECRET_KEY": "gunicorn-test",
        "FLASK_PASSWORD_HASH_METHOD": FAST_HASH,
    }
    log = (tmp_path / "gunicorn.log").open("wb")
    process = subprocess.Popen(
        [
            str(gunicorn),
            "--workers",
            str(WORKERS),
            "--bind",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "5",
            *(["--no-control-socket"] if control_socket_option(gunicorn) else []),
            "--pythonpath",
            str(EXAMPLES),
            f"{EXAMPLE_MODULE}:create_app()",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, process, time.monotonic() + DEADLINE)
        server = Server(port)
        bob = server.login("bob@example.com")
        alice = server.login("alice@example.com")

        # 1. warm: every worker serves bob, from the shared cache after the first fill
        warm: dict[str, int] = {}
        zero_sql: set[str] = set()
        deadline = time.monotonic() + DEADLINE
        while len(zero_sql) < WORKERS and time.monotonic() < deadline:
            status, response, data = server.request("GET", "/me", bob)
            assert status == 200 and json.loads(data)["email"] == "bob@example.com"
            pid = response.getheader("X-Worker-Pid")
            warm[pid] = warm.get(pid, 0) + 1
            if response.getheader("X-SQL-Statements") == "0":
                zero_sql.add(pid)
        assert len(zero_sql) >= 2, f"only workers {sorted(warm)} answered"

        # 2. the change, through whichever worker takes it
        status, response, data = server.request(
            "POST", "/admin/users/2", alice, form={"email": "bob.new@example.com"}
        )
        assert status == 200 and json.loads(data)["email"] == "bob.new@example.com"
        changed_by = response.getheader("X-Worker-Pid")

        # 3. every worker's next request serves it, including the warm ones that did not change it
        seen: set[str] = set()
        deadline = time.monotonic() + DEADLINE
        while (len(seen) < 2 or not seen - {changed_by}) and time.monotonic() < deadline:
            status, response, data = server.request("GET", "/me", bob)
            assert status == 200
            assert json.loads(data)["email"] == "bob.new@example.com"
            seen.add(response.getheader("X-Worker-Pid"))
        assert seen - {changed_by} and seen & set(zero_sql), (seen, changed_by)

        # 4. deactivation logs bob out of every worker on his next request there
        server.request("POST", "/admin/users/2", alice, form={"active": "0"})
        logged_out: set[str] = set()
        deadline = time.monotonic() + DEADLINE
        while len(logged_out) < 2 and time.monotonic() < deadline:
            status, response, _ = server.request("GET", "/me", bob)
            assert status == 302
            logged_out.add(response.getheader("X-Worker-Pid"))
        assert len(logged_out) >= 2

        # 5. stats sums the counters every worker published
        hits_at_least = sum(warm.values()) - 1
        args = ["stats", "--json", "--redis-url", REDIS_URL, "--prefix", prefix]
        deadline = time.monotonic() + DEADLINE
        while True:
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 0, result.output
            stats = json.loads(result.output)
            evictions = stats["models"].get("User", {}).get("evictions", 0)
            if stats["processes"] >= 2 and stats["hits"] >= hits_at_least and evictions >= 2:
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)  # waiting for the workers' next publication, bounded
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()
        CliRunner().invoke(main, ["flush", "--redis-url", REDIS_URL, "--prefix", prefix])
    output = (tmp_path / "gunicorn.log").read_text()
    assert "Traceback" not in output, output
