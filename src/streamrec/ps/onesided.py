"""One-sided reads: lookups in a live table directory that another process writes.

Owns: ``OneSidedReader``, a client on the storage node's host that maps a
file-backed table's live files (``EmbeddingTable(..., path=DIR)``) read-only
and runs the store's own lookup kernel (``_ops.find_batch``) on them, so the
storage process spends no CPU on these reads: the shared-memory analogue of
an RDMA one-sided read. The directory layout, the row layout and the kernel
come from the store (``_persist``, ``_rows``, ``_ops``); nothing is redone here.

Must not: write, truncate, create or remove anything in the directory. Every
file is opened ``O_RDONLY`` and mapped ``PROT_READ | MAP_SHARED``, so a store
through any view faults. Above all it never truncates arena.bin: the writer
grows that file with ``ftruncate``, and shrinking it under the writer's
mapping would kill the writer with SIGBUS.

Why a read is correct without the writer's help:

- Torn rows: each bucket carries a seqlock version; the kernel reads it before
  and after probing and copying, and retries on a change or an odd value.
- Index growth: the writer builds index-(N+1).bin, publishes it in state.bin,
  then sets the retired flag in index-N.bin's trailer page, then unlinks
  index-N.bin (``_persist``). The kernel reports STALE once it sees the flag;
  the reader then maps the generation state.bin names (``LiveView.open_index``
  retries if that file is already gone). A mapping of an unlinked file stays
  readable, so calls still on the old generation finish safely.
- Arena growth: the arena is mapped with ``libc.mmap`` over a reservation of
  ``max_rows`` rows (the writer's own upper bound: ``TableConfig.max_rows``,
  else 2**31, at most 2**32 - 1), however short arena.bin is now. A shared
  mapping may extend past the end of its file; only touching a page there
  faults (SIGBUS). The kernel touches rows the index points at, and every row
  number in any index generation is below the arena's high-water mark at the
  time it was stored there; the writer grows the file for a write's rows
  (``TableFiles._room_for``) before the kernel that fills and publishes them
  runs, and never shrinks it (compaction punches holes, keeping the length).
  So growth needs no remap and no bound check in the kernel. The other
  option, remapping when the counters pass the mapping, would need a bound
  check in the kernel against torn row numbers, and a lock around every call.
- Hashing: the index is hashed with the table's own key (``store._index``),
  which TABLE.json records; the reader puts it in the kernel's ``ctx``.
- TTL: ``ctx[CTX_NOW]`` comes from the reader's clock on the table's epoch, as
  in the writer, so a row past its expiry reads as absent.
- Eviction policy off: a real read under LRU/LFU marks the row accessed, which
  is a store into the arena (``_evict.touch``); the reader passes
  ``POLICY_NONE``, with which the kernel stores nothing. Reads from here are
  therefore invisible to the table's LRU/LFU order.
- A writer that died inside an update leaves a bucket locked (odd version):
  reads of keys hashing there raise ``TableBusy`` after 2 s (``retry_reader``).

Thread safety: a ``OneSidedReader`` may be shared by threads. ``find`` and
``contains`` run the kernel without the GIL on read-only mappings; the only
shared mutable state is which index generation is mapped, which changes under
a lock. Each generation counts the calls using it and is unmapped only when
that count is zero, so a remap or ``close()`` never pulls memory from under a
running call.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.errors import SnapshotError
from streamrec.store._checks import as_keys, as_out
from streamrec.store._evict import (
    CTX_EXPIRE_W,
    CTX_HASH_K0,
    CTX_HASH_K1,
    CTX_NOW,
    CTX_POLICY,
    CTX_RETRIES,
    CTX_SIZE,
    POLICY_NONE,
)
from streamrec.store._index import IndexGeneration, as_ctx_words
from streamrec.store._ops import Status, find_batch, retry_reader
from streamrec.store._persist import LiveView, index_file_bytes, table_config_from_meta
from streamrec.store._rows import RowLayout
from streamrec.store._table_files import hash_key_from_meta
from streamrec.store.table import _DEFAULT_MAX_ROWS, _MAX_ROWS_LIMIT

__all__ = ["OneSidedReader"]

Clock = Callable[[], float]

_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; as in store._memory
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int64]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class _Mapping:
    """``length`` bytes of a file mapped ``PROT_READ | MAP_SHARED``; may reach past its end.

    Python's ``mmap`` refuses to map more than a file holds, hence libc's.
    ``mem`` is writeable in numpy's eyes only: the kernels are compiled for
    writeable arrays (the writer's types, so numba's on-disk cache serves this
    process too; numba would also refuse to type ``find_batch``'s store in
    ``touch`` on a read-only array, though it never runs here). The page
    protection is what enforces read-only: a store through ``mem`` faults.
    """

    def __init__(self, fd: int, length: int) -> None:
        addr = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_NORESERVE, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {length} bytes: {os.strerror(err)}")
        self.addr: int = addr
        self.length = length
        raw = memoryview((ctypes.c_uint8 * length).from_address(addr))
        self.mem: np.ndarray | None = np.frombuffer(raw, np.uint8)

    def unmap(self) -> None:
        """REQUIRES: no view of ``mem`` is used again (it would address unmapped memory)."""
        if self.mem is not None:
            self.mem = None
            _libc.munmap(self.addr, self.length)


class _Generation:
    """One index generation mapped read-only, and the calls now using it."""

    def __init__(self, gen: int, buckets: int, fd: int) -> None:
        self.gen = gen
        self.buckets = buckets
        self.map = _Mapping(fd, index_file_bytes(buckets))
        mem = self.map.mem
        assert mem is not None
        self.idx64, self.idx32, _ = IndexGeneration.views(mem, buckets)
        self.retired = IndexGeneration.file_flag(mem, buckets)
        self.users = 0

    def unmap(self) -> None:
        del self.idx64, self.idx32, self.retired
        self.map.unmap()


class _Arena:
    """The row arena mapped read-only over ``rows`` rows of address space, with its two views."""

    def __init__(self, fd: int, rows: int, lay: RowLayout) -> None:
        self.map = _Mapping(fd, rows * lay.row_bytes)
        mem = self.map.mem
        assert mem is not None
        self.arena64 = mem.view(np.uint64).reshape(rows, lay.row_bytes // 8)
        self.arenav = mem.view(lay.dtype).reshape(rows, lay.row_elems)

    def unmap(self) -> None:
        del self.arena64, self.arenav
        self.map.unmap()


class OneSidedReader:
    """Lookups in a file-backed table that another process writes, without its CPU.

    Shape contract: as ``EmbeddingTable.find``: B keys per call, D = ``dim``;
    results are (B, D) rows (zeros where absent) and a (B,) bool mask, in the
    caller's order.

    Args:
        path: the table's live directory (``EmbeddingTable(..., path=path)``),
            its writer running or not.
        clock: seconds as a float (default ``time.time``), for TTLs; it should
            agree with the writer's.

    Raises:
        SnapshotError: ``path`` is not a live table directory of this format
            (or its files do not agree), naming the path.
        MemoryError: the arena's address-space reservation was refused.

    Thread safety: may be shared by threads (module docstring); ``close()``
    waits for no one: calls in flight finish on their mappings, later calls
    raise ``ValueError``.

    Example::

        with OneSidedReader("/data/tables/items") as r:
            values, found = r.find([7, 42])      # (2, D), (2,)
    """

    def __init__(self, path: str | os.PathLike[str], *, clock: Clock | None = None) -> None:
        self._view = LiveView(path)
        self._lock = threading.Lock()
        self._closed = False
        self._calls = 0
        self.retries = 0  # seqlock re-reads, as EmbeddingTable.stats().read_retries counts them
        self._old: list[_Generation] = []
        self._arena: _Arena | None = None
        try:
            self._setup(clock or time.time)
        except BaseException:
            self._closed = True
            self._reap()
            raise

    def _setup(self, clock: Clock) -> None:
        view = self._view
        meta, where = view.meta, str(view.root)
        cfg = table_config_from_meta(meta, where)
        lay = RowLayout.build(cfg.dim, np.dtype(cfg.dtype), cfg.optimizer, ttl=cfg.ttl_s > 0)
        if (meta.get("row_bytes"), meta.get("voff")) != (lay.row_bytes, lay.voff):
            raise SnapshotError(f"row layout {meta.get('row_bytes')} B (values at {meta.get('voff')}) "
                                f"differs from this build's {lay.row_bytes} B (at {lay.voff})", path=where)
        self._layout = lay
        self._clock = clock
        self._epoch = view.epoch
        ctx = np.zeros(CTX_SIZE, dtype=np.int64)
        ctx[CTX_EXPIRE_W] = lay.expire_word
        ctx[CTX_POLICY] = POLICY_NONE  # never POLICY_LRU/LFU: touch() would store into the arena
        # The writer's index hash key (TABLE.json): without it no key hashes to its bucket.
        ctx[CTX_HASH_K0], ctx[CTX_HASH_K1] = as_ctx_words(hash_key_from_meta(meta, where))
        self._ctx_template = ctx
        rows = min(cfg.max_rows or _DEFAULT_MAX_ROWS, _MAX_ROWS_LIMIT)
        fd = view.open_arena()
        try:
            self._arena = _Arena(fd, rows, lay)
        except OSError as exc:
            raise MemoryError(f"{where}/arena.bin: cannot reserve {rows} rows of address space ({exc})"
                              ) from None
        finally:
            os.close(fd)
        self._no_vals = np.empty((0, lay.dim), dtype=lay.dtype)
        self._current = self._map_index(-1)

    # -- properties ---------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._view.root

    @property
    def dim(self) -> int:
        return self._layout.dim

    @property
    def dtype(self) -> np.dtype:
        return self._layout.dtype

    @property
    def state_width(self) -> int:
        """Optimizer-state elements per row (see ``EmbeddingTable.state_width``)."""
        return self._layout.state_width

    @property
    def generation(self) -> int:
        """The index generation this reader has mapped (it follows the writer's growths)."""
        return self._current.gen

    def __repr__(self) -> str:
        return f"OneSidedReader({str(self.path)!r}, dim={self.dim}, generation={self.generation})"

    # -- reads: any thread ------------------------------------------------------------

    def find(self, keys: Any, out: np.ndarray | None = None, *, include_state: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of ``keys``, as ``EmbeddingTable.find`` returns them.

        Args:
            keys: (B,) integer keys.
            out: optional (B, W) C-contiguous array of the table's dtype to fill.
            include_state: W = D + ``state_width`` (the optimizer state follows
                each embedding); else W = D.

        Returns:
            ``(values, found)``: (B, W) rows (zeros where absent) and a (B,) mask.

        Raises:
            TypeError, ValueError: bad keys or ``out``; ValueError also once closed.
            TableBusy: a bucket stayed locked for 2 s (a writer died mid-update).
            SnapshotError: the writer replaced the index but no newer file appeared.
        """
        k = as_keys(keys)
        width = self.dim + (self.state_width if include_state else 0)
        values = as_out(out, k.shape[0], width, self.dtype)
        found = np.empty(k.shape[0], dtype=np.bool_)
        self._read(k, values, found, copy=True)
        return values, found

    def contains(self, keys: Any) -> np.ndarray:
        """(B,) mask: which keys are present (raises as ``find``)."""
        k = as_keys(keys)
        found = np.empty(k.shape[0], dtype=np.bool_)
        self._read(k, self._no_vals, found, copy=False)
        return found

    def _ctx(self) -> np.ndarray:
        ctx = self._ctx_template.copy()
        # As EmbeddingTable._now: seconds on the clock since the table's epoch, in uint32 range.
        ctx[CTX_NOW] = min(max(int(self._clock()) - self._epoch, 0), 2**32 - 1)
        return ctx

    def _read(self, keys: np.ndarray, out: np.ndarray, found: np.ndarray, copy: bool) -> None:
        voff = self._layout.voff

        retries = 0

        def once() -> int:
            nonlocal retries
            ix = self._acquire()
            ctx = self._ctx()
            try:
                a = self._arena
                assert a is not None  # unmapped only once closed and no call is in flight
                status = int(find_batch(ix.idx64, ix.idx32, ix.retired, a.arena64, a.arenav,
                                        voff, keys, out, found, copy, ctx))
            finally:
                self._release(ix)
            retries += int(ctx[CTX_RETRIES]) + (status != Status.OK)
            if status == Status.STALE:
                self._advance(ix)
            return status

        retry_reader(once, Status.BUSY)
        if retries:
            with self._lock:
                self.retries += retries

    # -- mappings ------------------------------------------------------------------------

    def _map_index(self, newer_than: int) -> _Generation:
        gen, buckets, fd = self._view.open_index(newer_than)
        try:
            return _Generation(gen, buckets, fd)
        finally:
            os.close(fd)

    def _acquire(self) -> _Generation:
        with self._lock:
            if self._closed:
                raise ValueError(f"OneSidedReader of {self.path} is closed")
            ix = self._current
            ix.users += 1
            self._calls += 1
            return ix

    def _release(self, ix: _Generation) -> None:
        with self._lock:
            ix.users -= 1
            self._calls -= 1
            self._reap()

    def _advance(self, stale: _Generation) -> None:
        """Map the generation that replaced ``stale`` (unless another thread did)."""
        with self._lock:
            if self._closed or self._current is not stale:
                return
            self._current = self._map_index(stale.gen)
            self._old.append(stale)
            self._reap()

    def _reap(self) -> None:
        """REQUIRES: the lock held (or no other thread can see the reader). Unmap what no call uses."""
        keep = []
        for ix in self._old:
            if ix.users:
                keep.append(ix)
            else:
                ix.unmap()
        self._old = keep
        if self._closed and self._calls == 0:
            if self._arena is not None:
                self._arena.unmap()
                self._arena = None
            self._view.close()

    def close(self) -> None:
        """Unmap everything (once calls in flight are done); later calls raise ValueError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._old.append(self._current)
            self._reap()

    def __enter__(self) -> OneSidedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Mappings made with libc outlive the object unless unmapped; a reader being
        # collected has no call in flight (each call holds a reference to it).
        if getattr(self, "_closed", True) is False and hasattr(self, "_current"):
            self.close()
