#!/usr/bin/env bash
# Run SQLAlchemy's own ORM tests with every Session a caching one (tests/sqla/plugin.py), and
# compare with the same tests without sa_cache. See docs/sqlalchemy-suite.md.
#
#   bash scripts/sqla_suite.sh                      # baseline, plain, fill-all on the default modules
#   bash scripts/sqla_suite.sh --modes "plain" test/orm/test_merge.py
#   bash scripts/sqla_suite.sh --fast               # the fast subset, plain + fill-all, listed
#                                                   # SQL-only differences marked xfail
#   bash scripts/sqla_suite.sh --lib HEAD           # test HEAD's sa_cache (git archive into the
#                                                   # cache folder), not the working tree's
#   bash scripts/sqla_suite.sh --classify           # also re-run the new failures with SQL
#                                                   # assertions off, to split SQL-only from
#                                                   # behaviour differences
#
# Modes: baseline (no plugin), plain, fill-all (SA_CACHE_SUITE_MODE of the plugin).
# SQLAlchemy's sdist of the installed version is downloaded once into $SA_CACHE_SQLA_CACHE
# (default ~/.cache/sa_cache_sqla, outside the repository) and extracted there; runs go to
# $SA_CACHE_SQLA_OUT (default $SA_CACHE_SQLA_CACHE/runs, or runs-fast for --fast; --fast exits
# non-zero if any test of the subset failed). Every module runs on its own, without
# xdist and without the cache provider, on a SQLite file per mode (fill-all needs a file: its
# second engine must see the same database through its own connection).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
CACHE_DIR=${SA_CACHE_SQLA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sa_cache_sqla}

DEFAULT_MODULES=(
  test/orm/test_session.py
  test/orm/test_transaction.py
  test/orm/test_lazy_relations.py
  test/orm/test_merge.py
  test/orm/test_expire.py
  test/orm/test_versioning.py
  test/orm/inheritance/test_basic.py
  test/orm/inheritance/test_polymorphic_rel.py
  test/orm/test_unitofwork.py
  test/orm/test_unitofworkv2.py
  test/orm/test_deferred.py
  test/orm/test_naturalpks.py
  test/orm/test_composites.py
  test/orm/test_query.py
  test/orm/test_events.py
  test/orm/test_eager_relations.py
  test/orm/test_selectin_relations.py
  test/orm/dml/test_bulk_statements.py
  test/orm/dml/test_bulk.py
  # 2.1 split test_update_delete_where.py into these
  test/orm/dml/test_orm_upd_del_basic.py
  test/orm/dml/test_orm_upd_del_inheritance.py
)
# green with the plugin apart from the listed SQL-only differences, in well under 3 minutes
FAST_MODULES=(
  test/orm/test_versioning.py
  test/orm/inheritance/test_basic.py
  test/orm/test_unitofwork.py
  test/orm/test_unitofworkv2.py
  test/orm/test_naturalpks.py
  test/orm/test_composites.py
  test/orm/test_deferred.py
  test/orm/test_eager_relations.py
  test/orm/test_selectin_relations.py
)

MODES="baseline plain fill-all"
LIB=${SA_CACHE_SQLA_LIB:-worktree}
CLASSIFY=0
XFAIL=0
FAST=0
MODULES=()
while [ $# -gt 0 ]; do
  case $1 in
    --modes) MODES=$2; shift 2 ;;
    --classify) CLASSIFY=1; shift ;;
    --lib) LIB=$2; shift 2 ;;
    --xfail) XFAIL=1; shift ;;
    --fast) MODES="plain fill-all"; XFAIL=1; FAST=1; MODULES=("${FAST_MODULES[@]}"); shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) MODULES+=("$1"); shift ;;
  esac
