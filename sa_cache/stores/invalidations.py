"""Redis server-assisted client tracking: the messages that tell a near cache which keys changed.

One connection per master (per primary of a Redis Cluster), of its own, speaking RESP2 over a
plain socket: ``CLIENT ID``, then ``CLIENT TRACKING on REDIRECT <its own id> BCAST PREFIX <p>``,
then ``SUBSCRIBE __redis__:invalidate``. From then on the server sends, for every key under the
prefix that any client modifies (a write, a delete, an expiry, an eviction), a message naming it;
a FLUSHALL or FLUSHDB sends one naming no key (everything is invalid).

A silent connection proves nothing: a partitioned server sends no message either. So the link
sends a PING every ``ping_interval`` and remembers, per connection, when it sent the last ping
whose PONG came back. The server answers in order, so that PONG proves every invalidation of a
write acknowledged before that ping was sent has arrived. :meth:`Invalidations.confirmed` is the
oldest such time over every connection: what a near cache may trust, and only for ``max_age``.

A supervisor thread ("sa_cache-invalidations") connects, pings, reads as soon as a message arrives,
re-resolves the masters every ``topology_interval`` (a Sentinel's current master, a Cluster's
primaries as its client knows them) and reconnects after a failure. Every loss (a connection
dropped or timed out, a change of master or of primaries) is reported through ``on_flush``: the
near cache drops everything, since a message may have been lost with the connection. Readers call
:meth:`Invalidations.drain` before each answer, so a message that has already reached the socket is
never missed while the supervisor sleeps.

The thread holds the listener only weakly: a listener no one uses any more is collected and its
thread ends.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

CHANNEL: Final = b"__redis__:invalidate"
_CRLF: Final = b"\r\n"


class Endpoint(NamedTuple):
    """Where a master listens, and how to log in and talk to it."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    ssl: ssl.SSLContext | None = None


class LinkError(Exception):
    """A tracking connection failed, timed out or answered something unexpected."""


class _Incomplete(Exception):
    """The buffer ends inside a reply."""


def _encode(*args: bytes | str | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _parse(buffer: bytes, at: int) -> tuple[Any, int]:
    """One RESP2 reply from ``buffer[at:]``: (the reply, where the next one starts)."""
    end = buffer.find(_CRLF, at)
    if end < 0:
        raise _Incomplete
    kind, line, after = buffer[at : at + 1], buffer[at + 1 : end], end + 2
    if kind in (b"+", b":"):
        return (line if kind == b"+" else int(line)), after
    if kind == b"-":
        return LinkError(line.decode(errors="replace")), after
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, after
        if len(buffer) < after + size + 2:
            raise _Incomplete
        return buffer[after : after + size], after + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            item, after = _parse(buffer, after)
            items.append(item)
        return items, after
    raise LinkError(f"unexpected RESP2 reply type {kind!r}")


class Link:
    """One tracking connection to one master (see the module docstring)."""

    def __init__(self, endpoint: Endpoint, prefix: str, timeout: float) -> None:
        self.endpoint = endpoint
        self._buffer = b""
        self._pings: list[float] = []  # send times of the pings not yet answered, oldest first
        self.confirmed = -1.0  # send time of the last ping answered; -1: none yet
        sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
        if endpoint.ssl is not None:
            sock = endpoint.ssl.wrap_socket(sock, server_hostname=endpoint.host)
        self.sock = sock
        try:
            if endpoint.password is not None:
                auth = [endpoint.username] if endpoint.username else []
                self._ask("AUTH", *auth, endpoint.password)
            client_id = self._ask("CLIENT", "ID")
            self._ask("CLIENT", "TRACKING", "on", "REDIRECT", client_id, "BCAST", "PREFIX", prefix)
            self._ask("SUBSCRIBE", CHANNEL)
        except BaseException:
            self.close()
            raise
        sock.setblocking(False)

    def _ask(self, *command: bytes | str | int) -> Any:
        """Send ``command`` and wait for its reply (only while connecting: blocking)."""
        self.sock.sendall(_encode(*command))
        while True:
            try:
                reply, at = _parse(self._buffer, 0)
            except _Incomplete:
                data = self.sock.recv(65536)
                if not data:
                    raise LinkError("connection closed") from None
                self._buffer += data
                continue
            self._buffer = self._buffer[at:]
            if isinstance(reply, LinkError):
                raise reply
            return reply

    def ping(self, now: float) -> None:
        try:
            self.sock.send(_encode("PING"))
        except (BlockingIOError, ssl.SSLWantWriteError):
            return  # the send buffer is full: the server is not reading; pings will time out
        self._pings.append(now)

    def read(self) -> list[list[bytes] | None]:
        """The invalidations that have arrived (a list of keys, or None: everything), without
        waiting; PONGs are consumed and move :attr:`confirmed`. Raises :class:`LinkError` or
        ``OSError`` if the connection is gone."""
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                break
            if not data:
                raise LinkError("connection closed")
            self._buffer += data
        messages: list[list[bytes] | None] = []
        at = 0
        while at < len(self._buffer):
            try:
                reply, at = _parse(self._buffer, at)
            except _Incomplete:
                break
            if isinstance(reply, LinkError):
                raise reply
            if isinstance(reply, list) and reply and reply[0] == b"pong":
                if not self._pings:
                    raise LinkError("a PONG no PING asked for")
                self.confirmed = self._pings.pop(0)
            elif isinstance(reply, list) and len(reply) == 3 and reply[:2] == [b"message", CHANNEL]:
                messages.append(reply[2])  # None: FLUSHALL / FLUSHDB
        self._buffer = self._buffer[at:]
        return messages

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def endpoints_of(store: Any) -> list[Endpoint]:
    """The masters of a Redis store: a Cluster client's primaries (as the client knows them), a
    Sentinel pool's master (asked of the sentinels), or a plain client's server; each spoken to
    over TLS exactly when, and as, the store's own connections are."""
    client = store.client
    if hasattr(client, "get_primaries"):  # redis.cluster.RedisCluster
        options = client.get_connection_kwargs()
        context = tls_context(options, options.get("connection_class"))
        return [
            _endpoint(node.host, node.port, options, context)
            for node in sorted(client.get_primaries(), key=lambda n: (n.host, n.port))
        ]
    pool = client.connection_pool
    options = pool.connection_kwargs
    context = tls_context(options, pool.connection_class)
    if hasattr(pool, "get_master_address"):  # redis.sentinel.SentinelConnectionPool
        host, port = pool.get_master_address()
        return [_endpoint(host, port, options, context)]
    if "path" in options:
        raise ValueError("a near cache needs a TCP Redis, not a unix socket")
    host, port = options.get("host", "localhost"), options.get("port", 6379)
    return [_endpoint(host, port, options, context)]


def _endpoint(
    host: str, port: int, options: dict[str, Any], context: ssl.SSLContext | None
) -> Endpoint:
    return Endpoint(host, int(port), options.get("username"), options.get("password"), context)


#: redis-py's ``ssl_cert_reqs`` names
_CERT_REQS: Final = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}


