"""Strong mode on a storage node: each strong shard replica's Raft member, and the requests it serves.

Owns: opening a replica's ``BatchLog`` (its Raft address and peers from the
spec, its journal under the node's data dir), readiness of a strong replica,
and the execution of writes and linearizable reads through the log. It must
not decide placement or modes (``cluster.spec``) or parse frames (the service
checks buffers and hands the arrays over).

Writes. Only the leader takes a write: it submits the whole batch as one log
entry under (writer, seq) = (the client's id, the high 32 bits of the request
id; the client's per-shard sequence number, ``aux`` bits 1-31) and answers once
a majority committed it and it applied it; a retried batch (same writer, seq)
commits as a duplicate and applies nothing. A follower answers ``NOT_LEADER``
naming the leader's node ("" during an election); a batch not committed in
the request's deadline is answered ``UNAVAILABLE`` (it may still commit: the
client retries it under the same seq, so it applies once). Reply buffers are
those of the client-replicated path, computed on the leader after its apply:
``ASSIGN`` and ``APPLY_GRADIENTS`` answer which keys the table holds then,
``ERASE`` how many of the keys it held when the leader took the request.

Reads. ``FIND`` with ``aux`` ``LINEARIZABLE`` is served by the leader after a
barrier entry commits; a plain ``FIND`` by any replica whose staleness is
within the table's ``max_staleness_s`` (a staler one is not ready: the
service answers ``UNAVAILABLE`` and the client tries another replica).

Thread safety: ``serve`` may run in many worker threads at once; each blocks
until its entry commits or its deadline passes. The log's tick thread is the
table's one writer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from streamrec.cluster.spec import ClusterSpec
from streamrec.errors import NotLeader, ReplicationError
from streamrec.ps.raftlog import Ack, BatchLog, Op, RaftLogConfig
from streamrec.store import EmbeddingTable
from streamrec.transport.frames import Frame, Kind, Status, error_reply, reply_to

__all__ = ["LINEARIZABLE", "leader_node", "log_ready", "open_log", "serve"]

log = logging.getLogger("streamrec.ps")

LINEARIZABLE = 1  # FIND aux: serve after a barrier, on the leader only
_MAX_WAIT_S = 30.0  # longest a request waits for its commit, whatever its deadline says
_DEFAULT_WAIT_S = 5.0  # a request with no deadline


def open_log(spec: ClusterSpec, node: str, t: int, s: int, data_dir: Path, name: str) -> BatchLog:
    """Start ``node``'s Raft member of table ``t`` shard ``s`` (it joins its group at once).

    Its journal and snapshot live in ``data_dir/raft-<table>-<shard>``, kept across
    restarts: a restarted member loads them and catches up from the leader.
    """
    table_spec = spec.tables[t]
    lo, hi = table_spec.election_timeout_s
    cfg = RaftLogConfig(election_timeout_s=(lo, hi), heartbeat_s=min(0.1, lo / 4))

    def make_table() -> EmbeddingTable:
        # In memory: a snapshot the log loads replaces the table object, so no live file
        # stays the replica's for one-sided readers (strong tables offer none).
        table = EmbeddingTable.from_config(table_spec.config)
        table.name = name
        return table

    peers = [spec.raft_address(n, t, s) for n in spec.replicas(t, s) if n != node]
    path = data_dir / f"raft-{table_spec.name}-{s}"
    def on_corrupt(exc: Exception) -> None:
        log.error("table %s shard %d: %s: this replica stops applying and serves nothing; wipe %s and "
                  "restart it", table_spec.name, s, exc, path)

    return BatchLog(spec.raft_address(node, t, s), peers, make_table, path, cfg, on_corrupt=on_corrupt)


def leader_node(spec: ClusterSpec, t: int, s: int, blog: BatchLog) -> str:
    """The node name of the group's leader as this member knows it, "" if none."""
    addr = blog.leader
    if addr is None:
        return ""
    for n in spec.replicas(t, s):
        if spec.raft_address(n, t, s) == addr:
            return n
    return ""


def log_ready(blog: BatchLog, max_staleness_s: float) -> bool:
    """A strong replica serves: its log loaded, a leader known, and it caught up with
    that leader within the bound (a restarted member is not ready until it replayed)."""
    return (blog.corrupt is None and bool(blog.isReady()) and blog.leader is not None
            and blog.staleness_s() <= max_staleness_s)


def serve(spec: ClusterSpec, blog: BatchLog, req: Frame, keys: np.ndarray, values: np.ndarray | None,
          lr: float) -> Frame:
    """The reply to a write or a linearizable FIND on a strong replica (module doc).

    REQUIRES: ``keys`` (B,) uint64 and ``values`` (B, D) checked by the caller;
    ``lr`` checked for APPLY_GRADIENTS.
    """
    t, s = req.table, req.shard
    if not blog.is_leader:
        return _not_leader(spec, req, blog)
    wait = min(req.deadline_us / 1e6, _MAX_WAIT_S) if req.deadline_us else _DEFAULT_WAIT_S
    table = blog.table
    try:
        if req.kind == Kind.FIND:
            blog.submit(Op.BARRIER, np.empty(0, np.uint64), writer=0, seq=0, timeout=wait)
            table = blog.table
            values_now, found = table.find(keys)
            return reply_to(req, [values_now, found])
        seq = req.aux >> 1
        if seq == 0:
            return error_reply(req, Status.BAD_REQUEST, "a write to a strong table needs a sequence number "
                               "(aux bits 1-31), its idempotence key")
        writer = req.request_id >> 32
        removed = int(np.count_nonzero(table.contains(keys))) if req.kind == Kind.ERASE else 0
        op = {Kind.FIND_OR_INSERT: Op.FIND_OR_INSERT, Kind.ERASE: Op.ERASE,
              Kind.APPLY_GRADIENTS: Op.APPLY_GRADIENTS}.get(Kind(req.kind))
        if op is None:
            op = Op.ASSIGN if req.aux & 1 else Op.INSERT_OR_ASSIGN
        ack = blog.submit(op, keys, values, writer=writer, seq=seq, lr=lr, timeout=wait)
    except NotLeader:
        return _not_leader(spec, req, blog)
    except ReplicationError as exc:
        return error_reply(req, Status.UNAVAILABLE, f"table {t} shard {s}: not committed ({exc.reason}): "
                           f"{exc}; it may still commit: retry it with the same sequence number")
    return _write_reply(req, blog, keys, ack, removed)


def _write_reply(req: Frame, blog: BatchLog, keys: np.ndarray, ack: Ack, removed: int) -> Frame:
    if ack.refused is not None:  # every replica refused it alike: nothing written anywhere
        status = Status.NON_FINITE if ack.refused.startswith("NonFiniteValues") else Status.STORE_ERROR
        return error_reply(req, status, f"shard {req.shard}: {ack.refused}")
    table = blog.table  # after a snapshot load the log holds a new table object
    if req.kind == Kind.FIND_OR_INSERT:
        return reply_to(req, [table.find(keys)[0]])
    if req.kind == Kind.ERASE:
        return reply_to(req, [np.array([removed if ack.applied else 0], dtype=np.int64)])
    if req.kind == Kind.ASSIGN and not req.aux & 1:
        return reply_to(req, [np.ones(keys.shape[0], np.bool_)])
    return reply_to(req, [table.contains(keys)])


def _not_leader(spec: ClusterSpec, req: Frame, blog: BatchLog) -> Frame:
    leader = leader_node(spec, req.table, req.shard, blog)
    return error_reply(req, Status.NOT_LEADER, leader)
