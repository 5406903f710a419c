"""A client's link to one storage node: every transport it can use, best first.

Owns: ``NodeLink``, which learns what a node offers (a HELLO over TCP: its
host, its shared-memory and RDMA endpoints, the live directories of its
replicas), opens connections lazily, and drops and later reopens one that
failed. It must not choose between nodes or retry calls (``ps.client`` and
``cluster.router`` do that); it only says which transports are usable now, in
the order one-sided > shared memory > RDMA > TCP.

One-sided reads map a replica's live files read-only when the node runs on
this host (same kernel boot id). A mapped table outlives its writer, so before
every one-sided read the link checks that the process that wrote it is still
alive (``kill(pid, 0)``, about a microsecond); when it is not, the readers are
dropped and the next call goes to another transport or replica.

Thread safety: one thread at a time (the client's).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from streamrec.cluster.spec import ClusterSpec, NodeSpec
from streamrec.errors import PeerUnavailable, SnapshotError, TransportError
from streamrec.transport.base import Connection
from streamrec.transport.frames import Frame, Kind, Status
from streamrec.transport.inproc import InProcConnection
from streamrec.transport.tcp import TcpConnection

__all__ = ["PREFERENCE", "NodeLink"]

log = logging.getLogger("streamrec.ps")

PREFERENCE = ("one_sided", "shm", "rdma", "tcp")
_REOPEN_S = 0.5  # a failed transport is not reopened sooner than this
_REHELLO_S = 2.0  # how often to ask again while some replica was still filling
_HELLO_S = 0.5  # a HELLO's patience: the master answers it inline, and a call waits for it
_ids = itertools.count(1)


def _local_host() -> str:
    try:
        from streamrec.transport.shm import host_id

        return host_id()
    except ImportError:
        return ""


class NodeLink:
    """The transports from this client to one node.

    Args:
        spec: the cluster.
        node: the node.
        allowed: transports the client may use, a subset of ``PREFERENCE``.
        handler: for an in-process node (the embedded default): its request
            handler; then the link offers only ``inproc``.
    """

    def __init__(self, spec: ClusterSpec, node: NodeSpec, *, allowed: tuple[str, ...] = PREFERENCE,
                 handler: Callable[[Frame], Frame] | None = None, timeout_s: float = 1.0) -> None:
        self.spec = spec
        self.node = node
        self.allowed = allowed
        self._handler = handler
        self._timeout = timeout_s
        self._conns: dict[str, Connection] = {}
        self._readers: dict[tuple[int, int], Any] = {}
        self._blocked_until: dict[str, float] = {}
        self._hello: dict[str, Any] | None = None
        self._hello_at = 0.0
        self._hello_stale = False  # a transport failed: the node may have restarted
        self._local = _local_host()

    # -- what can be used --------------------------------------------------------------

    def transports(self, table: int, shard: int, *, read: bool, held_back: bool = False) -> list[str]:
        """Usable transports for one request, best first (never empty: TCP stays as the last resort).

        ``held_back``: also those that failed a moment ago (for a call with nowhere else to go).
        """
        if self._handler is not None:
            return ["inproc"]
        now = time.monotonic()
        self._refresh(now)
        info = self._hello or {}
        same_host = bool(self._local) and info.get("host") == self._local
        offers = info.get("offers", {})
        out = []
        for name in self.allowed:
            if self._blocked_until.get(name, 0.0) > now and not held_back:
                continue
            if name == "one_sided":
                if read and same_host and self._one_sided_dir(table, shard) is not None:
                    out.append(name)
            elif name == "tcp" or (name in offers and (same_host or name != "shm")):
                out.append(name)
        return out or ["tcp"]

    def blocked(self, name: str) -> bool:
        """Whether transport ``name`` failed too recently to be tried again."""
        return self._blocked_until.get(name, 0.0) > time.monotonic()

    def held_back(self) -> bool:
        """Whether some transport this link may use failed too recently to be tried again."""
        now = time.monotonic()
        return any(self._blocked_until.get(name, 0.0) > now for name in self.allowed)

    def _refresh(self, now: float) -> None:
        stale = self._hello is None or self._hello_stale or (
            now - self._hello_at > _REHELLO_S and not all(s["ready"] for s in self._hello["shards"]))
        if not stale or now - self._hello_at < _REOPEN_S or self.blocked("tcp"):
            return
        self._hello_at = now
        for again in (False, True):
            kept = self.has("tcp")
            try:
                reply = self.connection("tcp").request(Frame(Kind.HELLO, request_id=next(_ids)),
                                                       min(self._timeout, _HELLO_S))
            except (TransportError, ValueError) as exc:
                if kept and not again and isinstance(exc, PeerUnavailable):
                    self.drop("tcp")  # found broken before it was used: the node may have restarted
                    continue
                log.debug("hello to %s failed: %s", self.node.name, exc)
                self.failed("tcp")
                return
            if reply.status == Status.OK:
                try:
                    info = json.loads(reply.text())
                except ValueError as exc:
                    log.debug("hello to %s failed: %s", self.node.name, exc)
                    self.failed("tcp")
                    return
                if self._hello is not None and info.get("incarnation") != self._hello.get("incarnation"):
                    self._drop_conns(keep="tcp")  # a new process: its shm and rdma endpoints are new too
                self._hello, self._hello_stale = info, False
                self._drop_readers()
            return

    def _one_sided_dir(self, table: int, shard: int) -> str | None:
        for s in (self._hello or {}).get("shards", []):
            if s["table"] == table and s["shard"] == shard and s["ready"]:
                return s.get("live_dir")
        return None

    # -- opening and dropping ---------------------------------------------------------------

    def connection(self, name: str, *, force: bool = False) -> Connection:
        """The open connection for transport ``name``, opening it if needed (``force``: even
        if it failed a moment ago, for a call with nowhere else to go).

        Raises:
            PeerUnavailable: it cannot be opened now.
        """
        conn = self._conns.get(name)
        if conn is not None:
            return conn
        if not force and self._blocked_until.get(name, 0.0) > time.monotonic():
            raise PeerUnavailable("recently failed", peer=self.node.name, transport=name)
        try:
            conn = self._open(name)
        except (OSError, ValueError, ImportError, TransportError) as exc:
            self.failed(name)
            raise PeerUnavailable(f"cannot open: {exc}", peer=self.node.name, transport=name) from exc
        self._conns[name] = conn
        return conn

    def _open(self, name: str) -> Connection:
        mfb = self.spec.max_frame_bytes
        if name == "inproc" and self._handler is not None:
            return InProcConnection(self._handler, self.node.name)
        if name == "tcp":
            return TcpConnection(self.node.address, max_frame_bytes=mfb, connect_timeout_s=self._timeout)
        offer = (self._hello or {}).get("offers", {}).get(name)
        if offer is None:
            raise PeerUnavailable("not offered", peer=self.node.name, transport=name)
        if name == "shm":
            from streamrec.transport.shm import ShmConnection

            return ShmConnection.connect(offer, timeout_s=self._timeout)
        if name == "rdma":
            from streamrec.transport.rdma import RdmaConnection

            return RdmaConnection.connect(offer, timeout_s=self._timeout, max_frame_bytes=mfb)
        raise ValueError(f"unknown transport {name!r}")

    def reader(self, table: int, shard: int) -> Any:
        """A one-sided reader of that replica's live files (opened on first use).

        Raises:
            PeerUnavailable: the node's process is gone, or its files cannot be mapped.
        """
        info = self._hello or {}
        pid = int(info.get("pid", 0))
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError, OverflowError):
            self._hello = None
            self._drop_readers()
            raise PeerUnavailable(f"process {pid} is gone", peer=self.node.name,
                                  transport="one_sided") from None
        r = self._readers.get((table, shard))
        if r is None:
            path = self._one_sided_dir(table, shard)
            if path is None:
                raise PeerUnavailable("replica not ready", peer=self.node.name, transport="one_sided")
            from streamrec.ps.onesided import OneSidedReader

            try:
                r = OneSidedReader(path)
            except (OSError, MemoryError, SnapshotError) as exc:
                self.failed("one_sided")
                raise PeerUnavailable(f"cannot map {path}: {exc}", peer=self.node.name,
                                      transport="one_sided") from exc
            self._readers[(table, shard)] = r
        return r

    def has(self, name: str) -> bool:
        """Whether a connection for transport ``name`` is open (kept from earlier calls)."""
        return name in self._conns

    def drop(self, name: str) -> None:
        """Close transport ``name``'s connection without holding it back: it was found broken
        before a frame left on it (its peer restarted since it was last used), so a new one
        may be opened at once."""
        conn = self._conns.pop(name, None)
        if conn is not None:
            conn.close()
        self._hello_stale = True  # a new process: ask again what it offers

    def failed(self, name: str) -> None:
        """Transport ``name`` failed: close it; it is not reopened for a while."""
        self._blocked_until[name] = time.monotonic() + _REOPEN_S
        if name == "one_sided":
            self._drop_readers()
        conn = self._conns.pop(name, None)
        if conn is not None:
            conn.close()
        if name != "one_sided":
            self._hello_stale = True  # ask again what the node offers: it may have restarted

    def _drop_readers(self) -> None:
        for r in self._readers.values():
            with contextlib.suppress(Exception):
                r.close()
        self._readers.clear()

    def _drop_conns(self, keep: str = "") -> None:
        for name in [n for n in self._conns if n != keep]:
            self._conns.pop(name).close()

    def close(self) -> None:
        self._drop_readers()
        self._drop_conns()
