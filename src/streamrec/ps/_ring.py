"""The ring of committed updates a replica keeps for its fan-out children, and the PULL wire form.

Owns: ``UpdateRing`` (the newest committed update batches of one shard
replica, in its apply order, bounded by bytes), the batch record, and the
encoding of PULL requests and replies. It must not apply batches to a table
(``ps._follow`` does) or know threads beyond its own lock.

What a batch holds: the *resulting rows* of one applied write (keys and the
embedding part of their values after the write, as ``assign`` would write
them), or the keys an ERASE removed. Gradients are never shipped: re-applying
a batch writes the same values again, so applying is idempotent, and a child
that applies batches ``seq0 + 1 ..`` over an export started at ``seq0`` ends
with the parent's rows whatever the export saw of later writes.

Numbering: batches are numbered ``1, 2, ...`` within an *epoch*, a random
63-bit number drawn when a writable replica becomes ready (each process
incarnation, and again after each refill), so a child tells a restarted or
refilled source from the one it followed. A fan-out replica re-logs what it
applies under the same ``(epoch, seq)``, so its own children pull from it.
The ring holds every batch after ``base``; appending past ``cap_bytes`` drops
the oldest (``base`` moves up). A reader asking for batches after an older
sequence number is told TRUNCATED; one in another epoch, EPOCH_CHANGED; either
re-syncs from an export.

PULL (request buffer: i64 (4,) = epoch, after_seq, max_bytes, wait_ms; epoch 0
asks only where the ring stands). Reply ``aux``: PULL_OK, PULL_TRUNCATED or
PULL_EPOCH, and buffers::

    state   i64 (4,)     epoch, base, last seq, commit time of the last (ns, wall clock)
    meta    i64 (n, 4)   per batch: seq, commit ns, keys, 1 if an erase else 0
    keys    u64 (K,)     every batch's keys, in order
    values  (P, D)       the rows of the non-erase batches, in order

Thread safety: every method takes the ring's own lock; batches are immutable
once appended (their arrays are owned by the ring), so readers may keep them.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from streamrec.transport.frames import Frame, Kind, reply_to

__all__ = ["MAX_WAIT_MS", "PULL_EPOCH", "PULL_OK", "PULL_TRUNCATED", "Batch", "UpdateRing", "decode_pull",
           "new_epoch", "pull_reply", "pull_request"]

PULL_OK, PULL_TRUNCATED, PULL_EPOCH = 0, 1, 2
MAX_WAIT_MS = 50  # a long-poll parks on the server's master (no worker held) for at most this long
_BATCH_OVERHEAD = 64  # bytes counted per batch beyond its arrays (the record), so empty batches still count


def new_epoch() -> int:
    """A fresh epoch: random, non-zero, fits an int64."""
    return random.SystemRandom().getrandbits(62) + 1


@dataclass(frozen=True, slots=True)
class Batch:
    """One committed update: ``keys (n,) u64`` and ``values (n, D)``, or ``values None`` for an erase."""

    seq: int
    commit_ns: int
    keys: np.ndarray
    values: np.ndarray | None

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + (self.values.nbytes if self.values is not None else 0) + _BATCH_OVERHEAD


class UpdateRing:
    """The newest committed batches of one replica, bounded by bytes (module doc).

    Args:
        cap_bytes: bytes of batches kept; the oldest go first.
        epoch: the starting epoch; 0 = none yet (a fan-out replica before its first sync).

    Attributes:
        on_append: called (outside the lock) after each append; the server wakes parked PULLs with it.
    """

    def __init__(self, cap_bytes: int, epoch: int = 0) -> None:
        self.cap_bytes = cap_bytes
        self._lock = threading.Lock()
        self._batches: collections.deque[Batch] = collections.deque()
        self._bytes = 0
        self.epoch = epoch
        self.base = 0  # every batch after this one is held
        self.last = 0
        self.last_commit_ns = 0
        self.on_append: Callable[[], None] | None = None

    def reset(self, epoch: int, base: int = 0, commit_ns: int = 0) -> None:
        """Start over in ``epoch``: empty, the next batch is ``base + 1``."""
        with self._lock:
            self._batches.clear()
            self._bytes = 0
            self.epoch, self.base, self.last, self.last_commit_ns = epoch, base, base, commit_ns

    def append(self, keys: np.ndarray, values: np.ndarray | None, *, seq: int = 0, commit_ns: int = 0) -> int:
        """Add a batch the ring now owns (``seq`` 0: the next number, ``commit_ns`` 0: now); its seq.

        REQUIRES: ``seq`` is 0 or ``last + 1`` (a re-logged batch keeps its number).
        """
        with self._lock:
            seq = seq or self.last + 1
            assert seq == self.last + 1, (seq, self.last)
            b = Batch(seq, commit_ns or time.time_ns(), keys, values)
            self._batches.append(b)
            self._bytes += b.nbytes
            self.last, self.last_commit_ns = seq, b.commit_ns
            while self._bytes > self.cap_bytes and len(self._batches) > 1:
                old = self._batches.popleft()
                self._bytes -= old.nbytes
                self.base = old.seq
        if self.on_append is not None:
            self.on_append()
        return seq

    def state(self) -> tuple[int, int, int, int]:
        """``(epoch, base, last, last_commit_ns)``."""
        with self._lock:
            return self.epoch, self.base, self.last, self.last_commit_ns

    def read(self, epoch: int, after: int, max_bytes: int) -> tuple[int, list[Batch]]:
        """``(outcome, batches)``: those after ``after`` (at least one if any, then up to
        ``max_bytes``), or PULL_EPOCH / PULL_TRUNCATED with none."""
        with self._lock:
            if epoch != self.epoch or self.epoch == 0:
                return PULL_EPOCH, []
            if after < self.base:
                return PULL_TRUNCATED, []
            out: list[Batch] = []
            first = self.last - len(self._batches) + 1
            size = 0
            for i in range(max(after + 1 - first, 0), len(self._batches)):
                b = self._batches[i]
                if out and size + b.nbytes > max_bytes:
                    break
                out.append(b)
                size += b.nbytes
            return PULL_OK, out

    def has_after(self, epoch: int, after: int) -> bool:
        """Whether a PULL for ``(epoch, after)`` would be answered now (batches, or a re-sync)."""
        with self._lock:
            return epoch != self.epoch or self.epoch == 0 or after < self.base or after < self.last

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._batches)


def pull_request(table: int, shard: int, epoch: int, after: int, max_bytes: int, wait_ms: int,
                 request_id: int = 0) -> Frame:
    """A PULL frame (module doc)."""
    return Frame(Kind.PULL, [np.array([epoch, after, max_bytes, wait_ms], dtype=np.int64)],
                 request_id=request_id, table=table, shard=shard)


def pull_reply(req: Frame, ring: UpdateRing, outcome: int, batches: list[Batch], dim: int,
               dtype: np.dtype) -> Frame:
    """The reply to ``req`` carrying ``batches`` (module doc's layout)."""
    epoch, base, last, commit = ring.state()
    meta = np.array([(b.seq, b.commit_ns, b.keys.shape[0], int(b.values is None)) for b in batches],
                    dtype=np.int64).reshape(len(batches), 4)
    keys = (batches[0].keys if len(batches) == 1 else
            np.concatenate([b.keys for b in batches]) if batches else np.empty(0, np.uint64))
    rows = [b.values for b in batches if b.values is not None]
    values = rows[0] if len(rows) == 1 else np.concatenate(rows) if rows else np.empty((0, dim), dtype)
    reply = reply_to(req, [np.array([epoch, base, last, commit], dtype=np.int64), meta, keys, values])
    reply.aux = outcome
    return reply


def decode_pull(reply: Frame, dim: int) -> tuple[tuple[int, int, int, int], list[Batch]]:
    """``(state, batches)`` of a PULL reply, checked against its own counts.

    Raises:
        ValueError: the buffers do not fit together (a peer's bytes are never trusted).
    """
    if len(reply.buffers) != 4:
        raise ValueError(f"a PULL reply has 4 buffers, got {len(reply.buffers)}")
    state, meta, keys, values = reply.buffers
    if state.dtype != np.int64 or state.shape != (4,):
        raise ValueError(f"PULL state: expected int64 (4,), got {state.dtype} {state.shape}")
    if meta.dtype != np.int64 or meta.ndim != 2 or meta.shape[1] != 4 or keys.dtype != np.uint64:
        raise ValueError("PULL meta/keys: expected int64 (n, 4) and uint64 (K,)")
    counts = meta[:, 2]
    puts = meta[:, 3] == 0
    if (counts < 0).any() or int(counts.sum()) != keys.shape[0] or values.ndim != 2 or \
            values.shape != (int(counts[puts].sum()), dim):
        raise ValueError(f"PULL batches do not add up: {counts.tolist()} keys, {keys.shape}, {values.shape}")
    borrowed = reply.borrowed
    out, k, v = [], 0, 0
    for seq, commit, n, erase in meta.tolist():
        bk = keys[k:k + n]
        bv = None if erase else values[v:v + n]
        if borrowed:  # views of a transport's reused ring: the batch is kept, so it gets its own copy
            bk, bv = bk.copy(), (bv.copy() if bv is not None else None)
        out.append(Batch(seq, commit, bk, bv))
        k += n
        v += 0 if erase else n
    s = state.tolist()
    return (s[0], s[1], s[2], s[3]), out
