#!/usr/bin/env bash
# The whole test suite, from a fresh clone: install, start services, lint, type-check, test.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[dev]"

bash scripts/services.sh

echo "== ruff"
.venv/bin/ruff check sa_cache integrations tests benchmarks
echo "== mypy --strict sa_cache"
.venv/bin/mypy --strict sa_cache
echo "== pytest"
.venv/bin/python -m pytest "$@"