done
[ ${#MODULES[@]} -gt 0 ] || MODULES=("${DEFAULT_MODULES[@]}")
if [ "$FAST" = 1 ]; then OUT=${SA_CACHE_SQLA_OUT:-$CACHE_DIR/runs-fast}; else OUT=${SA_CACHE_SQLA_OUT:-$CACHE_DIR/runs}; fi

# -- SQLAlchemy's source tree, for exactly the installed version --------------------------------
VERSION=$("$PY" -c 'import sqlalchemy; print(sqlalchemy.__version__)')
SRC=$CACHE_DIR/sqlalchemy-$VERSION
if [ ! -f "$SRC/test/conftest.py" ]; then
  mkdir -p "$CACHE_DIR/sdist"
  tarball=$(ls "$CACHE_DIR"/sdist/sqlalchemy-"$VERSION".tar.gz 2>/dev/null || true)
  if [ -z "$tarball" ]; then
    echo "sqla_suite: downloading the SQLAlchemy $VERSION sdist (pip builds its metadata: minutes)" >&2
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "SQLAlchemy==$VERSION" \
      -d "$CACHE_DIR/sdist"
    tarball=$(ls "$CACHE_DIR"/sdist/sqlalchemy-"$VERSION".tar.gz)
  fi
  tar -xzf "$tarball" -C "$CACHE_DIR"
fi

# -- which sa_cache: the working tree (default) or a commit, exported with git archive -----------
PYPATH=$REPO
if [ "$LIB" != worktree ]; then
  sha=$(git -C "$REPO" rev-parse --verify "$LIB^{commit}")
  PYPATH=$CACHE_DIR/lib-$sha
  if [ ! -d "$PYPATH/sa_cache" ]; then
    mkdir -p "$PYPATH"
    git -C "$REPO" archive "$sha" sa_cache | tar -x -C "$PYPATH"
  fi
  PYPATH=$PYPATH:$REPO
  echo "sqla_suite: sa_cache from $LIB ($sha)" >&2
fi

# -- the runs -------------------------------------------------------------------------------------
run_module() {  # mode module [test ids or @file instead of the whole module]
  local mode=$1 module=$2 name dir target=("$2")
  shift 2
  [ $# -eq 0 ] || target=("$@")
  name=$(echo "${module#test/}" | sed 's/\.py$//; s#/#.#g')
  dir=$OUT/$mode
  mkdir -p "$dir"
  rm -f "$dir/db.sqlite"
  local args=(-s -m pytest "${target[@]}" -p no:cacheprovider -q --maxfail=100000
    --dburi "sqlite:///$dir/db.sqlite" --junitxml "$dir/$name.xml")
  local env=(PYTHONPATH="$PYPATH")
  case $mode in
    baseline) ;;
    *-nosql) env+=(SA_CACHE_SUITE_MODE="${mode%-nosql}" SA_CACHE_SUITE_IGNORE_SQL=1
                   SA_CACHE_SUITE_STATS="$dir/$name.json"); args+=(-p tests.sqla.plugin) ;;
    *) env+=(SA_CACHE_SUITE_MODE="$mode" SA_CACHE_SUITE_XFAIL="$XFAIL"
             SA_CACHE_SUITE_STATS="$dir/$name.json"); args+=(-p tests.sqla.plugin) ;;
  esac
  local start=$SECONDS status=0
  (cd "$SRC" && env "${env[@]}" "$PY" "${args[@]}" >"$dir/$name.log" 2>&1) || status=$?
  echo "sqla_suite: $mode $module: $(tail -1 "$dir/$name.log" | tr -d '=') ($((SECONDS - start))s, exit $status)"
}

for mode in $MODES; do
  for module in "${MODULES[@]}"; do
    run_module "$mode" "$module"
  done
done

if [ "$CLASSIFY" = 1 ]; then
  # re-run, SQL assertions off, each module where a test fails with the plugin but not without
  # (whole modules: SQLAlchemy's per-backend test classes cannot be selected by node id)
  for mode in $MODES; do
    [ "$mode" = baseline ] && continue
    for module in "${MODULES[@]}"; do
      ids=$("$PY" "$REPO/tests/sqla/report.py" new-failures "$OUT" "$mode" "$module")
      [ -n "$ids" ] || continue
      run_module "$mode-nosql" "$module"
    done
    "$PY" "$REPO/tests/sqla/report.py" classify "$OUT" "$mode" -- "${MODULES[@]}" >"$OUT/classified-$mode.tsv"
    echo "sqla_suite: $mode: $(grep -c '^sql-only' "$OUT/classified-$mode.tsv") SQL-only," \
      "$(grep -c '^behaviour' "$OUT/classified-$mode.tsv") other (see $OUT/classified-$mode.tsv)"
  done
fi

"$PY" "$REPO/tests/sqla/report.py" summary "$OUT" $MODES -- "${MODULES[@]}"
if [ "$FAST" = 1 ]; then  # green means: no failure and no error in any module of any mode
  bad=0
  for mode in $MODES; do
    for module in "${MODULES[@]}"; do
      log=$OUT/$mode/$(echo "${module#test/}" | sed 's/\.py$//; s#/#.#g').log
      if tail -1 "$log" | grep -qE "[0-9]+ (failed|errors?)"; then bad=1; fi
    done
  done
  exit $bad
fi
