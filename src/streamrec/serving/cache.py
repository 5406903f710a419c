"""Near-model data for serving (FLAME's PDA): the encoded-history cache, the hot-embedding cache
and reused input buffers, each counting its hits.

Owns: ``HistoryCache`` (user -> ``Encoded`` history, valid while the user's sequence is
unchanged: request-level batching across requests), ``EmbeddingCache`` (item id -> embedding row,
bounded, for embeddings that live outside the model: a version's store tables) and ``Buffers``
(growable arrays a worker fills each batch instead of allocating). It must not read stores itself.

The history key. A user's entry is kept under ``(user, model version)`` with the sequence
store's state of that user when it was read: ``(length, newest timestamp, newest item, newest
action)``. The store has no public per-user version counter; this fingerprint changes on every
append (the newest event changes, even when the ring is full and the length does not), and on an
erase (the length drops to 0). It misses only a change that leaves the newest event and the
length as they were, which the store's writers (the join's appends) never make.

Thread safety: ``HistoryCache`` and ``EmbeddingCache`` take their own lock for each call, so any
thread may use them; what they hold is immutable. ``Buffers`` belongs to one worker thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from streamrec.serving.executor import Encoded

__all__ = ["Buffers", "CachedEmbedding", "EmbeddingCache", "HistoryCache", "HitRate"]

Fingerprint = tuple[int, int, int, int]


@dataclass
class HitRate:
    """Hits and lookups of one cache (``rate`` is nan before the first lookup)."""

    hits: int = 0
    lookups: int = 0

    @property
    def rate(self) -> float:
        return self.hits / self.lookups if self.lookups else float("nan")


@dataclass(frozen=True)
class _Entry:
    fingerprint: Fingerprint
    window: tuple[int, int]  # request times t that select the same events: lo < t <= hi
    encoded: Encoded


class HistoryCache:
    """User -> encoded history, bounded in bytes, least recently used out first.

    Args:
        max_bytes: the bound on what entries hold (their ``Encoded.nbytes``); 0 disables caching.

    Example::

        cache = HistoryCache(256 << 20)
        enc = cache.get(user, version, fp, now_ms)          # None on a miss
        if enc is None:
            enc = runner.encode(...); cache.put(user, version, fp, enc, (newest_held, oldest_left_out))
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes: expected >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.stats = HitRate()
        self._lru: OrderedDict[tuple[int, int], _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, user: int, version: int, fingerprint: Fingerprint, request_ts_ms: int) -> Encoded | None:
        """The encoding of ``user``'s history if the sequence is still ``fingerprint`` and a request
        at ``request_ts_ms`` selects the same events (those older than it); else None. The caller
        refreshes time buckets (``ModelRunner.refresh``)."""
        with self._lock:
            self.stats.lookups += 1
            e = self._lru.get((user, version))
            if e is None or e.fingerprint != fingerprint or not e.window[0] < request_ts_ms <= e.window[1]:
                return None
            self._lru.move_to_end((user, version))
            self.stats.hits += 1
            return e.encoded

    def peek(self, user: int, version: int) -> Encoded | None:
        """Whatever encoding is held for ``user``, current or not (not counted as a lookup): what a
        changed history can be encoded incrementally from (``ModelRunner.extend``)."""
        with self._lock:
            e = self._lru.get((user, version))
        return e.encoded if e is not None else None

    def put(self, user: int, version: int, fingerprint: Fingerprint, encoded: Encoded,
            window: tuple[int, int]) -> None:
        """Keep ``encoded`` for ``user`` (replacing any entry); evicts the oldest past ``max_bytes``.

        ``window`` = (newest timestamp it holds, oldest timestamp of a held event it left out as
        not older than its request): request times in ``(lo, hi]`` select the same events. An
        entry larger than the whole bound is not kept.
        """
        size = encoded.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._lru.pop((user, version), None)
            if old is not None:
                self.bytes -= old.encoded.nbytes
            self._lru[(user, version)] = _Entry(fingerprint, window, encoded)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, gone = self._lru.popitem(last=False)
                self.bytes -= gone.encoded.nbytes

    def replace(self, user: int, version: int, fingerprint: Fingerprint, encoded: Encoded) -> None:
        """Put ``encoded`` (the same events, re-bucketed for a later time) in place of the entry
        of ``fingerprint``, keeping its window; nothing if that entry is gone or changed."""
        with self._lock:
            e = self._lru.get((user, version))
            if e is not None and e.fingerprint == fingerprint:
                self._lru[(user, version)] = _Entry(fingerprint, e.window, encoded)
                self.bytes += encoded.nbytes - e.encoded.nbytes

    def drop_version(self, keep: int) -> None:
        """Forget every entry of a model version other than ``keep`` (after a swap)."""
        with self._lock:
            for key in [k for k in self._lru if k[1] != keep]:
                self.bytes -= self._lru.pop(key).encoded.nbytes


