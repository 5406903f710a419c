"""The expiry wheel: keys filed by the time slice in which their TTL ends.

Owns: ``ExpiryWheel``, which remembers, per slice of ``slice_s`` seconds, the
keys whose expiry was set inside it, and hands back every key of the slices
that have passed. It must not judge whether a key really expired: an entry is a
hint (the key may have been refreshed or erased since), and the reclaim kernel
checks the row's own expiry. Reads never depend on the wheel: a row past its
expiry reads as absent even before its slice is reclaimed.

Why slices rather than a heap of keys: filing is a vectorised bucketing of a
whole write batch (no per-key work in Python), and reclaiming a passed slice
touches exactly its entries, so expiry costs work proportional to the rows that
expire plus the refreshes, never a scan of the table. The slice numbers in use
sit in a small heap, so finding the due ones does not scan every slice either
(a sample join files its rows in 1-tick slices: tens of thousands of them).

A slice is due once every expiry it can hold has passed: expiries are whole
seconds and a row has expired at ``now >= expiry``, so slice s (expiries
``[s*S, (s+1)*S - 1]``) is due at ``now >= (s+1)*S - 1``. With S = 1 that is
the moment its rows expire, so after a write's reclaim no expired row is left
(a sample join relies on it: an expired, unreclaimed row reborn by a write
would vanish without being reported).

Thread safety: writer only (the table calls it under its writer lock).
"""

from __future__ import annotations

import heapq

import numpy as np

__all__ = ["ExpiryWheel"]


class ExpiryWheel:
    """Keys filed by expiry slice.

    Args:
        slice_s: width of a slice in seconds (>= 1).
    """

    def __init__(self, slice_s: int) -> None:
        if slice_s < 1:
            raise ValueError(f"slice_s: expected >= 1, got {slice_s}")
        self.slice_s = slice_s
        self._slices: dict[int, list[np.ndarray]] = {}
        self._order: list[int] = []  # heap of the keys of _slices
        self.entries = 0

    def _add(self, s: int, keys: np.ndarray) -> None:
        got = self._slices.get(s)
        if got is None:
            self._slices[s] = [keys]
            heapq.heappush(self._order, s)
        else:
            got.append(keys)

    def file(self, keys: np.ndarray, expires: np.ndarray) -> None:
        """File ``keys`` (K,) by their expiry ``expires`` (K,) or (1,); 0 = never."""
        if keys.size == 0:
            return
        exp = np.broadcast_to(expires, keys.shape)
        keep = exp != 0
        if not keep.all():
            keys, exp = keys[keep], exp[keep]
            if keys.size == 0:
                return
        sl = exp.astype(np.int64) // self.slice_s
        first = int(sl[0])
        if (sl == first).all():  # the common case: one TTL for the whole batch
            self._add(first, keys.copy())
        else:
            order = np.argsort(sl, kind="stable")
            sl_sorted, keys_sorted = sl[order], keys[order]
            bounds = np.flatnonzero(np.diff(sl_sorted)) + 1
            lo = np.concatenate([[0], bounds]).tolist()
            hi = [*lo[1:], keys.size]
            # views of one sorted copy: no gather per slice (a join files a batch in ~100 1-tick slices)
            for a, z in zip(lo, hi, strict=True):
                self._add(int(sl_sorted[a]), keys_sorted[a:z])
        self.entries += keys.size

    def next_due(self) -> int | None:
        """The time (seconds) at which the earliest slice will have passed, or None."""
        if not self._order:
            return None
        return (self._order[0] + 1) * self.slice_s - 1

    def pop_due(self, now: int) -> np.ndarray:
        """Every key filed in a slice whose expiries have all passed at ``now``, removing them."""
        parts: list[np.ndarray] = []
        while self._order and (self._order[0] + 1) * self.slice_s - 1 <= now:
            parts.extend(self._slices.pop(heapq.heappop(self._order)))
        if not parts:
            return np.empty(0, dtype=np.uint64)
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        self.entries -= out.size
        return out

    def clear(self) -> None:
        self._slices.clear()
        self._order.clear()
        self.entries = 0
