"""Two-tier tables: a RAM tier over a larger file-backed disk tier.

Owns: ``TieredTable``, which keeps the hot rows in an ``EmbeddingTable`` in
memory (capped at ``ram_rows``, evicting by LRU or LFU) and the rest in a
file-backed ``EmbeddingTable`` on disk (the seed's NVM/SSD layer): rows evicted
from RAM are demoted to disk with their optimizer state; rows found on disk are
promoted back to RAM; ``find`` answers from either and counts hits per tier.
It must not reach into either table's internals.

The disk tier is memory-mapped: the operating system's page cache holds what
is hot in it, and only rows actually read cost I/O, which is what NVM gives
the seed's system at a larger scale.

Thread safety: every method takes the tiered table's lock (a promotion is a
read on one tier and two writes), so calls are serialised. Use the RAM tier's
own ``find`` for lock-free reads that need no promotion.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from streamrec.store._checks import as_keys, as_matrix
from streamrec.store.table import EmbeddingTable

__all__ = ["TierStats", "TieredTable"]


@dataclass(frozen=True)
class TierStats:
    """Counts since creation: where ``find`` found its keys, and rows moved."""

    ram_hits: int
    disk_hits: int
    misses: int
    promoted: int
    demoted: int
    ram_rows: int
    disk_rows: int

    @property
    def ram_hit_rate(self) -> float:
        """RAM hits over keys found in either tier."""
        found = self.ram_hits + self.disk_hits
        return self.ram_hits / found if found else 0.0


class TieredTable:
    """An embedding table whose hot rows live in RAM and the rest on disk.

    Shape contract as ``EmbeddingTable``: (B,) keys, (B, D) values.

    Args:
        dim: D.
        ram_rows: rows the RAM tier holds; beyond it the least recently (or
            frequently) used rows move to disk.
        disk_path: directory for the disk tier's live files (on a disk, not
            ``/dev/shm``, to be a real second tier); must not hold a table yet.
        eviction: ``"lru"`` or ``"lfu"`` for the RAM tier.
        **table: further ``EmbeddingTable`` arguments for both tiers (dtype,
            optimizer, initializer, ...).

    Example::

        t = TieredTable(dim=64, ram_rows=1_000_000, disk_path="/var/lib/streamrec/t1")
        t.insert_or_assign(keys, values)
        values, found = t.find(keys)       # promotes rows found on disk
        t.stats().ram_hit_rate
    """

    def __init__(self, dim: int, ram_rows: int, disk_path: str | os.PathLike[str], *,
                 eviction: str = "lru", **table: Any) -> None:
        if not (isinstance(ram_rows, int) and ram_rows >= 1):
            raise ValueError(f"ram_rows: expected an int >= 1, got {ram_rows!r}")
        if table.get("ttl_s"):
            # A row moving between tiers would restart its TTL (each tier stamps
            # its own writes): refused until expiries travel with demoted rows.
            raise ValueError("ttl_s: tiered tables do not support a TTL yet")
        self._lock = threading.RLock()
        self._demoted = 0
        self._promoted = 0
        self._ram_hits = 0
        self._disk_hits = 0
        self._misses = 0
        self.ram = EmbeddingTable(dim, max_live_rows=ram_rows, eviction=eviction,
                                  on_evict=self._demote, evict_state=True, **table)
        disk_kw = {k: v for k, v in table.items() if k not in ("huge_pages", "capacity")}
        self.disk = EmbeddingTable(dim, huge_pages=False, path=disk_path, **disk_kw)
        self.dim = dim

    def _demote(self, keys: np.ndarray, rows: np.ndarray, reason: str) -> None:
        """RAM tier's eviction callback: evicted rows (with state) go to disk."""
        if reason == "evicted" and keys.size:
            self.disk.import_chunks([(keys, rows)], include_state=True)
            self._demoted += keys.size

    def _promote(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Move ``keys`` (unique, on disk) with their full ``rows`` to RAM.

        Off the disk first: the RAM insert may demote rows, these included, to
        disk, and each key must sit in exactly one tier at every step.
        """
        if keys.size:
            self.disk.erase(keys)
            self.ram.import_chunks([(keys, rows)], include_state=True)
            self._promoted += int(keys.size)

    def _gather(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Current full rows of unique ``keys``: (rows (n, D+S), in_ram, on_disk)."""
        rows, in_ram = self.ram.find(keys, include_state=True)
        on_disk = np.zeros(keys.size, dtype=np.bool_)
        miss = np.flatnonzero(~in_ram)
        if miss.size:
            disk_rows, hit = self.disk.find(keys[miss], include_state=True)
            rows[miss[hit]] = disk_rows[hit]
            on_disk[miss[hit]] = True
        return rows, in_ram, on_disk

    def find(self, keys: Any, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of ``keys`` from either tier; rows found on disk move to RAM.

        Returns ``(values (B, D), found (B,))``, zeros where absent.
        """
        k = as_keys(keys)
        with self._lock:
            values, found = self.ram.find(k, out)
            n_ram = int(np.count_nonzero(found))
            self._ram_hits += n_ram
            if n_ram == k.size:
                return values, found
            miss = np.flatnonzero(~found)
            uniq, where = np.unique(k[miss], return_inverse=True)
            rows, on_disk = self.disk.find(uniq, include_state=True)
            values[miss] = rows[where, : self.dim]
            found[miss] = on_disk[where]
            hits = int(np.count_nonzero(on_disk[where]))
            self._disk_hits += hits
            self._misses += miss.size - hits
            self._promote(uniq[on_disk], rows[on_disk])
            return values, found

    def contains(self, keys: Any) -> np.ndarray:
        k = as_keys(keys)
        with self._lock:
            return self.ram.contains(k) | self.disk.contains(k)

    def find_or_insert(self, keys: Any) -> np.ndarray:
        """Embeddings of ``keys``: rows on disk move to RAM, absent ones are created in RAM.

        Values are taken before anything moves, so a key of the batch that a
        promotion pushes back to disk still returns its row.
        """
        k = as_keys(keys)
        with self._lock:
            uniq, where = np.unique(k, return_inverse=True)
            rows, in_ram, on_disk = self._gather(uniq)
            out = rows[:, : self.dim].copy()
            self._promote(uniq[on_disk], rows[on_disk])
            new = ~(in_ram | on_disk)
            if new.any():
                out[new] = self.ram.find_or_insert(uniq[new])
            return out[where]

    def insert_or_assign(self, keys: Any, values: Any) -> np.ndarray:
        """Write rows to RAM, keeping each existing key's optimizer state (from either tier).

        For a key repeated in the batch the last value wins. Returns (B,) mask
        of the keys new to both tiers.
        """
        k = as_keys(keys)
        v = as_matrix(values, k.shape[0], self.dim, self.ram.dtype, "values")
        with self._lock:
            # the last occurrence of each key: unique over the reversed batch
            rev_uniq, rev_first = np.unique(k[::-1], return_index=True)
            uniq, last = rev_uniq, k.shape[0] - 1 - rev_first
            rows, in_ram, on_disk = self._gather(uniq)
            old = in_ram | on_disk
            rows[:, : self.dim] = v[last]
            self.disk.erase(uniq[on_disk])
            self.ram.import_chunks([(uniq[old], rows[old])], include_state=True)
            if (~old).any():
                self.ram.insert_or_assign(uniq[~old], rows[~old, : self.dim])
            return ~np.isin(k, uniq[old])

    def apply_gradients(self, keys: Any, grads: Any, lr: float) -> np.ndarray:
        """An optimizer step on rows wherever they are; no row moves.

        Each key's gradients (summed over repeats) are applied by the tier that
        holds it. Returns (B,) mask of the keys found in either tier.
        """
        k = as_keys(keys)
        g = as_matrix(grads, k.shape[0], self.dim, self.ram.dtype, "grads")
        with self._lock:
            found = self.ram.apply_gradients(k, g, lr)
            rest = np.flatnonzero(~found)
            if rest.size:
                found[rest] = self.disk.apply_gradients(k[rest], g[rest], lr)
            return found

    def erase(self, keys: Any) -> np.ndarray:
        k = as_keys(keys)
        with self._lock:
            return self.ram.erase(k) | self.disk.erase(k)

    def __len__(self) -> int:
        return len(self.ram) + len(self.disk)

    def stats(self) -> TierStats:
        return TierStats(self._ram_hits, self._disk_hits, self._misses, self._promoted,
                         self._demoted, len(self.ram), len(self.disk))

    def close(self) -> None:
        """Close the disk tier's files cleanly (the RAM tier has none)."""
        with self._lock:
            self.disk.close()
