"""Where the time of a sa_cache hit and of get_many(1000) goes: cProfile (exact call counts,
self time) and pyinstrument (a sampled call tree), plus direct timings of each step of a hit.

The step timings reach into sa_cache's internals on purpose (codec, row shapes, the placement in
the session); a step that no longer exists is reported as unavailable rather than failing."""

from __future__ import annotations

import cProfile
import gc
import io
import pstats
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import inspect

from . import paths
from .models import User


def _per_call_us(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best * 1e6


def _cprofile(fn: Callable[[], Any], limit: int, per: int) -> tuple[str, list[str]]:
    """The printed table, and the top functions by self time as "name: x us per op (y%)"."""
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime")
    stats.print_stats(limit)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    table = "\n".join(line.rstrip() for line in lines[start:] if line.strip())
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in raw.values()) or 1.0
    ranked = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:8]
    top = [
        f"`{func[2]}` ({func[0]}:{func[1]}): {entry[2] / per * 1e6:.2f} us per op, "
        f"{entry[2] / total:.0%} of self time, {entry[1] / per:g} calls per op"
        for func, entry in ranked
    ]
    return table, top


def _pyinstrument(fn: Callable[[], Any], max_lines: int) -> str:
    try:
        from pyinstrument import Profiler
    except ImportError:
        return "(pyinstrument not installed)"
    profiler = Profiler(interval=0.0002)
    profiler.start()
    fn()
    profiler.stop()
    text = profiler.output_text(unicode=False, color=False, show_all=False)
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[:max_lines])


