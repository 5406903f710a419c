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
                    (aux EXPORT_TRACK: also start recording the keys written from now on;
                    aux EXPORT_EXPIRY: a 4th buffer, each row's expiry i64 (n,), 0 = never)
                    (aux EXPORT_CHANGES: the recorded keys instead, up to ``rows`` of them:
                    -> keys (n,), rows (n, D), erased keys (m,), still recorded i64 (1,))
                    (aux EXPORT_END: stop recording)
    STATS / HELLO   -                               -> JSON (uint8)
                    (STATS aux STATS_APPLIED: also each fan-out replica's recent
                    (seq, commit ns, applied ns), for measuring propagation)
    PULL            epoch, after_seq, max_bytes, wait_ms i64 (4,) -> committed batches (``ps._ring``)
    SNAPSHOT        -                               -> JSON (uint8): the snapshot paths
    PING            -                               -> -

A write a table refuses for NaN or infinity (its ``nonfinite`` policy is
"raise") is answered ``NON_FINITE``, nothing written on that replica, with
``[rows, first key]`` as a second uint64 buffer beside the message.

Writes apply once: each replica remembers the request ids of its last
``_WRITE_MEMORY`` writes, and a write whose id it has seen (a client retrying
on another transport after a lost reply) is answered without applying it again.

Client-replicated writes (two replicas per shard). A replica that is not ready
(filling from its peer after a restart) applies writes but refuses reads; its
write replies carry ``aux`` ``FILLING`` so the client does not count it as a
ready copy. Keys it wrote while filling are never overwritten by the rows it
copies from the peer (those may be older). The peer records the keys written
while a fill runs (EXPORT_TRACK), and the filler copies them again
(EXPORT_CHANGES) until none is left, then reports ready (one fill per shard at
a time: the record is the peer's, one per shard, for two replicas per shard).
Each write also carries the client's per-shard sequence number in ``aux`` bits
1-31: a replica that sees a number skipped, or one arriving after a later one,
missed an acknowledged write (it was paused, or its link was down) and goes
back to filling (``on_stale``).

Fan-out (read-only serving replicas, ``TableSpec.serving``). A writable
replica of a table with serving members logs every write it applies while
ready into its ``UpdateRing``, as the resulting rows (``ps._ring``); a ready
writable replica starts a new epoch each time it becomes ready. A serving
replica (``role`` "serving") answers every write READ_ONLY, serves FIND once
it holds its shard, and is fed by its ``ps._follow.Follower``. PULL and EXPORT
are refused (UNAVAILABLE) by a replica not ready or re-syncing, so a child
never copies a half-synced parent.

Strong mode (``ClusterSpec.mode`` "strong"). A strong replica's table belongs
to its Raft member (``ShardReplica.log``, ``ps.raftlog.BatchLog``), which applies
committed batches in log order on every member; writes and linearizable reads
go through it (``ps._strong``), plain reads are served while the replica is
within its staleness bound (else it is not ready). Strong replicas never fill
from a peer: Raft's snapshot and log catch them up.

Thread safety: ``Service.handle`` may be called from many threads at once.
Reads run lock-free on the table; writes to one replica are serialised by its
lock, which also makes the check-and-record of write ids atomic.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.cluster.spec import ClusterSpec
from streamrec.config import TableConfig
from streamrec.errors import ConfigError, NonFiniteValues, StoreError
from streamrec.ps import _strong
from streamrec.ps._ring import MAX_WAIT_MS, UpdateRing, new_epoch, pull_reply
from streamrec.ps.raftlog import BatchLog
from streamrec.store import EmbeddingTable
from streamrec.transport.frames import Frame, Kind, Status, error_reply, in_place, reply_to

__all__ = ["EXPORT_CHANGES", "EXPORT_END", "EXPORT_EXPIRY", "EXPORT_TRACK", "FILLING", "MAX_KEYS", "SEQ_MOD",
           "SERVING", "STATS_APPLIED", "WRITABLE", "Service", "ShardReplica"]

log = logging.getLogger("streamrec.ps")

MAX_KEYS = 1 << 20  # keys per request: a 1 M-key FIND of dim 16 is 64 MiB, the default frame cap
_WRITE_MEMORY = 65_536  # write ids remembered per replica: minutes of retries at thousands of writes/s
_EXPORT_ROWS_MAX = 1 << 16
_WRITE_BUFFERS = {Kind.FIND_OR_INSERT: 1, Kind.APPLY_GRADIENTS: 3, Kind.ASSIGN: 2, Kind.ERASE: 1}
_WRITES = frozenset(_WRITE_BUFFERS)
_MASKED = frozenset({Kind.ASSIGN, Kind.APPLY_GRADIENTS})  # replies whose buffer 0 says which keys changed
FILLING = 1  # reply aux of a write applied by a replica that is not ready
EXPORT_TRACK, EXPORT_EXPIRY, EXPORT_CHANGES, EXPORT_END = 1, 2, 4, 8
IN_ORDER, SKIPPED, LATE = 0, 1, 2
SEQ_MOD = 1 << 31  # write sequence numbers live in aux bits 1-31; 0 = none
_CLIENTS_MAX = 1 << 16  # writers whose sequence a replica follows; the longest idle is forgotten first
_TRACK_MAX = 1 << 22  # keys a peer records for a fill; past it the fill starts over (bounded memory)
WRITABLE, SERVING = "writable", "serving"
STATS_APPLIED = 1  # STATS aux: include each serving replica's recent (seq, commit ns, applied ns)
_APPLIED_LOG = 8192  # (seq, commit, applied) triples a serving replica remembers for STATS_APPLIED


class _BadRequest(Exception):
    """A well-formed frame with arguments the handler cannot take."""


class ShardReplica:
    """One replica of one shard, hosted by this node.

    Attributes:
        table_index, shard: which shard.
        table: its ``EmbeddingTable`` (file-backed when the service has a data dir,
            so one-sided readers on this host can map it).
        ready: False while the replica is being filled from a peer (it applies
            writes then, but serves no reads).
        held: True once it held the shard (filled, or started ready).
        has_peers: the shard has another replica (one with none never fills again).
        touched: keys written while not ready (a copy from the peer skips them).
        tracking: keys written since a peer's fill began (None: no fill running).
        role: WRITABLE, or SERVING (read-only, fed by the fan-out tree).
        ring: committed updates kept for fan-out children; None when the table has no
            serving members (the write path then logs nothing).
        syncing: a serving replica copying an export: it serves reads (the rows it held)
            but no PULL or EXPORT.
        parent, root: where a serving replica pulls from, and the tree's root (its follower sets them).
        applied_log: a serving replica's recent (seq, commit ns, applied ns), newest last.
        log: a strong replica's Raft member, which owns its table; None in client mode.
        max_staleness_s: a strong replica is ready only while this fresh.
    """

    def __init__(self, table_index: int, shard: int, table: EmbeddingTable, *, ready: bool = True,
                 has_peers: bool = True, role: str = WRITABLE, ring: UpdateRing | None = None) -> None:
        self.table_index = table_index
        self.role = role
        self.ring = ring
        self.syncing = False
        self.resyncs = self.gaps = 0  # a serving replica's syncs (the first included) and gaps seen
        self.parent = self.root = ""
        self.applied_log: collections.deque[tuple[int, int, int]] = collections.deque(maxlen=_APPLIED_LOG)
        self.has_peers = has_peers
        self.shard = shard
        self.log: BatchLog | None = None
        self.max_staleness_s = 1.0
        self._table = table
        self._ready = ready
        self.held = ready
        self.touched: set[int] = set()
        self.tracking: set[int] | None = None
        self.tracking_lost = False
        self.lock = threading.Lock()
        self._applied: OrderedDict[int, None] = OrderedDict()
        self._seqs: OrderedDict[int, int] = OrderedDict()  # client id -> its last write's number, LRU

    @property
    def table(self) -> EmbeddingTable:
        # A strong replica's log replaces its table object when it loads a snapshot.
        return self._table if self.log is None else self.log.table

    @property
    def ready(self) -> bool:
        if self.log is None:
            return self._ready
        return _strong.log_ready(self.log, self.max_staleness_s)

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value

    def order(self, request_id: int, seq: int) -> int:
        """Writer lock held: where this write falls in its client's sequence: IN_ORDER,
        SKIPPED (the replica missed the writes between) or LATE (a later one came first)."""
        if seq == 0:
            return IN_ORDER
        client = request_id >> 32
        last = self._seqs.get(client)
        if last is None:
            self._seqs[client] = seq
            if len(self._seqs) > _CLIENTS_MAX:
                self._seqs.popitem(last=False)
            # A client first seen while filling is covered by the copy; one first seen while ready,
            # past its first write, may have had writes acknowledged without this replica.
            return IN_ORDER if seq == 1 or not self.ready else SKIPPED
        self._seqs.move_to_end(client)
        step = (seq - last) % (SEQ_MOD - 1)  # numbers run 1 .. SEQ_MOD - 1, then 1 again
        if step == 0:  # the same write again, under a new attempt that was not applied before
            return IN_ORDER
        if step >= (SEQ_MOD - 1) // 2:
            return LATE
        self._seqs[client] = seq
        return IN_ORDER if step == 1 else SKIPPED

    def note_write(self, kind: int, keys: np.ndarray, mask: np.ndarray | None) -> None:
        """Writer lock held: a write was applied to ``keys`` (``mask``: to those only)."""
        if self.tracking is not None:
            self.tracking.update(keys.tolist())
            if len(self.tracking) > _TRACK_MAX:
                self.tracking, self.tracking_lost = None, True
        if not self.ready and kind != Kind.FIND_OR_INSERT:  # an inserted initial value is no news
            self.touched.update((keys if mask is None else keys[mask]).tolist())

    def became_ready(self) -> None:
        """Writer lock held: a writable replica is ready again: its ring starts a new epoch
        (what it copied from its peer never went through the ring, so children re-sync)."""
        self.ready = self.held = True
        if self.ring is not None:
            self.ring.reset(new_epoch())

    def log_write(self, kind: int, keys: np.ndarray, mask: np.ndarray | None, reply: Frame) -> None:
        """Writer lock held: put a write's resulting rows (not its gradients) in the ring."""
        assert self.ring is not None
        if kind == Kind.ERASE:
            self.ring.append(keys.copy(), None)
            return
        if kind == Kind.FIND_OR_INSERT:  # the rows are the reply's (own arrays, never reused)
            self.ring.append(keys.copy(), reply.buffers[0])
            return
        k = keys[mask] if mask is not None and not mask.all() else keys.copy()
        if not k.size:
            return
        values, found = self.table.find(k)
        if not found.all():  # a row the write skipped (non-finite policy "skip")
            k, values = k[found], values[found]
        self.ring.append(k, values)

    def applied(self, request_id: int) -> bool:
        """Writer lock held: True if the write with this id was applied already.

        Id 0 opts out of deduplication (a caller that never retries)."""
        return request_id != 0 and request_id in self._applied

    def keys_not_in(self, seen: np.ndarray) -> np.ndarray:
        """This replica's keys that ``seen`` lacks (rows a sync's export did not carry: gone at the
        source). Reads the table in chunks; the caller decides, under the lock, what to erase."""
        start, mine = 0, []
        while start >= 0:
            keys, _, start = self.table.export_range(start, 65_536)
            mine.append(keys)
        local = np.concatenate(mine) if mine else np.empty(0, np.uint64)
        return local[~np.isin(local, seen)]

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
                 ready: bool = True, on_stale: Callable[[ShardReplica], None] | None = None) -> None:
        self.spec = spec
        self.on_stale = on_stale  # called (lock held) when a ready replica finds it missed a write
        self.node = spec.node(node)
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.incarnation = f"{os.getpid()}-{time.time_ns()}"
        self.replicas: dict[tuple[int, int], ShardReplica] = {}
        for t, s in spec.shards_on(node):
            table_spec = spec.tables[t]
            ring = UpdateRing(table_spec.ring_bytes, new_epoch()) if table_spec.serving else None
            self.replicas[(t, s)] = ShardReplica(t, s, self._new_table(t, s), ready=ready,
                                                 has_peers=len(spec.replicas(t, s)) > 1, ring=ring)
        for t, s in spec.strong_shards_on(node):
            if self.data_dir is None:
                raise ConfigError(f"table {spec.tables[t].name!r} is strong: node {node} needs a data dir "
                                  "for its Raft journal", field="node.data_dir")
            rep = self.replicas[(t, s)]
            rep.max_staleness_s = spec.tables[t].max_staleness_s
            unused = rep.table  # the empty client-mode table made above: the log makes its own
            rep.log = _strong.open_log(spec, node, t, s, self.data_dir, unused.name)
            unused.close()
            shutil.rmtree(self.live_dir(t, s), ignore_errors=True)  # its files: /dev/shm is memory
        for t, s in spec.serving_on(node):  # read-only: not ready until its follower synced it
            self.replicas[(t, s)] = ShardReplica(t, s, self._new_table(t, s), ready=False, has_peers=False,
                                                 role=SERVING, ring=UpdateRing(spec.tables[t].ring_bytes))
        for t in sorted({t for t, _ in self.replicas}):
            _warm(spec.tables[t].config)

    def _new_table(self, t: int, s: int) -> EmbeddingTable:
        table = self._open_table(t, s)
        # Store errors carry it (IndexGrowthRefused names the table to the client).
        table.name = f"{self.spec.tables[t].name}/{s} on {self.node.name}"
        return table

    def _open_table(self, t: int, s: int) -> EmbeddingTable:
        cfg = self.spec.tables[t].config
        if self.data_dir is None:
            return EmbeddingTable.from_config(cfg)
        path = self.live_dir(t, s)
        # A live directory left by an earlier run is never trusted here: a killed
        # server leaves it dirty, and a clean one may be behind its peers. The
        # replica starts empty and fills from a peer before it reports ready (the
        # server's fill: it starts empty only when no peer holds data).
        shutil.rmtree(path, ignore_errors=True)
        return EmbeddingTable.from_config(cfg, path=path)

    def live_dir(self, t: int, s: int) -> Path:
        assert self.data_dir is not None
        return self.data_dir / f"{self.spec.tables[t].name}-{s}"

    def close(self) -> None:
        for r in self.replicas.values():
            if r.log is not None:
                r.log.close()
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
                return reply_to(req, [_json(self.stats(applied=bool(req.aux & STATS_APPLIED)))])
            if req.kind == Kind.SNAPSHOT:
                return reply_to(req, [_json(self.snapshot())])
            rep = self._replica(req)
            if isinstance(rep, Frame):
                return rep
            if req.kind in _WRITES and rep.role == SERVING:
                writable = ", ".join(self.spec.replicas(req.table, req.shard))
                return error_reply(req, Status.READ_ONLY, f"node {self.node.name} holds a read-only "
                                   f"(serving) replica of table {self.spec.tables[req.table].name!r}: "
                                   f"write to its writable replicas ({writable})")
            if rep.log is not None and (req.kind in _WRITES or (req.kind == Kind.FIND
                                                                 and req.aux & _strong.LINEARIZABLE)):
                return self._strong(rep.log, req)
            if req.kind == Kind.PULL:
                reply = self._pull(rep, req, park=False)
                assert reply is not None  # only a parking pull waits
                return reply
            if req.kind in _WRITES:
                with rep.lock:
                    again = rep.applied(req.request_id)
                    order = IN_ORDER if again or self.on_stale is None else rep.order(req.request_id,
                                                                                       req.aux >> 1)
                    # The only replica of a shard holds every acknowledged write by definition:
                    # there is no peer to copy from, and a gap (a crafted number, say) is no news.
                    if order != IN_ORDER and rep.ready and self.on_stale is not None and rep.has_peers:
                        # It missed an acknowledged write: only a copy from the peer can say which.
                        log.warning("table %d shard %d missed a write: filling again", rep.table_index,
                                    rep.shard)
                        rep.ready = False
                        self.on_stale(rep)
                    if order == LATE:  # applying it now could undo a later write of its client
                        return error_reply(req, Status.UNAVAILABLE, "a later write of this client came first")
                    reply = self._write(rep, req, again)
                    if not again:
                        mask = reply.buffers[0] if req.kind in _MASKED else None
                        rep.note_write(req.kind, req.buffers[0], mask)
                        if rep.ring is not None and rep.ready:
                            rep.log_write(req.kind, req.buffers[0], mask, reply)
                    rep.record(req.request_id)
                    if not rep.ready:
                        reply.aux = FILLING
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
        except NonFiniteValues as exc:  # the data, not this replica: every replica refuses it alike
            return _non_finite_reply(req, exc)
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
        if rep.syncing and req.kind in (Kind.PULL, Kind.EXPORT):
            return error_reply(req, Status.UNAVAILABLE, f"table {self.spec.tables[req.table].name!r} shard "
                               f"{req.shard} is re-syncing from its fan-out parent")
        if rep.log is not None and not rep.ready and req.kind not in _WRITES and not (
                req.kind == Kind.FIND and req.aux & _strong.LINEARIZABLE):
            name = self.spec.tables[req.table].name
            return error_reply(req, Status.UNAVAILABLE, f"table {name!r} shard {req.shard}: this replica is "
                               f"{rep.log.staleness_s():.3f} s behind its group's leader (bound "
                               f"{rep.max_staleness_s} s), or has no leader")
        if not rep.ready and req.kind not in _WRITES:
            reply = error_reply(req, Status.UNAVAILABLE, f"table {self.spec.tables[req.table].name!r} shard "
                                f"{req.shard} is filling from a peer")
            reply.aux = int(rep.held)  # a filling peer says whether it holds data (see server's fill)
            return reply
        return rep

    def pull(self, req: Frame, *, park: bool = True) -> Frame | None:
        """The reply to a PULL, or (``park``) None when it should wait (nothing after its seq
        yet): the server parks it and asks again when the ring grows or its wait is over."""
        try:
            rep = self._replica(req)
            if isinstance(rep, Frame):
                return rep
            return self._pull(rep, req, park=park)
        except _BadRequest as exc:
            return error_reply(req, Status.BAD_REQUEST, str(exc))

    def _pull(self, rep: ShardReplica, req: Frame, *, park: bool) -> Frame | None:
        if rep.ring is None:
            return error_reply(req, Status.NOT_HOSTED, f"table {self.spec.tables[req.table].name!r} has no "
                               "fan-out members: no replica keeps a ring of its updates")
        b = req.buffers
        if len(b) != 1 or b[0].dtype != np.int64 or b[0].shape != (4,):
            raise _BadRequest("PULL takes epoch, after_seq, max_bytes, wait_ms as one int64 (4,) buffer")
        epoch, after, max_bytes, wait_ms = b[0].tolist()
        if after < 0 or max_bytes < 1 or not 0 <= wait_ms <= MAX_WAIT_MS:
            raise _BadRequest(f"PULL: after_seq >= 0, max_bytes >= 1, 0 <= wait_ms <= {MAX_WAIT_MS}; got "
                              f"{after}, {max_bytes}, {wait_ms}")
        if park and wait_ms and not rep.ring.has_after(epoch, after):
            return None
        outcome, batches = rep.ring.read(epoch, after, min(max_bytes, self.spec.max_frame_bytes // 2))
        return pull_reply(req, rep.ring, outcome, batches, rep.table.dim, rep.table.dtype)

    def _strong(self, blog: BatchLog, req: Frame) -> Frame:
        """A write or linearizable read of a strong replica: inputs checked here, run by ``ps._strong``."""
        if req.kind == Kind.FIND:
            return _strong.serve(self.spec, blog, req, _keys(req, 1), None, 0.0)
        keys = _keys(req, _WRITE_BUFFERS[Kind(req.kind)])
        values, lr = None, 0.0
        if req.kind in _MASKED:
            values = _matrix(req.buffers[1], keys.shape[0], blog.table.dim,
                             "values" if req.kind == Kind.ASSIGN else "grads")
        if req.kind == Kind.APPLY_GRADIENTS:
            b = req.buffers[2]
            if b.dtype != np.float64 or b.shape != (1,) or not (np.isfinite(b[0]) and b[0] > 0):
                raise _BadRequest(f"buffer 2 (lr): expected a finite float64 (1,) > 0, got {b.dtype} "
                                  f"{b.shape}")
            lr = float(b[0])
        return _strong.serve(self.spec, blog, req, keys, values, lr)

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
        if not (np.isfinite(lr[0]) and lr[0] > 0):  # checked here too: a replay skips the table's check
            raise _BadRequest(f"lr: expected a finite number > 0, got {lr[0]}")
        if again:
            return reply_to(req, [table.contains(keys)])
        return reply_to(req, [table.apply_gradients(keys, values, float(lr[0]))])

    def _export(self, rep: ShardReplica, req: Frame) -> Frame:
        if len(req.buffers) != 2 or any(b.dtype != np.int64 or b.shape != (1,) for b in req.buffers):
            raise _BadRequest("EXPORT takes start and rows as two int64 (1,) buffers")
        start, rows = int(req.buffers[0][0]), int(req.buffers[1][0])
        if start < 0 or not 1 <= rows <= _EXPORT_ROWS_MAX:
            raise _BadRequest(f"EXPORT: start >= 0 and 1 <= rows <= {_EXPORT_ROWS_MAX}, got {start}, {rows}")
        if req.aux & (EXPORT_TRACK | EXPORT_CHANGES | EXPORT_END):
            with rep.lock:
                if req.aux & EXPORT_TRACK:
                    rep.tracking, rep.tracking_lost = set(), False
                if req.aux & EXPORT_END:
                    rep.tracking = None
                    return reply_to(req)
                if req.aux & EXPORT_CHANGES:
                    return self._changes(rep, req, rows)
        if req.aux & EXPORT_EXPIRY:
            keys, values, expires_at, nxt = rep.table.export_range_with_expiry(start, rows,
                                                                                include_state=True)
            return reply_to(req, [keys, values, np.array([nxt], dtype=np.int64), expires_at])
        keys, values, nxt = rep.table.export_range(start, rows, include_state=True)
        return reply_to(req, [keys, values, np.array([nxt], dtype=np.int64)])

    def _changes(self, rep: ShardReplica, req: Frame, rows: int) -> Frame:
        """Writer lock held: up to ``rows`` recorded keys, taken off the record, with their rows now."""
        if rep.tracking is None:
            return error_reply(req, Status.UNAVAILABLE, "no write record: start the fill over")
        n = min(rows, len(rep.tracking))
        keys = np.fromiter((rep.tracking.pop() for _ in range(n)), dtype=np.uint64, count=n)
        values, found = rep.table.find(keys)
        return reply_to(req, [keys[found], values[found], keys[~found],
                              np.array([len(rep.tracking)], dtype=np.int64)])

    # -- node-level requests ---------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        """Who this node is and what it hosts (the endpoints' offers are added by the server)."""
        return {
            "node": self.node.name,
            "pid": os.getpid(),
            "incarnation": self.incarnation,
            "shards": [
                {"table": t, "shard": s, "ready": r.ready,
                 "live_dir": str(r.table.path) if r.table.path is not None else None, **_fanout(r),
                 **self._raft(r)}
                for (t, s), r in sorted(self.replicas.items())
            ],
        }

    def stats(self, *, applied: bool = False) -> dict[str, Any]:
        """Per replica: rows, memory, and its fan-out position (``applied``: the recent log too)."""
        out = []
        for (t, s), r in sorted(self.replicas.items()):
            st = r.table.stats()
            out.append({"table": self.spec.tables[t].name, "shard": s, "ready": r.ready,
                        "rows": st.rows, "load_factor": st.load_factor, "memory_bytes": st.memory_bytes,
                        "nonfinite_skipped": st.nonfinite_skipped, **_fanout(r), **self._raft(r)})
            if applied and r.role == SERVING:
                out[-1]["applied_log"] = list(r.applied_log)
        return {"node": self.node.name, "shards": out}

    def snapshot(self) -> dict[str, Any]:
        """Snapshot every replica under ``<data_dir>/snapshots``; the paths written."""
        if self.data_dir is None:
            raise _BadRequest("this node keeps no files (no data dir): nothing to snapshot to")
        paths = {}
        for (t, s), r in sorted(self.replicas.items()):
            if r.log is not None:  # the log's own snapshot (table + idempotence map), which truncates it
                r.log.force_snapshot()
                name = self.spec.tables[t].name
                paths[f"{name}/{s}"] = str(self.data_dir / f"raft-{name}-{s}" / "raft.dump")
                continue
            root = self.data_dir / "snapshots" / f"{self.spec.tables[t].name}-{s}"
            with r.lock:
                paths[f"{self.spec.tables[t].name}/{s}"] = str(r.table.snapshot(root))
        return {"node": self.node.name, "snapshots": paths}

    def _raft(self, r: ShardReplica) -> dict[str, Any]:
        """A strong replica's place in its Raft group, for HELLO and STATS (empty in client mode)."""
        if r.log is None:
            return {}
        stale = r.log.staleness_s()
        return {"mode": "strong", "leader": _strong.leader_node(self.spec, r.table_index, r.shard, r.log),
                "is_leader": r.log.is_leader, "applied_index": r.log.applied_index,
                "staleness_s": stale if stale != float("inf") else None}


def _fanout(r: ShardReplica) -> dict[str, Any]:
    """A replica's place in its fan-out tree, for HELLO and STATS (empty when it has no ring)."""
    if r.ring is None:
        return {"role": r.role}
    epoch, base, last, commit = r.ring.state()
    return {"role": r.role, "epoch": epoch, "seq": last, "commit_ns": commit, "ring_base": base,
            "ring_bytes": r.ring.nbytes, "syncing": r.syncing, "parent": r.parent, "root": r.root,
            "resyncs": r.resyncs, "gaps": r.gaps}


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
                                         else np.float64), 1e-3)  # a scratch table: any lr > 0
    table.find(keys)
    table.contains(keys)
    table.export_range(0, 16, include_state=True)
    table.erase(keys)


def _non_finite_reply(req: Frame, exc: NonFiniteValues) -> Frame:
    """NON_FINITE, with the message and, as buffer 1, ``[rows, first key]`` uint64 for the client."""
    reply = error_reply(req, Status.NON_FINITE, f"shard {req.shard}: {exc}")
    reply.buffers.append(np.array([exc.rows, exc.first_key], dtype=np.uint64))
    return reply


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
