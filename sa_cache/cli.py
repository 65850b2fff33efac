"""The ``sa-cache`` console script."""

from __future__ import annotations

import click

from . import demo as demo_module


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
