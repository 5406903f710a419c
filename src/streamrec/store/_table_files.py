"""The embedding table's persistence: live files, snapshots, reopening, export.

Owns: ``TableFiles``, the part of ``EmbeddingTable`` that moves a table to and
from files (``path=``, ``close``, ``snapshot``, ``open``) and in and out of
chunks (``export``, ``import_chunks``). It is a mixin so that ``table.py``
stays about the table's operations; it reaches the table's state through the
attributes declared below and must not run kernels of its own beyond export.

Thread safety: as ``EmbeddingTable``: every method here takes the writer lock
(``open`` builds a new table no one else sees yet).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from streamrec.config import TableConfig, table_config_to_dict
from streamrec.errors import SnapshotError
from streamrec.store._checks import as_keys, as_matrix
from streamrec.store._evict import CTX_NOW
from streamrec.store._expiry import ExpiryWheel
from streamrec.store._files import read_snapshot, snapshot_info
from streamrec.store._index import BUCKET_BYTES, IndexGeneration
from streamrec.store._memory import Region
from streamrec.store._ops import CNT_FREE, CNT_HIGH, CNT_LIVE, MODE_INSERT_OR_ASSIGN
from streamrec.store._persist import (
    LiveFiles,
    SnapshotJob,
    is_live_dir,
    is_snapshot_dir,
    read_live_meta,
    run_snapshot,
    table_config_from_meta,
)
from streamrec.store._rows import STAMP, RowLayout
from streamrec.store._write import export_rows

if TYPE_CHECKING:
    from streamrec.store.table import Clock, EmbeddingTable, EvictFn, InitFn

__all__ = ["TableFiles", "hash_key_from_meta"]

_SNAPSHOT_FORMAT = 2  # meta["format"] of table snapshots; 2: the index hash key is in the meta


def hash_key_from_meta(meta: Mapping[str, Any], where: str) -> tuple[int, int]:
    """The index hash key a table's metadata (TABLE.json, a snapshot's meta) records.

    Raises:
        SnapshotError: it is missing or malformed (the files cannot be read without it).
    """
    text = meta.get("hash_key")
    try:
        if not (isinstance(text, str) and len(text) == 32):
            raise ValueError(text)
        return int(text[:16], 16), int(text[16:], 16)
    except ValueError:
        raise SnapshotError(f"index hash key missing or malformed ({text!r}); the index cannot be read "
                            "without it", path=where) from None


class TableFiles:
    """Persistence methods of ``EmbeddingTable`` (see the module docstring)."""

    # State owned by EmbeddingTable, declared for the type checker.
    config: TableConfig
    _layout: RowLayout
    _lock: threading.Lock
    _files: LiveFiles | None
    _arena: Region
    _arena64: np.ndarray
    _arena32: np.ndarray
    _arenav: np.ndarray
    _free_region: Region
    _free: np.ndarray
    _cnt: np.ndarray
    _index: IndexGeneration
    _max_rows: int
    _epoch: int
    _grows: int
    _evicted: int
    _expired: int
    _not_admitted: int
    _sketch: np.ndarray
    _wheel: ExpiryWheel | None
    _clock: Callable[[], float]
    _no_vals: np.ndarray
    _setup: Callable[..., None]
    _hash_key: tuple[int, int]
    _set_hash_key: Callable[[tuple[int, int]], None]
    _ctx: Callable[[], np.ndarray]
    _write: Callable[..., None]

    def _room_for(self, n: int) -> None:
        """Writer only. Before a write of up to n new rows: mark live files dirty, grow them."""
        files = self._files
        if files is None:
            return
        files.mark_dirty()
        self._arena.ensure((int(self._cnt[CNT_HIGH]) + n) * self._layout.row_bytes)
        self._free_region.ensure((int(self._cnt[CNT_FREE]) + n) * 4)

    def _file_meta(self) -> dict[str, Any]:
        lay = self._layout
        k0, k1 = self._hash_key
        return {"kind": "embedding_table", "config": table_config_to_dict(self.config),
                "row_bytes": lay.row_bytes, "voff": lay.voff, "epoch": self._epoch,
                "hash_key": f"{k0:016x}{k1:016x}"}

    def _attach_files(self, path: str | os.PathLike[str]) -> None:
        """Move a new, empty table onto live files in ``path``."""
        files = LiveFiles.create(path, self._file_meta())
        buckets = self._index.buckets
        region = files.new_index(buckets, buckets * BUCKET_BYTES)
        self._use_files(files, IndexGeneration(buckets, False, region))
        files.index_done(buckets)

    def _use_files(self, files: LiveFiles, index: IndexGeneration) -> None:
        lay = self._layout
        self._arena = files.arena(self._max_rows * lay.row_bytes)
        self._arena64 = self._arena.array(np.uint64, (self._max_rows, lay.row_bytes // 8))
        self._arena32 = self._arena.array(np.uint32, (self._max_rows, lay.row_bytes // 4))
        self._arenav = self._arena.array(lay.dtype, (self._max_rows, lay.row_elems))
        self._free_region = files.free(self._max_rows * 4)
        self._free = self._free_region.array(np.uint32, (self._max_rows,))
        self._cnt = files.counters()
        self._index = index
        self._files = files

    @property
    def path(self) -> Path | None:
        """The live directory of a file-backed table, else None."""
        return self._files.root if self._files is not None else None

    def close(self) -> None:
        """Flush a file-backed table and mark its files clean, so ``open`` can map them again.

        The table stays usable; its next write marks the files dirty again. A
        table in anonymous memory has nothing to close.
        """
        with self._lock:
            if self._files is not None:
                ix = self._index
                self._files.close_clean(ix.idx8, [self._arena, self._free_region, ix.region])

    def __enter__(self) -> TableFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def snapshot(self, root: str | os.PathLike[str], *, wait: bool = True) -> Path | SnapshotJob:
        """Write a consistent snapshot of the table to ``root`` while writes continue.

        The table forks under its writer lock (a few milliseconds); the child
        writes its copy-on-write image as a new checksummed generation of
        ``root``, switched in atomically, so a crash at any point leaves the
        previous snapshot loadable. A file-backed table writes in-process under
        its writer lock instead (its pages are shared with a child, not copied).

        Returns the root, or with ``wait=False`` a ``SnapshotJob`` to ``wait()`` on.
        Raises SnapshotError if the snapshot could not be written.
        """
        lay = self._layout
        with self._lock:
            ix = self._index
            high, nfree = int(self._cnt[CNT_HIGH]), int(self._cnt[CNT_FREE])
            meta = {**self._file_meta(), "format": _SNAPSHOT_FORMAT, "buckets": ix.buckets, "high": high,
                    "nfree": nfree, "live": int(self._cnt[CNT_LIVE]), "grows": self._grows,
                    "evicted": self._evicted, "expired": self._expired,
                    "not_admitted": self._not_admitted}

            def arrays() -> dict[str, np.ndarray]:
                out = {"index": ix.idx8, "arena": self._arena.array(np.uint8, (high, lay.row_bytes)),
                       "free": self._free[:nfree]}
                if self.config.admit_after:
                    out["sketch"] = self._sketch
                return out

            job = run_snapshot(root, arrays, meta, fork=self._files is None)
        if isinstance(job, Path) or not wait:
            return job
        return job.wait()

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, initializer_fn: InitFn | None = None,
             clock: Clock | None = None, on_evict: EvictFn | None = None) -> EmbeddingTable:
        """Reopen a table: a live directory (warm) or a snapshot (cold).

        Warm: the live files of a file-backed table that was closed cleanly are
        mapped again after their header and index checksum are verified; rows are
        not read. Cold: a snapshot's files are read sequentially into new memory,
        every chunk's checksum verified before the table serves; no rehashing.
        Tables with a TTL rebuild their expiry wheel from the rows' expiries.

        Raises SnapshotError (CorruptFile for a damaged file) naming the file and
        the problem; nothing is half-loaded.
        """
        if is_snapshot_dir(path):
            return cls._load_snapshot(Path(path), initializer_fn, clock, on_evict)
        if is_live_dir(path):
            files = LiveFiles.open(path)
            self = cls._from_meta(files.meta, str(path), initializer_fn, clock, on_evict)
            self._epoch = files.epoch
            region, buckets = files.current_index()
            self._use_files(files, IndexGeneration(buckets, False, region))
            files.check_counters(self._arena.file_size // self._layout.row_bytes,
                                 self._free_region.file_size // 4)
            self._refile_expiries()
            return self
        raise SnapshotError("neither a snapshot (no CURRENT) nor a live table directory (no TABLE.json)",
                            path=str(path))

    @classmethod
    def recover(cls, path: str | os.PathLike[str], *, snapshot: str | os.PathLike[str] | None = None,
                initializer_fn: InitFn | None = None, clock: Clock | None = None,
                on_evict: EvictFn | None = None) -> EmbeddingTable:
        """Put a live table that ``open`` refuses (not closed cleanly) back in service at ``path``.

        With ``snapshot``: the snapshot is loaded (every checksum verified) and its
        rows, with their optimizer state and expiry, are written into new live files
        at ``path``; writes made after the snapshot are lost. Without: the rows are
        discarded and an empty table of the recorded config takes their place. The old
        files are removed only once the snapshot has loaded.

        Raises:
            SnapshotError: ``path`` is not a live table directory, or the snapshot is
                damaged or holds rows of another shape (dim, dtype, optimizer).
        """
        p = Path(path)
        if not is_live_dir(p):
            raise SnapshotError("not a live table directory (no TABLE.json): nothing to recover", path=str(p))
        cfg = table_config_from_meta(read_live_meta(p), str(p))
        source = None
        if snapshot is not None:
            source = cls._load_snapshot(Path(snapshot), initializer_fn, clock, on_evict)
            got = (source.config.dim, source.config.dtype, source.config.optimizer)
            if got != (cfg.dim, cfg.dtype, cfg.optimizer):
                source.close()
                raise SnapshotError(f"holds rows of (dim, dtype, optimizer) {got}, the table at {p} "
                                    f"{(cfg.dim, cfg.dtype, cfg.optimizer)}", path=str(snapshot))
        shutil.rmtree(p)
        table = cast("type[EmbeddingTable]", cls).from_config(cfg, initializer_fn, clock=clock,
                                                              on_evict=on_evict, path=p)
        if source is not None:
            lo = 0
            while lo >= 0:
                keys, values, expires_at, lo = source.export_range_with_expiry(lo, 65536, include_state=True)
                if keys.size:
                    table.import_chunks([(keys, values, expires_at)], include_state=True)
            source.close()
        return table

    @classmethod
    def _from_meta(cls, meta: dict[str, Any], where: str, init_fn: InitFn | None, clock: Clock | None,
                   on_evict: EvictFn | None) -> EmbeddingTable:
        cfg = table_config_from_meta(meta, where)
        self = cast("EmbeddingTable", cls.__new__(cls))
        self._setup(cfg, init_fn, clock, on_evict)
        if meta.get("row_bytes") != self._layout.row_bytes:
            raise SnapshotError(f"row layout {meta.get('row_bytes')} B differs from this build's "
                                f"{self._layout.row_bytes} B", path=where)
        self._epoch = int(meta["epoch"])
        self._set_hash_key(hash_key_from_meta(meta, where))
        return self

    @classmethod
    def _load_snapshot(cls, root: Path, init_fn: InitFn | None, clock: Clock | None,
                       on_evict: EvictFn | None) -> EmbeddingTable:
        meta = snapshot_info(root).meta
        if meta.get("format") != _SNAPSHOT_FORMAT:
            raise SnapshotError(f"table snapshot format {meta.get('format')!r}, this build reads "
                                f"{_SNAPSHOT_FORMAT} (format 1 predates the keyed index hash: export it "
                                "with the build that wrote it and import_chunks the rows)", path=str(root))
        self = cls._from_meta(meta, str(root), init_fn, clock, on_evict)
        try:
            high, nfree, live, buckets = (int(meta[k]) for k in ("high", "nfree", "live", "buckets"))
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"MANIFEST.json meta incomplete: {exc}", path=str(root)) from None
        if high > self._max_rows or buckets < 2 or buckets & (buckets - 1):
            raise SnapshotError(f"implausible sizes: {high} rows, {buckets} buckets", path=str(root))
        self._index = IndexGeneration(buckets, self.config.huge_pages)
        lay = self._layout
        targets = {"index": self._index.idx8, "arena": self._arena.array(np.uint8, (high, lay.row_bytes)),
                   "free": self._free[:nfree]}
        if self.config.admit_after:
            targets["sketch"] = self._sketch

        def allocate(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
            if name not in targets:
                raise SnapshotError(f"unexpected array {name!r}", path=str(root))
            return targets[name]

        _, arrays = read_snapshot(root, allocate)
        if set(arrays) != set(targets):
            raise SnapshotError(f"arrays {sorted(arrays)} do not match {sorted(targets)}", path=str(root))
        self._cnt[CNT_HIGH], self._cnt[CNT_FREE], self._cnt[CNT_LIVE] = high, nfree, live
        self._grows = int(meta.get("grows", 0))
        self._evicted, self._expired = int(meta.get("evicted", 0)), int(meta.get("expired", 0))
        self._not_admitted = int(meta.get("not_admitted", 0))
        self._refile_expiries()
        return self

    def _refile_expiries(self) -> None:
        """File every live row's expiry in a fresh wheel (tables with a TTL)."""
        if self._wheel is None:
            return
        self._wheel.clear()
        high = int(self._cnt[CNT_HIGH])
        exp = self._arena32[:high, self._layout.expire_word]
        live = (self._arena32[:high, STAMP] & 1).astype(bool) & (exp != 0)
        self._wheel.file(self._arena64[:high, 0][live], exp[live])

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
        lo = 0
        while True:
            keys, vals, lo = self.export_range(lo, chunk_rows, include_state)
            if lo < 0:
                return
            if keys.size:
                yield keys, vals

    def export_range(self, start: int, rows: int, include_state: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, int]:
        """The live rows among arena rows ``[start, start + rows)``, and where to go on.

        The stateless form of ``export`` (for a replica pulling a table chunk by
        chunk over the wire): returns ``(keys (n,), values (n, W), next_start)``
        with ``next_start`` -1 once ``start`` is past the arena's high-water mark.
        The writer lock is held only for this chunk.
        """
        keys, vals, _, nxt = self._export_chunk(start, rows, include_state, expiry=False)
        return keys, vals, nxt

    def export_range_with_expiry(self, start: int, rows: int, include_state: bool = False
                                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """``export_range`` plus each row's expiry: ``(keys, values, expires_at (n,) int64, next)``.

        ``expires_at`` is in seconds on the table's clock (``time.time`` by default), 0 for
        a row that never expires; ``import_chunks`` takes it back, so a copied row keeps
        its deadline instead of starting a fresh TTL.
        """
        return self._export_chunk(start, rows, include_state, expiry=True)

    def _export_chunk(self, start: int, rows: int, include_state: bool, *, expiry: bool
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Both ``export_range`` forms; ``expires_at`` is computed only with ``expiry``."""
        if not (isinstance(start, int) and start >= 0 and isinstance(rows, int) and rows >= 1):
            raise ValueError(f"start, rows: expected ints >= 0 and >= 1, got {start!r}, {rows!r}")
        width = self._layout.dim + (self._layout.state_width if include_state else 0)
        with self._lock:
            hi = min(start + rows, int(self._cnt[CNT_HIGH]))
            if start >= hi:
                return (np.empty(0, np.uint64), np.empty((0, width), self._layout.dtype),
                        np.empty(0, np.int64), -1)
            keys = np.empty(hi - start, dtype=np.uint64)
            vals = np.empty((hi - start, width), dtype=self._layout.dtype)
            ctx = self._ctx()
            c = export_rows(self._arena64, self._arena32, self._arenav, self._layout.voff,
                            start, hi, keys, vals, ctx)
            if not expiry:
                return keys[:c], vals[:c], np.empty(0, np.int64), hi
            live = (self._arena32[start:hi, STAMP] & 1).astype(bool)
            if self._wheel is None:
                expires_at = np.zeros(c, np.int64)
            else:  # the kernel's filter, over the same rows under the same lock
                exp = self._arena32[start:hi, self._layout.expire_word].astype(np.int64)
                live &= (exp == 0) | (exp > int(ctx[CTX_NOW]))
                expires_at = np.where(exp == 0, 0, exp + self._epoch)[live]
        assert expires_at.shape[0] == c
        return keys[:c], vals[:c], expires_at, hi

    def import_chunks(self, chunks: Iterable[tuple[Any, ...]], include_state: bool = False) -> int:
        """Insert-or-assign every ``(keys, values)`` chunk, as ``export`` yields them.

        With ``include_state`` the values carry the optimizer state after the
        embedding (W = D + state_width) and it is restored; otherwise new rows
        get fresh state. A chunk may carry a third array, ``expires_at`` (n,) as
        ``export_range_with_expiry`` gives it: in a table with a TTL each row then
        keeps that deadline (rows already past it are skipped); without one, new
        rows get the table's TTL. Returns the number of keys written.
        """
        width = self._layout.dim + (self._layout.state_width if include_state else 0)
        total = 0
        for chunk in chunks:
            k = as_keys(chunk[0])
            v = as_matrix(chunk[1], k.shape[0], width, self._layout.dtype, "values")
            ttl: Any = None
            if len(chunk) > 2 and self._wheel is not None:
                at = np.asarray(chunk[2], dtype=np.int64)
                if at.shape != k.shape:
                    raise ValueError(f"expires_at: expected shape {k.shape}, got {at.shape}")
                left = at - int(self._clock())
                keep = (at == 0) | (left > 0)
                if not keep.all():
                    k, v, at, left = k[keep], v[keep], at[keep], left[keep]
                ttl = np.where(at == 0, 0, left)
            self._write(k, MODE_INSERT_OR_ASSIGN, v, self._no_vals,
                        np.empty(k.shape[0], dtype=np.bool_), ttl)
            total += k.shape[0]
        return total
