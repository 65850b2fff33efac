#!/usr/bin/env bash
# The whole test suite, from a fresh clone: install, start services, lint, type-check, test on
# the newest SQLAlchemy 2.1.x, then the core tests again on the newest 2.0.x, then a fast subset of
# SQLAlchemy's own ORM test suite with every session a caching one (docs/sqlalchemy-suite.md).
#
# Arguments go to the main pytest run (`bash scripts/test.sh -k redis -x`). The tests read
# SA_CACHE_TEST_REDIS, SA_CACHE_TEST_PORTS and SA_CACHE_TEST_DB (see docs/testing.md).
# When a stage fails, the script says which one and which later stages did not run, and exits
# with the failing command's status.
set -euo pipefail
cd "$(dirname "$0")/.."

STAGES=(install services ruff mypy pytest sqlalchemy-2.0 sqlalchemy-suite)
STAGE=""
stage() { STAGE=$1; }
report_failure() {
  local status=$? skipped="" seen=""
  [ "$status" -eq 0 ] && return 0
  for name in "${STAGES[@]}"; do
    [ -n "$seen" ] && skipped+=" $name"
    [ "$name" = "$STAGE" ] && seen=1
  done
  echo "test.sh: stage '${STAGE:-setup}' failed (exit status $status)" >&2
  echo "test.sh: not run:${skipped:- nothing, it was the last stage}" >&2
  return "$status"
}
trap report_failure EXIT

PYTHON=${PYTHON:-python3}
install() {  # venv, extra pip arguments
  [ -x "$1/bin/python" ] || "$PYTHON" -m venv "$1"
  "$1/bin/python" -m pip install --quiet --upgrade pip
  "$1/bin/python" -m pip install --quiet -e ".[dev]" "${@:2}"
}

stage install
install .venv "SQLAlchemy>=2.1,<2.2"
stage services
bash scripts/services.sh

stage ruff
echo "== ruff"
.venv/bin/ruff check sa_cache integrations tests benchmarks
stage mypy
echo "== mypy --strict sa_cache integrations"
.venv/bin/mypy --strict sa_cache integrations
stage pytest
echo "== pytest (SQLAlchemy $(.venv/bin/python -c 'import sqlalchemy; print(sqlalchemy.__version__)'))"
.venv/bin/python -m pytest "$@"

stage sqlalchemy-2.0
echo "== SQLAlchemy 2.0.x: the core behaviour tests"
install .venv-sa20 "SQLAlchemy>=2.0,<2.1"
.venv-sa20/bin/python -m pytest -q -p no:cacheprovider \
  tests/test_orm_internals.py tests/test_lookups.py tests/test_races.py tests/test_snapshot.py \
  tests/test_eviction.py tests/test_bulk.py tests/test_dirty_reads.py tests/test_negative.py \
  tests/test_format.py tests/test_keys.py tests/test_hydration.py

stage sqlalchemy-suite
echo "== SQLAlchemy's own ORM tests under the cache (fast subset)"
bash scripts/sqla_suite.sh --fast
