"""Windowed counters per key, kept in a store table: "a user's clicks in the last hour".

Owns: ``Counters`` (one key column, one window, one or more counted channels)
and its row format, update kernel and as-of read kernel. It must not keep
per-key state outside its ``EmbeddingTable``: a snapshot of the table is the
whole state (the event-time watermark lives in a reserved row too).

Semantics (what "exact" means here, and what the brute-force test checks):

- Time is cut into buckets of ``bucket_ms``; the window is ``window_ms`` =
  ``B`` buckets. A read **as of** ``t`` counts the events of the key whose
  bucket lies in ``[b(t) - B, b(t) - 1]``, with ``b(t) = t // bucket_ms``: the B
  whole buckets before the one holding ``t`` (Chronon's tiled windows). Every
  counted event is therefore strictly earlier than ``t``: a training sample read
  as of its impression's ``ts_ms`` never sees its own label, nor anything later,
  and serving (as of now) and training (as of the impression) read the same
  number for the same moment. The price is staleness of at most one bucket, so
  buckets are small (a 60th of the window by default).
- Each key's row is a ring of ``R = B + H + 1`` buckets, ``H`` = ``horizon_ms`` /
  ``bucket_ms``, plus the newest bucket the row holds (its head). The horizon is
  how far behind the newest event a read (or a late event) may be: the sample
  join reads as of impressions emitted up to its label window (plus lateness)
  later, so the horizon must cover that.
- An event whose bucket is at or below ``head - R`` (its slot already reused by
  a newer bucket of the same key) is dropped and counted (``stats.late_dropped``).
  Events are applied in batch order, so the result is deterministic.
- A read as of ``t`` with ``b(t) - B <= b(watermark) - R`` (older than the
  horizon) may miss buckets already reused; it is served and counted
  (``stats.stale_reads``), never raised: the pipeline does not stop for it.
- Rows expire ``window + horizon`` (plus two buckets and a second, so that a
  row is only reclaimed once nothing in it can be counted again) after their
  last update, on the table's clock, which is the counters' event-time
  watermark (the newest ``ts_ms`` seen), not the wall clock: a replay of old
  traffic ages rows as the traffic did. Times are trusted: one event far in
  the future would move the watermark and expire every row, so events come
  here validated (``events.validate`` dead-letters times far in the future).

Row layout (float64, exact for counts and bucket numbers below 2**53):
``[head, slot_0[ch_0 .. ch_C-1], slot_1[...], ..., slot_R-1[...]]``, bucket j in
slot ``j % R``. D = 1 + R * C.

Thread safety: one writer (``update``; serialised by a lock) and any number of
lock-free readers (``read``): each row is read whole under the table's seqlock,
so a read never mixes two versions of a key's ring.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from streamrec.config import Initializer
from streamrec.errors import ConfigError, FeatureError, MissingColumns
from streamrec.store import EmbeddingTable
from streamrec.store._jit import kernel

__all__ = ["Channel", "CounterSpec", "CounterStats", "Counters", "factorize"]

Source = Literal["impressions", "actions"]

_META_KEY = (1 << 64) - 1  # ids are < 2**53 (contract), so this key is never an id; it holds the watermark
_TTL_SLACK_S = 1  # seconds on top of window + horizon + 2 buckets: the table's clock counts whole seconds


@dataclass(frozen=True)
class Channel:
    """One counted quantity of a ``Counters``: impressions, or actions of one type.

    Attributes:
        name: the column name the count is known by (``"clicks"``).
        source: ``"impressions"`` (every impression counts 1) or ``"actions"``.
        action: for ``"actions"``, the action code counted (``ACTIONS["click"]`` = 1).
    """

    name: str
    source: Source = "actions"
    action: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and self.name.isidentifier()):
            raise ConfigError(f"must be an identifier, got {self.name!r}", field="channel.name")
        if self.source not in ("impressions", "actions"):
            raise ConfigError(f"must be 'impressions' or 'actions', got {self.source!r}",
                              field="channel.source")
        if self.source == "actions" and not (isinstance(self.action, int) and 1 <= self.action < 256):
            raise ConfigError(f"must be an action code in [1, 256), got {self.action!r}",
                              field="channel.action")


@dataclass(frozen=True)
class CounterSpec:
    """What a ``Counters`` counts: per value of ``key``, channels over a sliding window.

    Attributes:
        key: the id column counted by (``"user_id"``, ``"item_id"``).
        window_ms: window length; a multiple of ``bucket_ms``.
        bucket_ms: bucket width: the window's granularity and a read's
            staleness bound. 0 (default): a 60th of the window (one minute of an
            hour), or the gcd of that and the window where it does not divide.
        horizon_ms: how far behind the newest event reads and late events may
            be and still be exact (default 40 min: the longest label window
            the join allows, 30 min, plus 10 min of lateness).
        channels: what is counted (at least one, names distinct).
    """

    key: str
    window_ms: int
    bucket_ms: int = 0
    horizon_ms: int = 40 * 60_000
    channels: tuple[Channel, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not (isinstance(self.key, str) and self.key.isidentifier()):
            raise ConfigError(f"must be a column name, got {self.key!r}", field="counters.key")
        if not (isinstance(self.window_ms, int) and self.window_ms > 0):
            raise ConfigError(f"must be an int > 0, got {self.window_ms!r}", field="counters.window_ms")
        if self.bucket_ms == 0:
            # A 60th of the window, or the nearest width below it that divides the window.
            object.__setattr__(self, "bucket_ms", math.gcd(self.window_ms, max(1, self.window_ms // 60)))
        b = self.bucket_ms
        if not (isinstance(b, int) and b > 0 and self.window_ms % b == 0):
            raise ConfigError(f"must be an int > 0 dividing window_ms ({self.window_ms}), got {b!r}",
                              field="counters.bucket_ms")
        if not (isinstance(self.horizon_ms, int) and self.horizon_ms >= 0):
            raise ConfigError(f"must be an int >= 0, got {self.horizon_ms!r}", field="counters.horizon_ms")
        chans = tuple(self.channels)
        object.__setattr__(self, "channels", chans)
        if not chans or not all(isinstance(c, Channel) for c in chans):
            raise ConfigError("must be one or more Channel", field="counters.channels")
        if len({c.name for c in chans}) != len(chans):
            raise ConfigError(f"names repeat: {[c.name for c in chans]}", field="counters.channels")

    @property
    def buckets(self) -> int:
        """B: buckets in the window."""
        return self.window_ms // self.bucket_ms

    @property
    def ring(self) -> int:
        """R: buckets a row keeps (window, horizon, and the bucket being filled)."""
        return self.buckets + -(-self.horizon_ms // self.bucket_ms) + 1

    @property
    def dim(self) -> int:
        """Row width D = 1 + R * C."""
        return 1 + self.ring * len(self.channels)

    @property
    def ttl_s(self) -> int:
        return math.ceil((self.window_ms + self.horizon_ms + 2 * self.bucket_ms) / 1000) + _TTL_SLACK_S


@dataclass(frozen=True)
class CounterStats:
    """Counts since this object was made: ``events`` applied, ``late_dropped``
    (older than the key's ring), ``stale_reads`` (reads older than the horizon),
    and ``keys`` (rows live in the table, the watermark row excluded)."""

    events: int
    late_dropped: int
    stale_reads: int
    keys: int


class Counters:
    """Windowed counts per key in an ``EmbeddingTable`` (module doc: semantics, layout).

    Shape contract: ``update`` takes an Arrow batch of N impressions or actions
    (an ``action`` column marks actions; ``ts_ms`` int64 and the key column are
    required); ``read`` takes (B,) keys and a time (scalar or (B,) int64 ms) and
    returns (B, C) int64 counts, one column per channel in ``spec.channels`` order.

    Args:
        spec: what to count.
        capacity: keys to size the table for at first (it grows).
        huge_pages: passed to the table.

    Raises:
        ConfigError: a bad spec.

    Thread safety: one writer, many lock-free readers (module doc).

    Example::

        c = Counters(CounterSpec("user_id", window_ms=3_600_000, channels=(Channel("clicks", action=1),)))
        c.update(actions)                                      # pa.RecordBatch with user_id, ts_ms, action
        clicks = c.read(samples_user_ids, samples_ts_ms)[:, 0]  # as of each sample's time
    """

    def __init__(self, spec: CounterSpec, *, capacity: int = 1024, huge_pages: bool = True,
                 _table: EmbeddingTable | None = None) -> None:
        if not isinstance(spec, CounterSpec):
            raise ConfigError(f"expected a CounterSpec, got {type(spec).__name__}", field="counters")
        self.spec = spec
        self._watermark_ms = 0
        self._lock = threading.Lock()
        self._events = 0
        self._late = 0
        self._stale = 0
        if _table is None:
            _table = EmbeddingTable(spec.dim, "float64", capacity, initializer=Initializer(kind="zeros"),
                                    ttl_s=spec.ttl_s, clock=self._clock_s, huge_pages=huge_pages)
        elif _table.dim != spec.dim:
            raise ConfigError(f"the table's rows hold {_table.dim} values, the spec needs {spec.dim}",
                              field="counters")
        self._table = _table
        row, found = _table.find(np.array([_META_KEY], dtype=np.uint64))
        if found[0]:
            self._watermark_ms = int(row[0, 0])
        self._source_action = np.array([c.source == "actions" for c in spec.channels])
        self._codes = np.array([c.action for c in spec.channels], dtype=np.int64)

    def _clock_s(self) -> float:
        return self._watermark_ms / 1000.0

    @property
    def table(self) -> EmbeddingTable:
        """The table holding every row (for snapshots and stats)."""
        return self._table

    @property
    def watermark_ms(self) -> int:
        """The newest ``ts_ms`` given to ``update`` (0 before any)."""
        return self._watermark_ms

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.spec.channels)

    @property
    def stats(self) -> CounterStats:
        return CounterStats(self._events, self._late, self._stale, max(len(self._table) - 1, 0))

    # -- writes ---------------------------------------------------------------------

    def update(self, *batches: pa.RecordBatch | None) -> int:
        """Count batches of impressions or actions, in order, in one write; returns the events applied.

        Each batch is impressions or actions (an ``action`` column); None is
        skipped. Events not counted by any channel (impressions when only
        actions are counted, other action types) are skipped; events older than
        their key's ring are dropped and counted (module doc). A runner passes
        a micro-batch's impressions and actions together: each key's row is
        then read and written once.

        Raises:
            MissingColumns: ``ts_ms`` or the key column is absent.
            FeatureError: nulls or negative values in them.
        """
        parts = [p for p in (self._counted(b) for b in batches if b is not None) if p is not None]
        if not parts:
            return 0
        keys, ts, inc8 = (np.concatenate([p[k] for p in parts]) if len(parts) > 1 else parts[0][k]
                          for k in range(3))
        buckets = ts // self.spec.bucket_ms
        with self._lock:
            self._watermark_ms = max(self._watermark_ms, int(ts.max()))
            uniq, inv = factorize(keys)
            n = uniq.shape[0]
            rows = np.empty((n + 1, self.spec.dim))
            self._table.find(uniq, out=rows[:n])  # zeros for keys not yet counted
            late = int(_apply(rows, inv, buckets, inc8, self.spec.ring))
            # The watermark row rides in the same write (one writer-lock hold), and never expires.
            rows[n] = 0.0
            rows[n, 0] = self._watermark_ms
            ttl = np.full(n + 1, self.spec.ttl_s, dtype=np.int64)
            ttl[n] = 0
            self._table.insert_or_assign(np.append(uniq, np.uint64(_META_KEY)), rows, ttl_s=ttl)
            self._events += keys.shape[0] - late
            self._late += late
        return keys.shape[0] - late

    def _counted(self, batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(keys, ts, increments uint8 (N, C)) of the batch's counted events, or None if none counts."""
        is_actions = "action" in batch.schema.names
        sel = self._source_action if is_actions else ~self._source_action
        if not sel.any() or batch.num_rows == 0:
            return None
        need = [self.spec.key, "ts_ms"] + (["action"] if is_actions else [])
        cols = _columns(batch, need, "counters")
        keys, ts = cols[0], cols[1]
        if is_actions:
            acts = cols[2].astype(np.int64, copy=False)
            inc = (acts[:, None] == self._codes[None, :]) & sel[None, :]
            hit = inc.any(axis=1)
            if not hit.all():
                keys, ts, inc = keys[hit], ts[hit], inc[hit]
        else:
            inc = np.broadcast_to(sel[None, :], (keys.shape[0], sel.shape[0]))
        if keys.shape[0] == 0:
            return None
        return keys, ts, np.ascontiguousarray(inc, dtype=np.uint8)

    # -- reads ----------------------------------------------------------------------

    def read(self, keys: Any, now_ms: Any) -> np.ndarray:
        """Counts per channel as of ``now_ms`` (module doc): (B, C) int64.

        Args:
            keys: (B,) non-negative integer ids.
            now_ms: one time for all (serving) or (B,) times, one per key (training).

        Raises:
            FeatureError: negative keys or times, or ``now_ms`` of the wrong shape.
        """
        k = np.asarray(keys)
        if k.ndim != 1 or (k.size and k.dtype.kind not in "iu"):
            raise FeatureError(f"keys: expected (B,) integers, got {k.dtype} {k.shape}", column=self.spec.key)
        t = np.asarray(now_ms)
        if t.dtype.kind not in "iu" or t.ndim > 1 or (t.ndim == 1 and t.shape[0] != k.shape[0]):
            raise FeatureError(f"now_ms: expected an int or ({k.shape[0]},) integers, "
                               f"got {t.dtype} {t.shape}", column="ts_ms")
        t = np.broadcast_to(t.astype(np.int64, copy=False), k.shape)
        if k.size and (int(k.min()) < 0 or int(t.min()) < 0):
            raise FeatureError("keys and times must be non-negative", column=self.spec.key)
        out = np.zeros((k.shape[0], len(self.spec.channels)), dtype=np.float64)
        if k.size == 0:
            return out.astype(np.int64)
        uniq, inv = factorize(k)
        rows, _ = self._table.find(uniq)
        bq = t // self.spec.bucket_ms
        # Rows of one key in one bucket read the same sum: sum once per (key, bucket) pair.
        # A batch of samples spans a few buckets, so pairs are about as many as keys.
        b0 = int(bq.min())
        span = int(bq.max()) - b0 + 1
        if uniq.size * span < 1 << 62:
            pairs, pinv = factorize(inv * span + (bq - b0))
            p = pairs.astype(np.int64)
            sums = np.zeros((p.shape[0], out.shape[1]), dtype=np.float64)
            _sum_window(rows, p // span, p % span + b0, self.spec.buckets, self.spec.ring, sums)
            out = sums[pinv]
        else:
            _sum_window(rows, inv, bq, self.spec.buckets, self.spec.ring, out)
        oldest_exact = self._watermark_ms // self.spec.bucket_ms - self.spec.ring + self.spec.buckets
        stale = int(np.count_nonzero(bq <= oldest_exact))
        if stale:
            self._stale += stale  # a statistic: a lost increment between reader threads is harmless
        return out.astype(np.int64)

    # -- persistence ----------------------------------------------------------------

    def snapshot(self, root: str | os.PathLike[str]) -> Path:
        """Write the counters' table (rows and watermark) as a snapshot generation of ``root``."""
        with self._lock:
            got = self._table.snapshot(root)
        assert isinstance(got, Path)
        return got

    @classmethod
    def open(cls, root: str | os.PathLike[str], spec: CounterSpec) -> Counters:
        """Counters loaded from a ``snapshot`` of counters with this ``spec``."""
        holder: list[Counters] = []
        table = EmbeddingTable.open(root, clock=lambda: holder[0]._clock_s() if holder else 0.0)
        self = cls(spec, _table=table)
        holder.append(self)
        return self


def factorize(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(uniq, inv)``: the distinct keys (uint64, in order of first appearance) and each key's
    index among them (int64), as ``np.unique(return_inverse=True)`` but by hashing: 12 ms for 1 M
    keys of 10 k distinct, against 250 ms for the sort. Requires: keys integers >= 0 below 2**63."""
    inv, uniq = pd.factorize(keys.astype(np.int64, copy=False), sort=False)
    return np.asarray(uniq).astype(np.uint64), inv.astype(np.int64, copy=False)


def _columns(batch: pa.RecordBatch, names: list[str], who: str) -> list[np.ndarray]:
    """Non-null, non-negative integer columns of ``batch`` as numpy arrays."""
    missing = [n for n in names if n not in batch.schema.names]
    if missing:
        raise MissingColumns(missing, feature=who)
    out = []
    for n in names:
        col = batch.column(n)
        if col.null_count:
            raise FeatureError(f"{col.null_count} null value(s)", feature=who, column=n)
        a = col.to_numpy(zero_copy_only=False)
        if a.dtype.kind not in "iu":
            raise FeatureError(f"expected integers, got {a.dtype}", feature=who, column=n)
        if a.size and a.dtype.kind == "i" and int(a.min()) < 0:
            raise FeatureError(f"expected non-negative values, got {int(a.min())}", feature=who, column=n)
        out.append(a.astype(np.int64, copy=False))
    return out


@kernel
def _apply(rows: np.ndarray, inv: np.ndarray, buckets: np.ndarray, inc: np.ndarray, ring: int) -> int:
    """Add each event to its key's ring, in batch order; returns the events dropped as too late.

    Requires: rows float64 (U, 1 + ring * C) as read (zeros for new keys);
    inv int64 (N,) row of each event; buckets int64 (N,) >= 0; inc uint8 (N, C).
    """
    c_n = inc.shape[1]
    late = 0
    for e in range(inv.shape[0]):
        r = inv[e]
        b = buckets[e]
        head = np.int64(rows[r, 0])
        if b > head:
            # Clear the slots of the buckets between the old head and this one: they start empty.
            lo = max(head + 1, b - ring + 1)
            for j in range(lo, b + 1):
                base = 1 + (j % ring) * c_n
                for c in range(c_n):
                    rows[r, base + c] = 0.0
            rows[r, 0] = b
        elif b <= head - ring:
            late += 1
            continue
        base = 1 + (b % ring) * c_n
        for c in range(c_n):
            rows[r, base + c] += inc[e, c]
    return late


@kernel
def _sum_window(rows: np.ndarray, inv: np.ndarray, bq: np.ndarray, nb: int, ring: int,
                out: np.ndarray) -> None:
    """out[i] = the sums of buckets [bq[i] - nb, bq[i] - 1] held by row inv[i].

    Requires: rows float64 (U, 1 + ring * C); inv, bq int64 (B,); out float64 (B, C) zeroed.
    """
    c_n = out.shape[1]
    end = 1 + ring * c_n
    for i in range(inv.shape[0]):
        r = inv[i]
        head = np.int64(rows[r, 0])
        lo = max(bq[i] - nb, head - ring + 1)
        hi = min(bq[i] - 1, head)
        # The buckets lo..hi are consecutive slots from lo % ring, wrapping once at most.
        p = 1 + (lo % ring) * c_n if hi >= lo else end
        for _ in range(hi - lo + 1):
            for c in range(c_n):
                out[i, c] += rows[r, p + c]
            p += c_n
            if p == end:
                p = 1
