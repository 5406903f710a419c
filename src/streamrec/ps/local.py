"""A cluster of storage processes on this machine: for the demo, benchmarks and tests.

Owns: ``loopback_spec`` (a spec of N zones x M nodes on free loopback ports)
and ``LocalCluster``, which runs each node as a ``streamrec ps serve`` child
process, waits until it serves, kills and restarts nodes, and cleans up their
files. It must not reach into a server's memory: it sees the nodes as a client
does (HELLO over TCP) and as an operator does (signals).

Thread safety: one controlling thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from streamrec.cluster.spec import ClusterSpec, NodeSpec, TableSpec
from streamrec.config import table_config_from_dict
from streamrec.errors import TransportError
from streamrec.transport.frames import Frame, Kind, Status
from streamrec.transport.tcp import TcpConnection

__all__ = ["LocalCluster", "free_port", "loopback_spec"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a race with other binders is possible, and rare)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_spec(name: str, *, zones: int = 2, nodes_per_zone: int = 2, shards: int = 2, dim: int = 64,
                  optimizer: str = "adagrad", replicas_per_zone: int = 1, metrics: bool = True,
                  data_root: str | os.PathLike[str] | None = None, table: str = "emb", serving: int = 0,
                  fanout: int = 4, ring_bytes: int = 64 << 20, mode: str | None = None,
                  election_timeout_s: tuple[float, float] = (0.4, 1.4),
                  max_staleness_s: float = 1.0) -> ClusterSpec:
    """A spec of ``zones`` zones of ``nodes_per_zone`` nodes each (one pod per node), on free ports.

    Nodes are named ``z<zone>n<node>`` (``z1n1``, ``z1n2``, ``z2n1`` ...); their data
    directories sit under ``data_root`` (default ``/dev/shm/streamrec/<name>``).
    ``serving`` read-only fan-out replicas of the table (``f01``, ``f02`` ..., zone
    ``fan``, no metrics server) join them, in a tree of fan-out ``fanout``.
    ``mode`` "strong" gives every writable node a run of free Raft ports (one per
    shard) and makes the table strong; ``election_timeout_s`` and
    ``max_staleness_s`` are then its Raft settings.
    """
    root = Path(data_root) if data_root is not None else Path("/dev/shm/streamrec") / name
    nodes = [NodeSpec(f"z{z}n{n}", port=free_port(), zone=f"z{z}", pod=f"z{z}p{n}",
                      metrics_port=free_port() if metrics else 0, data_dir=str(root / f"z{z}n{n}"),
                      raft_port=_free_run(shards) if mode == "strong" else 0)
             for z in range(1, zones + 1) for n in range(1, nodes_per_zone + 1)]
    fan = [NodeSpec(f"f{i:02d}", port=free_port(), zone="fan", data_dir=str(root / f"f{i:02d}"))
           for i in range(1, serving + 1)]
    config = table_config_from_dict({"dim": dim, "optimizer": optimizer})
    return ClusterSpec(name, (*nodes, *fan), (TableSpec(table, config, shards=shards,
                                                        replicas_per_zone=replicas_per_zone,
                                                        serving=tuple(n.name for n in fan), fanout=fanout,
                                                        ring_bytes=ring_bytes, mode=mode,
                                                        election_timeout_s=election_timeout_s,
                                                        max_staleness_s=max_staleness_s),))


def _free_run(n: int) -> int:
    """The first of ``n`` consecutive TCP ports free on 127.0.0.1 now (races as ``free_port``)."""
    while True:
        base = free_port()
        if base + n > 65536:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for p in range(base + 1, base + n):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", p))
            except OSError:
                continue
        return base


class LocalCluster:
    """Run every node of ``spec`` as a child process on this machine.

    Args:
        spec: the cluster; every node must be on this host.
        args: extra ``streamrec ps serve`` arguments for every node (``--no-shm`` ...).
        log_dir: where each node's output goes (``<node>.log``); default a temp dir.

    Example::

        with LocalCluster(loopback_spec("t")) as cluster:
            cluster.start()
            cluster.kill("z1n1"); cluster.restart("z1n1")
    """

    def __init__(self, spec: ClusterSpec, *, args: tuple[str, ...] = (),
                 log_dir: str | os.PathLike[str] | None = None) -> None:
        self.spec = spec
        self._tmp = Path(tempfile.mkdtemp(prefix=f"streamrec-{spec.name}-"))
        self.log_dir = Path(log_dir) if log_dir is not None else self._tmp
        self.spec_path = self._tmp / "cluster.toml"
        self.spec_path.write_text(spec.to_toml())
        self._args = args
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}

    def start(self, nodes: list[str] | None = None, *, wait: bool = True, timeout_s: float = 90.0) -> None:
        """Start ``nodes`` (default all) and, with ``wait``, block until each serves every replica."""
        names = nodes if nodes is not None else [n.name for n in self.spec.nodes]
        for name in names:
            self._spawn(name)
        if wait:
            for name in names:
                self.wait_ready(name, timeout_s)

    def _spawn(self, name: str) -> None:
        log = self._logs.get(name)
        if log is None:
            log = self._logs[name] = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (kept open)
        cmd = [sys.executable, "-m", "streamrec.cli", "ps", "serve", "--config", str(self.spec_path),
               "--node", name, *self._args]
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

    def hello(self, name: str, timeout_s: float = 0.5) -> dict | None:
        """The node's HELLO, or None if it does not answer."""
        try:
            with TcpConnection(self.spec.node(name).address, connect_timeout_s=timeout_s) as conn:
                reply = conn.request(Frame(Kind.HELLO, request_id=1), timeout_s)
        except TransportError:
            return None
        return json.loads(reply.text()) if reply.status == Status.OK else None

    def wait_ready(self, name: str, timeout_s: float = 90.0) -> None:
        """Block until ``name`` answers HELLO with every replica ready.

        Raises:
            RuntimeError: the process exited or the timeout passed (the log's tail is in the message).
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"node {name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            info = self.hello(name)
            if info is not None and all(s["ready"] for s in info["shards"]):
                return
            time.sleep(0.1)
        raise RuntimeError(f"node {name} not ready after {timeout_s} s:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        with contextlib.suppress(OSError):
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the node's process and reap it."""
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(30)

    def restart(self, name: str, *, wait: bool = True, timeout_s: float = 90.0) -> None:
        """Start a killed node again (it refills its replicas from a peer)."""
        self.kill(name)
        self.start([name], wait=wait, timeout_s=timeout_s)

    def pid(self, name: str) -> int | None:
        proc = self.procs.get(name)
        return proc.pid if proc is not None and proc.poll() is None else None

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after 10 s) and remove their files."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        for log in self._logs.values():
            log.close()
        self._logs.clear()
        parents = set()
        for n in self.spec.nodes:
            path = Path(self.spec.data_dir(n.name))
            shutil.rmtree(path, ignore_errors=True)
            parents.add(path.parent)
        for parent in parents:  # the cluster's own root (loopback_spec's), once empty; never more
            with contextlib.suppress(OSError):
                parent.rmdir()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
