"""CPU preprocessing of a ranking request, apart from model execution.

Owns: ``Preprocessor.prepare`` (one request -> ``Prepared``: candidates deduplicated, context
filled, the pipeline's ``FeatureSet.request_features`` turned into the model's dense and
categorical columns exactly as ``RequestBatch.from_samples`` picks them in training, and the
user's history from the ``SequenceStore``, encoded through the ``HistoryCache``) and
``feature_columns`` (that pick). It must not run the scoring model or touch queues.

The same event, the same inputs: a training sample's columns are ``SAMPLE_SCHEMA`` then the
feature set's; ``from_samples`` takes the context columns ``device``, ``hour``, ``position`` and
then every integer feature column as categorical, every float feature column as dense, in
schema order, and the user's events strictly older than the request, newest ``max_history``.
``prepare`` builds the same from ``request_features`` and the store (tests/serving/
test_features.py checks it against the training path row for row).

Bad input: an unknown user has an empty history (the store returns none); candidates outside
the catalog get category 0, and the model's item table gives every id a row (the default
embedding of a store-backed table is zeros: ``cache.EmbeddingCache``).

Thread safety: ``prepare`` runs in many worker threads at once; the stores are read lock-free
(their readers' rule) and the caches lock themselves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from streamrec.errors import BadRequest, FeatureError
from streamrec.model.batch import suffix_index
from streamrec.pipeline.features import FeatureSet, Stores
from streamrec.serving.cache import HistoryCache
from streamrec.serving.codec import RankRequest
from streamrec.serving.executor import Encoded, ModelRunner

__all__ = ["CONTEXT_COLUMNS", "History", "Prepared", "Preprocessor", "feature_columns"]

CONTEXT_COLUMNS = ("device", "hour", "position")  # from_samples' categorical context, in its order
_HOUR_MS = 3_600_000


def feature_columns(fs: FeatureSet | None) -> tuple[list[str], list[str]]:
    """(categorical, dense) column names the model sees, in training's order (module doc)."""
    if fs is None:
        return list(CONTEXT_COLUMNS), []
    sparse, dense = list(CONTEXT_COLUMNS), []
    for f in fs.schema:
        if pa.types.is_integer(f.type):
            sparse.append(f.name)
        elif pa.types.is_floating(f.type):
            dense.append(f.name)
    return sparse, dense


@dataclass(frozen=True)
class History:
    """One user's events older than the request, oldest first (int64 ids/actions/times, float32 values)."""

    items: np.ndarray
    actions: np.ndarray
    ts_ms: np.ndarray
    values: np.ndarray

    @property
    def length(self) -> int:
        return int(self.items.shape[0])


@dataclass
class Prepared:
    """A request ready for the model: U unique candidates, F dense and C categorical columns.

    ``inverse`` (M,) maps each requested candidate to its unique row; ``encoded`` is set for a
    split model (``ModelRunner.split``), ``history`` otherwise. ``stage_ms`` collects timings.
    """

    request: RankRequest
    now_ms: int
    items: np.ndarray
    inverse: np.ndarray
    category: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray
    runner: ModelRunner
    encoded: Encoded | None = None
    history: History | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)

    @property
    def num_candidates(self) -> int:
        return int(self.items.shape[0])

    @property
    def history_length(self) -> int:
        if self.encoded is not None:
            return self.encoded.length
        return self.history.length if self.history is not None else 0


_EMPTY = History(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))


