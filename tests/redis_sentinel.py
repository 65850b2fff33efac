"""A private Redis Sentinel deployment on spare loopback ports: a master, one replica and three
sentinels, each with its own temporary folder, with fast failover settings (a master is down
after 1 s without an answer). The shared Redis on 6379 is never touched.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from typing import Any

import redis

from .redis_server import RedisServer

SERVICE = "sa_cache_test"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


class SentinelServer(RedisServer):
    """``redis-server --sentinel`` monitoring ``master_port`` as :data:`SERVICE`."""

    def __init__(self, master_port: int) -> None:
        super().__init__()
        self.master_port = master_port

    def _command(self) -> list[str]:
        config = os.path.join(self.folder, "sentinel.conf")
        if not os.path.exists(config):  # a restarted sentinel keeps what it learnt
            with open(config, "w") as handle:
                handle.write(
                    f"port {self.port}\nbind 127.0.0.1\ndir {self.folder}\n"
                    f"logfile {os.path.join(self.folder, 'redis.log')}\n"
                    f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 2\n"
                    f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                    f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                    f"sentinel parallel-syncs {SERVICE} 1\n"
                )
        return [self._binary(), config, "--sentinel"]

    @staticmethod
    def _binary() -> str:
        from .redis_server import redis_binary

        return redis_binary()


class RedisSentinelServers:
    """``server_args``: extra ``redis-server`` arguments of both data servers (the replica may
    become the master), e.g. ``--min-replicas-to-write 1``."""

    def __init__(self, *server_args: str) -> None:
        self.master = RedisServer(*server_args)
        self.replica = RedisServer(*server_args, "--replicaof", "127.0.0.1", str(self.master.port))
        self.sentinels = [SentinelServer(self.master.port) for _ in range(3)]

    @property
    def servers(self) -> list[RedisServer]:
        return [self.master, self.replica]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def region_arguments(self) -> dict[str, Any]:
        """For ``make_region().configure("dogpile.cache.redis_sentinel", arguments=...)``."""
        return {
            "sentinels": [("127.0.0.1", s.port) for s in self.sentinels],
            "service_name": SERVICE,
            "socket_timeout": 1.0,
            "sentinel_kwargs": {"socket_timeout": 1.0},
        }

    def start(self) -> RedisSentinelServers:
        """Start everything and wait until the sentinels agree; on failure, stop what started."""
        try:
            self.master.start()
            self.replica.start()
            self.wait_replicated(self.master)
            for sentinel in self.sentinels:
                sentinel.start()
            self.wait(self._sentinels_agree, "the sentinels to see each other and the replica")
        except BaseException:
            self.stop()
            raise
        return self

    def sentinel_client(self, index: int = 0) -> redis.Redis:
        return self.sentinels[index].client(decode_responses=True)

    def master_port(self) -> int:
        """The master's port as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            try:
                _, port = self.sentinel_client(self.sentinels.index(sentinel)).execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE
                )
                return int(port)
            except redis.RedisError:
                continue
        raise RuntimeError("no sentinel answers")

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def _sentinels_agree(self) -> bool:
        for index in range(len(self.sentinels)):
            fields = self.sentinel_client(index).sentinel_master(SERVICE)
            if int(fields["num-slaves"]) < 1 or int(fields["num-other-sentinels"]) < 2:
                return False
        return True

    @staticmethod
    def wait_replicated(server: RedisServer) -> None:
        """Until ``server`` has a replica in sync."""

        def synced() -> bool:
            info = server.client().info("replication")
            return int(info.get("connected_slaves", 0)) >= 1 and "online" in str(
                info.get("slave0", {})
            )

        RedisSentinelServers.wait(synced, "a replica in sync")

    @staticmethod
    def wait(condition: Any, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: the graceful one (the old master is demoted later)."""
        self.sentinel_client().execute_command("SENTINEL", "FAILOVER", SERVICE)

    def wait_new_master(self, old_port: int, timeout: float = 30) -> int:
        self.wait(lambda: self.master_port() != old_port, "a new master", timeout)
        return self.master_port()

    def point_sentinels_at(self, server: RedisServer) -> None:
        """Make every sentinel name ``server`` as the master at once (what a failover ends with,
        without its timing): REMOVE and MONITOR again."""
        for index in range(len(self.sentinels)):
            client = self.sentinel_client(index)
            client.execute_command("SENTINEL", "REMOVE", SERVICE)
            client.execute_command("SENTINEL", "MONITOR", SERVICE, "127.0.0.1", server.port, 2)
            client.execute_command(
                "SENTINEL", "SET", SERVICE, "down-after-milliseconds", DOWN_AFTER_MS
            )

    def stop(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.stop()


_shared: RedisSentinelServers | None = None
_lock = threading.Lock()


def shared() -> RedisSentinelServers:
    """The test run's deployment for tests that leave its topology alone, started on first use
    (stopped at exit)."""
    global _shared
    with _lock:
        if _shared is None:
            servers = RedisSentinelServers()
            try:
                servers.start()
            except BaseException:
                servers.stop()
                raise
            _shared = servers
            atexit.register(stop_shared)
        return _shared


def stop_shared(*args: Any) -> None:
    global _shared
    with _lock:
        if _shared is not None:
            _shared.stop()
            _shared = None
