"""The results file (Markdown) and the chart (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

LABELS = {
    "a": "(a) no cache",
    "b": "(b) Flask-Caching memoize",
    "c": "(c) dogpile + pickle + merge",
    "d": "(d) sa_cache Redis",
    "e": "(e) sa_cache in-process",
    "raw_get": "floor: raw redis-py GET",
    "raw_mget": "floor: raw redis-py MGET",
    "idmap": "floor: identity-map hit",
    "session": "Session() open + close alone",
}
PATHS = ("a", "b", "c", "d", "e")
DB_LABELS = {"sqlite": "SQLite", "postgresql": "PostgreSQL", "mariadb": "MariaDB"}


def us(seconds: float) -> str:
    if seconds is None or math.isnan(seconds):
        return "n/a"
    value = seconds * 1e6
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def ratio(x: float, y: float) -> str:
    if not y or math.isnan(x) or math.isnan(y):
        return "n/a"
    return f"{x / y:.2f}x"


def trips(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def targets(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(target, database, measured, met/missed) rows."""
    rows: list[tuple[str, str, str, str]] = []
    for db, r in results["databases"].items():
        name = DB_LABELS[db]
        fresh, reused = r["hit"], r["hit_reused"]
        d_f, d_r = fresh["d"]["median"], reused["d"]["median"]
        floor_f, floor_r = fresh["raw_get"]["median"], reused["raw_get"]["median"]
        rows.append(("(d) Redis hit <= 1.3x raw GET, fresh session", name,
                     f"{us(d_f)} vs {us(floor_f)} us = {ratio(d_f, floor_f)}",
                     verdict(d_f <= 1.3 * floor_f)))  # fmt: skip
        rows.append(("(d) Redis hit <= 1.3x raw GET, lookup in an open session", name,
                     f"{us(d_r)} vs {us(floor_r)} us = {ratio(d_r, floor_r)}",
                     verdict(d_r <= 1.3 * floor_r)))  # fmt: skip
        a = fresh["a"]["median"]
        if db == "postgresql":
            rows.append(("(d) hit >= 5x faster than (a) on PostgreSQL", name,
                         f"{us(a)} / {us(d_f)} us = {ratio(a, d_f)}",
                         verdict(a >= 5 * d_f)))  # fmt: skip
        for other in ("b", "c"):
            o = fresh[other]["median"]
            rows.append((f"(d) hit faster than {LABELS[other]}", name,
                         f"{us(d_f)} vs {us(o)} us ({ratio(o, d_f)} faster)",
                         verdict(d_f < o)))  # fmt: skip
        many = r["get_many"].get("1000") or r["get_many"].get(1000)
        if many:
            m = many["d"]
            one_trip = m["round_trips"] is not None and m["round_trips"] <= 1
            rows.append(("(d) get_many(1000): 1 cache round trip", name,
                         f"{trips(m['round_trips'])} round trips", verdict(one_trip)))  # fmt: skip
            rows.append(("(d) get_many(1000): <= 10 us per key incl. hydration", name,
                         f"{us(m['median'])} us per key",
                         verdict(m["median"] <= 10e-6)))  # fmt: skip
        commits = r["commit"]
        worst = max(
            (c["d"]["round_trips"] or 0) for c in commits.values()
        ) if commits else float("nan")  # fmt: skip
        rows.append(("(d) eviction <= 1 round trip per commit", name,
                     f"max {worst:g} round trips per commit "
                     f"({', '.join(str(k) for k in commits)} rows)",
                     verdict(worst <= 1)))  # fmt: skip
        payload = r["payload"]
        rows.append(("payload <= 0.5x pickle", name,
                     f"{payload['sa_cache']:.0f} vs {payload['pickle']:.0f} bytes = "
                     f"{payload['sa_cache'] / payload['pickle']:.2f}x",
                     verdict(payload["sa_cache"] <= 0.5 * payload["pickle"])))  # fmt: skip
        web = r.get("web")
        if web:
            c, u = web["cached"], web["uncached"]
            rows.append(("Flask-Login warm request: 0 SQL", name,
                         f"{c['sql_per_request']:g} SQL per request (uncached "
                         f"{u['sql_per_request']:g})",
                         verdict(c["sql_per_request"] == 0)))  # fmt: skip
            if db == "postgresql":
                rows.append(("Flask-Login: >= 1.3x uncached requests/s on PostgreSQL", name,
                             f"{c['rps']:.0f} vs {u['rps']:.0f} req/s = "
                             f"{ratio(c['rps'], u['rps'])}",
                             verdict(c["rps"] >= 1.3 * u["rps"])))  # fmt: skip
    return rows


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    out = [f"# sa_cache benchmarks, {meta['date']}{' (quick)' if meta['quick'] else ''}", ""]
    out.append(
        f"`{meta['command']}` on {meta['machine']}; Python {meta['python']}, "
        f"SQLAlchemy {meta['sqlalchemy']}, redis-py {meta['redis']}, dogpile.cache "
        f"{meta['dogpile']}, Flask-Caching {meta['flask_caching']}. Took {meta['seconds']:.0f} s."
    )
    out.append("")
    users = f"{meta['users']:,} users" if meta.get("users") else "one table of users"
    columns = meta.get("columns") or []
    out.append(
        f"Same data for every path: {users}"
        + (f" of {len(columns)} columns ({', '.join(dict.fromkeys(columns))})" if columns else "")
        + ", read back from each database and cache. Every operation runs all paths side by "
        "side, interleaved: each round shuffles the order of the paths and times a block of "
        "operations one by one; a round's figure is its median operation and the figure shown "
        "is the median of the rounds "
        f"(hits: {meta['settings']['hit_rounds']} rounds x {meta['settings']['hit_ops']} "
        f"lookups; misses: {meta['settings']['miss_rounds']} x {meta['settings']['miss_ops']}). "
        "Redis round trips are counted on the real connections (a `redis.Connection` subclass), "
        "SQL statements with `before_cursor_execute`. Redis and the database servers run on "
        f"127.0.0.1, on the machine of the client ({meta['machine']})."
    )
    out.append("")
    out.append(
        "A *hit* opens a fresh session, looks one user up and closes the session, except (b), "
        "whose memoized loader returns the unpickled, detached user without any session. The "
        "*lookup in an open session* rows time the lookup alone in a session that already "
        "exists (the found object is expunged afterwards, outside the timing). A *miss* follows "
        "an eviction of that user (for sa_cache a tombstone, so the fill is a compare-and-set; "
        "for (b) and (c) a deleted key)."
    )
    out.append("")
    for note in meta.get("notes", []):
        out.append(f"> {note}")
        out.append("")
    if meta.get("load_average"):
        before, after = meta["load_average"]
        out.append(
            f"> Load average (1 min) at start {before:g}, at end {after:g}: the machine is shared, "
            "so absolute figures move between runs; the ratios within one run are what to read."
        )
        out.append("")
    out.append("## Targets")
    out.append("")
    out.append("| target | database | measured | |")
    out.append("|---|---|---|---|")
    for row in targets(results):
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    out.extend(_reading(results))
    for db, r in results["databases"].items():
        out.extend(_database_section(db, r))
    if results.get("profile"):
        out.extend(_profile_section(results["profile"]))
    return "\n".join(out) + "\n"


