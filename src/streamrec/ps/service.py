"""The storage service: the shards one node hosts, and the execution of requests on them.

Owns: ``ShardReplica`` (one replica of one table shard: its table, its
readiness, the ids of writes it applied) and ``Service``, which turns a request
frame into a reply frame. It must not know transports or threads: the server
(``ps.server``) feeds it frames from any transport and from worker threads; the
embedded client feeds it frames in-process.

Request contracts (buffers in order; B keys, D the table's dim)::

    FIND            keys u64 (B,)                   -> values (B, D), found bool (B,)
    FIND_OR_INSERT  keys u64 (B,)                   -> values (B, D)
    APPLY_GRADIENTS keys u64 (B,), grads (B, D), lr f64 (1,) -> found bool (B,)
    ASSIGN          keys u64 (B,), values (B, D)    -> written bool (B,)
                    (aux 0: insert or assign; aux 1: assign existing keys only)
    ERASE           keys u64 (B,)                   -> removed i64 (1,)
    EXPORT          start i64 (1,), rows i64 (1,)   -> keys (n,), rows (n, D + state), next i64 (1,)
    STATS / HELLO   -                               -> JSON (uint8)
    SNAPSHOT        -                               -> JSON (uint8): the snapshot paths
    PING            -                               -> -

Writes apply once: each replica remembers the request ids of its last
``_WRITE_MEMORY`` writes, and a write whose id it has seen (a client retrying
on another transport after a lost reply) is answered without applying it again.

Thread safety: ``Service.handle`` may be called from many threads at once.
Reads run lock-free on the table; writes to one replica are serialised by its
lock, which also makes the check-and-record of write ids atomic.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.cluster.spec import ClusterSpec
from streamrec.config import TableConfig
from streamrec.errors import StoreError
from streamrec.store import EmbeddingTable
from streamrec.transport.frames import Frame, Kind, Status, error_reply, in_place, reply_to

__all__ = ["MAX_KEYS", "Service", "ShardReplica"]

log = logging.getLogger("streamrec.ps")

MAX_KEYS = 1 << 20  # keys per request: a 1 M-key FIND of dim 16 is 64 MiB, the default frame cap
_WRITE_MEMORY = 65_536  # write ids remembered per replica: minutes of retries at thousands of writes/s
_EXPORT_ROWS_MAX = 1 << 16
_WRITE_BUFFERS = {Kind.FIND_OR_INSERT: 1, Kind.APPLY_GRADIENTS: 3, Kind.ASSIGN: 2, Kind.ERASE: 1}
_WRITES = frozenset(_WRITE_BUFFERS)


class _BadRequest(Exception):
    """A well-formed frame with arguments the handler cannot take."""


class ShardReplica:
    """One replica of one shard, hosted by this node.

    Attributes:
        table_index, shard: which shard.
        table: its ``EmbeddingTable`` (file-backed when the service has a data dir,
            so one-sided readers on this host can map it).
        ready: False while the replica is being filled from a peer.
    """

    def __init__(self, table_index: int, shard: int, table: EmbeddingTable, *, ready: bool = True) -> None:
        self.table_index = table_index
        self.shard = shard
        self.table = table
        self.ready = ready
        self.lock = threading.Lock()
        self._applied: OrderedDict[int, None] = OrderedDict()

    def applied(self, request_id: int) -> bool:
        """Writer lock held: True if the write with this id was applied already.

        Id 0 opts out of deduplication (a caller that never retries)."""
        return request_id != 0 and request_id in self._applied

    def record(self, request_id: int) -> None:
        """Writer lock held: remember a write applied (only after it succeeded,
        so a retry after a failed attempt applies it)."""
        if request_id != 0:
            self._applied[request_id] = None
            if len(self._applied) > _WRITE_MEMORY:
                self._applied.popitem(last=False)


class Service:
    """Executes request frames against this node's shard replicas.

    Args:
        spec: the cluster.
        node: this node's name in ``spec``.
        data_dir: where tables keep their live files (for one-sided readers);
            None keeps them in anonymous memory (the embedded default).
        clock: the tables' clock (TTL), seconds.

    Raises:
        ConfigError: ``node`` is not in the spec.
    """

    def __init__(self, spec: ClusterSpec, node: str, *, data_dir: str | os.PathLike[str] | None = None,
                 ready: bool = True) -> None:
        self.spec = spec
        self.node = spec.node(node)
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.incarnation = f"{os.getpid()}-{time.time_ns()}"
        self.replicas: dict[tuple[int, int], ShardReplica] = {}
        for t, s in spec.shards_on(node):
            self.replicas[(t, s)] = ShardReplica(t, s, self._new_table(t, s), ready=ready)
        for t in sorted({t for t, _ in self.replicas}):
            _warm(spec.tables[t].config)

    def _new_table(self, t: int, s: int) -> EmbeddingTable:
        cfg = self.spec.tables[t].config
        if self.data_dir is None:
            return EmbeddingTable.from_config(cfg)
        path = self.live_dir(t, s)
        # A live directory left by an earlier run is never trusted here: a killed
        # server leaves it dirty, and a clean one may be behind its peers. The
        # replica starts empty and fills from a peer (or stays empty if none).
        shutil.rmtree(path, ignore_errors=True)
        return EmbeddingTable.from_config(cfg, path=path)

    def live_dir(self, t: int, s: int) -> Path:
        assert self.data_dir is not None
        return self.data_dir / f"{self.spec.tables[t].name}-{s}"

    def close(self) -> None:
        for r in self.replicas.values():
            r.table.close()

    # -- the one entry point ---------------------------------------------------------

    def handle(self, req: Frame) -> Frame:
        """The reply to ``req``; never raises (errors become error frames)."""
        try:
            if req.kind == Kind.PING:
                return reply_to(req)
            if req.kind == Kind.HELLO:
                return reply_to(req, [_json(self.hello())])
            if req.kind == Kind.STATS:
                return reply_to(req, [_json(self.stats())])
            if req.kind == Kind.SNAPSHOT:
                return reply_to(req, [_json(self.snapshot())])
            rep = self._replica(req)
            if isinstance(rep, Frame):
                return rep
            if req.kind in _WRITES:
                with rep.lock:
                    reply = self._write(rep, req, rep.applied(req.request_id))
                    rep.record(req.request_id)
                    return reply
            if req.kind == Kind.FIND:
                keys = _keys(req, 1)
                t = rep.table
                reply = in_place(req, [((keys.shape[0], t.dim), t.dtype), ((keys.shape[0],), np.bool_)])
                t.find(keys, out=reply.buffers[0], found=reply.buffers[1])
                return reply
            if req.kind == Kind.EXPORT:
                return self._export(rep, req)
            return error_reply(req, Status.UNKNOWN_KIND, f"kind {req.kind} is not a request")
        except _BadRequest as exc:
            return error_reply(req, Status.BAD_REQUEST, str(exc))
        except (TypeError, ValueError) as exc:  # the table's own input checks
            return error_reply(req, Status.BAD_REQUEST, str(exc))
        except StoreError as exc:
            return error_reply(req, Status.STORE_ERROR, str(exc))
        except Exception as exc:  # a bug must cost one request, never the server
            log.exception("request kind %s failed", req.kind)
            return error_reply(req, Status.INTERNAL, f"{type(exc).__name__}: {exc}")

    def _replica(self, req: Frame) -> ShardReplica | Frame:
        if req.table >= len(self.spec.tables):
            return error_reply(req, Status.UNKNOWN_TABLE,
                               f"table {req.table}: the cluster has {len(self.spec.tables)} tables")
        rep = self.replicas.get((req.table, req.shard))
        if rep is None:
            return error_reply(req, Status.NOT_HOSTED, f"node {self.node.name} holds no replica of table "
                               f"{self.spec.tables[req.table].name!r} shard {req.shard}")
        if not rep.ready:
            return error_reply(req, Status.UNAVAILABLE, f"table {self.spec.tables[req.table].name!r} shard "
                               f"{req.shard} is filling from a peer")
        return rep

    def _write(self, rep: ShardReplica, req: Frame, again: bool) -> Frame:
        """Apply one write (``again``: it was applied before; answer without applying)."""
        table = rep.table
        keys = _keys(req, _WRITE_BUFFERS[Kind(req.kind)])
        if req.kind == Kind.FIND_OR_INSERT:
            # A repeat reads what the first try wrote (initial values are a pure
            # function of the key, so every replica returns the same rows).
            return reply_to(req, [table.find(keys)[0] if again else table.find_or_insert(keys)])
        if req.kind == Kind.ERASE:
            n = 0 if again else int(np.count_nonzero(table.erase(keys)))
            return reply_to(req, [np.array([n], dtype=np.int64)])
        values = _matrix(req.buffers[1], keys.shape[0], table.dim, "values" if req.kind == Kind.ASSIGN
                         else "grads")
        if req.kind == Kind.ASSIGN:
            if again:
                return reply_to(req, [table.contains(keys)])
            only_existing = bool(req.aux & 1)
            written = table.assign(keys, values) if only_existing else table.insert_or_assign(keys, values)
            return reply_to(req, [written if only_existing else np.ones(keys.shape[0], np.bool_)])
        lr = req.buffers[2]
        if lr.dtype != np.float64 or lr.shape != (1,):
            raise _BadRequest(f"buffer 2 (lr): expected float64 (1,), got {lr.dtype} {lr.shape}")
        if not (np.isfinite(lr[0]) and lr[0] >= 0):  # checked here too: a replay skips the table's check
            raise _BadRequest(f"lr: expected a finite number >= 0, got {lr[0]}")
        if again:
            return reply_to(req, [table.contains(keys)])
        return reply_to(req, [table.apply_gradients(keys, values, float(lr[0]))])

    def _export(self, rep: ShardReplica, req: Frame) -> Frame:
        if len(req.buffers) != 2 or any(b.dtype != np.int64 or b.shape != (1,) for b in req.buffers):
            raise _BadRequest("EXPORT takes start and rows as two int64 (1,) buffers")
        start, rows = int(req.buffers[0][0]), int(req.buffers[1][0])
        if start < 0 or not 1 <= rows <= _EXPORT_ROWS_MAX:
            raise _BadRequest(f"EXPORT: start >= 0 and 1 <= rows <= {_EXPORT_ROWS_MAX}, got {start}, {rows}")
        keys, values, nxt = rep.table.export_range(start, rows, include_state=True)
        return reply_to(req, [keys, values, np.array([nxt], dtype=np.int64)])

    # -- node-level requests ---------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        """Who this node is and what it hosts (the endpoints' offers are added by the server)."""
        return {
            "node": self.node.name,
            "pid": os.getpid(),
            "incarnation": self.incarnation,
            "shards": [
                {"table": t, "shard": s, "ready": r.ready,
                 "live_dir": str(r.table.path) if r.table.path is not None else None}
                for (t, s), r in sorted(self.replicas.items())
            ],
        }

    def stats(self) -> dict[str, Any]:
        out = []
        for (t, s), r in sorted(self.replicas.items()):
            st = r.table.stats()
            out.append({"table": self.spec.tables[t].name, "shard": s, "ready": r.ready,
                        "rows": st.rows, "load_factor": st.load_factor, "memory_bytes": st.memory_bytes})
        return {"node": self.node.name, "shards": out}

    def snapshot(self) -> dict[str, Any]:
        """Snapshot every replica under ``<data_dir>/snapshots``; the paths written."""
        if self.data_dir is None:
            raise _BadRequest("this node keeps no files (no data dir): nothing to snapshot to")
        paths = {}
        for (t, s), r in sorted(self.replicas.items()):
            root = self.data_dir / "snapshots" / f"{self.spec.tables[t].name}-{s}"
            with r.lock:
                paths[f"{self.spec.tables[t].name}/{s}"] = str(r.table.snapshot(root))
        return {"node": self.node.name, "snapshots": paths}


def _warm(cfg: TableConfig) -> None:
    """Run every kernel once on a scratch table, so the first request does not pay
    numba's load from its cache (about 0.3 s per table layout)."""
    table = EmbeddingTable.from_config(dataclasses.replace(cfg, capacity=64, max_rows=1024, huge_pages=False,
                                                           max_live_rows=0, admit_after=0))
    keys = np.arange(1, 9, dtype=np.uint64)
    table.find_or_insert(keys)
    table.insert_or_assign(keys, np.zeros((8, cfg.dim), dtype=cfg.dtype))
    table.assign(keys, np.zeros((8, cfg.dim), dtype=cfg.dtype))
    table.apply_gradients(keys, np.zeros((8, cfg.dim), dtype=np.float32 if cfg.dtype == "float32"
                                         else np.float64), 0.0)
    table.find(keys)
    table.contains(keys)
    table.export_range(0, 16, include_state=True)
    table.erase(keys)


def _json(obj: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)


def _keys(req: Frame, nbufs: int) -> np.ndarray:
    if len(req.buffers) != nbufs:
        raise _BadRequest(f"{Kind(req.kind).name} takes {nbufs} buffers, got {len(req.buffers)}")
    keys = req.buffers[0]
    if keys.dtype != np.uint64 or keys.ndim != 1:
        raise _BadRequest(f"buffer 0 (keys): expected uint64 (B,), got {keys.dtype} {keys.shape}")
    if keys.shape[0] > MAX_KEYS:
        raise _BadRequest(f"{keys.shape[0]} keys in one request, at most {MAX_KEYS}")
    return keys


def _matrix(buf: np.ndarray, rows: int, dim: int, what: str) -> np.ndarray:
    if buf.ndim != 2 or buf.shape != (rows, dim):
        raise _BadRequest(f"{what}: expected ({rows}, {dim}), got {buf.shape}")
    return buf
