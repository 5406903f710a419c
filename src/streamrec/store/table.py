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

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamrec.config import Adagrad, Adam, Initializer, Optimizer, TableConfig
from streamrec.errors import TableBusy, TableFull
from streamrec.store._checks import as_keys, as_matrix, as_out
from streamrec.store._index import BUCKET_BYTES, MAX_BFS_NODES, SLOTS
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
    apply_gradients_batch,
    export_rows,
    find_batch,
    rebuild_index,
    write_batch,
)
from streamrec.store._rows import RowLayout, init_params, optimizer_params

__all__ = ["EmbeddingTable", "TableStats"]

InitFn = Callable[[np.ndarray], np.ndarray]

_DEFAULT_MAX_ROWS = 1 << 31  # address space only; see TableConfig.max_rows
_MAX_ROWS_LIMIT = (1 << 32) - 1  # row numbers are uint32 in the bucket
_RESERVE_LOAD = 0.9  # reserve()/capacity size the index for this load
_BUSY_PATIENCE_S = 2.0


@dataclass(frozen=True)
class TableStats:
    """A snapshot of a table's counters (see ``EmbeddingTable.stats``).

    ``grow_load_factors`` lists, for each growth forced by a full index, the
    load factor at which displacement first failed (growths by ``reserve`` are
    not in it).
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


class _Index:
    """One index generation: its memory, the three views, and its retired flag."""

    def __init__(self, buckets: int, huge_pages: bool) -> None:
        self.region = Region(buckets * BUCKET_BYTES, huge_pages=huge_pages)
        self.idx64 = self.region.array(np.uint64, (buckets, BUCKET_BYTES // 8))
        self.idx32 = self.region.array(np.uint32, (buckets, BUCKET_BYTES // 4))
        self.idx8 = self.region.array(np.uint8, (buckets, BUCKET_BYTES))
        # Set to 1 (once, by the writer) when a newer index replaces this one;
        # readers still on it see the flag and restart on the new one.
        self.retired = np.zeros(1, dtype=np.int64)
        self.buckets = buckets


class EmbeddingTable:
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
    ) -> None:
        init_fn: InitFn | None = None
        if callable(initializer) and not isinstance(initializer, Initializer):
            init_fn, initializer = initializer, Initializer(kind="zeros")
        cfg = TableConfig(
            dim=dim,
            dtype=np.dtype(dtype).name,  # type: ignore[arg-type]
            capacity=capacity,
            max_rows=max_rows,
            optimizer=_optimizer(optimizer),
            initializer=initializer if initializer is not None else Initializer(),
            huge_pages=huge_pages,
        )
        self._setup(cfg, init_fn)

    @classmethod
    def from_config(cls, config: TableConfig, initializer_fn: InitFn | None = None) -> EmbeddingTable:
        """A table built from a ``TableConfig`` (for example one read from TOML)."""
        self = cls.__new__(cls)
        self._setup(config, initializer_fn)
        return self

    def _setup(self, cfg: TableConfig, init_fn: InitFn | None) -> None:
        self.config = cfg
        self._init_fn = init_fn
        self._layout = RowLayout.build(cfg.dim, np.dtype(cfg.dtype), cfg.optimizer)
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
        self._index = _Index(_buckets_for(cfg.capacity), cfg.huge_pages)
        self._lock = threading.Lock()
        self._nodes = np.empty((MAX_BFS_NODES, 3), dtype=np.int64)
        self._init = init_params(cfg.initializer)
        self._opt, self._hp = optimizer_params(cfg.optimizer)
        self._grows = 0
        self._grow_loads: list[float] = []
        self._no_vals = np.empty((0, lay.dim), dtype=lay.dtype)

    # -- properties -------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._layout.dim

    @property
    def dtype(self) -> np.dtype:
        return self._layout.dtype

    @property
    def state_width(self) -> int:
        """Optimizer-state elements per row (0, D for Adagrad, 2D+2 for Adam)."""
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
        )

    def __repr__(self) -> str:
        opt = type(self.config.optimizer).__name__ if self.config.optimizer else "sgd"
        return (
            f"EmbeddingTable(dim={self.dim}, dtype={self.dtype.name}, rows={len(self)}, "
            f"optimizer={opt}, load_factor={self.load_factor:.3f})"
        )

    # -- reads: lock-free, any thread ---------------------------------------------

    def find(self, keys: Any, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of ``keys``.

        Args:
            keys: (B,) integer keys.
            out: optional (B, D) C-contiguous array of the table's dtype to fill.

        Returns:
            ``(values, found)``: (B, D) rows (zeros where absent) and a (B,) mask.
        """
        k = as_keys(keys)
        values = as_out(out, k.shape[0], self.dim, self.dtype)
        found = np.empty(k.shape[0], dtype=np.bool_)
        self._read(k, values, found, copy=True)
        return values, found

    def contains(self, keys: Any) -> np.ndarray:
        """(B,) mask: which keys are present."""
        k = as_keys(keys)
        found = np.empty(k.shape[0], dtype=np.bool_)
        self._read(k, self._no_vals, found, copy=False)
        return found

    def _read(self, keys: np.ndarray, out: np.ndarray, found: np.ndarray, copy: bool) -> None:
        started = 0.0
        while True:
            ix = self._index
            status = find_batch(
                ix.idx64, ix.idx32, ix.retired, self._arena64, self._arenav,
                self._layout.voff, keys, out, found, copy,
            )
            if status == Status.OK:
                return
            if status == Status.BUSY:
                now = time.monotonic()
                started = started or now
                if now - started > _BUSY_PATIENCE_S:
                    raise TableBusy(waited_s=now - started)
                time.sleep(0)

    # -- writes: serialised by the writer lock --------------------------------------

    def find_or_insert(self, keys: Any, out: np.ndarray | None = None) -> np.ndarray:
        """Embeddings of ``keys``, creating absent ones from the initializer.

        Returns:
            (B, D) rows in the caller's order; a key repeated in the batch gets one row.
        """
        k = as_keys(keys)
        values = as_out(out, k.shape[0], self.dim, self.dtype)
        if self._init_fn is None:
            flags = np.empty(k.shape[0], dtype=np.bool_)
            self._write(k, MODE_FIND_OR_INSERT, self._no_vals, values, flags)
            return values
        with self._lock:
            missing = np.unique(k[~self.contains(k)])
            if missing.size:
                new = as_matrix(self._init_fn(missing.copy()), missing.size, self.dim, self.dtype,
                                "initializer(keys) result")
                self._write_locked(missing, MODE_INSERT_OR_ASSIGN, new, self._no_vals,
                                   np.empty(missing.size, dtype=np.bool_))
            found = np.empty(k.shape[0], dtype=np.bool_)
            self._read(k, values, found, copy=True)
        return values

    def insert_or_assign(self, keys: Any, values: Any) -> np.ndarray:
        """Write ``values`` (B, D) to ``keys``, inserting absent ones (fresh optimizer state).

        Returns: (B,) mask of the keys that were inserted.
        """
        k = as_keys(keys)
        v = as_matrix(values, k.shape[0], self.dim, self.dtype, "values")
        inserted = np.empty(k.shape[0], dtype=np.bool_)
        self._write(k, MODE_INSERT_OR_ASSIGN, v, self._no_vals, inserted)
        return inserted

    def assign(self, keys: Any, values: Any) -> np.ndarray:
        """Write ``values`` (B, D) to the keys that exist; absent keys are skipped.

        Returns: (B,) mask of the keys that were found (and written).
        """
        k = as_keys(keys)
        v = as_matrix(values, k.shape[0], self.dim, self.dtype, "values")
        found = np.empty(k.shape[0], dtype=np.bool_)
        self._write(k, MODE_ASSIGN, v, self._no_vals, found)
        return found

    def erase(self, keys: Any) -> np.ndarray:
        """Remove ``keys``. Returns: (B,) mask of the keys that were present."""
        k = as_keys(keys)
        found = np.empty(k.shape[0], dtype=np.bool_)
        self._write(k, MODE_ERASE, self._no_vals, self._no_vals, found)
        return found

    def apply_gradients(self, keys: Any, grads: Any, lr: float) -> np.ndarray:
        """One optimizer step on the rows of ``keys`` with ``grads`` (B, D).

        Gradients of a key repeated in the batch are summed first, as a dense
        optimizer sees them; each distinct row steps once. Absent keys are skipped.

        Returns: (B,) mask of the keys that were found (and updated).
        """
        k = as_keys(keys)
        g = as_matrix(grads, k.shape[0], self.dim, np.dtype(np.float32) if self.dtype == np.float32
                      else self.dtype, "grads")
        if not (isinstance(lr, (int, float, np.floating)) and np.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr: expected a finite number >= 0, got {lr!r}")
        found = np.empty(k.shape[0], dtype=np.bool_)
        with self._lock:
            ix = self._index
            apply_gradients_batch(
                ix.idx64, ix.idx32, self._arena64, self._arena32, self._arenav,
                self._layout.voff, k, g, float(lr), self._opt, self._hp, found,
            )
        return found

    def reserve(self, n: int) -> None:
        """Size the index for ``n`` keys now, so inserts up to n do not rehash."""
        if not (isinstance(n, int) and n >= 0):
            raise ValueError(f"n: expected an int >= 0, got {n!r}")
        if n > self._max_rows:
            raise ValueError(f"n: {n} exceeds the table's max_rows ({self._max_rows})")
        with self._lock:
            want = _buckets_for(n)
            if want > self._index.buckets:
                self._rebuild(want)

    def _write(self, keys: np.ndarray, mode: int, vals: np.ndarray, out: np.ndarray,
               flags: np.ndarray) -> None:
        with self._lock:
            self._write_locked(keys, mode, vals, out, flags)

    def _write_locked(self, keys: np.ndarray, mode: int, vals: np.ndarray, out: np.ndarray,
                      flags: np.ndarray) -> None:
        pos = 0
        kind, a, b, seed = self._init
        while True:
            ix = self._index
            status, pos = write_batch(
                ix.idx64, ix.idx32, ix.idx8, self._arena64, self._arena32, self._arenav,
                self._cnt, self._free, self._layout.voff, self.dim, keys, pos, mode,
                vals, out, flags, kind, a, b, seed, self._opt, self._hp, self._nodes,
            )
            if status == Status.OK:
                return
            if status == Status.INDEX_FULL:
                self._grow_loads.append(self.load_factor)
                self._rebuild(self._index.buckets * 2)
                continue
            raise TableFull(rows=len(self), max_rows=self._max_rows,
                            load_factor=self.load_factor, position=int(pos))

    def _rebuild(self, buckets: int) -> None:
        """Writer only. Build a larger index from the arena, then swap it in."""
        while True:
            new = _Index(buckets, self.config.huge_pages)
            status = rebuild_index(new.idx64, new.idx32, new.idx8, self._arena64, self._arena32,
                                   int(self._cnt[CNT_HIGH]), self._nodes)
            if status == Status.OK:
                break
            buckets *= 2
        old, self._index = self._index, new
        old.retired[0] = 1
        self._grows += 1

    # -- export and import ------------------------------------------------------------

    def export(self, chunk_rows: int = 65536, include_state: bool = False
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Iterate over the table as ``(keys (n,), values (n, W))`` chunks.

        W is D, or D + ``state_width`` with ``include_state``. Memory stays at one
        chunk: the writer lock is held only while a chunk is copied, so writes go
        on between chunks; a row live for the whole export appears exactly once.
        """
        if not (isinstance(chunk_rows, int) and chunk_rows >= 1):
            raise ValueError(f"chunk_rows: expected an int >= 1, got {chunk_rows!r}")
        width = self.dim + (self.state_width if include_state else 0)
        lo = 0
        while True:
            with self._lock:
                hi = min(lo + chunk_rows, int(self._cnt[CNT_HIGH]))
                if lo >= hi:
                    return
                keys = np.empty(hi - lo, dtype=np.uint64)
                vals = np.empty((hi - lo, width), dtype=self.dtype)
                c = export_rows(self._arena64, self._arena32, self._arenav, self._layout.voff,
                                lo, hi, keys, vals)
            lo = hi
            if c:
                yield keys[:c], vals[:c]

    def import_chunks(self, chunks: Iterable[tuple[Any, Any]], include_state: bool = False) -> int:
        """Insert-or-assign every ``(keys, values)`` chunk, as ``export`` yields them.

        With ``include_state`` the values carry the optimizer state after the
        embedding (W = D + state_width) and it is restored; otherwise new rows
        get fresh state. Returns the number of keys written.
        """
        width = self.dim + (self.state_width if include_state else 0)
        total = 0
        for keys, values in chunks:
            k = as_keys(keys)
            v = as_matrix(values, k.shape[0], width, self.dtype, "values")
            self._write(k, MODE_INSERT_OR_ASSIGN, v, self._no_vals,
                        np.empty(k.shape[0], dtype=np.bool_))
            total += k.shape[0]
        return total


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
    raise ValueError(f"optimizer: expected None, 'adagrad', 'adam', Adagrad() or Adam(), got {opt!r}")
