"""A private Redis Cluster on loopback: 3 masters and 3 replicas, for the cluster store's tests;
or (``RedisClusterServers(replicas=0, tls_dir=...)``) a small TLS-only one for tests/test_tls.py.

Six ``redis-server`` processes (cluster mode, each with its own temporary folder and its own
client and cluster-bus ports from :func:`tests.redis_server.free_port`, so ``SA_CACHE_TEST_PORTS``
is honoured), joined by ``redis-cli --cluster create``. One cluster is shared by a whole test run
(:func:`shared`) and stopped when the run ends (``pytest_sessionfinish`` in ``tests/conftest.py``).
The shared Redis on 6379 is never touched.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import threading
import time
from typing import Any

import redis
from redis.crc import key_slot

from .redis_server import RedisServer, free_port

#: Milliseconds before a silent master is declared failed and its replica promoted; short, so a
#: failover test waits seconds, not the default 15.
NODE_TIMEOUT_MS = 1000
MASTERS = 3


class ClusterNodeServer(RedisServer):
    """One cluster-enabled ``redis-server``; its cluster bus on a spare port of its own. With
    ``tls_dir`` (tests/redis_server.py ``make_tls_files``) it listens for TLS only, and its
    cluster bus and replication speak TLS too (``--tls-cluster``, ``--tls-replication``)."""

    def __init__(self, tls_dir: str | None = None) -> None:
        self.bus_port = free_port()
        tls: tuple[str, ...] = ()
        if tls_dir is not None:  # a node is a TLS client of the others' buses: the client cert
            tls = ("--tls-cluster", "yes", "--tls-replication", "yes")
            tls += ("--tls-client-cert-file", os.path.join(tls_dir, "client.crt"))
            tls += ("--tls-client-key-file", os.path.join(tls_dir, "client.key"))
        super().__init__(
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--cluster-port", str(self.bus_port),
            # a replica may take over whatever its replication offset (the failover test kills
            # masters with writes in flight)
            "--cluster-replica-validity-factor", "0",
            *tls,
            tls_dir=tls_dir,
        )  # fmt: skip
        while self.bus_port == self.port:
            self.bus_port = free_port()
            self.extra_args[self.extra_args.index("--cluster-port") + 1] = str(self.bus_port)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class RedisClusterServers:
    """Three masters, each with ``replicas`` replicas (the shared cluster: one each); with
    ``tls_dir``, every node TLS only (:class:`ClusterNodeServer`). :meth:`start` creates the
    cluster and waits until every node says it is ok."""

    def __init__(self, replicas: int = 1, tls_dir: str | None = None) -> None:
        self.nodes: list[ClusterNodeServer] = []
        self.replicas = replicas
        self.tls_dir = tls_dir

    @property
    def url(self) -> str:
        """The documented sa_cache URL form, naming one node (the client discovers the rest);
        for a TLS cluster ``rediss+cluster://`` trusting the test CA (:meth:`tls_url`)."""
        if self.tls_dir is not None:
            return self.tls_url(ssl_ca_certs=os.path.join(self.tls_dir, "ca.crt"))
        return f"redis+cluster://{self.nodes[0].address}/"

    def tls_url(self, **query: str) -> str:
        """``rediss+cluster://`` naming one node, ``query``: redis-py's ``ssl_*`` options."""
        options = "&".join(f"{name}={value}" for name, value in query.items())
        return f"rediss+cluster://{self.nodes[0].address}/" + (f"?{options}" if options else "")

    def start(self) -> RedisClusterServers:
        for _ in range(MASTERS * (1 + self.replicas)):  # each started before the next picks
            node = ClusterNodeServer(tls_dir=self.tls_dir)
            self.nodes.append(node)
            node.start()
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        tls = []
        if self.tls_dir is not None:
            tls = ["--tls", "--cacert", os.path.join(self.tls_dir, "ca.crt")]
        subprocess.run(
            [cli, *tls, "--cluster", "create", *(n.address for n in self.nodes)]
            + ["--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        if self.replicas:
            self._write_to_every_master()
        self.wait_ok()
        return self

    def _write_to_every_master(self) -> None:
        """Redis lists a replica in CLUSTER SLOTS (what clients route by) only once it has
        replicated something: a fresh cluster's replicas are invisible to clients until then."""
        deadline = time.monotonic() + 30
        while len(self.masters()) < MASTERS or not all(
            self._node_ok(node, replicas=False) for node in self.running()
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not become ok")
            time.sleep(0.05)
        for node in self.masters():
            client = node.client()
            (first, *_), *_ = [r for r in client.execute_command("CLUSTER SLOTS") if
                               r[2][1] == node.port]  # fmt: skip
            key = next(f"warm{i}" for i in range(100_000) if key_slot(b"warm%d" % i) == first)
            client.set(key, b"x")

    def client(self, node: ClusterNodeServer) -> redis.Redis:
        return node.client()

    def running(self) -> list[ClusterNodeServer]:
        return [node for node in self.nodes if node.process is not None]

    def masters(self) -> list[ClusterNodeServer]:
        """The running nodes that are masters now (failover changes which)."""
        return [n for n in self.running() if n.client().info("replication")["role"] == "master"]

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every running node reports ``cluster_state:ok`` with every slot served, and
        every replica is in sync with its master."""
        deadline = time.monotonic() + timeout
        while True:
            if all(self._node_ok(node) for node in self.running()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the test cluster did not become ok")
            time.sleep(0.05)

    def _node_ok(self, node: ClusterNodeServer, replicas: bool = True) -> bool:
        """The node sees every slot served; with ``replicas``, it lists a replica for every
        master in CLUSTER SLOTS, and, itself a replica, is in sync with its master."""
        try:
            client = node.client()
            info = client.cluster("info")
            replication = client.info("replication")
            slots = client.execute_command("CLUSTER SLOTS")
        except redis.RedisError:
            return False
        if not isinstance(info, dict):
            return False
        ok = info.get("cluster_state") == "ok" and int(info.get("cluster_slots_ok", 0)) == 16384
        if replicas and self.replicas:
            ok = ok and all(len(entry) > 3 for entry in slots)
            if replication["role"] == "slave":
                ok = ok and replication.get("master_link_status") == "up"
        return ok

    def flushall(self) -> None:
        for node in self.masters():
            node.client().flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


_shared: RedisClusterServers | None = None
_lock = threading.Lock()


def available() -> bool:
    return shutil.which("redis-cli") is not None and shutil.which("redis-server") is not None


def shared() -> RedisClusterServers:
    """The test run's cluster, started on first use."""
    global _shared
    with _lock:
        if _shared is None:
            servers = RedisClusterServers()
            try:
                servers.start()
            except BaseException:
                servers.stop()
                raise
            _shared = servers
            atexit.register(stop_shared)  # a run that ends without pytest's session hook
        return _shared


def stop_shared(*args: Any) -> None:
    global _shared
    with _lock:
        if _shared is not None:
            _shared.stop()
            _shared = None
