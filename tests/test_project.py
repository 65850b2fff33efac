"""The project's front door: the README quick start runs as pasted, the demo tells the truth, and
CI runs exactly the README's test command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    commands = next((b for b in blocks if "sa-cache demo" in b), None)
    assert commands is not None
    lines = [line for line in commands.splitlines() if line and not line.startswith("#")]
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


def test_the_readme_flask_lines_run_and_match_the_extension_docstring():
    from sa_cache.integrations import flask as extension

    block = re.search(r"## Flask in three lines\n.*?```python\n(.*?)```", README, re.S)
    assert block is not None
    snippet = block.group(1)
    numbered = [line.split("#")[0].strip() for line in snippet.splitlines() if "# " in line]
    documented = [line.split("#")[0].strip() for line in (extension.__doc__ or "").splitlines()]
    for line in numbered[:3]:
        assert line in documented
    prelude = (
        "from flask import Flask\n"
        "from flask_login import LoginManager\n"
        "from flask_sqlalchemy import SQLAlchemy\n"
        "from sqlalchemy.orm import DeclarativeBase\n"
        "class Base(DeclarativeBase):\n    pass\n"
        "app = Flask('readme')\n"
        "app.config['SQLALCHEMY_DATABASE_URI'] = 'sqlite://'\n"
        "login_manager = LoginManager(app)\n"
    )
    model = (
        "db.init_app(app)  # the rest of your existing set-up\n"
        "from sqlalchemy import String\n"
        "from sqlalchemy.orm import Mapped, mapped_column\n"
        "class User(db.Model):\n"
        "    __tablename__ = 'readme_users'\n"
        "    id: Mapped[int] = mapped_column(primary_key=True)\n"
        "    email: Mapped[str] = mapped_column(String(100))\n"
    )
    # the three lines, then the application's models, then the loader that names one
    lines = snippet.splitlines(keepends=True)
    cut = max(i for i, line in enumerate(lines) if "# 3" in line) + 1
    source = prelude + "".join(lines[:cut]) + model + "".join(lines[cut:])
    namespace: dict[str, Any] = {}
    exec(compile(source, "README.md", "exec", dont_inherit=True), namespace)
    app, db, User = namespace["app"], namespace["db"], namespace["User"]  # noqa: N806
    with app.app_context():
        db.create_all()
        db.session.add(User(id=1, email="ada@example.com"))
        db.session.commit()
    for _ in range(2):
        with app.app_context():
            assert namespace["load_user"]("1").email == "ada@example.com"
    with app.app_context():
        assert namespace["sacache"].cache.stats()["hits"] == 1
        for cookie in ("abc", "1.5", "9" * 40, "", "1 OR 1=1"):  # malformed: anonymous, not a 500
            assert namespace["load_user"](cookie) is None


def test_every_relative_link_in_the_readme_and_docs_names_a_file():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_the_configuration_reference_names_every_keyword_and_flask_setting():
    import inspect

    from sa_cache import IdentityCache

    reference = (ROOT / "docs" / "configuration.md").read_text()
    keywords = [name for name in inspect.signature(IdentityCache).parameters if name != "self"]
    assert keywords and [name for name in keywords if f"`{name}`" not in reference] == []
    flask_source = (ROOT / "integrations" / "flask.py").read_text()
    settings = set(re.findall(r"\bSA_CACHE_[A-Z_]*[A-Z]\b", flask_source))
    assert "SA_CACHE_URL" in settings
    assert [name for name in sorted(settings) if f"`{name}`" not in reference] == []


def test_the_serve_extra_installs_gunicorn_and_dev_includes_it():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(req.startswith("gunicorn") for req in extras["serve"])
    assert any(req.startswith("sa-cache[") and "serve" in req for req in extras["dev"])
    assert "[redis,flask,serve]" in README  # where the README runs gunicorn


def test_the_test_script_names_the_stage_that_failed_and_the_ones_not_run(tmp_path):
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert '.venv/bin/python -m pytest "$@"' in script
    header = script[: script.index("trap report_failure EXIT\n")] + "trap report_failure EXIT\n"
    stages = re.search(r"STAGES=\((.*?)\)", script)
    assert stages is not None
    names = stages.group(1).split()
    for name in names:
        assert f"\nstage {name}\n" in script
    body = "stage install\nstage services\nstage ruff\nbash -c 'exit 7'\necho unreachable\n"
    (tmp_path / "t.sh").write_text(header.replace('cd "$(dirname "$0")/.."\n', "") + body)
    done = subprocess.run(["bash", str(tmp_path / "t.sh")], capture_output=True, text=True)
    assert done.returncode == 7
    assert "unreachable" not in done.stdout
    assert "stage 'ruff' failed (exit status 7)" in done.stderr
    assert f"not run: {' '.join(names[names.index('ruff') + 1 :])}" in done.stderr


def test_private_redis_servers_take_their_ports_from_sa_cache_test_ports(monkeypatch):
    import socket

    from .redis_server import free_port

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        monkeypatch.setenv("SA_CACHE_TEST_PORTS", f"{taken}-{taken}")
        with pytest.raises(RuntimeError, match="no free port"):
            free_port()
    monkeypatch.setenv("SA_CACHE_TEST_PORTS", "21000-21999")
    assert 21000 <= free_port() <= 21999
    monkeypatch.setenv("SA_CACHE_TEST_PORTS", "21999-21000")
    with pytest.raises(ValueError, match="LOW"):
        free_port()


def test_the_test_databases_are_named_from_sa_cache_test_db():
    code = "import tests.conftest as c, os; print(c.RUN_ID == f'mine_{os.getpid()}')"
    env = {**os.environ, "SA_CACHE_TEST_DB": "mine_"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert done.stdout.strip() == "True", done.stderr