#: contexts made by :func:`tls_context`, by the options they were made from
_CONTEXTS: dict[tuple[Any, ...], ssl.SSLContext | None] = {}


def tls_context(options: dict[str, Any], connection_class: Any = None) -> ssl.SSLContext | None:
    """:func:`make_tls_context`, made once per set of options: the supervisor resolves the
    masters every ``topology_interval`` and compares what it gets with what it connected to, so
    the same options must give the same context (a new one would look like a change of master
    and drop everything; making one also reads the system's CA store, about 17 ms)."""
    key = (connection_class, repr(sorted((k, v) for k, v in options.items() if k[:3] == "ssl")))
    context = _CONTEXTS.get(key)
    if context is None and key not in _CONTEXTS:
        context = make_tls_context(options, connection_class)
        if len(_CONTEXTS) >= 64:  # options made on the fly: never grow without bound
            _CONTEXTS.clear()
        _CONTEXTS[key] = context
    return context


def make_tls_context(
    options: dict[str, Any], connection_class: Any = None
) -> ssl.SSLContext | None:
    """The TLS settings of a store's connections, for a tracking connection: None if they speak
    plain TCP. A ``rediss://`` URL says TLS by its connection class (redis-py's
    ``SSLConnection``, or a Sentinel's), ``ssl=True`` by the option; either way the context
    verifies (certificate, host name, CA files, client certificate, versions, ciphers) as
    redis-py's ``SSLConnection`` does with the same ``ssl_*`` options: a tracking connection
    trusts what the store's connections trust, never more. Options it cannot mirror (OCSP) are
    refused: such a near cache never connects, so it never serves from memory."""
    from redis.connection import SSLConnection

    cls = connection_class
    if not options.get("ssl") and not (isinstance(cls, type) and issubclass(cls, SSLConnection)):
        return None
    if options.get("ssl_validate_ocsp") or options.get("ssl_validate_ocsp_stapled"):
        raise ValueError("a near cache's tracking connection cannot validate OCSP")
    reqs = options.get("ssl_cert_reqs", "required")
    if reqs is None:
        reqs = ssl.CERT_NONE
    elif isinstance(reqs, str):
        reqs = _CERT_REQS.get(reqs, reqs)
    if not isinstance(reqs, ssl.VerifyMode):
        raise ValueError(f"invalid ssl_cert_reqs {reqs!r}")
    context = ssl.create_default_context()
    context.check_hostname = bool(options.get("ssl_check_hostname", True)) and reqs != ssl.CERT_NONE
    context.verify_mode = reqs
    for flag in options.get("ssl_include_verify_flags") or ():
        context.verify_flags |= flag
    for flag in options.get("ssl_exclude_verify_flags") or ():
        context.verify_flags &= ~flag
    certfile, keyfile = options.get("ssl_certfile"), options.get("ssl_keyfile")
    if certfile or keyfile:
        if not certfile:
            raise ValueError("ssl_keyfile without ssl_certfile")
        context.load_cert_chain(certfile, keyfile, options.get("ssl_password"))
    cafile, capath, cadata = (options.get(f"ssl_ca_{n}") for n in ("certs", "path", "data"))
    if cafile is not None or capath is not None or cadata is not None:
        context.load_verify_locations(cafile=cafile, capath=capath, cadata=cadata)
    if options.get("ssl_min_version") is not None:
        context.minimum_version = options["ssl_min_version"]
    if options.get("ssl_ciphers"):
        context.set_ciphers(options["ssl_ciphers"])
    return context


