"""``python -m benchmarks [--quick] [--output DIR] [--databases sqlite,postgresql,mariadb]``.

Writes ``<DIR>/<date>.md`` (``<date>-quick.md`` with --quick), the same name with ``.png`` (the
chart) and ``.json`` (every figure). DIR defaults to ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine

from . import env, micro, paths, profiling, report, web
from .models import USERS, User, populate

RESULTS = Path(__file__).resolve().parent / "results"


def _plain(measures: dict[str, micro.Measure]) -> dict[str, Any]:
    return {
        key: {
            "median": m.median,
            "rounds": m.rounds,
            "round_trips": m.round_trips,
            "extra": m.extra,
        }
        for key, m in measures.items()
    }


def _log(message: str, started: float) -> None:
    print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)


def run_database(
    db: str, tmpdir: str, settings: micro.Settings, rng: random.Random, started: float,
    with_profile: bool,
) -> tuple[dict[str, Any], dict[str, Any] | None]:  # fmt: skip
    url = env.database_url(db, tmpdir)
    engine = create_engine(url)
    out: dict[str, Any] = {}
    profile = None
    bench = None
    try:
        populate(engine)
        _log(f"{db}: {USERS} users written", started)
        bench = micro.Bench(db, engine, settings, rng)
        bench.warm()
        _log(f"{db}: caches warm", started)
        fresh, reused = bench.hits()
        out["hit"], out["hit_reused"] = _plain(fresh), _plain(reused)
        _log(f"{db}: hits", started)
        out["miss"] = _plain(bench.misses())
        _log(f"{db}: misses", started)
        out["get_many"] = {str(n): _plain(m) for n, m in bench.get_many().items()}
        _log(f"{db}: get_many", started)
        out["payload"] = bench.payload()
        if with_profile:
            d = bench.paths["d"]
            assert isinstance(d, paths.SaCacheRedis)
            profile = profiling.profile(d, bench.ids, settings.quick)
            profile["db"] = db
            _log(f"{db}: profile", started)
        out["commit"] = {str(n): _plain(m) for n, m in bench.commits().items()}
        _log(f"{db}: commits", started)
        web_results = web.run(url, db, settings.quick, rng)
        out["web"] = {
            name: {
                "rps": w.median_rps,
                "rps_rounds": w.rps,
                "sql_per_request": w.sql_per_request,
                "cold_sql_per_request": w.cold_sql_per_request,
                "errors": w.errors,
            }
            for name, w in web_results.items()
        }
        out["web"].update(web.describe(settings.quick))
        _log(f"{db}: Flask-Login requests", started)
    finally:
        if bench is not None:
            bench.close()
        engine.dispose()
        env.drop_database(db)
    return out, profile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run: SQLite, few rounds")
    parser.add_argument("--output", type=Path, default=RESULTS, help="directory for results")
    parser.add_argument("--databases", help="comma-separated: sqlite,postgresql,mariadb")
    parser.add_argument(
        "--from-json", type=Path, help="only render the .md and .png again from a saved .json"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        write(saved, args.from_json.parent, args.from_json.stem)
        return 0
    settings = micro.Settings.make(args.quick)
    if args.databases:
        wanted = [d.strip() for d in args.databases.split(",") if d.strip()]
    else:
        wanted = ["sqlite"] if args.quick else ["sqlite", "postgresql", "mariadb"]
    if not env.port_open(6379):
        print("Redis is not running on 127.0.0.1:6379", file=sys.stderr)
        return 2
    started = time.monotonic()
    load_before = os.getloadavg()
    rng = random.Random(42)
    notes = []
    databases: dict[str, Any] = {}
    profile = None
    with tempfile.TemporaryDirectory(prefix="sa_cache_bench_") as tmpdir:
        for db in wanted:
            if not env.available(db):
                notes.append(f"{db} was not running on 127.0.0.1: left out of this run.")
                _log(f"{db}: not running, skipped", started)
                continue
            want_profile = profile is None and (db == "postgresql" or len(wanted) == 1)
            databases[db], got = run_database(db, tmpdir, settings, rng, started, want_profile)
            profile = profile or got
    if not databases:
        print("no database available", file=sys.stderr)
        return 2
    today = dt.date.today().isoformat()
    results = {
        "meta": {
            "date": today,
            "quick": args.quick,
            "command": "python -m benchmarks" + (" --quick" if args.quick else ""),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
            "users": USERS,
            "columns": [type(c.type).__name__ for c in User.__table__.columns],
            "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "python": platform.python_version(),
            "sqlalchemy": version("SQLAlchemy"),
            "redis": version("redis"),
            "dogpile": version("dogpile.cache"),
            "flask_caching": version("Flask-Caching"),
            "settings": dataclasses.asdict(settings),
            "seconds": time.monotonic() - started,
            "notes": notes,
        },
        "databases": databases,
        "profile": profile,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    stem = today + ("-quick" if args.quick else "")
    (args.output / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    md, png = write(results, args.output, stem)
    _log(f"wrote {md} and {png}", started)
    return 0


def write(results: dict[str, Any], directory: Path, stem: str) -> tuple[Path, Path]:
    md = directory / f"{stem}.md"
    png = directory / f"{stem}.png"
    report.chart(results, png)
    md.write_text(report.markdown(results) + f"\n![chart]({png.name})\n")
    return md, png


if __name__ == "__main__":
    sys.exit(main())
