#!/usr/bin/env bash
# The whole test suite, from a fresh clone: install, start services, lint, type-check, test on
# the newest SQLAlchemy 2.1.x, then the core tests again on the newest 2.0.x.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
install() {  # venv, extra pip arguments
  [ -x "$1/bin/python" ] || "$PYTHON" -m venv "$1"
  "$1/bin/python" -m pip install --quiet --upgrade pip
  "$1/bin/python" -m pip install --quiet -e ".[dev]" "${@:2}"
}

install .venv "SQLAlchemy>=2.1,<2.2"
bash scripts/services.sh

echo "== ruff"
.venv/bin/ruff check sa_cache integrations tests benchmarks
echo "== mypy --strict sa_cache"
.venv/bin/mypy --strict sa_cache
echo "== pytest (SQLAlchemy $(.venv/bin/python -c 'import sqlalchemy; print(sqlalchemy.__version__)'))"
.venv/bin/python -m pytest "$@"

echo "== SQLAlchemy 2.0.x: the core behaviour tests"
install .venv-sa20 "SQLAlchemy>=2.0,<2.1"
.venv-sa20/bin/python -m pytest -q -p no:cacheprovider \
  tests/test_orm_internals.py tests/test_lookups.py tests/test_races.py tests/test_snapshot.py \
  tests/test_eviction.py tests/test_bulk.py tests/test_dirty_reads.py tests/test_negative.py \
  tests/test_format.py tests/test_keys.py tests/test_hydration.py