def steps(path: paths.SaCacheRedis, ids: list[int], repeat: int) -> dict[str, float]:
    """Microseconds per step of one warm hit, each step timed alone."""
    out: dict[str, float] = {}
    rng = random.Random(1)
    uid = rng.choice(ids)
    cache = path.cache
    mapper = inspect(User)

    def attempt(name: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
            out[name] = _per_call_us(fn, repeat)
        except Exception as exc:  # the internals moved: say so
            out[f"{name} (unavailable: {type(exc).__name__})"] = float("nan")

    Session = path.Session
    attempt("whole hit: Session() + get + close", lambda: _hit(Session, uid))

    def session_only() -> None:
        with Session():
            pass

    attempt("Session() + close, no lookup", session_only)
    model = cache.model_for(mapper)
    assert model is not None
    key = model.keys.row_key((uid,))
    gen_key = model.keys.generation_key
    client = path.client
    attempt("redis MGET(generation, row) alone", lambda: client.mget([gen_key, key]))
    attempt("redis GET(row) alone", lambda: client.get(key))
    attempt("GuardedStore.read (MGET + checks)", lambda: cache.guarded.read([model], [key]))
    raw = client.get(key)
    from sa_cache import codec
    from sa_cache.protocol import classify

    attempt("codec.decode (msgpack + ext_hook)", lambda: codec.decode(raw))
    entry = codec.decode(raw)
    shape = model.shape(mapper)
    values = entry.values
    attempt("RowShape.hydrate", lambda: shape.hydrate(values))
    read = cache.guarded.read([model], [key])
    if read is not None:
        gen = read[0][0]
        attempt("protocol.classify (decode + hydrate + checks)",
                lambda: classify(model, gen, raw, (uid,)))  # fmt: skip
    attempt("KeySpace.row_key", lambda: model.keys.row_key((uid,)))
    attempt("CachedModel.normalise", lambda: model.normalise((uid,)))
    attempt(
        "mapper.identity_key_from_primary_key",
        lambda: mapper.identity_key_from_primary_key((uid,)),
    )
    from sa_cache import _orm

    holder = Session()
    attempt(
        "_orm.next_load_sees_fresh_snapshot", lambda: _orm.next_load_sees_fresh_snapshot(holder)
    )
    hydrated = shape.hydrate(values)
    identity_key = mapper.identity_key_from_primary_key((uid,))

    def place() -> None:
        obj = _orm.place_in_session(holder, mapper, identity_key, hydrated, shape.expire_on_hit)
        holder.expunge(obj)

    attempt("_orm.place_in_session (+ expunge)", place)
    holder.close()

    # what a hit costs without the network: the store answers from a dict of the same bytes
    store = cache.store
    real_get_many = store.get_many
    answers = dict(zip([gen_key, key], real_get_many([gen_key, key]), strict=True))
    answers.update(zip([model.keys.row_key((i,)) for i in ids[:500]],
                       real_get_many([model.keys.row_key((i,)) for i in ids[:500]]),
                       strict=True))  # fmt: skip
    sample = ids[:500]
    counter = iter(range(10**9))

    def instant_hit() -> None:
        _hit(Session, sample[next(counter) % len(sample)])

    try:
        store.get_many = lambda keys: [answers.get(k) for k in keys]
        attempt("whole hit with an instant store (no network)", instant_hit)
    finally:
        del store.get_many
    assert store.get_many == real_get_many

    def get_after_hit() -> float:
        _hit(Session, uid)
        start = time.perf_counter()
        client.get(key)
        return time.perf_counter() - start

    try:
        out["redis GET(row) right after a hit, not in a tight loop"] = (
            statistics.median([get_after_hit() for _ in range(repeat)]) * 1e6
        )
    except Exception as exc:
        out[f"redis GET after a hit (unavailable: {type(exc).__name__})"] = float("nan")
    return out


def findings(steps: dict[str, float]) -> list[str]:
    whole = steps.get("whole hit: Session() + get + close", float("nan"))
    parts = [
        (name, value)
        for name, value in steps.items()
        if name != "whole hit: Session() + get + close" and value == value  # not NaN
    ]
    parts.sort(key=lambda item: item[1], reverse=True)
    return [f"{name}: {value:.1f} us ({value / whole:.0%} of a whole hit)" for name, value in parts]


def get_many_with_and_without_gc(
    path: paths.SaCacheRedis, batches: list[list[int]]
) -> dict[str, float]:
    """Microseconds per key of get_many(1000), with Python's cyclic garbage collector running as
    usual and paused for the call, alternating. The difference is the collector traversing the
    instances the call creates (a SQLAlchemy load of as many rows pays it too)."""
    figures: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(3):
        for batch in batches:
            for paused in (False, True):
                if paused:
                    gc.disable()
                try:
                    start = time.perf_counter()
                    path.get_many(batch)
                    figures[paused].append((time.perf_counter() - start) / len(batch) * 1e6)
                finally:
                    gc.enable()
    return {
        "collector running": statistics.median(figures[False]),
        "collector paused": statistics.median(figures[True]),
    }


def _hit(Session: Any, uid: int) -> Any:
    with Session() as session:
        return session.get(User, uid)


def profile(path: paths.SaCacheRedis, ids: list[int], quick: bool) -> dict[str, Any]:
    rng = random.Random(2)
    hits = 300 if quick else 3000
    sample = [rng.choice(ids) for _ in range(hits)]
    many = [rng.sample(ids, 1000) for _ in range(2 if quick else 15)]
    Session = path.Session

    def hit_loop() -> None:
        for uid in sample:
            _hit(Session, uid)

    def many_loop() -> None:
        for batch in many:
            path.get_many(batch)

    measured = steps(path, ids, 200 if quick else 2000)
    collector = get_many_with_and_without_gc(path, many)
    hit_table, hit_top = _cprofile(hit_loop, 22, hits)
    many_table, many_top = _cprofile(many_loop, 22, len(many))
    return {
        "steps": measured,
        "findings": findings(measured),
        "hit_top": hit_top,
        "many_top": many_top,
        "hit_cprofile": hit_table,
        "hit_pyinstrument": _pyinstrument(hit_loop, 45),
        "many_cprofile": many_table,
        "many_pyinstrument": _pyinstrument(many_loop, 45),
        "get_many_gc": collector,
        "hit_calls": hits,
        "many_calls": len(many),
    }