def _reading(results: dict[str, Any]) -> list[str]:
    """Plain statements computed from this run's figures."""
    out = ["## Reading these numbers", ""]
    for db, r in results["databases"].items():
        hit = r["hit"]
        floor = hit["raw_get"]["median"]
        best = hit["session"]["median"] + hit["idmap"]["median"] + floor
        out.append(
            f"- {DB_LABELS[db]}: no session-based path can beat Session() open + close "
            f"({us(hit['session']['median'])} us) + an identity-map get "
            f"({us(hit['idmap']['median'])} us) + the raw GET ({us(floor)} us) = {us(best)} us, "
            f"{ratio(best, floor)} the floor; (d) measured {us(hit['d']['median'])} us "
            f"({ratio(hit['d']['median'], floor)}), (e) {us(hit['e']['median'])} us."
        )
        web = r.get("web")
        if web and web["cached"]["rps_rounds"] and web["uncached"]["rps_rounds"]:
            c, u = web["cached"]["rps_rounds"], web["uncached"]["rps_rounds"]
            faster = web["cached"]["rps"] >= web["uncached"]["rps"]
            out.append(
                f"- {DB_LABELS[db]}, Flask-Login: the cached app served "
                f"{ratio(web['cached']['rps'], web['uncached']['rps'])} the uncached app's "
                f"requests per second ({'faster' if faster else 'slower'}); rounds ranged "
                f"{min(c):.0f}-{max(c):.0f} req/s cached and {min(u):.0f}-{max(u):.0f} uncached."
            )
    profile = results.get("profile")
    if profile:
        st = profile["steps"]
        instant = st.get("whole hit with an instant store (no network)")
        whole = st.get("whole hit: Session() + get + close")
        tight = st.get("redis GET(row) alone")
        after = st.get("redis GET(row) right after a hit, not in a tight loop")
        if instant and whole and tight and after:
            out.append(
                f"- Profile ({DB_LABELS[profile['db']]}): a whole Redis hit took {whole:.0f} us "
                f"when timed in a loop; the same hit with the store answering from a dict took "
                f"{instant:.0f} us, so the network accounts for about {whole - instant:.0f} us "
                f"and sa_cache + SQLAlchemy CPU for {instant:.0f} us. A GET timed in a tight "
                f"loop (the floor's conditions) took {tight:.0f} us, right after a hit "
                f"{after:.0f} us"
                + (
                    ": a round trip interleaved with other work costs more than the floor measures."
                    if after > 1.1 * tight
                    else "."
                )
            )
        collector = profile.get("get_many_gc")
        if collector:
            running, paused = collector["collector running"], collector["collector paused"]
            share = (
                f"The {running - paused:.1f} us between them is the collector traversing the "
                "1000 new instances and their states, which a SQLAlchemy load of 1000 rows pays "
                "as well"
                if running - paused >= 0.5
                else "The collector's share is within the noise in this run"
            )
            out.append(
                f"- get_many(1000) from Redis ({DB_LABELS[profile['db']]}, profile run): "
                f"{running:.1f} us per key, {paused:.1f} us with Python's cyclic garbage "
                f"collector paused for the call. {share}; sa_cache does not pause the "
                "collector, which would affect every thread of the process."
            )
    out.append(
        "- Commits wait for the disk (fsync), whose latency varies by milliseconds between "
        "rounds; the eviction timed alone and the round-trip count are the reliable figures."
    )
    out.append("")
    return out


