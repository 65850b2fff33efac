"""The project's front door: the README quick start runs as pasted, the demo tells the truth, and
CI runs exactly the README's test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sa_cache import demo
from sa_cache.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_readme_quick_start_runs_as_pasted(tmp_path):
    block = re.search(r"## Quick start\n+```python\n(.*?)```", README, re.S)
    assert block is not None
    script = tmp_path / "quickstart.py"
    script.write_text(block.group(1))
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "ada@example.org"
    assert lines[-1].startswith("{'hits': 2, 'misses': 3, 'fills': 3, 'evictions': 2, 'errors': 0")


def test_the_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    commands = re.search(r"```bash\n(.*?)```", README, re.S)
    assert commands is not None
    lines = [line for line in commands.group(1).splitlines() if line and not line.startswith("#")]
    assert len(lines) == 2
    assert "sa-cache demo" in lines[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert lines[1] in ci


def test_the_demo_reports_what_the_cache_did_at_each_step():
    steps = {step.name: step for step in demo.run()}
    assert steps["get(User, 1): cold, a miss"].sql == 1
    assert steps["get(User, 1): warm, a hit"].sql == 0
    assert steps["get(User, 1): warm, a hit"].outcome == "hits 1"
    assert "evictions 1" in steps["update email of user 1 + commit"].outcome
    assert steps["get(User, 1): after the commit, a miss"].sql == 1
    assert steps["get_many(User, 1..10)"].sql == 1
    assert steps["get_many(User, 1..10) again"].sql == 0
    assert "evictions" not in steps["update user 2, then roll back"].outcome
    assert steps["get(User, 2): still cached"].sql == 0
    assert steps["get(User, 404): absent, from the cache"].sql == 0


def test_the_demo_command_prints_the_table():
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 0, result.output
    assert "SQLite (temporary file) + in-process cache" in result.output
    assert re.search(r"get\(User, 1\): warm, a hit\s+0\s+hits 1", result.output)


def test_the_demo_runs_the_same_scenario_against_servers(engine, db):
    from .conftest import REDIS_URL, require_service

    if db == "sqlite":
        pytest.skip("the embedded default is covered above")
    require_service("redis", 6379)
    url = engine.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(main, ["demo", "--db-url", url, "--redis-url", REDIS_URL])
    assert result.exit_code == 0, result.output
    assert "+ Redis" in result.output
    assert re.search(r"get\(User, 1\): warm, a hit\s+0\s+hits 1", result.output)
    assert re.search(r"get_many\(User, 1\.\.10\) again\s+0\s+hits 10", result.output)
