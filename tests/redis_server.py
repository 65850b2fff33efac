"""A private ``redis-server`` on a spare loopback port, for tests that kill, hang or restart it.

The shared Redis on 6379 is never touched this way.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

import redis

#: ``SA_CACHE_TEST_PORTS=21000-21999``: the loopback ports private servers may use (unset: any
#: port the kernel picks).
PORTS_ENV = "SA_CACHE_TEST_PORTS"


def port_range(spec: str | None = None) -> range | None:
    """The range named by ``SA_CACHE_TEST_PORTS`` (``LOW-HIGH``, both included), or None."""
    spec = os.environ.get(PORTS_ENV, "") if spec is None else spec
    if not spec.strip():
        return None
    low, sep, high = spec.strip().partition("-")
    try:
        first, last = int(low), int(high if sep else low)
    except ValueError:
        raise ValueError(f"{PORTS_ENV}={spec!r}: expected LOW-HIGH, e.g. 21000-21999") from None
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"{PORTS_ENV}={spec!r}: expected 1 <= LOW <= HIGH <= 65535")
    return range(first, last + 1)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A loopback port nothing listens on: inside ``SA_CACHE_TEST_PORTS`` when it is set (tried
    in random order), else one the kernel picks."""
    ports = port_range()
    if ports is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    for port in random.sample(ports, len(ports)):
        if _bindable(port):
            return port
    raise RuntimeError(f"no free port in {PORTS_ENV}={os.environ.get(PORTS_ENV)!r}")


def redis_binary() -> str:
    return shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """``extra_args`` are passed to ``redis-server`` as they are (``--maxmemory``, ``--requirepass``
    ...). With ``tls_dir`` (made by :func:`make_tls_files`) the server listens for TLS only, on
    ``port``, with ``server.crt``; ``tls_auth_clients`` ("no", "yes", "optional") says whether a
    client must present a certificate signed by ``ca.crt``."""

    def __init__(
        self, *extra_args: str, tls_dir: str | None = None, tls_auth_clients: str = "no"
    ) -> None:
        self.port = free_port()
        self.folder = tempfile.mkdtemp(prefix="sa_cache_redis_")
        self.extra_args = list(extra_args)
        self.tls_dir = tls_dir
        self.tls_auth_clients = tls_auth_clients
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        command = [redis_binary(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", self.folder, "--logfile", os.path.join(self.folder, "redis.log")]
        if self.tls_dir is None:
            command += ["--port", str(self.port)]
        else:
            files = {name: os.path.join(self.tls_dir, name) for name in ("ca.crt", "server.crt")}
            command += ["--port", "0", "--tls-port", str(self.port)]
            command += ["--tls-cert-file", files["server.crt"]]
            command += ["--tls-key-file", os.path.join(self.tls_dir, "server.key")]
            command += ["--tls-ca-cert-file", files["ca.crt"]]
            command += ["--tls-auth-clients", self.tls_auth_clients]
        return command + self.extra_args

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start: {self.log()[-2000:]}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def log(self) -> str:
        try:
            with open(os.path.join(self.folder, "redis.log")) as handle:
                return handle.read()
        except OSError:
            return ""

    def tls_url(self, host: str = "127.0.0.1", **query: str) -> str:
        """A ``rediss://`` URL of this TLS server; ``query``: redis-py's ``ssl_*`` options
        (none: the CA of :func:`make_tls_files`, and its client certificate)."""
        assert self.tls_dir is not None, "not a TLS server"
        if not query:
            query = tls_options(self.tls_dir)
        options = "&".join(f"{name}={value}" for name, value in query.items())
        return f"rediss://{host}:{self.port}/0" + (f"?{options}" if options else "")

    def client(self, **options: Any) -> redis.Redis:
        """A client of its own (not the cache's), for injecting faults and looking inside; over
        TLS (trusting the test CA, with its client certificate) if the server is a TLS one."""
        if self.tls_dir is not None:
            options = {"ssl": True, **tls_options(self.tls_dir), **options}
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **options)

    def kill(self) -> None:
        """SIGKILL: the process and everything in its memory are gone at once."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None
            self.paused = False

    def restart(self) -> None:
        """SIGKILL, then a new process on the same port, with empty memory."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections (the kernel's backlog), nothing answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.process is not None and self.paused:
            self.resume()
        self.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


def tls_options(folder: str) -> dict[str, str]:
    """redis-py's options (``ssl_*``) of a client trusting the CA of :func:`make_tls_files` and
    presenting its client certificate."""
    return {
        "ssl_ca_certs": os.path.join(folder, "ca.crt"),
        "ssl_certfile": os.path.join(folder, "client.crt"),
        "ssl_keyfile": os.path.join(folder, "client.key"),
    }


def make_tls_files(folder: str) -> None:
    """Throwaway certificates in ``folder``, made with the ``openssl`` command line: a CA
    (``ca.crt``), a server certificate it signed for 127.0.0.1 and localhost (``server.crt``,
    ``server.key``), a client certificate it signed (``client.crt``, ``client.key``), and another
    CA that signed nothing here (``other-ca.crt``: what a client trusting the wrong CA has)."""
    binary = shutil.which("openssl")
    if binary is None:
        raise FileNotFoundError("openssl")

    def run(*args: str) -> None:
        subprocess.run([binary, *args], cwd=folder, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca, name in (("ca", "sa_cache test CA"), ("other-ca", "sa_cache other test CA")):
        run("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2",
            "-subj", f"/CN={name}")  # fmt: skip
    extensions = {
        "server": "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for name, extension in extensions.items():
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        with open(os.path.join(folder, f"{name}.cnf"), "w") as handle:
            handle.write(extension)
        run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.cnf",
        )  # fmt: skip
