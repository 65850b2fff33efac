"""``python -m benchmarks --quick`` completes and writes its results file and chart.

A smoke test of the benchmark harness only: it checks that every path runs, not the numbers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICK_BUDGET = 60  # seconds --quick is meant to take
TIMEOUT = 2 * QUICK_BUDGET  # headroom for a loaded machine; a hang still fails


def _redis_running() -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", 6379)) == 0


@pytest.mark.slow
def test_quick_benchmark_writes_results_and_chart(tmp_path: Path) -> None:
    pytest.importorskip("flask_caching")
    pytest.importorskip("matplotlib")
    if not _redis_running():
        if os.environ.get("CI") == "true":
            pytest.fail("Redis is not running on 127.0.0.1:6379")
        pytest.skip("Redis is not running on 127.0.0.1:6379 (scripts/test.sh starts it)")
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--output", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    reports = list(tmp_path.glob("*.md"))
    charts = list(tmp_path.glob("*.png"))
    assert len(reports) == 1 and len(charts) == 1, sorted(p.name for p in tmp_path.iterdir())
    text = reports[0].read_text()
    assert "## Targets" in text and "## Profile" in text
    for label in ("(a) no cache", "(b) Flask-Caching", "(c) dogpile", "(d) sa_cache Redis",
                  "(e) sa_cache in-process", "raw redis-py GET", "identity-map hit"):  # fmt: skip
        assert label in text
    assert "Flask-Login request" in text
    assert charts[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_event_loop_benchmark_runs_both_variants() -> None:
    """``python -m benchmarks.asyncio_loop`` at a tiny scale: both variants run and report."""
    if not _redis_running():
        if os.environ.get("CI") == "true":
            pytest.fail("Redis is not running on 127.0.0.1:6379")
        pytest.skip("Redis is not running on 127.0.0.1:6379 (scripts/test.sh starts it)")
    from benchmarks.asyncio_loop import measure

    for variant in ("awaited", "blocking"):
        figures = measure(variant, "redis://127.0.0.1:6379/0", tasks=5, lookups=3, miss_every=2)
        assert figures["steps"] > 0 and figures["lookups_per_s"] > 0


@pytest.mark.parametrize("store", ["cluster", "sentinel"])
def test_the_event_loop_benchmark_runs_on_a_cluster_and_a_sentinel(store: str) -> None:
    """The same at a tiny scale on the run's Cluster and Sentinel (``--store``)."""
    from benchmarks.asyncio_loop import measure

    from . import redis_sentinel
    from .conftest import require_redis_cluster

    url = require_redis_cluster().url if store == "cluster" else redis_sentinel.shared().url
    for variant in ("awaited", "blocking"):
        figures = measure(variant, url, tasks=5, lookups=3, miss_every=2)
        assert figures["steps"] > 0 and figures["lookups_per_s"] > 0


def test_the_roles_web_benchmark_runs_its_three_variants_in_a_quick_run(tmp_path: Path) -> None:
    """``python -m benchmarks.web_roles --quick`` on PostgreSQL: gunicorn serves the three
    variants without an error, and the warm sa_cache requests of the timed bursts sent no SQL,
    checked out no connection and began no transaction."""
    pytest.importorskip("flask_caching")
    if not _redis_running():
        if os.environ.get("CI") == "true":
            pytest.fail("Redis is not running on 127.0.0.1:6379")
        pytest.skip("Redis is not running on 127.0.0.1:6379 (scripts/test.sh starts it)")
    from .conftest import require_service

    require_service("postgresql", 5432)
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.web_roles", "--quick", "--databases", "postgresql",
         "--output", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (saved,) = tmp_path.glob("web-roles-*.json")
    (report,) = tmp_path.glob("web-roles-*.md")
    variants = json.loads(saved.read_text())["databases"]["postgresql"]
    assert sorted(variants) == ["memoize", "none", "sa_cache"]
    for figures in variants.values():
        assert figures["requests"] > 0 and figures["errors"] == 0
        assert not figures["tracebacks"]
    assert variants["none"]["sql_per_request"] >= 3  # the user, the roles, each role's abilities
    warm = variants["sa_cache"]
    assert (warm["sql_per_request"], warm["checkouts_per_request"],
            warm["transactions_per_request"]) == (0, 0, 0)  # fmt: skip
    assert "| sa_cache |" in report.read_text()


def test_the_awake_regime_spins_only_while_measuring() -> None:
    """``benchmarks.awake``: a round trip is measured, ``--awake`` is taken out of the
    arguments and turns the spinner on, and the spinner is gone once the block ends."""
    from benchmarks import awake

    if not _redis_running():
        pytest.fail("Redis is not running on 127.0.0.1:6379")
    assert awake.round_trip_us(samples=20) > 0
    args, measured_in = awake.regime(["/some/checkout", "--awake"])
    assert args == ["/some/checkout"]
    spinners_before = _spinners()
    with measured_in:
        assert len(_spinners()) == len(spinners_before) + 1
    assert _spinners() == spinners_before
    args, measured_in = awake.regime(["/some/checkout"])
    assert args == ["/some/checkout"]
    with measured_in:
        assert _spinners() == spinners_before


def _spinners() -> set[int]:
    """The processes running :data:`benchmarks.awake.SPIN` (by /proc, so no tool is needed)."""
    from benchmarks.awake import SPIN

    found = set()
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if SPIN.encode() in cmdline:
            found.add(int(entry.name))
    return found
