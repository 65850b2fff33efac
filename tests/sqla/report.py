"""Summaries of scripts/sqla_suite.sh runs, from the JUnit XML pytest wrote per mode and module.

report.py summary OUT MODE... -- MODULE...    counts per module and mode, new failures
report.py new-failures OUT MODE MODULE        node ids failing in MODE, not in baseline
report.py classify OUT MODE -- MODULE...      new failures: SQL-only (pass in MODE-nosql)
                                              or behaviour (fail there too)
report.py expected OUT MODE... -- MODULE...   the SQL-only ones as expected_sql_differences.txt
                                              lines: modes, node id, reason from the message
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

_BACKEND_SUFFIX = re.compile(r"_sqlite\+pysqlite_[0-9_]+")


def module_name(module: str) -> str:
    return re.sub(r"\.py$", "", module.removeprefix("test/")).replace("/", ".")


def results(out: Path, mode: str, module: str) -> dict[str, str] | None:
    """node id (backend suffix removed) -> passed / failed / error / skipped / xfailed / xpassed."""
    path = out / mode / f"{module_name(module)}.xml"
    if not path.exists():
        return None
    dotted = "test." + module_name(module)
    found: dict[str, str] = {}
    for case in ET.parse(path).iter("testcase"):
        classname = case.get("classname", "")
        rest = classname[len(dotted) + 1 :] if classname.startswith(dotted + ".") else classname
        nodeid = (
            module + "::" + "::".join(filter(None, [rest.replace(".", "::"), case.get("name")]))
        )
        nodeid = _BACKEND_SUFFIX.sub("", nodeid)
        outcome = "passed"
        for child in case:
            if child.tag == "failure":
                outcome = "failed"
            elif child.tag == "error":
                outcome = "error"
            elif child.tag == "skipped":
                kind = child.get("type", "")
                outcome = "xfailed" if kind == "pytest.xfail" else "skipped"
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if outcome == "passed" and props.get("xpassed"):
            outcome = "xpassed"
        # a test failing in call and erroring in teardown appears twice: keep the worst
        if found.get(nodeid) in ("failed", "error"):
            continue
        found[nodeid] = outcome
    return found


def bad(outcome: str | None) -> bool:
    return outcome in ("failed", "error")


def new_failures(out: Path, mode: str, module: str) -> list[str]:
    base = results(out, "baseline", module) or {}
    mine = results(out, mode, module) or {}
    return sorted(n for n, o in mine.items() if bad(o) and not bad(base.get(n)))


def _raw_ids(out: Path, mode: str, module: str, ids: list[str]) -> list[str]:
    """The node ids as pytest wants them on its command line (with the backend suffix)."""
    path = out / mode / f"{module_name(module)}.xml"
    dotted = "test." + module_name(module)
    wanted = set(ids)
    raw = []
    for case in ET.parse(path).iter("testcase"):
        classname = case.get("classname", "")
        rest = classname[len(dotted) + 1 :] if classname.startswith(dotted + ".") else classname
        nodeid = (
            module + "::" + "::".join(filter(None, [rest.replace(".", "::"), case.get("name")]))
        )
        if _BACKEND_SUFFIX.sub("", nodeid) in wanted and nodeid not in raw:
            raw.append(nodeid)
    return raw


def counts(res: dict[str, str] | None) -> str:
    if res is None:
        return "-"
    p = sum(o in ("passed", "xpassed") for o in res.values())
    f = sum(bad(o) for o in res.values())
    s = sum(o == "skipped" for o in res.values())
    x = sum(o == "xfailed" for o in res.values())
    text = f"{p} / {f} / {s}"
    return text + (f" (+{x} xfail)" if x else "")


def summary(out: Path, modes: list[str], modules: list[str]) -> None:
    print("| module | " + " | ".join(f"{m} pass / fail / skip" for m in modes) + " |")
    print("|---" * (len(modes) + 1) + "|")
    for module in modules:
        row = [counts(results(out, m, module)) for m in modes]
        print(f"| {module_name(module)} | " + " | ".join(row) + " |")
    for mode in modes:
        if mode == "baseline":
            continue
        total = 0
        for module in modules:
            ids = new_failures(out, mode, module)
            total += len(ids)
            for nodeid in ids:
                print(f"new failure ({mode}): {nodeid}")
        print(f"{mode}: {total} new failures against baseline")
        hits = 0
        for module in modules:
            stats = out / mode / f"{module_name(module)}.json"
            if stats.exists():
                totals = json.loads(stats.read_text())["totals"]
                hits += totals.get("test_hits", totals.get("cache_hits", 0))
        print(f"{mode}: {hits} lookups of the tests' sessions answered by the cache")


def classify(out: Path, mode: str, modules: list[str]) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {"sql-only": [], "behaviour": []}
    for module in modules:
        ids = new_failures(out, mode, module)
        nosql = results(out, mode + "-nosql", module) or {}
        for nodeid in ids:
            kind = "behaviour" if bad(nosql.get(nodeid, "failed")) else "sql-only"
            kinds[kind].append(nodeid)
    return kinds


def failure_messages(out: Path, mode: str, module: str) -> dict[str, str]:
    path = out / mode / f"{module_name(module)}.xml"
    dotted = "test." + module_name(module)
    found: dict[str, str] = {}
    for case in ET.parse(path).iter("testcase"):
        classname = case.get("classname", "")
        rest = classname[len(dotted) + 1 :] if classname.startswith(dotted + ".") else classname
        nodeid = (
            module + "::" + "::".join(filter(None, [rest.replace(".", "::"), case.get("name")]))
        )
        for child in case:
            if child.tag in ("failure", "error"):
                found[_BACKEND_SUFFIX.sub("", nodeid)] = child.text or ""
    return found


def sql_reason(text: str) -> str:
    count = re.search(r"desired statement count (\d+) does not match (\d+)", text)
    if count:
        want, got = int(count.group(1)), int(count.group(2))
        kind = "cache hit" if got < want else "more statements"
        return f"{kind}: {got} statements where SQLAlchemy sends {want}"
    if "RETURNING" in text and "Testing for compiled statement" in text:
        return "ORM UPDATE/DELETE gets RETURNING <pk> (sa_cache asks which rows matched)"
    if "pending assertion rules remain" in text:
        return "cache hit: an expected SELECT is not sent"
    if "Testing for compiled statement" in text:
        return "statement text differs"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:100] if lines else "?"


def expected(out: Path, modes: list[str], modules: list[str]) -> None:
    found: dict[str, tuple[list[str], str]] = {}
    for mode in modes:
        for module in modules:
            kinds = classify(out, mode, [module])
            if not kinds["sql-only"]:
                continue
            messages = failure_messages(out, mode, module)
            for nodeid in kinds["sql-only"]:
                entry = found.setdefault(nodeid, ([], sql_reason(messages.get(nodeid, ""))))
                entry[0].append(mode)
    for nodeid, (in_modes, reason) in found.items():
        print(f"{','.join(in_modes)}\t{nodeid}\t-- {reason}")


def main(argv: list[str]) -> None:
    command, out = argv[0], Path(argv[1])
    rest = argv[2:]
    if command == "summary":
        split = rest.index("--")
        summary(out, rest[:split], rest[split + 1 :])
    elif command == "new-failures":
        mode, module = rest
        ids = new_failures(out, mode, module)
        if ids:
            print("\n".join(_raw_ids(out, mode, module, ids)))
    elif command == "classify":
        mode = rest[0]
        kinds = classify(out, mode, rest[rest.index("--") + 1 :])
        for kind, ids in kinds.items():
            for nodeid in ids:
                print(f"{kind}\t{nodeid}")
    elif command == "expected":
        split = rest.index("--")
        expected(out, rest[:split], rest[split + 1 :])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
