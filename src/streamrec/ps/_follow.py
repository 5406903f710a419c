"""The follower of a read-only serving replica: where it pulls from, and how it applies.

Owns: ``Follower`` (one thread per serving replica: choose a parent in the
fan-out tree, copy the shard from it, then pull and apply committed batches
in sequence order) and ``apply_batches`` (the in-order apply with gap
detection). It must not answer requests (``ps.service``) or decide the tree's
shape (``cluster.tree.attach`` does, from the members it believes dead).

The loop, per serving replica::

    parent = attach(writable replicas, serving members, k, me, believed dead)
    unsynced or told TRUNCATED / EPOCH_CHANGED -> sync: ask where the parent's
        ring stands (epoch E, last seq L), copy its rows by EXPORT, erase rows it
        did not send, restart this replica's ring at (E, L)
    otherwise PULL(E, applied seq) with a 50 ms long-poll; apply what comes

Bounds (stated in the README): a parent that fails every request (refused,
no reply within 0.5 s, or UNAVAILABLE: not ready or re-syncing) for
``PARENT_DEAD_S`` is believed dead and the replica re-attaches, so a dead
interior node's children pull from their new parent within
``PARENT_DEAD_S + _RPC_S`` (1.5 s), then re-sync if it is behind what its
ring holds. Members believed dead are asked every ``REVIVE_S`` whether they
serve again (HELLO: that replica ready), and the tree is computed again
without them. A sync copies while the replica keeps serving the rows it held
(a first sync: not ready until it holds the shard and applied up to where its
parent stood when the copy ended).

Thread safety: one thread per follower; it writes its replica's table and ring
under the replica's lock (the service takes the same lock for EXPORT).
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time

import numpy as np

from streamrec.cluster.spec import ClusterSpec
from streamrec.cluster.tree import attach
from streamrec.errors import DeadlineExceeded, TransportError
from streamrec.ps._ring import MAX_WAIT_MS, PULL_OK, Batch, decode_pull, pull_request
from streamrec.ps.service import EXPORT_EXPIRY, ShardReplica
from streamrec.transport.frames import Frame, Kind, Status
from streamrec.transport.tcp import TcpConnection

__all__ = ["PARENT_DEAD_S", "REVIVE_S", "Follower", "SequenceGap", "apply_batches"]

log = logging.getLogger("streamrec.ps")

PARENT_DEAD_S = 1.0  # a parent failing this long is left: 2 missed 0.5 s requests, well above a GC pause
REVIVE_S = 1.0  # how often members believed dead are asked whether they are back
_RPC_S = 0.5  # one request's patience (a PULL waits at most MAX_WAIT_MS on the server)
_PULL_BYTES = 16 << 20  # per PULL reply: one 16 MiB batch, or many small ones
_EXPORT_ROWS = 32_768  # rows per EXPORT chunk of a sync (16 MiB at dim 64 with Adagrad state)
_EXPORT_S = 5.0  # one EXPORT chunk's patience


class SequenceGap(Exception):
    """A batch arrived out of sequence: ``expected`` was due, ``got`` came."""

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"sequence gap: expected batch {expected}, got {got}")
        self.expected, self.got = expected, got


class _Stopped(Exception):
    """The server is stopping: the follower ends without waiting out a request."""


class _Unusable(Exception):
    """The parent answered, but cannot feed this replica now (not ready, re-syncing, no ring)."""


def apply_batches(rep: ShardReplica, batches: list[Batch]) -> int:
    """Apply ``batches`` to a serving replica in order, re-logging each in its ring
    under the same (epoch, seq); returns how many were applied.

    Batches at or below the replica's applied seq are skipped (a repeat); the
    first after it must be exactly the next one.

    Raises:
        SequenceGap: a batch is missing; the ones before it stay applied.
    """
    assert rep.ring is not None
    applied = 0
    with rep.lock:
        for b in batches:
            last = rep.ring.last
            if b.seq <= last:
                continue
            if b.seq != last + 1:
                raise SequenceGap(last + 1, b.seq)
            if b.values is None:
                rep.table.erase(b.keys)
            elif b.keys.size:
                rep.table.insert_or_assign(b.keys, b.values)
            rep.ring.append(b.keys, b.values, seq=b.seq, commit_ns=b.commit_ns)
            rep.applied_log.append((b.seq, b.commit_ns, time.time_ns()))
            applied += 1
    return applied


class Follower:
    """Feeds one serving replica from the fan-out tree (module doc).

    Args:
        spec: the cluster.
        node: this node's name (a serving member of the replica's table).
        rep: the serving replica.
        stop: set to end the thread.
    """

    def __init__(self, spec: ClusterSpec, node: str, rep: ShardReplica, stop: threading.Event) -> None:
        t, s = rep.table_index, rep.shard
        self.spec, self.me, self.rep, self._stop = spec, node, rep, stop
        self.sources = spec.replicas(t, s)
        self.members = spec.serving(t)
        self.k = spec.tables[t].fanout
        self.dead: dict[str, float] = {}  # member -> when it was found dead
        self._need_sync = True
        self._target = 0  # a first sync: ready once the ring reaches this seq
        self._revived_at = time.monotonic()
        self._conns: dict[str, TcpConnection] = {}
        self._ids = itertools.count(1)
        self.thread = threading.Thread(target=self._run, name=f"ps-follow-{t}-{s}", daemon=True)

    def start(self) -> Follower:
        self.thread.start()
        return self

    # -- the loop -----------------------------------------------------------------------

    def _run(self) -> None:
        failing_since: float | None = None
        try:
            while not self._stop.is_set():
                self._revive()
                try:
                    root, parent = attach(self.sources, self.members, self.k, self.me, self.dead)
                except ValueError:  # every writable replica believed dead: ask them all again
                    self.dead = {m: at for m, at in self.dead.items() if m not in self.sources}
                    self._stop.wait(0.1)
                    continue
                if (parent, root) != (self.rep.parent, self.rep.root):
                    log.info("table %d shard %d: pulling from %s (root %s)", self.rep.table_index,
                             self.rep.shard, parent, root)
                    self.rep.parent, self.rep.root = parent, root
                    failing_since = None
                try:
                    self._step(parent)
                    failing_since = None
                except (TransportError, _Unusable) as exc:
                    self._drop(parent)
                    now = time.monotonic()
                    if failing_since is None:
                        failing_since = now
                    elif now - failing_since >= PARENT_DEAD_S:
                        log.warning("table %d shard %d: parent %s unusable for %.2f s (%s): re-attaching",
                                    self.rep.table_index, self.rep.shard, parent, now - failing_since, exc)
                        self.dead[parent] = now
                        failing_since = None
                    self._stop.wait(0.05)
                except SequenceGap as exc:
                    self.rep.gaps += 1
                    log.warning("table %d shard %d: %s from %s: re-syncing", self.rep.table_index,
                                self.rep.shard, exc, parent)
                    self._need_sync = True
                except _Stopped:
                    return
                except Exception:  # a bug must not end the replica's feed
                    log.exception("table %d shard %d: following %s failed", self.rep.table_index,
                                  self.rep.shard, parent)
                    self._need_sync = True
                    self._stop.wait(0.2)
        finally:
            for name in list(self._conns):
                self._drop(name)

    def _step(self, parent: str) -> None:
        if self._need_sync:
            self._sync(parent)
            return
        rep = self.rep
        assert rep.ring is not None
        epoch, _, last, _ = rep.ring.state()
        reply = self._ask(parent, pull_request(rep.table_index, rep.shard, epoch, last, _PULL_BYTES,
                                               MAX_WAIT_MS), _RPC_S)
        _, batches = decode_pull(reply, rep.table.dim)
        if reply.aux != PULL_OK:
            log.info("table %d shard %d: %s says %s: re-syncing", rep.table_index, rep.shard, parent,
                     "truncated" if reply.aux == 1 else "epoch changed")
            self._need_sync = True
            return
        if batches:
            apply_batches(rep, batches)
        if not rep.ready and rep.ring.last >= self._target:
            with rep.lock:
                rep.ready = rep.held = True
            log.info("table %d shard %d: ready at seq %d", rep.table_index, rep.shard, rep.ring.last)

    def _sync(self, parent: str) -> None:
        """Copy the shard from ``parent`` and restart the ring where its ring stood when the copy began."""
        rep = self.rep
        assert rep.ring is not None
        t, s = rep.table_index, rep.shard
        rep.syncing = True
        epoch, _, start_seq, commit = self._where(parent)
        start, seen, rows = 0, [], 0
        while start >= 0:
            req = Frame(Kind.EXPORT, [np.array([start], np.int64), np.array([_EXPORT_ROWS], np.int64)],
                        table=t, shard=s, aux=EXPORT_EXPIRY)
            reply = self._ask(parent, req, _EXPORT_S)
            keys, values, nxt, expires_at = reply.buffers
            keys, values, expires_at = keys.copy(), values.copy(), expires_at.copy()
            with rep.lock:
                rep.table.import_chunks([(keys, values, expires_at)], include_state=True)
            seen.append(keys)
            rows += keys.shape[0]
            start = int(nxt[0])
        with rep.lock:
            _erase_unseen(rep, np.concatenate(seen) if seen else np.empty(0, np.uint64))
            rep.ring.reset(epoch, start_seq, commit)
            rep.syncing = False
        end_epoch, _, end_seq, _ = self._where(parent)
        self._need_sync = end_epoch != epoch
        self._target = end_seq
        self.rep.resyncs += 1
        log.info("table %d shard %d: synced %d rows from %s at epoch %d seq %d", t, s, rows, parent, epoch,
                 start_seq)

    def _where(self, parent: str) -> tuple[int, int, int, int]:
        """Where ``parent``'s ring stands: (epoch, base, last seq, commit ns)."""
        rep = self.rep
        reply = self._ask(parent, pull_request(rep.table_index, rep.shard, 0, 0, 1, 0), _RPC_S)
        state, _ = decode_pull(reply, rep.table.dim)
        if state[0] == 0:
            raise _Unusable(f"{parent} has no epoch yet")
        return state

    # -- talking to members ------------------------------------------------------------------

    def _ask(self, name: str, frame: Frame, timeout_s: float) -> Frame:
        """``frame``'s OK reply from ``name``. Raises TransportError, or _Unusable for an error reply."""
        conn = self._conns.get(name)
        if conn is None:
            conn = self._conns[name] = TcpConnection(self.spec.node(name).address, connect_timeout_s=_RPC_S,
                                                     max_frame_bytes=self.spec.max_frame_bytes)
        frame.request_id = next(self._ids)
        deadline = time.monotonic() + timeout_s
        conn.send(frame)
        while True:  # in slices, so a stopping server does not wait out a long EXPORT
            if self._stop.is_set():
                raise _Stopped
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"no reply from {name} in {timeout_s:.3f} s", deadline_s=timeout_s,
                                       peer=name, transport="tcp")
            reply = conn.recv(min(left, 0.1))
            if reply is not None and reply.request_id == frame.request_id:
                break
        if reply.status != Status.OK:
            name_of = Status(reply.status).name if reply.status in Status._value2member_map_ else reply.status
            raise _Unusable(f"{name} answered {name_of}: {reply.text()}")
        return reply

    def _drop(self, name: str) -> None:
        conn = self._conns.pop(name, None)
        if conn is not None:
            conn.close()

    def _revive(self) -> None:
        """Every REVIVE_S: forget the death of members that serve this replica again."""
        now = time.monotonic()
        if not self.dead or now - self._revived_at < REVIVE_S:
            return
        self._revived_at = now
        key = (self.rep.table_index, self.rep.shard)
        for name in list(self.dead):
            try:
                with TcpConnection(self.spec.node(name).address, connect_timeout_s=0.2) as conn:
                    reply = conn.request(Frame(Kind.HELLO, request_id=1), 0.2)
                info = json.loads(reply.text())
            except (TransportError, ValueError):
                continue
            if any((r["table"], r["shard"]) == key and r["ready"] and not r.get("syncing")
                   for r in info.get("shards", ())):
                log.info("table %d shard %d: %s serves again", key[0], key[1], name)
                del self.dead[name]


def _erase_unseen(rep: ShardReplica, seen: np.ndarray) -> None:
    """Writer lock held: erase the rows a sync's export did not carry (gone on the parent)."""
    gone = rep.keys_not_in(seen)
    if gone.size:
        rep.table.erase(gone)