def _database_section(db: str, r: dict[str, Any]) -> list[str]:
    out = [f"## {DB_LABELS[db]}", ""]
    fresh, reused = r["hit"], r["hit_reused"]
    floor_f, floor_r = fresh["raw_get"]["median"], reused["raw_get"]["median"]
    a = fresh["a"]["median"]
    out.append("### Hit (warm), microseconds per lookup")
    out.append("")
    out.append(
        "| path | fresh session | x raw GET | (a) / path | round trips | "
        "lookup in an open session | x raw GET |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for key in (*PATHS, "raw_get", "idmap", "session"):
        f = fresh.get(key)
        rr = reused.get(key)
        if f is None and rr is None:
            continue
        fm = f["median"] if f else float("nan")
        rm = rr["median"] if rr else float("nan")
        out.append(
            f"| {LABELS[key]} | {us(fm)} | {ratio(fm, floor_f)} | {ratio(a, fm)} | "
            f"{trips(f['round_trips'] if f else None)} | {us(rm)} | {ratio(rm, floor_r)} |"
        )
    out.append("")
    miss = r["miss"]
    out.append("### Miss + fill, microseconds per lookup")
    out.append("")
    out.append("| path | miss + fill | x (a) | round trips |")
    out.append("|---|---:|---:|---:|")
    am = miss["a"]["median"]
    for key in PATHS:
        m = miss[key]
        out.append(
            f"| {LABELS[key]} | {us(m['median'])} | {ratio(m['median'], am)} | "
            f"{trips(m['round_trips'])} |"
        )
    out.append("")
    out.append("### get_many(N), warm: microseconds per key (cache round trips per call)")
    out.append("")
    sizes = list(r["get_many"])
    out.append("| path | " + " | ".join(f"N={n}" for n in sizes) + " |")
    out.append("|---|" + "---:|" * len(sizes))
    for key in (*PATHS, "raw_mget"):
        cells = []
        for n in sizes:
            m = r["get_many"][n][key]
            rt = m["round_trips"]
            cells.append(us(m["median"]) + ("" if rt is None else f" ({rt:g})"))
        out.append(f"| {LABELS[key]} | " + " | ".join(cells) + " |")
    out.append("")
    out.append(
        "(a) is one `SELECT ... WHERE id IN (...)`; (b) calls the memoized loader once per key "
        "(memoize has no multi-get); (c) is `get_or_create_multi` + `merge(load=False)` per row; "
        "sa_cache is `session.get_many`. The floor is one MGET of the same sa_cache payloads, "
        "without decoding."
    )
    out.append("")
    out.append("### Commit + eviction, microseconds per written row")
    out.append("")
    out.append(
        "Rows are loaded, one column of each is changed, then the commit is timed, together "
        "with the eviction the application must do by hand for (b) (`delete_memoized` per row) "
        "and (c) (`delete_multi`). The overhead is the median over rounds of the difference to "
        "(a) in the same round; commits wait for the disk, so it is noisy. sa_cache's own "
        "eviction is also timed alone (`GuardedStore.evict`, median call)."
    )
    out.append("")
    out.append(
        "| rows per commit | path | per row | overhead vs (a) per row | round trips per commit "
        "| eviction alone per row |"
    )
    out.append("|---:|---|---:|---:|---:|---:|")
    for rows, per_path in r["commit"].items():
        base = per_path["a"]["rounds"]
        for key in PATHS:
            m = per_path[key]
            evict = m["extra"].get("evict_us_per_row")
            # paired per round (the paths of one round ran back to back), then the median
            overhead = statistics.median([x - y for x, y in zip(m["rounds"], base, strict=True)])
            out.append(
                f"| {rows} | {LABELS[key]} | {us(m['median'])} | "
                f"{us(overhead) if key != 'a' else '-'} | {trips(m['round_trips'])} | "
                f"{'-' if evict is None else f'{evict:.1f}'} |"
            )
    out.append("")
    web = r.get("web")
    if web:
        out.append("### Flask-Login request to a login-required endpoint (gunicorn)")
        out.append("")
        out.append(
            f"gunicorn, {web['workers']} sync workers; a {web['threads']}-thread client on "
            f"loopback sending {web['rounds']} alternating bursts of {web['burst']} requests "
            f"per app over {web['users']} logged-in users."
        )
        out.append("")
        out.append("| app | requests/s (median) | SQL per request, warm | SQL per request, first |")
        out.append("|---|---:|---:|---:|")
        for name in ("uncached", "cached"):
            w = web[name]
            out.append(
                f"| {name} | {w['rps']:.0f} | {w['sql_per_request']:g} | "
                f"{w['cold_sql_per_request']:g} |"
            )
        ratio_text = ratio(web["cached"]["rps"], web["uncached"]["rps"])
        out.append("")
        out.append(f"Cached / uncached requests per second: {ratio_text}.")
        if web["cached"]["errors"] or web["uncached"]["errors"]:
            out.append(
                f"Errors: cached {web['cached']['errors']}, uncached {web['uncached']['errors']}."
            )
        out.append("")
    p = r["payload"]
    sample = f"mean of {p['rows']} users" if p.get("rows") else "mean over a sample of users"
    out.append(f"### Payload, bytes per row ({sample})")
    out.append("")
    out.append("| format | bytes | x pickle |")
    out.append("|---|---:|---:|")
    for name, label in (
        ("sa_cache", "sa_cache msgpack value (as stored)"),
        ("pickle", "pickle.dumps(user)"),
        ("flask_caching", "(b) Flask-Caching value (as stored)"),
        ("dogpile", "(c) dogpile value (as stored)"),
    ):
        out.append(f"| {label} | {p[name]:.0f} | {p[name] / p['pickle']:.2f}x |")
    out.append("")
    return out


def _profile_section(profile: dict[str, Any]) -> list[str]:
    out = ["## Profile: sa_cache (Redis) hit and get_many(1000)", ""]
    out.append(
        f"Measured on {DB_LABELS[profile['db']]}. Each step of a warm hit timed alone "
        "(best of 3 loops), microseconds:"
    )
    out.append("")
    out.append("| step | us |")
    out.append("|---|---:|")
    for name, value in profile["steps"].items():
        out.append(f"| {name} | {'n/a' if math.isnan(value) else f'{value:.2f}'} |")
    out.append("")
    if profile.get("findings"):
        out.append("What dominates a hit, step by step (largest first):")
        out.append("")
        for line in profile["findings"]:
            out.append(f"- {line}")
        out.append("")
    for key, title in (
        ("hit_top", "Self time per hit under cProfile (cProfile inflates small calls):"),
        ("many_top", "Self time per get_many(1000) call under cProfile:"),
    ):
        if profile.get(key):
            out.append(title)
            out.append("")
            for line in profile[key]:
                out.append(f"- {line}")
            out.append("")
    for title, key in (
        (f"cProfile, {profile['hit_calls']} hits (fresh session each), self time", "hit_cprofile"),
        ("pyinstrument, the same hits", "hit_pyinstrument"),
        (f"cProfile, {profile['many_calls']} x get_many(1000), by self time", "many_cprofile"),
        ("pyinstrument, the same get_many calls", "many_pyinstrument"),
    ):  # fmt: skip
        out.append(f"<details><summary>{title}</summary>")
        out.append("")
        out.append("```")
        out.append(profile[key])
        out.append("```")
        out.append("")
        out.append("</details>")
        out.append("")
    return out


def chart(results: dict[str, Any], target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dbs = list(results["databases"])
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    colors = {
        "a": "#9e9e9e", "b": "#e07b39", "c": "#c9b037", "d": "#2b6cb0", "e": "#38a169",
        "raw_get": "#000000", "raw_mget": "#000000", "idmap": "#6b46c1",
    }  # fmt: skip

    ax = axes[0][0]
    keys = [*PATHS, "raw_get", "idmap"]
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        values = [results["databases"][db]["hit"][key]["median"] * 1e6 for db in dbs]
        xs = [j + i * width for j in range(len(dbs))]
        ax.bar(xs, values, width, label=LABELS[key], color=colors[key])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(dbs))])
    ax.set_xticklabels([DB_LABELS[db] for db in dbs])
    ax.set_yscale("log")
    top = max(results["databases"][db]["hit"][k]["median"] for db in dbs for k in keys) * 1e6
    ax.set_ylim(top=top * 8)
    ax.set_ylabel("us per lookup (log)")
    ax.set_title("Warm hit, fresh session (lower is better)")
    ax.legend(fontsize=7, ncol=2, loc="upper center")

    ax = axes[0][1]
    db = "postgresql" if "postgresql" in dbs else dbs[0]
    many = results["databases"][db]["get_many"]
    sizes = list(many)
    for key in (*PATHS, "raw_mget"):
        ax.plot(
            [int(n) for n in sizes],
            [many[n][key]["median"] * 1e6 for n in sizes],
            marker="o",
            label=LABELS[key],
            color=colors[key],
            linestyle="--" if key == "raw_mget" else "-",
        )
    ax.axhline(10, color="red", linewidth=0.8, linestyle=":", label="target 10 us/key")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N")
    ax.set_ylabel("us per key (log)")
    ax.set_title(f"get_many(N), warm, {DB_LABELS[db]}")
    ax.legend(fontsize=7)

    ax = axes[1][0]
    web_dbs = [db for db in dbs if results["databases"][db].get("web")]
    for i, name in enumerate(("uncached", "cached")):
        values = [results["databases"][db]["web"][name]["rps"] for db in web_dbs]
        ax.bar(
            [j + i * 0.4 for j in range(len(web_dbs))],
            values,
            0.4,
            label=name,
            color="#9e9e9e" if name == "uncached" else "#2b6cb0",
        )
    ax.set_xticks([j + 0.2 for j in range(len(web_dbs))])
    ax.set_xticklabels([DB_LABELS[db] for db in web_dbs])
    ax.set_ylabel("requests / s")
    ax.set_title("Flask-Login request, gunicorn (higher is better)")
    ax.legend(fontsize=8)

    ax = axes[1][1]
    p = results["databases"][dbs[0]]["payload"]
    names = ["sa_cache", "pickle", "flask_caching", "dogpile"]
    ax.bar(
        ["sa_cache\nmsgpack", "pickle", "(b) stored", "(c) stored"],
        [p[n] for n in names],
        color=["#2b6cb0", "#9e9e9e", "#e07b39", "#c9b037"],
    )
    ax.axhline(p["pickle"] / 2, color="red", linewidth=0.8, linestyle=":", label="0.5x pickle")
    ax.set_ylabel("bytes per row")
    ax.set_title("Payload per row")
    ax.legend(fontsize=8)

    fig.suptitle(f"sa_cache benchmarks, {results['meta']['date']}")
    fig.tight_layout()
    fig.savefig(target, dpi=100)
    plt.close(fig)


def summary(results: dict[str, Any]) -> str:
    """A compact table for the README: warm hit per path and database, and the targets."""
    dbs = list(results["databases"])
    lines = [
        "| warm hit, us (x raw GET floor) | " + " | ".join(DB_LABELS[db] for db in dbs) + " |",
        "|---|" + "---:|" * len(dbs),
    ]
    for key in (*PATHS, "raw_get", "idmap"):
        cells = []
        for db in dbs:
            hit = results["databases"][db]["hit"]
            value, floor = hit[key]["median"], hit["raw_get"]["median"]
            cells.append(f"{us(value)} ({ratio(value, floor)})")
        lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + " |")
    headline = "postgresql" if "postgresql" in dbs else dbs[0]
    lines.append("")
    lines.append(f"| target ({DB_LABELS[headline]}) | measured | |")
    lines.append("|---|---|---|")
    for target, database, measured, met in targets(results):
        if database == DB_LABELS[headline]:
            lines.append(f"| {target} | {measured} | {met} |")
    return "\n".join(lines)
