"""Read kernels of the embedding table, and the status codes and counters all kernels share.

Owns: ``find_batch`` (lookups and membership) and its single-key retry path,
``Status``, the table counters' layout and the write modes. Writer kernels are
in ``_write``. Inputs are checked by the caller (``Requires:`` lines say what);
kernels return a ``Status`` code, never raise.

Lookups run in groups of ``GROUP`` keys and three passes per group, so the
memory accesses of a group overlap instead of following one another: (A) hash
every key and prefetch both bucket lines; (B) read the buckets' versions, match
tags, and prefetch the candidate row's lines; (C) check the row's key, copy the
embedding, and re-read the versions. A key whose versions moved, whose first
candidate was a false tag match, or whose bucket was locked is redone on the
single-key path, which loops until it reads a stable bucket pair. Each
re-read for a torn or locked bucket is counted in ``ctx[CTX_RETRIES]`` (the
table's ``stats().read_retries``): a store into the call's own ctx, on the slow
path only.

Thread safety: ``find_batch`` may run on any number of threads beside one
writer; every other kernel here is writer only (the caller holds the table's
writer lock).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import IntEnum

import numpy as np

from streamrec.errors import TableBusy
from streamrec.store._evict import (
    CTX_DECAY_MIN,
    CTX_EXPIRE_W,
    CTX_HASH_K0,
    CTX_HASH_K1,
    CTX_NOW,
    CTX_POLICY,
    CTX_RETRIES,
    expired,
    touch,
)
from streamrec.store._index import (
    ROW0,
    VER,
    alt_bucket,
    hash_key,
    match,
    scan,
    tag_of,
)
from streamrec.store._jit import (
    barrier,
    ctz,
    kernel,
    load_acquire,
    prefetch,
    prefetch2_nta,
)

__all__ = [
    "AHEAD",
    "CHUNK",
    "CNT_FREE",
    "CNT_HIGH",
    "CNT_LIVE",
    "GROUP",
    "MODE_ASSIGN",
    "MODE_ERASE",
    "MODE_FIND_OR_INSERT",
    "MODE_INSERT_OR_ASSIGN",
    "PROBE_AHEAD",
    "Status",
    "find_batch",
    "retry_reader",
]


_BUSY_PATIENCE_S = 2.0  # how long a reader waits on a locked bucket before giving up


def retry_reader(call: Callable[[], int], busy: int = 4) -> None:
    """Run a reader kernel until it reports OK (0): again at once on any other
    code, yielding the GIL on ``busy``; raise TableBusy after 2 s of busy.

    ``call`` must read the current index each time, so a STALE retry lands on
    the new one. Tables and the sequence store both read through this.
    """
    started = 0.0
    while True:
        status = call()
        if status == 0:
            return
        if status == busy:
            now = time.monotonic()
            started = started or now
            if now - started > _BUSY_PATIENCE_S:
                raise TableBusy(waited_s=now - started)
            time.sleep(0)


class Status(IntEnum):
    """What a kernel reports; ``table.py`` turns all but OK into retries or errors."""

    OK = 0
    STALE = 1  # the index was replaced while reading: retry on the new one
    INDEX_FULL = 2  # no slot even after displacement: grow the index, resume
    ARENA_FULL = 3  # the row arena's reservation is used up
    BUSY = 4  # a bucket stayed locked through SPIN retries


_OK, _STALE, _INDEX_FULL, _ARENA_FULL, _BUSY = 0, 1, 2, 3, 4

GROUP = 16  # keys hashed and prefetched together by writers
CHUNK = 512  # keys per round of passes: their bucket lines stay in L2 until validated
PROBE_AHEAD = 16  # bucket prefetch distance of the probe pass, in keys
AHEAD = 8  # row prefetch distance of the copy pass, in keys
_SPIN = 1 << 16  # single-key retries before reporting BUSY
_LINE_BYTES = 64

CNT_HIGH = 0  # rows ever handed out (the arena's high-water mark)
CNT_FREE = 1  # rows on the free list
CNT_LIVE = 2  # live keys

MODE_FIND_OR_INSERT = 0
MODE_INSERT_OR_ASSIGN = 1
MODE_ASSIGN = 2
MODE_ERASE = 3

_ONE = np.uint64(1)
_ZERO = np.uint64(0)


@kernel
def _find_one(
    idx64: np.ndarray, idx32: np.ndarray, retired: np.ndarray, arena64: np.ndarray,
    arenav: np.ndarray, voff: int, key: int, b1: int, b2: int,
    tag: int, out: np.ndarray, found: np.ndarray, i: int, copy: bool, ctx: np.ndarray,
) -> int:
    """One key under the seqlock, retried until stable. Sets found[i], out[i]."""
    dim = out.shape[1]
    arena32 = arena64.view(np.uint32)
    for _ in range(_SPIN):
        v1 = idx32[b1, VER]
        v2 = idx32[b2, VER]
        if (v1 | v2) & np.uint32(1):
            if retired[0] != 0:
                return _STALE
            ctx[CTX_RETRIES] += 1
            continue
        barrier()
        _, row = scan(idx64, idx32, arena64, key, b1, tag)
        if row < 0:
            _, row = scan(idx64, idx32, arena64, key, b2, tag)
        if row >= 0 and expired(arena32, row, ctx[CTX_EXPIRE_W], ctx[CTX_NOW]):
            row = -1
        if copy:
            if row >= 0:
                src = arenav[row, voff:]  # a slice: numba skips the wraparound test, the copy vectorises
                for d in range(dim):
                    out[i, d] = src[d]
            else:
                for d in range(dim):
                    out[i, d] = 0
        barrier()
        if idx32[b1, VER] == v1 and idx32[b2, VER] == v2:
            if retired[0] != 0:
                return _STALE
            found[i] = row >= 0
            if row >= 0 and copy:
                touch(arena32, row, ctx[CTX_POLICY], ctx[CTX_NOW], ctx[CTX_DECAY_MIN])
            return _OK
        if retired[0] != 0:
            return _STALE
        ctx[CTX_RETRIES] += 1
    return _BUSY


@kernel
def find_batch(
    idx64: np.ndarray, idx32: np.ndarray, retired: np.ndarray, arena64: np.ndarray,
    arenav: np.ndarray, voff: int, keys: np.ndarray, out: np.ndarray,
    found: np.ndarray, copy: bool, ctx: np.ndarray,
) -> int:
    """Look up ``keys``; copy embeddings of present keys into ``out`` (zeros if absent).

    Works through the batch in chunks of ``CHUNK`` keys, four passes per chunk,
    each prefetching a fixed distance ahead so the misses of different keys
    overlap: hash; probe every key's first bucket; probe the second bucket of
    the keys not found in their first (inserts try the first bucket first, so
    at load 0.8 that is about 5 % of present keys); copy each row and re-read
    the versions its probe saw. A key found in one bucket needs only that
    bucket's version to be unchanged (the key sat there, and any write to its
    row locks that bucket); an absent key needs both.

    Rows are prefetched non-temporally: each is read once, and keeping them out
    of the outer caches keeps the index in. One-off measurement (2026-11-24,
    ``python benchmarks/store.py --quick`` on kernel variants while writing
    commit f55799c, 5 M keys, dim 64; the variants are gone): this order ran
    about 1.2x probing both buckets at once, and 1.3x a fused loop that probes
    ahead while it copies. Tried 2026-12-03 (5 M keys, dim 64, thread CPU
    time, alternating runs on a 2-core VM under load 4-9, variants gone):
    prefetching every first bucket while hashing instead of ``PROBE_AHEAD``
    keys ahead won 0.56 vs 0.51 of the gather ceiling in one series and lost
    0.46 vs 0.51-0.58 in the next; the row distance ``AHEAD`` 16 instead of 8
    was no better. Neither was kept: the noise is larger than either effect.

    A row whose TTL has passed reads as absent. With ``copy`` (a real read, not
    a membership test) each row found is marked accessed for the eviction policy.

    Requires: keys uint64 (B,); out (B, D) of the arena's dtype (any (0, D)
    array when ``copy`` is False); found bool (B,); ctx as in ``_evict``.

    Returns a Status: OK, or STALE (retry all on the current index), or BUSY.
    """
    n = keys.shape[0]
    arena32 = arena64.view(np.uint32)
    now = ctx[CTX_NOW]
    exp_w = ctx[CTX_EXPIRE_W]
    policy = ctx[CTX_POLICY] if copy else 0
    dim = out.shape[1]
    mask = np.uint64(idx64.shape[0] - 1)
    k0 = np.uint64(ctx[CTX_HASH_K0])
    k1 = np.uint64(ctx[CTX_HASH_K1])
    row_lines = ((voff + dim) * arenav.itemsize + _LINE_BYTES - 1) // _LINE_BYTES
    line_elems = _LINE_BYTES // arenav.itemsize
    b1s = np.empty(CHUNK, np.int64)
    b2s = np.empty(CHUNK, np.int64)
    tags = np.empty(CHUNK, np.uint64)
    v1s = np.empty(CHUNK, np.uint32)
    v2s = np.empty(CHUNK, np.uint32)
    cands = np.empty(CHUNK, np.int64)
    which = np.empty(CHUNK, np.int8)  # bucket the probe ended in: 1, or 2 (both read)
    miss = np.empty(CHUNK, np.int64)
    for lo in range(0, n, CHUNK):
        c = min(CHUNK, n - lo)
        for j in range(c):
            h = hash_key(keys[lo + j], k0, k1)
            t = tag_of(h)
            b1 = np.int64(h & mask)
            b1s[j] = b1
            b2s[j] = alt_bucket(b1, t, mask)
            tags[j] = t
            if j < PROBE_AHEAD:
                prefetch(idx64, b1)
        nm = 0
        for j in range(c):  # first buckets
            if j + PROBE_AHEAD < c:
                prefetch(idx64, b1s[j + PROBE_AHEAD])
            b1 = b1s[j]
            v1 = load_acquire(idx32, b1, VER)
            v1s[j] = v1
            if v1 & np.uint32(1):
                cands[j] = -2
                which[j] = 1
                continue
            m = match(idx64, b1, tags[j])
            if m != _ZERO:
                cands[j] = np.int64(idx32[b1, ROW0 + np.int64(ctz(m))])
                which[j] = 1
            else:
                miss[nm] = j
                nm += 1
        for q in range(min(PROBE_AHEAD, nm)):
            prefetch(idx64, b2s[miss[q]])
        for q in range(nm):  # second buckets, of the keys not in their first
            if q + PROBE_AHEAD < nm:
                prefetch(idx64, b2s[miss[q + PROBE_AHEAD]])
            j = miss[q]
            b2 = b2s[j]
            v2 = load_acquire(idx32, b2, VER)
            v2s[j] = v2
            which[j] = 2
            if v2 & np.uint32(1):
                cands[j] = -2
                continue
            m = match(idx64, b2, tags[j])
            cands[j] = np.int64(idx32[b2, ROW0 + np.int64(ctz(m))]) if m != _ZERO else -1
        for j in range(min(AHEAD, c)):
            if cands[j] >= 0:
                for ln in range(row_lines if copy else 1):
                    prefetch2_nta(arenav, cands[j], ln * line_elems)
        for j in range(c):
            if j + AHEAD < c:
                r = cands[j + AHEAD]
                if r >= 0:
                    for ln in range(row_lines if copy else 1):
                        prefetch2_nta(arenav, r, ln * line_elems)
            i = lo + j
            key = keys[i]
            cand = cands[j]
            ok = False
            if cand >= 0 and exp_w != 0 and expired(arena32, cand, exp_w, now):
                cand = -3  # expired: the slow path decides under a stable read
            if cand >= 0:
                if arena64[cand, 0] == key:
                    if copy:
                        src = arenav[cand, voff:]  # see _find_one
                        for d in range(dim):
                            out[i, d] = src[d]
                    found[i] = True
                    ok = True
            elif cand == -1:
                if copy:
                    for d in range(dim):
                        out[i, d] = 0
                found[i] = False
                ok = True
            barrier()
            if ok and retired[0] == 0:
                stable = False
                if which[j] == 1:
                    stable = idx32[b1s[j], VER] == v1s[j]
                elif cand >= 0:
                    stable = idx32[b2s[j], VER] == v2s[j]
                else:
                    stable = idx32[b1s[j], VER] == v1s[j] and idx32[b2s[j], VER] == v2s[j]
                if stable:
                    if policy != 0 and cand >= 0:
                        touch(arena32, cand, policy, now, ctx[CTX_DECAY_MIN])
                    continue
            if ok or cand == -2:  # a torn or locked bucket, not a false tag match or an expiry
                ctx[CTX_RETRIES] += 1
            st = _find_one(idx64, idx32, retired, arena64, arenav, voff, key,
                           b1s[j], b2s[j], tags[j], out, found, i, copy, ctx)
            if st != _OK:
                return st
    return _OK