class _Poller:
    """Whether any of some sockets has bytes to read, without waiting, from any thread at once:
    ``epoll`` where there is one (``select.poll`` refuses concurrent calls), else ``select``."""

    def __init__(self) -> None:
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._sockets: list[socket.socket] = []

    def register(self, sock: socket.socket) -> None:
        self._sockets.append(sock)
        if self._epoll is not None:
            self._epoll.register(sock.fileno(), select.EPOLLIN)

    def poll(self, timeout: float) -> bool:
        if self._epoll is not None:
            return bool(self._epoll.poll(timeout))
        return bool(select.select(self._sockets, [], [], timeout)[0])

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()


class Invalidations:
    """The tracking connections of one near cache and their supervisor (module docstring).

    ``on_keys(keys)`` receives the keys of each message (as str), ``on_flush()`` every loss of
    coherence; both are called with the listener's lock held, from the supervisor thread or from
    a reader's :meth:`drain`.
    """

    def __init__(
        self,
        resolve: Callable[[], Sequence[Endpoint]],
        prefix: str,
        on_keys: Callable[[list[str]], None],
        on_flush: Callable[[], None],
        *,
        ping_interval: float = 0.1,
        timeout: float = 0.25,
        topology_interval: float = 1.0,
    ) -> None:
        self._resolve = resolve
        self.prefix = prefix
        self._on_keys = on_keys
        self._on_flush = on_flush
        self.ping_interval = ping_interval
        self.timeout = timeout
        self.topology_interval = topology_interval
        self._lock = threading.RLock()
        self._links: list[Link] = []
        self._endpoints: list[Endpoint] = []
        self._next_ping = 0.0
        self._next_topology = 0.0
        self._retry_at = 0.0
        self._closed = False
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._confirmed = -1.0  # see confirmed(); read without the lock
        self._poller: _Poller | None = None  # the links' sockets, for drain()
        #: the links' TLS sockets: bytes they decrypted and kept are where ``poll`` cannot see
        self._tls: tuple[ssl.SSLSocket, ...] = ()
        #: what went wrong last (for the health check and tests), None while connected
        self.last_error: str | None = "not connected yet"
        self.connects = 0

    # -- what readers ask ------------------------------------------------------------------------

    def confirmed(self) -> float:
        """The monotonic time before which every write's invalidation has arrived, on every
        master: the oldest send time of a ping answered (-1 if not connected)."""
        return self._confirmed

    def _update_confirmed(self) -> None:
        """Called with the lock held whenever a PONG arrives or the links change."""
        self._confirmed = min((link.confirmed for link in self._links), default=-1.0)

    def drain(self) -> None:
        """Apply the messages that have already arrived (readers call this before answering):
        one ``poll`` system call when nothing has. A TLS link is also read when its SSL object
        holds decrypted bytes (``pending()``, no system call): bytes taken off the socket that
        ``poll`` can no longer see. Under the lock, so a message the supervisor has taken off the
        socket but not applied yet is applied before this returns."""
        if self._pid != os.getpid():
            self._after_fork()
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._ensure_thread()
        with self._lock:
            poller = self._poller
            try:
                if poller is None or (
                    not poller.poll(0) and not any(sock.pending() for sock in self._tls)
                ):
                    return
                self._read_links()
            except Exception as exc:  # whatever it is, nothing read since can be trusted
                self._drop(f"draining failed: {type(exc).__name__}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop("closed")

    # -- the supervisor ---------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            with self._lock:
                if self._closed or (self._thread is not None and self._thread.is_alive()):
                    return
                self._thread = threading.Thread(
                    target=_supervise, args=(weakref.ref(self),), daemon=True,
                    name="sa_cache-invalidations",
                )  # fmt: skip
                self._thread.start()

    def _after_fork(self) -> None:
        """A forked child shares its parent's sockets: drop them (never closing the parent's
        connections with a QUIT) and start over with connections and a thread of its own."""
        self._pid = os.getpid()
        self._lock = threading.RLock()
        for link in self._links:
            link.close()
        self._links = []
        self._close_poller()
        self._update_confirmed()
        self._thread = None
        self._on_flush()

    def _drop(self, why: str) -> None:
        """Close every link and report the loss; called with the lock held."""
        for link in self._links:
            link.close()
        had = bool(self._links)
        self._links = []
        self._close_poller()
        self._update_confirmed()
        self.last_error = why
        if had or why:
            self._on_flush()

    def _close_poller(self) -> None:
        poller, self._poller = self._poller, None
        self._tls = ()
        if poller is not None:
            poller.close()

    def _read_links(self) -> None:
        for link in self._links:
            try:
                messages = link.read()
            except (OSError, LinkError) as exc:
                self._drop(f"tracking connection lost: {type(exc).__name__}")
                self._retry_at = time.monotonic() + self.ping_interval
                return
            if link.confirmed > self._confirmed:
                self._update_confirmed()
            for keys in messages:
                if keys is None:
                    self._on_flush()
                else:
                    self._on_keys([k.decode("utf-8", "surrogateescape") for k in keys])

    def _connect(self, now: float) -> None:
        endpoints = list(self._resolve())
        links = []
        try:
            for endpoint in endpoints:
                links.append(Link(endpoint, self.prefix, self.timeout))
        except BaseException:
            for link in links:
                link.close()
            raise
        with self._lock:
            if self._closed:
                for link in links:
                    link.close()
                return
            self._drop("")  # nothing was trusted before this
            self._links, self._endpoints = links, endpoints
            poller = _Poller()
            for link in links:
                poller.register(link.sock)
            self._poller = poller
            self._tls = tuple(link.sock for link in links if isinstance(link.sock, ssl.SSLSocket))
            self._update_confirmed()
            self.last_error = None
            self.connects += 1
            for link in links:
                link.ping(now)
            self._next_ping = now + self.ping_interval
            self._next_topology = now + self.topology_interval

    def tick(self) -> float:
        """One step of the supervisor: connect, ping, check the topology, time out; returns how
        long it may wait for a message before the next step."""
        now = time.monotonic()
        if not self._links:
            if now < self._retry_at:
                return self._retry_at - now
            try:
                self._connect(now)
            except Exception as exc:
                self.last_error = f"cannot connect: {type(exc).__name__}"
                self._retry_at = now + self.ping_interval
            return self.ping_interval
        if now >= self._next_topology:
            self._next_topology = now + self.topology_interval
            try:
                endpoints = list(self._resolve())
            except Exception:
                endpoints = self._endpoints  # the sentinels are unreachable: the pings decide
            if endpoints != self._endpoints:
                with self._lock:
                    self._drop("the masters changed")
                return 0.0
        with self._lock:
            if now >= self._next_ping:
                self._next_ping = now + self.ping_interval
                for link in self._links:
                    if link._pings and now - link._pings[0] > self.timeout:
                        self._drop("tracking connection timed out")
                        self._retry_at = now + self.ping_interval
                        return self.ping_interval
                    link.ping(now)
        return max(0.0, self._next_ping - now)

    def wait(self, seconds: float) -> None:
        """Wait up to ``seconds`` for a message, then apply what arrived."""
        links = self._links
        sockets = [link.sock for link in links]
        if not sockets:
            time.sleep(min(seconds, self.ping_interval))
            return
        with contextlib.suppress(OSError, ValueError):  # a socket closed meanwhile: read says so
            select.select(sockets, [], [], seconds)
        with self._lock:
            if self._links is links:
                self._read_links()


def _supervise(ref: weakref.ref[Invalidations]) -> None:
    while True:
        listener = ref()
        if listener is None or listener._closed or listener._pid != os.getpid():
            return
        try:
            pause = listener.tick()
            listener.wait(pause)
        except Exception as exc:  # never let the thread die silently: start over
            with listener._lock:
                listener._drop(f"supervisor error: {type(exc).__name__}")
            time.sleep(listener.ping_interval)
        del listener
