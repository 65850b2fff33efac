"""The ``sa-cache`` console script."""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from typing import Any

import click
from sqlalchemy import Column, MetaData, String, Table
from sqlalchemy.orm import registry

from . import demo as demo_module
from .cache import IdentityCache
from .errors import describe_error
from .shared_stats import read_shared_stats
from .stats import MODEL_COUNTERS

#: The command line waits longer for Redis than a request would: one call, run by a person.
CLI_SOCKET_TIMEOUT = 2.0


@click.group()
def main() -> None:
    """sa_cache: an SQLAlchemy identity-map cache."""


@main.command()
@click.option("--db-url", default=None, help="SQLAlchemy URL (default: a temporary SQLite file).")
@click.option("--redis-url", default=None, help="Redis URL (default: the in-process backend).")
def demo(db_url: str | None, redis_url: str | None) -> None:
    """Run a scripted scenario and print what the cache did at each step."""
    backend = "in-process cache" if redis_url is None else "Redis"
    database = "SQLite (temporary file)" if db_url is None else db_url.split("://")[0]
    click.echo(f"sa_cache demo: {database} + {backend}\n")
    click.echo(demo_module.render(demo_module.run(db_url, redis_url)))


# -- stats, evict, flush: shared with ``flask sa-cache`` ----------------------------------------

_redis_url = click.option(
    "--redis-url",
    envvar="SA_CACHE_URL",
    required=True,
    help="Redis URL of the cache (env SA_CACHE_URL).",
)
_prefix = click.option(
    "--prefix",
    envvar="SA_CACHE_PREFIX",
    default="sa_cache",
    show_default=True,
    help="Key prefix of the cache (env SA_CACHE_PREFIX).",
)


def _open(redis_url: str, prefix: str) -> IdentityCache:
    try:
        cache = IdentityCache(redis_url, prefix=prefix, socket_timeout=CLI_SOCKET_TIMEOUT)
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc), param_hint="--redis-url") from None
    return cache


def _is_shared(cache: IdentityCache) -> bool:
    return cache.store.capabilities.shared


def print_stats(cache: IdentityCache, *, as_json: bool = False) -> None:
    """Print the counters every process published under the cache's prefix (Redis), or this
    process's own (in-process backend)."""
    if _is_shared(cache):
        try:
            stats = read_shared_stats(cache.store.client, cache.prefix)  # type: ignore[attr-defined]
        except Exception as exc:
            message = f"cannot read the shared counters: {describe_error(exc)}"
            raise click.ClickException(message) from None
        scope = f"all processes under prefix {cache.prefix!r} ({stats['processes']} live)"
    else:
        stats = cache.stats()
        scope = "this process only: the in-process backend is not shared"
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
        return
    click.echo(f"sa_cache stats, {scope}")
    click.echo(render_stats(stats))


def render_stats(stats: dict[str, Any]) -> str:
    columns = MODEL_COUNTERS
    rows = [
        (name, [counters.get(c, 0) for c in columns]) for name, counters in stats["models"].items()
    ]
    rows.append(("total", [stats.get(c, 0) for c in columns]))
    width = max(len("model"), *(len(name) for name, _ in rows))
    lines = ["model".ljust(width) + "".join(c.rjust(11) for c in columns)]
    for name, values in rows:
        lines.append(name.ljust(width) + "".join(str(v).rjust(11) for v in values))
    lookups = stats.get("hits", 0) + stats.get("misses", 0)
    if lookups:
        lines.append(f"hit rate {100 * stats.get('hits', 0) / lookups:.1f}% of {lookups} lookups")
    if stats.get("bypassed"):
        lines.append(f"bypassed (breaker open) {stats['bypassed']}")
    return "\n".join(lines)


def evict_row(cache: IdentityCache, model: type[Any], pk: Sequence[str]) -> None:
    """Evict one row of ``model``; ``pk`` as typed (normalised through the column types)."""
    try:
        delivered = cache.evict(model, pk[0] if len(pk) == 1 else tuple(pk))
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc), param_hint="PK") from None
    if not delivered:
        raise click.ClickException("the cache backend is unavailable: nothing was evicted")
    click.echo(f"evicted {model.__name__} {', '.join(pk)}")


def flush_cache(cache: IdentityCache) -> None:
    """Delete every key under ``prefix:`` (this cache's keys only; never FLUSHDB)."""
    try:
        removed = cache.flush()
    except Exception as exc:
        raise click.ClickException(f"flush failed: {describe_error(exc)}") from None
    click.echo(f"removed {removed} keys under {cache.prefix + ':'!r}")


def _table_model(table_name: str, width: int) -> type[Any]:
    """A throwaway mapping of ``table_name`` with ``width`` text primary-key columns: enough to
    name its keys when the console script has no access to the application's models."""
    schema, _, name = table_name.rpartition(".")
    table = Table(
        name,
        MetaData(),
        *[Column(f"pk{i}", String, primary_key=True) for i in range(width)],
        schema=schema or None,
    )
    cls = type(name, (), {})
    registry().map_imperatively(cls, table)
    return cls


def _import_model(path: str) -> type[Any]:
    module_name, _, attr = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"cannot import {path!r}: {exc}", param_hint="MODEL") from None
    if not isinstance(target, type):
        raise click.BadParameter(f"{path!r} is not a class", param_hint="MODEL")
    return target


@main.command()
@_redis_url
@_prefix
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(redis_url: str, prefix: str, as_json: bool) -> None:
    """Counters of every process using the cache, summed (published every few seconds)."""
    print_stats(_open(redis_url, prefix), as_json=as_json)


@main.command()
@_redis_url
@_prefix
@click.argument("model")
@click.argument("pk", nargs=-1, required=True)
def evict(redis_url: str, prefix: str, model: str, pk: tuple[str, ...]) -> None:
    """Evict one row now.

    MODEL is a class to import (``myapp.models:User``: the key is normalised exactly as the
    application does) or a table name (``users``: PK is used as typed, which is right for
    integer and text keys). Several PK values name a composite key, in primary-key order.
    """
    cache = _open(redis_url, prefix)
    cls = _import_model(model) if ":" in model else _table_model(model, len(pk))
    cache.register(cls)
    evict_row(cache, cls, pk)


@main.command()
@_redis_url
@_prefix
def flush(redis_url: str, prefix: str) -> None:
    """Remove every key of this cache: only keys under PREFIX, never FLUSHDB."""
    flush_cache(_open(redis_url, prefix))
