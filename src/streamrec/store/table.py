"""The embedding table: a batch cuckoo-hash map from uint64 ids to rows.

Owns: ``EmbeddingTable``, the public API over the index (``_index``), the row
format (``_rows``) and the batch kernels (``_ops``): input checks, growth,
retries, and turning kernel status codes into exceptions. It must not do
per-key work in Python.

Thread safety, for the whole class: any number of threads may call the read
methods (``find``, ``contains``, ``len``, ``load_factor``, ``memory_bytes``)
while one thread writes; every write method takes the table's writer lock, so
writes from several threads are serialised, never interleaved. Readers take no
lock: they validate each bucket they read with its version counter and retry a
torn read, so a reader never sees a half-written row or a value that was never
written. Kernels release the GIL, so readers and the writer run in parallel.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamrec.config import (
    Adagrad,
    Adam,
    Initializer,
    Optimizer,
    TableConfig,
)
from streamrec.errors import ConfigError, IndexGrowthRefused, NonFiniteValues, TableFull
from streamrec.store._checks import as_keys, as_mask_out, as_matrix, as_out
from streamrec.store._evict import (
    CTX_ADMIT,
    CTX_DECAY_MIN,
    CTX_EVICTED,
    CTX_EXPIRE_W,
    CTX_HASH_K0,
    CTX_HASH_K1,
    CTX_MAX_LIVE,
    CTX_NOW,
    CTX_POLICY,
    CTX_REFRESH,
    CTX_REFUSED,
    CTX_RETRIES,
    CTX_RNG,
    CTX_SAMPLE,
    CTX_SIZE,
    POLICY_LFU,
    POLICY_LRU,
    POLICY_NONE,
)
from streamrec.store._expiry import ExpiryWheel
from streamrec.store._index import (
    BUCKET_BYTES,
    MAX_BFS_NODES,
    SLOTS,
    IndexGeneration,
    as_ctx_words,
    first_unplaceable,
    hash_key_of_seed,
    new_hash_key,
    rebuild_from,
)
from streamrec.store._memory import Region
from streamrec.store._ops import (
    CNT_FREE,
    CNT_HIGH,
    CNT_LIVE,
    MODE_ASSIGN,
    MODE_ERASE,
    MODE_FIND_OR_INSERT,
    MODE_INSERT_OR_ASSIGN,
    Status,
    find_batch,
    retry_reader,
)
from streamrec.store._persist import LiveFiles
from streamrec.store._rows import (
    STAMP,
    RowLayout,
    exponent_mask,
    finite_limit,
    init_params,
    nonfinite_rows,
    optimizer_params,
)
from streamrec.store._table_files import TableFiles
from streamrec.store._write import (
    apply_gradients_batch,
    compact_step,
    reclaim_keys,
    write_batch,
)

__all__ = ["EmbeddingTable", "TableStats"]

InitFn = Callable[[np.ndarray], np.ndarray]
EvictFn = Callable[[np.ndarray, np.ndarray, str], None]
Clock = Callable[[], float]

_DEFAULT_MAX_ROWS = 1 << 31  # address space only; see TableConfig.max_rows
_MAX_ROWS_LIMIT = (1 << 32) - 1  # row numbers are uint32 in the bucket
_RESERVE_LOAD = 0.9  # reserve()/capacity size the index for this load
_COMPACT_STEP = 65536  # rows moved per writer-lock hold while compacting


@dataclass(frozen=True)
class TableStats:
    """A snapshot of a table's counters (see ``EmbeddingTable.stats``).

    ``grow_load_factors`` lists, for each growth forced by a full index, the
    load factor at which displacement first failed (growths by ``reserve`` are
    not in it). ``wasted_fraction`` is the share of the arena's used rows (up to
    its high-water mark) that are holes; ``compact()`` brings it to 0.
    ``evicted``, ``expired`` and ``not_admitted`` count keys since creation;
    ``nonfinite_skipped`` counts rows a ``nonfinite="skip"`` table dropped since
    this process opened it (values, or distinct rows of a gradient step).
    ``read_retries`` counts the seqlock's work since then: each time a reader
    of this object read a key again because its bucket was locked or changed
    under the read (or a batch again on a replaced index). It shows readers
    met a writer; it is not an error count.
    """

    rows: int
    buckets: int
    load_factor: float
    high_water_rows: int
    free_rows: int
    max_rows: int
    row_bytes: int
    memory_bytes: int
    index_grows: int
    grow_load_factors: tuple[float, ...]
    wasted_fraction: float
    evicted: int
    expired: int
    not_admitted: int
    nonfinite_skipped: int
    read_retries: int


class EmbeddingTable(TableFiles):
    """A map from uint64 keys to embedding rows (with optimizer state), for batches.

    Shape contract: B keys per call, D = ``dim``. Keys are (B,) integers, every
    uint64 a valid key; values and gradients are (B, D); results are (B, D) rows
    and (B,) bool masks, in the caller's order.

    Args:
        dim: D, elements per embedding.
        dtype: ``"float32"`` (default) or ``"float64"``.
        capacity: keys to size the index for at first; it grows beyond.
        optimizer: ``None`` (plain SGD), ``"adagrad"``, ``"adam"``, or an
            ``Adagrad``/``Adam`` config.
        initializer: an ``Initializer`` (default normal, std 0.01, a function of
            the key, so every replica agrees) or a callable ``f(keys) -> (n, D)``
            called once per batch with the new keys.
        max_rows: row-arena reservation (0 = automatic; see ``TableConfig``).
        huge_pages: back the arena and index with transparent huge pages.
        ttl_s, max_live_rows, eviction, admit_after: lifecycle (see ``TableConfig``);
            further ``TableConfig`` fields may be given by name.
        clock: seconds as a float (default ``time.time``); tests pass their own.
        on_evict: ``f(keys, values, reason)`` called after a write with the keys
            evicted (reason ``"evicted"``) or reclaimed by expiry (``"expired"``)
            and their rows (n, D); with ``evict_state`` the rows carry the
            optimizer state too (n, D + state_width), as tier demotion needs.
        path: run on live files in this directory (see ``open`` and ``close``).

    Raises:
        ConfigError: a bad argument, naming it.

    Thread safety: one writer and any number of lock-free readers (module doc).

    Example::

        t = EmbeddingTable(dim=4, optimizer="adagrad")
        rows = t.find_or_insert(np.array([7, 42], dtype=np.uint64))   # (2, 4)
        t.apply_gradients([7, 42], np.ones((2, 4)), lr=0.1)
        values, found = t.find([7, 8])                                 # found == [True, False]
    """

    def __init__(
        self,
        dim: int,
        dtype: str | np.dtype | type = "float32",
        capacity: int = 1024,
        optimizer: str | Optimizer | None = None,
        initializer: Initializer | InitFn | None = None,
        *,
        max_rows: int = 0,
        huge_pages: bool = True,
        ttl_s: int = 0,
        max_live_rows: int = 0,
        eviction: str = "lru",
        admit_after: int = 0,
        clock: Clock | None = None,
        on_evict: EvictFn | None = None,
        path: str | os.PathLike[str] | None = None,
        evict_state: bool = False,
        **more: Any,
    ) -> None:
        init_fn: InitFn | None = None
        if callable(initializer) and not isinstance(initializer, Initializer):
            init_fn, initializer = initializer, Initializer(kind="zeros")
        try:
            dtype_name = np.dtype(dtype).name
        except TypeError:
            raise ConfigError(f"must be 'float32' or 'float64', got {dtype!r}", field="table.dtype") from None
        cfg = TableConfig(
            dim=dim,
            dtype=dtype_name,  # type: ignore[arg-type]
            capacity=capacity,
            max_rows=max_rows,
            optimizer=_optimizer(optimizer),
            initializer=initializer if initializer is not None else Initializer(),
            huge_pages=huge_pages,
            ttl_s=ttl_s,
            max_live_rows=max_live_rows,
            eviction=eviction,  # type: ignore[arg-type]
            admit_after=admit_after,
            **more,
        )
        self._setup(cfg, init_fn, clock, on_evict)
        self._evict_width = self.dim + (self.state_width if evict_state else 0)
        if path is not None:
            self._attach_files(path)

    @classmethod
    def from_config(cls, config: TableConfig, initializer_fn: InitFn | None = None, *,
                    clock: Clock | None = None, on_evict: EvictFn | None = None,
                    path: str | os.PathLike[str] | None = None) -> EmbeddingTable:
        """A table built from a ``TableConfig`` (for example one read from TOML)."""
        self = cls.__new__(cls)
        self._setup(config, initializer_fn, clock, on_evict)
        if path is not None:
            self._attach_files(path)
        return self

    def _setup(self, cfg: TableConfig, init_fn: InitFn | None, clock: Clock | None,
               on_evict: EvictFn | None) -> None:
        self.config = cfg
        self._init_fn = init_fn
        self._layout = RowLayout.build(cfg.dim, np.dtype(cfg.dtype), cfg.optimizer, ttl=cfg.ttl_s > 0)
        lay = self._layout
        want = cfg.max_rows or _DEFAULT_MAX_ROWS
        self._arena = Region(
            want * lay.row_bytes, huge_pages=cfg.huge_pages, min_nbytes=cfg.capacity * lay.row_bytes
        )
        self._max_rows = min(self._arena.nbytes // lay.row_bytes, _MAX_ROWS_LIMIT, want)
        self._arena64 = self._arena.array(np.uint64, (self._max_rows, lay.row_bytes // 8))
        self._arena32 = self._arena.array(np.uint32, (self._max_rows, lay.row_bytes // 4))
        self._arenav = self._arena.array(lay.dtype, (self._max_rows, lay.row_elems))
        self._free_region = Region(self._max_rows * 4, huge_pages=False)
        self._free = self._free_region.array(np.uint32, (self._max_rows,))
        self._cnt = np.zeros(4, dtype=np.int64)
        self._index = IndexGeneration(_buckets_for(cfg.capacity), cfg.huge_pages)
        self._lock = threading.Lock()
        self._nodes = np.empty((MAX_BFS_NODES, 3), dtype=np.int64)
        self._init = init_params(cfg.initializer)
        self._opt, self._hp = optimizer_params(cfg.optimizer)
        self._grows = 0
        self._grow_loads: list[float] = []
        self._no_vals = np.empty((0, lay.dim), dtype=lay.dtype)
        # lifecycle
        self._clock: Clock = clock or time.time
        self._epoch = int(self._clock())
        self._files: LiveFiles | None = None
        self._on_evict = on_evict
        self._evict_width = lay.dim
        self._evicted = 0
        self._expired = 0
        self._not_admitted = 0
        self._nonfinite_skipped = 0
        self._read_retries = 0
        self._retry_lock = threading.Lock()
        self._skip_nonfinite = cfg.nonfinite == "skip"
        self._finite_lim = finite_limit(lay.dtype)
        self._bits_dtype, self._exp_mask = exponent_mask(lay.dtype)
        self._wheel = ExpiryWheel(cfg.ttl_slice_s or max(1, cfg.ttl_s // 16)) if cfg.ttl_s else None
        self._sketch = np.zeros((4, cfg.admission_sketch_width if cfg.admit_after else 1), np.uint8)
        self._sightings = 0
        ctx = np.zeros(CTX_SIZE, dtype=np.int64)
        ctx[CTX_EXPIRE_W] = lay.expire_word
        ctx[CTX_MAX_LIVE] = cfg.max_live_rows
        policy = POLICY_LFU if cfg.eviction == "lfu" else POLICY_LRU
        ctx[CTX_POLICY] = policy if cfg.max_live_rows else POLICY_NONE
        ctx[CTX_ADMIT] = cfg.admit_after
        ctx[CTX_DECAY_MIN] = cfg.lfu_decay_min
        ctx[CTX_SAMPLE] = cfg.eviction_sample
        ctx[CTX_RNG] = 0x2545F4914F6CDD1D
        self._ctx_template = ctx
        self._set_hash_key(hash_key_of_seed(cfg.hash_seed) if cfg.hash_seed else new_hash_key())
        self.name = ""  # what errors call the table (its owner may name it); else its path
        # The index's ceiling in buckets (TableConfig.max_index_bytes; 0: what max_rows needs at load 0.5).
        auto = max(1 << (-(-self._max_rows // (SLOTS // 2)) - 1).bit_length(), self._index.buckets)
        self._max_buckets = cfg.max_index_bytes // BUCKET_BYTES if cfg.max_index_bytes else auto
        if self._index.buckets > self._max_buckets:
            raise ConfigError(f"{cfg.max_index_bytes} bytes hold fewer buckets than capacity "
                              f"{cfg.capacity} needs ({self._index.buckets * BUCKET_BYTES} bytes)",
                              field="table.max_index_bytes")

    def _set_hash_key(self, key: tuple[int, int]) -> None:
        """Hash the index with ``key`` (a new table's, or the one its files record)."""
        self._hash_key = key
        self._hk = (np.uint64(key[0]), np.uint64(key[1]))
        self._ctx_template[CTX_HASH_K0], self._ctx_template[CTX_HASH_K1] = as_ctx_words(key)

    def _now(self) -> int:
        """Seconds on the table's clock since the table's epoch (uint32 range)."""
        return min(max(int(self._clock()) - self._epoch, 0), 2**32 - 1)

    def _ctx(self) -> np.ndarray:
        ctx = self._ctx_template.copy()
        ctx[CTX_NOW] = self._now()
        return ctx

    # -- properties -------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._layout.dim

    @property
    def dtype(self) -> np.dtype:
        return self._layout.dtype

    @property
    def state_width(self) -> int:
        """Optimizer-state elements per row (0, D for Adagrad, 2D+1 for Adam)."""
        return self._layout.state_width

    @property
    def max_rows(self) -> int:
        return self._max_rows

    def __len__(self) -> int:
        return int(self._cnt[CNT_LIVE])

    @property
    def load_factor(self) -> float:
        """Live keys over index slots (buckets x 12)."""
        return len(self) / (self._index.buckets * SLOTS)

    @property
    def memory_bytes(self) -> int:
        """Bytes in use: the index, the arena up to its high-water mark, the free list."""
        return (
            self._index.buckets * BUCKET_BYTES
            + int(self._cnt[CNT_HIGH]) * self._layout.row_bytes
            + int(self._cnt[CNT_FREE]) * 4
        )

    def stats(self) -> TableStats:
        return TableStats(
            rows=len(self),
            buckets=self._index.buckets,
            load_factor=self.load_factor,
            high_water_rows=int(self._cnt[CNT_HIGH]),
            free_rows=int(self._cnt[CNT_FREE]),
            max_rows=self._max_rows,
            row_bytes=self._layout.row_bytes,
            memory_bytes=self.memory_bytes,
            index_grows=self._grows,
            grow_load_factors=tuple(self._grow_loads),
            wasted_fraction=self.wasted_fraction,
            evicted=self._evicted,
            expired=self._expired,
            not_admitted=self._not_admitted,
            nonfinite_skipped=self._nonfinite_skipped,
            read_retries=self._read_retries,
        )

    @property
    def wasted_fraction(self) -> float:
        """Holes (erased, expired, evicted rows not yet reused) over rows up to the high-water mark."""
        high = int(self._cnt[CNT_HIGH])
        return (high - len(self)) / high if high else 0.0

    def __repr__(self) -> str:
        opt = type(self.config.optimizer).__name__ if self.config.optimizer else "sgd"
        return (
            f"EmbeddingTable(dim={self.dim}, dtype={self.dtype.name}, rows={len(self)}, "
            f"optimizer={opt}, load_factor={self.load_factor:.3f})"
        )

    # -- reads: lock-free, any thread ---------------------------------------------

    def find(self, keys: Any, out: np.ndarray | None = None, *, include_state: bool = False,
             found: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of ``keys``.

        Args:
            keys: (B,) integer keys.
            out: optional (B, W) C-contiguous array of the table's dtype to fill.
            include_state: W = D + ``state_width``: the optimizer state follows
                each embedding (to move whole rows, as tiers do); else W = D.
            found: optional (B,) bool array to fill with the mask (a reply
                written in place passes both ``out`` and ``found``).

        Returns:
            ``(values, found)``: (B, W) rows (zeros where absent) and a (B,) mask.
        """
        k = as_keys(keys)
        width = self.dim + (self.state_width if include_state else 0)
        values = as_out(out, k.shape[0], width, self.dtype)
        mask = as_mask_out(found, k.shape[0])
        self._read(k, values, mask, copy=True)
        return values, mask

    def contains(self, keys: Any) -> np.ndarray:
        """(B,) mask: which keys are present."""
        k = as_keys(keys)
        found = np.empty(k.shape[0], dtype=np.bool_)
        self._read(k, self._no_vals, found, copy=False)
        return found

    def _read(self, keys: np.ndarray, out: np.ndarray, found: np.ndarray, copy: bool) -> None:
        retries = 0

        def once() -> int:
            nonlocal retries
            ix = self._index  # the current index on every try: STALE retries land on the new one
            ctx = self._ctx()
            status = int(find_batch(ix.idx64, ix.idx32, ix.retired, self._arena64, self._arenav,
                                    self._layout.voff, keys, out, found, copy, ctx))
            retries += int(ctx[CTX_RETRIES]) + (status != Status.OK)
            return status

        retry_reader(once, Status.BUSY)
        if retries:  # a lock only then: exact across reader threads, free for an untroubled read
            with self._retry_lock:
                self._read_retries += retries

    # -- writes: serialised by the writer lock --------------------------------------

    def find_or_insert(self, keys: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Embeddings of ``keys``, creating absent ones from the initializer.

        With ``admit_after`` set, a key seen fewer times than that gets the
        initializer's values but no row (counted in ``stats().not_admitted``).

        Returns:
            (B, D) rows in the caller's order; a key repeated in the batch gets one row.

        Raises:
            NonFiniteValues: a callable initializer returned NaN or inf (whatever
                the ``nonfinite`` policy: the initializer is broken, not the data).
        """
        k = as_keys(keys)
        values = as_out(out, k.shape[0], self.dim, self.dtype)
        if self._init_fn is None:
            flags = np.empty(k.shape[0], dtype=np.bool_)
            self._write(k, MODE_FIND_OR_INSERT, self._no_vals, values, flags, None)
            return values
        with self._lock:
            # Only the absent keys are shown to the initializer, once each; the
            # kernel then runs the normal path (eviction, admission, TTL) with
            # those rows as the new rows' values.
            absent = ~self.contains(k)
            uniq, where = np.unique(k[absent], return_inverse=True)
            vals = np.zeros((k.shape[0], self.dim), dtype=self.dtype)
            if uniq.size:
                new = as_matrix(self._init_fn(uniq.copy()), uniq.size, self.dim, self.dtype,
                                "initializer(keys) result")
                bad = np.empty(uniq.size, dtype=np.bool_)
                n_bad = int(nonfinite_rows(new.view(self._bits_dtype), self._exp_mask, bad))
                if n_bad:  # under either policy: a broken initializer is a bug, not data to drop
                    raise NonFiniteValues(rows=n_bad, first_key=int(uniq[int(np.argmax(bad))]),
                                          what="initializer values")
                vals[absent] = new[where]
            flags = np.empty(k.shape[0], dtype=np.bool_)
            self._write_locked(k, MODE_FIND_OR_INSERT, vals, values, flags, None)
        return values

    def insert_or_assign(self, keys: Any, values: Any, ttl_s: Any = None) -> np.ndarray:
        """Write ``values`` (B, D) to ``keys``, inserting absent ones (fresh optimizer state).

        Args:
            ttl_s: in a table with a TTL, this write's TTL in seconds: a scalar or
                (B,) per key; 0 = never expire; None = the table's ``ttl_s``.

        Rows of ``values`` holding NaN or inf (after conversion to the table's
        dtype: a float64 1e40 is inf in float32) follow the ``nonfinite``
        policy: ``"raise"`` refuses the batch before anything changes,
        ``"skip"`` writes the other rows.

        Returns: (B,) mask of the keys that were inserted (False for a skipped row).

        Raises:
            NonFiniteValues: (policy ``"raise"``) with the rows and the first key.
        """
        k = as_keys(keys)
        v = as_matrix(values, k.shape[0], self.dim, self.dtype, "values")
        inserted = np.empty(k.shape[0], dtype=np.bool_)
        self._write(k, MODE_INSERT_OR_ASSIGN, v, self._no_vals, inserted, ttl_s)
        return inserted

    def assign(self, keys: Any, values: Any, ttl_s: Any = None) -> np.ndarray:
        """Write ``values`` (B, D) to the keys that exist; absent keys are skipped.

        ``ttl_s`` and non-finite values as in ``insert_or_assign``. Returns: (B,)
        mask of the keys found and written (False for a skipped row).
        """
        k = as_keys(keys)
        v = as_matrix(values, k.shape[0], self.dim, self.dtype, "values")
        found = np.empty(k.shape[0], dtype=np.bool_)
        self._write(k, MODE_ASSIGN, v, self._no_vals, found, ttl_s)
        return found

    def erase(self, keys: Any) -> np.ndarray:
        """Remove ``keys``. Returns: (B,) mask of the keys that were present."""
        k = as_keys(keys)
        found = np.empty(k.shape[0], dtype=np.bool_)
        self._write(k, MODE_ERASE, self._no_vals, self._no_vals, found, None)
        return found

    def apply_gradients(self, keys: Any, grads: Any, lr: float) -> np.ndarray:
        """One optimizer step on the rows of ``keys`` with ``grads`` (B, D).

        Gradients of a key repeated in the batch are summed first, as a dense
        optimizer sees them; each distinct row steps once. Absent (and expired)
        keys are skipped. Updated rows count as written: their TTL restarts.

        A step whose new embedding or state would not be finite in the table's
        dtype (a NaN or inf gradient, ``lr * g`` past float32's range) is
        refused by the ``nonfinite`` policy: ``"raise"`` refuses the batch
        before any row changes, ``"skip"`` leaves those rows as they were.
        The check is part of the step kernel; under ``"raise"`` it costs a
        second pass over the batch's rows (measured: ``_write.apply_gradients_batch``).

        Returns: (B,) mask of the keys that were found and updated.

        Raises:
            ValueError: ``lr`` is not a finite number > 0.
            NonFiniteValues: (policy ``"raise"``) with the rows and the first key.
        """
        k = as_keys(keys)
        g = as_matrix(grads, k.shape[0], self.dim, np.dtype(np.float32) if self.dtype == np.float32
                      else self.dtype, "grads")
        real = isinstance(lr, (int, float, np.floating)) and not isinstance(lr, bool)
        if not (real and np.isfinite(lr) and lr > 0):
            raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")
        found = np.empty(k.shape[0], dtype=np.bool_)
        with self._lock:
            self._expire_locked()
            self._room_for(0)
            ix = self._index
            ctx = self._ctx()
            if self._wheel is not None:
                ctx[CTX_REFRESH] = ctx[CTX_NOW] + self.config.ttl_s
            _, bad, first = apply_gradients_batch(
                ix.idx64, ix.idx32, self._arena64, self._arena32, self._arenav,
                self._layout.voff, k, g, float(lr), self._opt, self._hp, found, ctx,
                self._finite_lim, self._skip_nonfinite,
            )
            if bad and not self._skip_nonfinite:
                raise NonFiniteValues(rows=int(bad), first_key=int(k[first]), what="gradient steps")
            self._nonfinite_skipped += int(bad)
            if self._wheel is not None:
                self._wheel.file(k[found], np.array([ctx[CTX_REFRESH]], dtype=np.uint32))
        return found

    def reserve(self, n: int) -> None:
        """Size the index for ``n`` keys now, so inserts up to n do not rehash."""
        if not (isinstance(n, int) and n >= 0):
            raise ValueError(f"n: expected an int >= 0, got {n!r}")
        if n > self._max_rows:
            raise ValueError(f"n: {n} exceeds the table's max_rows ({self._max_rows})")
        with self._lock:
            want = _buckets_for(n)
            if want > self._max_buckets:
                raise ValueError(f"n: {n} keys need {want * BUCKET_BYTES} bytes of index, past the "
                                 f"table's max_index_bytes ({self._max_buckets * BUCKET_BYTES})")
            if want > self._index.buckets:
                self._room_for(0)
                self._rebuild(want)

    def expire(self) -> int:
        """Reclaim now every row whose expiry slice has passed; returns how many.

        Writes call this themselves before they start, so it is needed only to
        release memory promptly in a table that is not being written.
        """
        with self._lock:
            return self._expire_locked()

    def compact(self, max_moves: int | None = None) -> int:
        """Close the holes in the row arena; returns the rows moved.

        Moves the highest live rows into the lowest holes, repointing their index
        slots under the seqlock, in steps of 65,536 rows with the writer lock
        released between steps (writes interleave, readers never stop), then
        returns the memory past the new high-water mark to the system. After a
        full compaction ``stats().wasted_fraction`` is 0.
        """
        if max_moves is not None and not (isinstance(max_moves, int) and max_moves >= 0):
            raise ValueError(f"max_moves: expected an int >= 0 or None, got {max_moves!r}")
        moved = 0
        while max_moves is None or moved < max_moves:
            step = _COMPACT_STEP if max_moves is None else min(_COMPACT_STEP, max_moves - moved)
            with self._lock:
                nfree = int(self._cnt[CNT_FREE])
                if nfree == 0 or step == 0:
                    break
                self._room_for(0)
                holes = np.sort(self._free[:nfree])
                old_high = int(self._cnt[CNT_HIGH])
                ix = self._index
                h, moves = compact_step(ix.idx64, ix.idx32, self._arena64, self._arena32, self._arenav,
                                        self._cnt, holes, 0, step, *self._hk)
                high = int(self._cnt[CNT_HIGH])
                left = holes[h:]
                left = left[left < high]
                self._free[: left.size] = left
                self._cnt[CNT_FREE] = left.size
                self._arena.release(high * self._layout.row_bytes, old_high * self._layout.row_bytes)
            moved += int(moves)
            if moves == 0:
                break
        return moved

    def _write(self, keys: np.ndarray, mode: int, vals: np.ndarray, out: np.ndarray,
               flags: np.ndarray, ttl_s: Any) -> None:
        with self._lock:
            self._write_locked(keys, mode, vals, out, flags, ttl_s)

    def _expiries(self, n: int, now: int, ttl_s: Any) -> np.ndarray:
        """uint32 expiry per key ((1,) when all equal) for a write at ``now``."""
        if ttl_s is None:
            return np.array([now + self.config.ttl_s if self._wheel is not None else 0], dtype=np.uint32)
        if self._wheel is None:
            raise ValueError("ttl_s: this table has no TTL; create it with ttl_s > 0 to give writes one")
        t = np.asarray(ttl_s)
        if t.dtype.kind not in "iuf" or t.ndim > 1 or (t.ndim == 1 and t.shape[0] != n):
            raise ValueError(f"ttl_s: expected a number or an array of shape ({n},), got {t.dtype} {t.shape}")
        if not (np.isfinite(t).all() and (t >= 0).all() and (t < 2**31).all()):
            raise ValueError("ttl_s: expected finite seconds in [0, 2**31)")
        ttl = np.ceil(t).astype(np.int64).reshape(-1)
        exp = np.where(ttl > 0, now + ttl, 0)
        return np.minimum(exp, 2**32 - 1).astype(np.uint32)

    def _write_locked(self, keys: np.ndarray, mode: int, vals: np.ndarray, out: np.ndarray,
                      flags: np.ndarray, ttl_s: Any) -> None:
        if mode in (MODE_INSERT_OR_ASSIGN, MODE_ASSIGN) and keys.shape[0]:
            # Checked before anything changes, so "raise" leaves the table as it
            # was. One vectorised kernel pass over the batch (exponent fields,
            # see _rows.nonfinite_rows): 79 us for 16,384 rows of D=64 float32
            # (208 M rows/s), against about 2.2 ms for the assign itself; an A/B
            # of assign (400 k-row table) showed no difference beyond its noise.
            bad = np.empty(keys.shape[0], dtype=np.bool_)
            n_bad = int(nonfinite_rows(vals.view(self._bits_dtype), self._exp_mask, bad))
            if n_bad:
                if not self._skip_nonfinite:
                    raise NonFiniteValues(rows=n_bad, first_key=int(keys[int(np.argmax(bad))]))
                self._nonfinite_skipped += n_bad
                keep = ~bad
                t = None if ttl_s is None else np.asarray(ttl_s)
                if t is not None and t.ndim == 1 and t.shape[0] == keys.shape[0]:
                    ttl_s = t[keep]
                written = np.zeros(int(keep.sum()), dtype=np.bool_)
                try:
                    self._write_locked(keys[keep], mode, vals[keep], out, written, ttl_s)
                finally:
                    flags[bad] = False
                    flags[keep] = written
                return
        self._expire_locked()
        self._place_or_refuse(keys, mode)
        self._room_for(keys.shape[0])
        ctx = self._ctx()
        expires = self._expiries(keys.shape[0], int(ctx[CTX_NOW]), ttl_s)
        evicting = mode in (MODE_FIND_OR_INSERT, MODE_INSERT_OR_ASSIGN) and self.config.max_live_rows > 0
        ev_keys = np.empty(keys.shape[0] if evicting else 0, dtype=np.uint64)
        ev_vals = np.empty((ev_keys.size if self._on_evict else 0, self._evict_width), dtype=self.dtype)
        ev_why = np.empty(ev_keys.size, dtype=np.uint8)
        pos = 0
        kind, a, b, seed = self._init
        try:
            while True:
                ix = self._index
                status, pos = write_batch(
                    ix.idx64, ix.idx32, ix.idx8, self._arena64, self._arena32, self._arenav,
                    self._cnt, self._free, self._layout.voff, self.dim, keys, pos, mode,
                    vals, out, flags, kind, a, b, seed, self._opt, self._hp, self._nodes,
                    ctx, expires, ev_keys, ev_vals, ev_why, self._sketch,
                )
                if status == Status.OK:
                    break
                if status == Status.INDEX_FULL:
                    self._grow_or_refuse(int(pos))
                    continue
                raise TableFull(rows=len(self), max_rows=self._max_rows,
                                load_factor=self.load_factor, position=int(pos))
        finally:
            self._template_rng(ctx)
            self._after_write(keys[:pos], mode, flags[:pos], expires, ctx, ev_keys, ev_vals, ev_why)

    # -- growth limits (TableConfig.min_load_factor, max_index_bytes) -------------------

    def _refusal(self, load: float, limit: str, position: int = 0) -> IndexGrowthRefused:
        return IndexGrowthRefused(table=self.name or str(self.path or ""), load_factor=load,
                                  buckets=self._index.buckets, limit=limit, floor=self.config.min_load_factor,
                                  max_buckets=self._max_buckets, position=position)

    def _grow_or_refuse(self, position: int) -> None:
        """Writer only. Double the index for an insert that found no slot, if the limits allow."""
        load = self.load_factor
        if load < self.config.min_load_factor:
            raise self._refusal(load, "floor", position)
        if self._index.buckets * 2 > self._max_buckets:
            raise self._refusal(load, "ceiling", position)
        self._grow_loads.append(load)
        self._rebuild(self._index.buckets * 2)

    def _place_or_refuse(self, keys: np.ndarray, mode: int) -> None:
        """Writer only. Refuse, before anything changes, a batch that only a forbidden growth could place.

        Runs while a refusal is possible in this batch: the load is below twice
        the floor (a growth could take it under) or the ceiling is within two
        doublings. The batch's new keys, in order, are then placed on an overlay
        (``first_unplaceable``): a key that fits nowhere below the floor, or
        where growing would pass the ceiling, refuses the batch; one at or
        above the floor grows the index now, as the batch would have, and the
        check runs again at the new size. Elsewhere a failed insert can only
        grow (``_grow_or_refuse`` stays as the backstop), and this costs nothing.
        """
        if mode not in (MODE_FIND_OR_INSERT, MODE_INSERT_OR_ASSIGN) or keys.shape[0] == 0:
            return
        floor = self.config.min_load_factor
        live = len(self)
        new: np.ndarray | None = None
        while True:
            buckets = self._index.buckets
            if live >= 2 * floor * buckets * SLOTS and buckets * 4 <= self._max_buckets:
                return
            if new is None:
                fresh = keys[~self.contains(keys)]
                _, first = np.unique(fresh, return_index=True)
                # Distinct, in the order the batch inserts them; as many as the arena
                # can take (past them the batch stops with TableFull first).
                new = fresh[np.sort(first)][: max(self._max_rows - live, 0)]
            at = int(first_unplaceable(self._index.idx64, self._index.idx8, new, *self._hk, self._nodes))
            if at < 0:
                return
            load = (live + at) / (buckets * SLOTS)
            if load < floor:
                raise self._refusal(load, "floor")
            if buckets * 2 > self._max_buckets:
                raise self._refusal(load, "ceiling")
            self._grow_loads.append(load)
            self._rebuild(buckets * 2)

    def _template_rng(self, ctx: np.ndarray) -> None:
        self._ctx_template[CTX_RNG] = ctx[CTX_RNG]

    def _after_write(self, keys: np.ndarray, mode: int, flags: np.ndarray, expires: np.ndarray,
                     ctx: np.ndarray, ev_keys: np.ndarray, ev_vals: np.ndarray,
                     ev_why: np.ndarray) -> None:
        """File new expiries, count admissions, report evictions (writer lock held)."""
        if mode == MODE_FIND_OR_INSERT and self.config.admit_after:
            self._sightings += keys.size
            self._not_admitted += int(ctx[CTX_REFUSED])
            if self._sightings > 8 * self._sketch.shape[1]:  # age the sketch: halve every counter
                self._sketch >>= 1
                self._sightings = 0
        if self._wheel is not None and mode != MODE_ERASE and keys.size:
            written = keys if mode == MODE_INSERT_OR_ASSIGN else keys[flags]
            exp = expires if expires.size == 1 else (expires[: keys.size] if mode == MODE_INSERT_OR_ASSIGN
                                                      else expires[: keys.size][flags])
            self._wheel.file(written, exp)
        n_ev = int(ctx[CTX_EVICTED])
        if n_ev:
            self._report(ev_keys[:n_ev], ev_vals[:n_ev], ev_why[:n_ev])

    def _report(self, keys: np.ndarray, vals: np.ndarray, why: np.ndarray) -> None:
        """Count removed keys and hand them to ``on_evict``, evicted ones first."""
        for code, reason in ((0, "evicted"), (1, "expired")):
            sel = why == code
            n = int(np.count_nonzero(sel))
            if not n:
                continue
            if code == 0:
                self._evicted += n
            else:
                self._expired += n
            if self._on_evict is not None:
                self._on_evict(keys[sel], vals[sel] if vals.shape[0] else vals, reason)

    def _rebuild(self, buckets: int) -> None:
        """Writer only. Build a larger index from the arena, then swap it in."""
        while True:
            region = self._files.new_index(buckets, buckets * BUCKET_BYTES) if self._files else None
            new = IndexGeneration(buckets, self.config.huge_pages, region)
            high = int(self._cnt[CNT_HIGH])
            live = (self._arena32[:high, STAMP] & 1).astype(np.bool_)
            if rebuild_from(new.idx64, new.idx32, new.idx8, self._arena64[:high, 0], live, self._nodes,
                            *self._hk):
                break
            buckets *= 2
            if buckets > self._max_buckets:
                raise self._refusal(self.load_factor, "ceiling")
        old, self._index = self._index, new
        # Publish, retire, unlink, in that order (see _persist): a reader in
        # another process that sees the flag must find the new generation in
        # state.bin. The flag is still set before this writer touches a row
        # through the new index, so readers on the old one never miss a write.
        files = self._files
        replaced = files.index_done(buckets) if files is not None else -1
        old.retired[0] = 1
        if files is not None:
            files.drop_index(replaced)
        self._grows += 1

    def _expire_locked(self) -> int:
        wheel = self._wheel
        if wheel is None:
            return 0
        now = self._now()
        due = wheel.next_due()
        if due is None or due > now:
            return 0
        keys = wheel.pop_due(now)
        if keys.size == 0:
            return 0
        self._room_for(keys.size)
        ctx = self._ctx()
        ev_keys = np.empty(keys.size, dtype=np.uint64)
        ev_vals = np.empty((keys.size if self._on_evict else 0, self._evict_width), dtype=self.dtype)
        ev_why = np.empty(keys.size, dtype=np.uint8)
        ix = self._index
        n = int(reclaim_keys(ix.idx64, ix.idx32, ix.idx8, self._arena64, self._arena32, self._arenav,
                             self._cnt, self._free, self._layout.voff, self.dim, keys, ctx,
                             ev_keys, ev_vals, ev_why))
        if n:
            self._report(ev_keys[:n], ev_vals[:n], ev_why[:n])
        return n


def _buckets_for(n: int) -> int:
    need = max(2, -(-max(n, 1) // int(SLOTS * _RESERVE_LOAD)))
    return 1 << (need - 1).bit_length()


def _optimizer(opt: str | Optimizer | None) -> Optimizer | None:
    if opt is None or isinstance(opt, (Adagrad, Adam)):
        return opt
    if opt == "adagrad":
        return Adagrad()
    if opt == "adam":
        return Adam()
    if opt in ("none", "sgd"):
        return None
    raise ConfigError(f"expected None, 'adagrad', 'adam', Adagrad() or Adam(), got {opt!r}",
                      field="table.optimizer")
