"""The local services and the throwaway databases that tests, benchmarks and the randomized
checker create on them: one implementation, so all three create and drop databases the same way.

Nothing here imports pytest: the benchmarks run without it (``require_service`` in conftest.py
turns a closed port into a skip or a failure).
"""

from __future__ import annotations

import socket

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

SERVERS = {
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432",
    "mariadb": "mysql+pymysql://root@127.0.0.1:3306",
}
PORTS = {"sqlite": None, "postgresql": 5432, "mariadb": 3306, "redis": 6379}


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def available(service: str) -> bool:
    """Whether ``service`` (a key of :data:`PORTS`) answers; SQLite always does."""
    port = PORTS[service]
    return port is None or port_open(port)


def admin_url(server: str) -> URL:
    """``server`` (a URL, with or without a database) pointed at a database that always exists."""
    url = make_url(server)
    if not url.database:
        url = url.set(database="postgres" if url.get_backend_name() == "postgresql" else "test")
    return url


def create_database(server: str, name: str) -> str:
    """(Re)create database ``name`` on ``server``, empty, and return its URL."""
    drop_database(server, name)
    admin = create_engine(admin_url(server), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return admin_url(server).set(database=name).render_as_string(hide_password=False)


def drop_database(server: str, name: str) -> None:
    """Drop database ``name`` on ``server`` if it exists, whoever is still connected to it."""
    url = admin_url(server)
    force = " WITH (FORCE)" if url.get_backend_name() == "postgresql" else ""
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}{force}"))
    admin.dispose()
