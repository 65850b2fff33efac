"""A TCP forwarder on a free loopback port that can stall: one process's private way to Redis.

A process that reaches the shared Redis only through its own :class:`StallingProxy` can be cut
off from Redis (and only it: every other process keeps its direct connection) without pausing,
killing or reconfiguring the shared server. While stalled the proxy neither accepts connections
nor moves a byte in either direction: the client's commands and Redis's replies wait in the
kernel's buffers, as on a network that stopped delivering, so the client's reads time out. When
the stall ends, whatever was buffered is delivered, in order, as TCP would.

Threads, not asyncio: two per connection plus one accepting, each blocking at most
:data:`POLL` seconds, so a stall starts within that time and :meth:`StallingProxy.close` returns.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time

from ..redis_server import free_port

#: seconds a forwarding thread blocks before it looks at the stall and stop flags again
POLL = 0.01
CHUNK = 65536


class StallingProxy:
    """Forwards ``127.0.0.1:port`` to ``upstream`` (host, port) until :meth:`close`."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(POLL)
        self._running = threading.Event()  # set: forwarding; clear: stalled
        self._running.set()
        self._closed = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._accept, daemon=True, name="proxy-accept")]
        self._threads[0].start()

    # -- control --------------------------------------------------------------------------------

    def stall(self) -> None:
        """Stop accepting and forwarding (bytes already in flight stay buffered)."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @property
    def stalled(self) -> bool:
        return not self._running.is_set()

    def close(self) -> None:
        self._closed.set()
        self._running.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _close(sock)
        self._listener.close()
        for thread in list(self._threads):
            thread.join(timeout=5)

    # -- forwarding -----------------------------------------------------------------------------

    def _wait_running(self) -> bool:
        """Block while stalled; False once the proxy is closed."""
        while not self._running.wait(POLL):
            if self._closed.is_set():
                return False
        return not self._closed.is_set()

    def _accept(self) -> None:
        while self._wait_running():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets.update((client, server))
            for source, target in ((client, server), (server, client)):
                thread = threading.Thread(
                    target=self._pump, args=(source, target), daemon=True, name="proxy-pump"
                )
                self._threads.append(thread)
                thread.start()
            self._threads = [t for t in self._threads if t.is_alive()]

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while self._wait_running():
                readable, _, _ = select.select([source], [], [], POLL)
                if not readable or not self._running.is_set():
                    continue  # a stall that began during select leaves the bytes buffered
                data = source.recv(CHUNK)
                if not data:
                    break
                target.sendall(data)
        except (OSError, ValueError):  # ValueError: the other direction closed the socket
            pass
        finally:
            for sock in (source, target):
                with self._lock:
                    self._sockets.discard(sock)
                _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def stall_for(proxy: StallingProxy, seconds: float) -> tuple[int, int]:
    """Stall ``proxy`` for ``seconds``; the window as ``time.monotonic_ns()`` (start, end), its
    end taken :data:`POLL` after the resume: by then every forwarding thread has woken up."""
    started = time.monotonic_ns()
    proxy.stall()
    time.sleep(seconds)
    proxy.resume()
    return started, time.monotonic_ns() + int(POLL * 1e9)
