"""Real Redis servers for tests: a master, replicas (`replicaof`) and Sentinels.

Each server runs in its own temporary directory on a free 127.0.0.1 port,
without persistence, and is stopped by `stop()` (the pytest fixtures in
the test modules call it at teardown)::

    master = RedisServer.start(tmp_path / "master")
    replica = RedisServer.start(tmp_path / "replica", replica_of=master)
    replica.wait_synced()
    sentinel = RedisSentinel.start(tmp_path / "sentinel", master, service="mg")
    ...
    for s in (sentinel, replica, master):
        s.stop()
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from support import LOOPBACK, SupportError, free_port, port_accepts, stop_process, wait_until

__all__ = ["RedisServer", "RedisSentinel", "redis_available"]


def redis_available() -> bool:
    return bool(shutil.which("redis-server") and shutil.which("redis-sentinel"))


class _Process:
    binary = "redis-server"

    def __init__(self, workdir: Path, port: int, conf: str) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.conf_path = self.workdir / "redis.conf"
        self.conf_path.write_text(conf)
        self.log_path = self.workdir / "redis.log"
        self.proc: subprocess.Popen | None = None

    def _spawn(self) -> None:
        self.proc = subprocess.Popen([shutil.which(self.binary) or self.binary, str(self.conf_path)],
                                     cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: self.proc.poll() is not None or port_accepts(self.port), timeout=10,
                       what=f"{self.binary} on port {self.port}")
        except SupportError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise SupportError(f"{self.binary} exited: {self.log()}")

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=2)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the server vanishes as in a crash."""
        if self.running:
            assert self.proc is not None
            stop_process(self.proc, timeout=5, sig=signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=5)

    def restart(self) -> None:
        """Start again on the same port (after stop() or kill())."""
        self.stop()
        self._spawn()


class RedisServer(_Process):
    """One redis-server: a master, or a replica of another RedisServer."""

    @classmethod
    def start(cls, workdir: Path, replica_of: "RedisServer | None" = None, port: int | None = None) -> "RedisServer":
        port = port or free_port()
        lines = [
            f"port {port}", f"bind {LOOPBACK}", "save \"\"", "appendonly no", f"dir {workdir}",
            f"logfile {Path(workdir) / 'redis.log'}", "daemonize no", "protected-mode no",
            "repl-diskless-sync yes", "repl-diskless-sync-delay 0", "repl-ping-replica-period 1",
        ]
        if replica_of is not None:
            lines.append(f"replicaof {LOOPBACK} {replica_of.port}")
        server = cls(workdir, port, "\n".join(lines) + "\n")
        server._spawn()
        return server

    def wait_synced(self, timeout: float = 10) -> None:
        """Wait until this replica's link to its master is up."""
        def up() -> bool:
            try:
                info = self.client().info("replication")
            except redis.RedisError:
                return False
            return info.get("master_link_status") == "up"

        wait_until(up, timeout=timeout, what=f"replica on port {self.port} in sync")

    def wait_replicated(self, replica: "RedisServer", timeout: float = 10) -> None:
        """Wait until *replica* has caught up with everything written here."""
        def caught_up() -> bool:
            try:
                master_off = self.client().info("replication")["master_repl_offset"]
                info = replica.client().info("replication")
            except redis.RedisError:
                return False
            return info.get("master_link_status") == "up" and info.get("slave_repl_offset", -1) >= master_off

        wait_until(caught_up, timeout=timeout, what=f"replica on port {replica.port} caught up")

    def role(self) -> str:
        return self.client().execute_command("ROLE")[0].decode()


class RedisSentinel(_Process):
    """A redis-sentinel watching one master, with short timeouts (failover in seconds)."""

    binary = "redis-sentinel"

    @classmethod
    def start(cls, workdir: Path, master: RedisServer, service: str = "mymaster",
              down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> "RedisSentinel":
        port = free_port()
        conf = "\n".join([
            f"port {port}", f"bind {LOOPBACK}", f"dir {workdir}", f"logfile {Path(workdir) / 'redis.log'}",
            "daemonize no", "protected-mode no",
            f"sentinel monitor {service} {LOOPBACK} {master.port} 1",
            f"sentinel down-after-milliseconds {service} {down_after_ms}",
            f"sentinel failover-timeout {service} {failover_timeout_ms}",
            f"sentinel parallel-syncs {service} 1",
        ]) + "\n"
        sentinel = cls(workdir, port, conf)
        sentinel.service = service
        sentinel._spawn()
        return sentinel

    def master_port(self) -> int | None:
        try:
            addr = self.client().execute_command("SENTINEL", "get-master-addr-by-name", self.service)
        except redis.RedisError:
            return None
        return int(addr[1]) if addr else None

    def wait_replicas_known(self, count: int = 1, timeout: float = 15) -> None:
        """Wait until the Sentinel has discovered *count* replicas of its master."""
        def known() -> bool:
            try:
                replicas = self.client().execute_command("SENTINEL", "replicas", self.service)
            except redis.RedisError:
                return False
            return len(replicas) >= count

        wait_until(known, timeout=timeout, what="sentinel knows the replicas")

    def wait_failover(self, old_port: int, timeout: float = 30) -> int:
        """Wait until the Sentinel names another master than *old_port*; its port."""
        start = time.monotonic()
        wait_until(lambda: (self.master_port() or old_port) != old_port, timeout=timeout, what="sentinel failover")
        port = self.master_port()
        assert port is not None, f"no master after {time.monotonic() - start:.1f}s"
        return port