class Preprocessor:
    """Turns checked requests into model inputs.

    Args:
        features: the pipeline's feature set the model was trained on, or None (context only).
        stores: its stores (counters, sequence store, item catalog); None: empty histories and
            no counter features (then ``features`` must be None too).
        max_history: newest events per history.
        cache: the encoded-history cache, or None (every request encodes its history).
        value_field: the sequence store's extra field for event values (training's default).

    Raises:
        ValueError: a feature set without stores.
    """

    def __init__(self, features: FeatureSet | None, stores: Stores | None, *, max_history: int,
                 cache: HistoryCache | None, value_field: str = "value") -> None:
        if features is not None and stores is None:
            raise ValueError("stores: a feature set needs its stores (FeatureSet.make_stores)")
        self.features = features
        self.stores = stores
        self.max_history = max_history
        self.cache = cache
        self.value_field = value_field
        self.sparse_columns, self.dense_columns = feature_columns(features)
        self.encoded_events = 0  # history events run through the encoder
        self.reused_events = 0  # history events whose cached encoding served a request
        self._lock = threading.Lock()

    # -- one request ----------------------------------------------------------------------

    def prepare(self, req: RankRequest, runner: ModelRunner) -> Prepared:
        """Features and history of ``req`` for ``runner``'s model.

        Raises:
            BadRequest: context the feature set cannot use (wrong shape, out of range).
        """
        t0 = time.perf_counter()
        now_ms = req.ts_ms if req.ts_ms is not None else int(time.time() * 1000)
        items, first, inverse = np.unique(req.items, return_index=True, return_inverse=True)
        ctx = self._context(req, items, first, now_ms)
        sparse, dense = self._features(req.user_id, items, ctx, now_ms, runner)
        p = Prepared(req, now_ms, items, inverse.reshape(-1).astype(np.int64), ctx["category"], dense, sparse,
                     runner)
        t1 = time.perf_counter()
        if runner.split:
            p.encoded = self._encoded(req.user_id, now_ms, runner)
        else:
            p.history = self._history(req.user_id, now_ms)
        p.stage_ms["features"] = (t1 - t0) * 1e3
        p.stage_ms["history"] = (time.perf_counter() - t1) * 1e3
        return p

    def _context(self, req: RankRequest, items: np.ndarray, first: np.ndarray, now_ms: int
                 ) -> dict[str, np.ndarray]:
        u = items.shape[0]
        ctx: dict[str, np.ndarray] = {}
        for name, v in req.context.items():
            ctx[name] = np.full(u, int(v)) if v.ndim == 0 else v[first]
        ctx.setdefault("device", np.zeros(u, np.int64))
        ctx.setdefault("position", np.zeros(u, np.int64))
        ctx.setdefault("hour", np.full(u, (now_ms // _HOUR_MS) % 24, np.int64))
        if "category" not in ctx:
            cat = self.stores.item_category if self.stores is not None else None
            if cat is not None:
                inside = items < cat.shape[0]
                ctx["category"] = np.where(inside, cat[np.where(inside, items, 0)], 0).astype(np.int64)
            else:
                ctx["category"] = np.zeros(u, np.int64)
        return ctx

    def _features(self, user: int, items: np.ndarray, ctx: Mapping[str, np.ndarray], now_ms: int,
                  runner: ModelRunner) -> tuple[np.ndarray, np.ndarray]:
        u = items.shape[0]
        if self.features is None:
            sparse = (np.stack([ctx[c] for c in CONTEXT_COLUMNS], axis=1) if runner.sparse_features
                      else np.zeros((u, 0), np.int64))
            return sparse.astype(np.int64, copy=False), np.zeros((u, 0), np.float32)
        assert self.stores is not None
        try:
            rb = self.features.request_features(user, items, dict(ctx), now_ms, self.stores)
        except FeatureError as exc:
            raise BadRequest(f"context: {exc}") from exc
        cols = {name: rb.column(name) for name in rb.schema.names}
        sparse = np.empty((u, len(self.sparse_columns)), np.int64)
        for j, c in enumerate(self.sparse_columns):
            sparse[:, j] = ctx[c] if c in CONTEXT_COLUMNS else cols[c].to_numpy(zero_copy_only=False)
        dense = np.empty((u, len(self.dense_columns)), np.float32)
        for j, c in enumerate(self.dense_columns):
            dense[:, j] = np.nan_to_num(cols[c].to_numpy(zero_copy_only=False).astype(np.float32))
        return sparse, dense

    # -- history --------------------------------------------------------------------------

    def _fingerprint(self, user: int) -> tuple[int, int, int, int]:
        seq = self.stores.sequences if self.stores is not None else None
        if seq is None:
            return (0, 0, 0, 0)
        users = np.array([user], dtype=np.uint64)
        n = int(seq.length(users)[0])
        if n == 0:
            return (0, 0, 0, 0)
        _, last = seq.read_last(users, 1)
        return (n, int(last["timestamp"][0, -1]), int(last["item"][0, -1]), int(last["action"][0, -1]))

    def _read(self, user: int, now_ms: int) -> tuple[History, tuple[int, int]]:
        """The user's events older than ``now_ms`` (newest ``max_history``) and the window of
        request times that select the same ones (``HistoryCache.put``)."""
        seq = self.stores.sequences if self.stores is not None else None
        big = np.iinfo(np.int64).max
        if seq is None:
            return _EMPTY, (np.iinfo(np.int64).min, big)
        _, cols = seq.read(np.array([user], dtype=np.uint64))
        ts = cols["timestamp"]
        keep = ts < now_ms
        lo = int(ts[keep].max()) if keep.any() else np.iinfo(np.int64).min
        hi = int(ts[~keep].min()) if (~keep).any() else big
        idx = np.flatnonzero(keep)
        n = idx.shape[0]
        _, sel = suffix_index(np.array([0, n], np.int64), np.array([min(n, self.max_history)], np.int64))
        idx = idx[sel]
        vals = cols.get(self.value_field) if self.value_field else None
        v = vals[idx].astype(np.float32) if vals is not None else np.zeros(idx.shape[0], np.float32)
        return History(cols["item"][idx].astype(np.int64), cols["action"][idx].astype(np.int64),
                       ts[idx].astype(np.int64), v), (lo, hi)

    def _history(self, user: int, now_ms: int) -> History:
        return self._read(user, now_ms)[0]

    def _encoded(self, user: int, now_ms: int, runner: ModelRunner) -> Encoded:
        cache = self.cache
        fp = self._fingerprint(user) if cache is not None else None
        if cache is not None and fp is not None:
            hit = cache.get(user, runner.version, fp, now_ms)
            if hit is not None:
                enc, moved = runner.refresh(hit, now_ms)
                with self._lock:
                    self.encoded_events += moved
                    self.reused_events += enc.length - moved
                if moved:
                    cache.replace(user, runner.version, fp, enc)
                return enc
        hist, window = self._read(user, now_ms)
        prev = cache.peek(user, runner.version) if cache is not None else None
        grown = (runner.extend(prev, hist.items, hist.actions, hist.ts_ms, hist.values, now_ms)
                 if prev is not None else None)
        if grown is not None:
            enc, reused = grown
        else:
            enc, reused = runner.encode(hist.items, hist.actions, hist.ts_ms, hist.values, now_ms), 0
        with self._lock:
            self.encoded_events += hist.length - reused
            self.reused_events += reused
        if cache is not None and fp is not None:
            cache.put(user, runner.version, fp, enc, window)
        return enc