class EmbeddingCache:
    """Item id -> embedding row for rows fetched from outside the model, bounded in rows.

    Args:
        fetch: ``(ids int64 (B,)) -> (rows float32 (B, D), found bool (B,))`` (the ``find`` of a
            version's table snapshot); rows not found get the default embedding (zeros). Both are
            cached: a snapshot does not change, so neither goes stale within its version.
        dim: D.
        max_rows: the bound; past it the least recently used rows go first (0: no caching).

    Shape: ``lookup(ids (B,)) -> (B, D)`` float32.
    """

    def __init__(self, fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], dim: int,
                 max_rows: int) -> None:
        self.fetch = fetch
        self.dim = dim
        self.max_rows = max_rows
        self.stats = HitRate()
        self._rows: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids``: cached ones from memory, the rest fetched in one call."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        uniq, inv = np.unique(ids, return_inverse=True)
        out = np.zeros((uniq.shape[0], self.dim), dtype=np.float32)
        miss = np.ones(uniq.shape[0], dtype=bool)
        if self.max_rows:
            with self._lock:
                for i, k in enumerate(uniq.tolist()):
                    row = self._rows.get(k)
                    if row is not None:
                        self._rows.move_to_end(k)
                        out[i] = row
                        miss[i] = False
                self.stats.lookups += int(uniq.shape[0])
                self.stats.hits += int(uniq.shape[0] - miss.sum())
        if miss.any():
            want = uniq[miss]
            rows, found = self.fetch(want)
            rows = np.asarray(rows, dtype=np.float32).reshape(want.shape[0], self.dim)
            found = np.asarray(found, dtype=bool)
            got = np.where(found[:, None], rows, np.float32(0.0))
            out[miss] = got
            if self.max_rows:
                with self._lock:
                    for k, row in zip(want.tolist(), got, strict=True):
                        self._rows[k] = row
                    while len(self._rows) > self.max_rows:
                        self._rows.popitem(last=False)
        return out[inv]

    def __len__(self) -> int:
        return len(self._rows)


class CachedEmbedding(nn.Module):
    """A model's embedding module over an ``EmbeddingCache``: what serving puts in place of the
    training bridge (``model.embedding.StoreEmbedding``), reading rows and never inserting.

    Shape: ids int64 (...,) -> rows float32 (..., D); absent ids get zeros (the default embedding).
    """

    def __init__(self, cache: EmbeddingCache) -> None:
        super().__init__()
        self.cache = cache

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        rows = torch.from_numpy(self.cache.lookup(uniq.numpy()))
        return rows[inverse].reshape(*ids.shape, self.cache.dim)


class Buffers:
    """Named arrays reused across batches; grown by doubling, never shrunk.

    ``take(name, shape, dtype)`` returns a view of the first ``prod(shape)`` elements, contents
    undefined: the caller fills all of it. One worker thread owns a ``Buffers``.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._arrays: dict[str, np.ndarray] = {}
        self.allocations = 0

    def take(self, name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        n = int(np.prod(shape)) if shape else 1
        if not self.enabled:
            self.allocations += 1
            return np.empty(shape, dtype=dtype)
        a = self._arrays.get(name)
        if a is None or a.dtype != np.dtype(dtype) or a.shape[0] < n:
            cap = max(n, 2 * (a.shape[0] if a is not None else 0), 64)
            a = self._arrays[name] = np.empty(cap, dtype=dtype)
            self.allocations += 1
        return a[:n].reshape(shape)
