"""Writer kernels of the embedding table: batch writes, gradients, expiry, compaction.

Owns: every kernel that changes a table (``write_batch``,
``apply_gradients_batch``, ``reclaim_keys``, ``compact_step``) and the bulk
read ``export_rows``; index rebuilds are ``_index.rebuild_from``. Inputs are checked by
``table.py`` (``Requires:`` lines say what); kernels return status codes.

Thread safety: writer only. The caller holds the table's writer lock; readers
may run concurrently, which is why every change to a reachable bucket or row
happens between ``lock`` and ``unlock`` of the bucket that holds the key.
"""

from __future__ import annotations

import numpy as np

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
    admit,
    expired,
    fresh_meta,
    pick_victim,
    touch,
)
from streamrec.store._index import (
    ROW0,
    alt_bucket,
    hash_key,
    locate,
    lock,
    make_room,
    mix64,
    publish,
    tag_of,
    unlock,
    unpublish,
)
from streamrec.store._jit import inline, kernel, prefetch, prefetch2
from streamrec.store._ops import (
    _ARENA_FULL,
    _INDEX_FULL,
    _OK,
    AHEAD,
    CNT_FREE,
    CNT_HIGH,
    CNT_LIVE,
    GROUP,
    MODE_ASSIGN,
    MODE_ERASE,
    MODE_FIND_OR_INSERT,
)
from streamrec.store._rows import META, STAMP, init_state, init_values, state_elems, step_row

__all__ = [
    "apply_gradients_batch",
    "compact_step",
    "export_rows",
    "reclaim_keys",
    "write_batch",
]


@kernel
def _remove(
    idx32: np.ndarray, idx8: np.ndarray, arena64: np.ndarray, arena32: np.ndarray,
    arenav: np.ndarray, cnt: np.ndarray, free: np.ndarray, voff: int, dim: int,
    b: int, s: int, r: int, ev_keys: np.ndarray, ev_vals: np.ndarray, ctx: np.ndarray,
    ev_why: np.ndarray, why: int,
) -> None:
    """Take the key at (b, s) -> row r out of the table, reporting it if asked.

    Reports into ev_keys/ev_vals/ev_why while they have room (``why``: 0 evicted,
    1 expired): ev_vals's width is D, or D + the optimizer state's width to
    carry the whole row (tier demotion).
    """
    unpublish(idx32, idx8, b, s)
    e = ctx[CTX_EVICTED]
    if e < ev_keys.shape[0]:
        ev_keys[e] = arena64[r, 0]
        ev_why[e] = why
        if ev_vals.shape[0] > e:
            src = arenav[r, voff:]
            for d in range(ev_vals.shape[1]):  # the embedding, and the optimizer state if asked
                ev_vals[e, d] = src[d]
        ctx[CTX_EVICTED] = e + 1
    arena32[r, STAMP] &= ~np.uint32(1)
    free[cnt[CNT_FREE]] = np.uint32(r)
    cnt[CNT_FREE] += 1
    cnt[CNT_LIVE] -= 1


@kernel
def _evict_one(
    idx64: np.ndarray, idx32: np.ndarray, idx8: np.ndarray, arena64: np.ndarray,
    arena32: np.ndarray, arenav: np.ndarray, cnt: np.ndarray, free: np.ndarray,
    voff: int, dim: int, ctx: np.ndarray, ev_keys: np.ndarray, ev_vals: np.ndarray,
    ev_why: np.ndarray,
) -> bool:
    """Evict one row chosen by the policy (an expired one is reported as expired)."""
    victim = pick_victim(arena32, cnt[CNT_HIGH], ctx)
    if victim < 0:
        return False
    key = arena64[victim, 0]
    h = hash_key(key, ctx[CTX_HASH_K0], ctx[CTX_HASH_K1])
    t = tag_of(h)
    mask = np.uint64(idx64.shape[0] - 1)
    b1 = np.int64(h & mask)
    b, s, r = locate(idx64, idx32, arena64, key, b1, alt_bucket(b1, t, mask), t)
    if r != victim:
        return False
    why = 1 if expired(arena32, r, ctx[CTX_EXPIRE_W], ctx[CTX_NOW]) else 0
    _remove(idx32, idx8, arena64, arena32, arenav, cnt, free, voff, dim, b, s, r,
            ev_keys, ev_vals, ctx, ev_why, why)
    return True


@kernel
def write_batch(
    idx64: np.ndarray, idx32: np.ndarray, idx8: np.ndarray, arena64: np.ndarray,
    arena32: np.ndarray, arenav: np.ndarray, cnt: np.ndarray, free: np.ndarray,
    voff: int, dim: int, keys: np.ndarray, start: int, mode: int,
    vals: np.ndarray, out: np.ndarray, flags: np.ndarray,
    init_kind: int, init_a: float, init_b: float, init_seed: int,
    opt: int, hp: np.ndarray, nodes: np.ndarray, ctx: np.ndarray, expires: np.ndarray,
    ev_keys: np.ndarray, ev_vals: np.ndarray, ev_why: np.ndarray, sketch: np.ndarray,
) -> tuple[int, int]:
    """Writer only. Apply one write ``mode`` to keys[start:], in order.

    Modes and what ``flags[i]`` records:
      FIND_OR_INSERT: copy the (possibly new) row's embedding to out[i]; flags =
        inserted. A new row starts from vals[i] when vals has B rows (a caller's
        initializer), else from the initializer. With admission on, an
        unseen-enough key gets those values in out[i] but no row.
      INSERT_OR_ASSIGN: write vals[i] (width W: the embedding, or embedding and
        optimizer state when W > D); new rows get fresh optimizer state; flags = inserted.
      ASSIGN: like INSERT_OR_ASSIGN but absent keys are skipped; flags = found.
      ERASE: remove; flags = found.
    A key repeated in the batch sees the effect of its earlier occurrences. An
    expired key counts as absent (its row is reused for a new insert). Writes
    set the expiry to ``expires[i]`` (or ``expires[0]`` for all; 0 = never);
    inserts beyond the row limit first evict a row by the policy, reported in
    ``ev_keys``/``ev_vals`` (count in ctx[CTX_EVICTED]).

    Requires: keys uint64 (B,); vals (B, W) of the arena dtype for the assigning
    modes; out (B, D) for FIND_OR_INSERT; flags bool (B,); expires uint32 (B,)
    or (1,); ev_keys (B,) and ev_vals (B, D) or (0, D); nodes int64
    (MAX_BFS_NODES, 3); ctx as in ``_evict``.

    Returns ``(status, position)``: OK with B, or INDEX_FULL/ARENA_FULL with the
    position of the first key not done (nothing of it was written).
    """
    n = keys.shape[0]
    mask = np.uint64(idx64.shape[0] - 1)
    max_rows = arena64.shape[0]
    width = vals.shape[1]
    now = ctx[CTX_NOW]
    exp_w = ctx[CTX_EXPIRE_W]
    policy = ctx[CTX_POLICY]
    max_live = ctx[CTX_MAX_LIVE]
    one_expiry = expires.shape[0] == 1
    given = mode == MODE_FIND_OR_INSERT and vals.shape[0] == n  # new rows' values from the caller
    b1s = np.empty(GROUP, np.int64)
    b2s = np.empty(GROUP, np.int64)
    tags = np.empty(GROUP, np.uint64)
    for base in range(start, n, GROUP):
        g = min(GROUP, n - base)
        for j in range(g):
            h = hash_key(keys[base + j], ctx[CTX_HASH_K0], ctx[CTX_HASH_K1])
            t = tag_of(h)
            b1 = np.int64(h & mask)
            b2 = alt_bucket(b1, t, mask)
            b1s[j] = b1
            b2s[j] = b2
            tags[j] = t
            prefetch(idx64, b1)
            prefetch(idx64, b2)
        for j in range(g):
            i = base + j
            key = keys[i]
            exp = expires[0] if one_expiry else expires[i]
            b, s, r = locate(idx64, idx32, arena64, key, b1s[j], b2s[j], tags[j])
            if r >= 0 and expired(arena32, r, exp_w, now):
                if mode >= MODE_ASSIGN:  # ASSIGN or ERASE: an expired key is absent
                    flags[i] = False
                    if mode == MODE_ERASE:
                        _remove(idx32, idx8, arena64, arena32, arenav, cnt, free, voff, dim,
                                b, s, r, ev_keys[:0], ev_vals[:0], ctx, ev_why, 1)
                    continue
                # Reborn: the expired row becomes the key's new row in place.
                lock(idx32, b)
                if mode == MODE_FIND_OR_INSERT:
                    src = arenav[r, voff:]
                    if given:
                        for d in range(dim):
                            src[d] = vals[i, d]
                    else:
                        init_values(src, dim, key, init_kind, init_a, init_b, init_seed)
                    for d in range(dim):
                        out[i, d] = src[d]
                else:
                    dst = arenav[r, voff:]
                    for d in range(width):
                        dst[d] = vals[i, d]
                if width <= dim or mode == MODE_FIND_OR_INSERT:
                    init_state(arenav, r, voff + dim, dim, opt, hp)
                arena32[r, META] = fresh_meta(policy, now)
                arena32[r, exp_w] = np.uint32(exp)
                arena32[r, STAMP] += np.uint32(2)
                unlock(idx32, b)
                flags[i] = True
                continue
            if r >= 0:
                flags[i] = mode >= MODE_ASSIGN
                if mode == MODE_FIND_OR_INSERT:
                    src = arenav[r, voff:]
                    for d in range(dim):
                        out[i, d] = src[d]
                    touch(arena32, r, policy, now, ctx[CTX_DECAY_MIN])
                elif mode == MODE_ERASE:
                    _remove(idx32, idx8, arena64, arena32, arenav, cnt, free, voff, dim,
                            b, s, r, ev_keys[:0], ev_vals[:0], ctx, ev_why, 0)
                else:
                    lock(idx32, b)
                    dst = arenav[r, voff:]
                    for d in range(width):
                        dst[d] = vals[i, d]
                    if exp_w != 0:
                        arena32[r, exp_w] = np.uint32(exp)
                    touch(arena32, r, policy, now, ctx[CTX_DECAY_MIN])
                    arena32[r, STAMP] += np.uint32(2)
                    unlock(idx32, b)
                continue
            flags[i] = False
            if mode >= MODE_ASSIGN:
                continue
            if mode == MODE_FIND_OR_INSERT and ctx[CTX_ADMIT] > 0 and not admit(sketch, key, ctx[CTX_ADMIT]):
                if given:
                    for d in range(dim):
                        out[i, d] = vals[i, d]
                else:
                    init_values(out[i], dim, key, init_kind, init_a, init_b, init_seed)
                ctx[CTX_REFUSED] += 1
                continue
            if max_live > 0 and cnt[CNT_LIVE] >= max_live:
                _evict_one(idx64, idx32, idx8, arena64, arena32, arenav, cnt, free, voff, dim,
                           ctx, ev_keys, ev_vals, ev_why)
            b, s = make_room(idx64, idx32, idx8, b1s[j], b2s[j], mask, nodes)
            if b < 0:
                return _INDEX_FULL, i
            if cnt[CNT_FREE] > 0:
                cnt[CNT_FREE] -= 1
                r = np.int64(free[cnt[CNT_FREE]])
            elif cnt[CNT_HIGH] < max_rows:
                r = cnt[CNT_HIGH]
                cnt[CNT_HIGH] += 1
            else:
                return _ARENA_FULL, i
            # The row is unreachable until published, so it is filled without a lock.
            arena64[r, 0] = key
            arena32[r, STAMP] = (arena32[r, STAMP] | np.uint32(1)) + np.uint32(2)
            arena32[r, META] = fresh_meta(policy, now)
            if exp_w != 0:
                arena32[r, exp_w] = np.uint32(exp)
            dst = arenav[r, voff:]
            if mode == MODE_FIND_OR_INSERT:
                if given:
                    for d in range(dim):
                        dst[d] = vals[i, d]
                else:
                    init_values(dst, dim, key, init_kind, init_a, init_b, init_seed)
                for d in range(dim):
                    out[i, d] = dst[d]
            else:
                for d in range(width):
                    dst[d] = vals[i, d]
            if width <= dim:
                init_state(arenav, r, voff + dim, dim, opt, hp)
            publish(idx32, idx8, b, s, tags[j], r)
            cnt[CNT_LIVE] += 1
            flags[i] = True
    return _OK, n


@kernel
def apply_gradients_batch(
    idx64: np.ndarray, idx32: np.ndarray, arena64: np.ndarray, arena32: np.ndarray,
    arenav: np.ndarray, voff: int, keys: np.ndarray, grads: np.ndarray, lr: float,
    opt: int, hp: np.ndarray, found: np.ndarray, ctx: np.ndarray, lim: float, skip: bool,
) -> tuple[int, int, int]:
    """Writer only. One optimizer step per distinct present key, duplicates summed.

    Duplicates are grouped in O(B) with a small open-addressing map from row to
    the key's first position and a chain through the later positions, so the
    summed gradient is built once per row without sorting. Absent and expired
    keys are skipped (found[i] = False). Updated rows count as accessed, and get
    the expiry ctx[CTX_REFRESH] when it is set.

    Each step is computed into a scratch row and copied in under the bucket's
    seqlock only if every new element is finite below ``lim`` (a NaN or inf
    gradient, or an overflow). With ``skip`` such rows are left as they were
    (found = False at each of the key's positions); without it a first pass
    computes every step and the batch is refused whole, nothing written, if
    any is not finite. That pass is the policy's cost: measured (16,384 keys of
    D=64 float32 Adagrad in a 400 k-row table, best of 40, 3 runs interleaved),
    the kernel before this check ran 2.8 M keys/s; "raise" 2.2-2.8 and "skip"
    3.7-4.2 with the row prefetch added beside the check (1.2-1.6 without it).

    Requires: keys uint64 (B,); grads (B, D) float32/float64; found bool (B,).
    Returns ``(rows updated, rows not finite, position of the first of those or -1)``.
    """
    n = keys.shape[0]
    dim = grads.shape[1]
    mask = np.uint64(idx64.shape[0] - 1)
    now = ctx[CTX_NOW]
    exp_w = ctx[CTX_EXPIRE_W]
    refresh = ctx[CTX_REFRESH]
    rows = np.empty(n, np.int64)
    bks = np.empty(n, np.int64)
    for base in range(0, n, GROUP):
        g = min(GROUP, n - base)
        for j in range(g):
            h = hash_key(keys[base + j], ctx[CTX_HASH_K0], ctx[CTX_HASH_K1])
            prefetch(idx64, np.int64(h & mask))
        for j in range(g):
            i = base + j
            h = hash_key(keys[i], ctx[CTX_HASH_K0], ctx[CTX_HASH_K1])
            t = tag_of(h)
            b1 = np.int64(h & mask)
            b, _, r = locate(idx64, idx32, arena64, keys[i], b1, alt_bucket(b1, t, mask), t)
            if r >= 0 and expired(arena32, r, exp_w, now):
                r = -1
            rows[i] = r
            bks[i] = b
            found[i] = r >= 0
    size = 1
    while size < 2 * n:
        size *= 2
    slots = np.full(size, -1, np.int64)
    nxt = np.full(n, -1, np.int64)
    last = np.empty(n, np.int64)
    lead = np.zeros(n, np.bool_)
    smask = np.uint64(size - 1)
    for i in range(n):
        r = rows[i]
        if r < 0:
            continue
        p = np.int64(mix64(np.uint64(r)) & smask)
        while True:
            f = slots[p]
            if f < 0:
                slots[p] = i
                lead[i] = True
                last[i] = i
                break
            if rows[f] == r:
                nxt[last[f]] = i
                last[f] = i
                break
            p = (p + 1) & np.int64(smask)
    gsum = np.empty(dim, np.float64)
    width = dim + state_elems(opt, dim)
    new = np.empty(width, arenav.dtype)
    bad = 0
    first = -1
    # Rows are prefetched AHEAD keys ahead in both passes: random rows otherwise
    # cost a full miss each, and the second pass of "raise" finds them in cache.
    lines = (width * arenav.itemsize + 63) // 64  # 64-byte lines of a row's embedding and state
    line_elems = 64 // arenav.itemsize
    if not skip:
        for i in range(n):
            if i + AHEAD < n and lead[i + AHEAD]:
                for ln in range(lines):
                    prefetch2(arenav, rows[i + AHEAD], voff + ln * line_elems)
            if lead[i]:
                _sum_grads(grads, i, nxt, gsum)
                if not step_row(arenav[rows[i], voff:], new, dim, gsum, lr, opt, hp, lim):
                    bad += 1
                    first = i if first < 0 else first
        if bad:
            return 0, bad, first
    updated = 0
    for i in range(n):
        if i + AHEAD < n and lead[i + AHEAD]:
            for ln in range(lines):
                prefetch2(arenav, rows[i + AHEAD], voff + ln * line_elems)
        if not lead[i]:
            continue
        _sum_grads(grads, i, nxt, gsum)
        r = rows[i]
        if not step_row(arenav[r, voff:], new, dim, gsum, lr, opt, hp, lim):
            bad += 1
            first = i if first < 0 else first
            k = i
            while k >= 0:
                found[k] = False
                k = nxt[k]
            continue
        lock(idx32, bks[i])
        dst = arenav[r, voff:]
        for d in range(width):
            dst[d] = new[d]
        if refresh != 0 and exp_w != 0:
            arena32[r, exp_w] = np.uint32(refresh)
        touch(arena32, r, ctx[CTX_POLICY], now, ctx[CTX_DECAY_MIN])
        arena32[r, STAMP] += np.uint32(2)
        unlock(idx32, bks[i])
        updated += 1
    return updated, bad, first


@inline
def _sum_grads(grads: np.ndarray, i: int, nxt: np.ndarray, gsum: np.ndarray) -> None:
    """gsum = the gradients of position i and of its repeats (chained through ``nxt``)."""
    dim = gsum.shape[0]
    for d in range(dim):
        gsum[d] = grads[i, d]
    k = nxt[i]
    while k >= 0:
        for d in range(dim):
            gsum[d] += grads[k, d]
        k = nxt[k]


@kernel
def reclaim_keys(
    idx64: np.ndarray, idx32: np.ndarray, idx8: np.ndarray, arena64: np.ndarray,
    arena32: np.ndarray, arenav: np.ndarray, cnt: np.ndarray, free: np.ndarray,
    voff: int, dim: int, keys: np.ndarray, ctx: np.ndarray,
    ev_keys: np.ndarray, ev_vals: np.ndarray, ev_why: np.ndarray,
) -> int:
    """Writer only. Remove each of ``keys`` whose row has expired; report them.

    ``keys`` are the entries of passed expiry slices: keys whose expiry was
    refreshed since, or that were erased, are skipped. Work is proportional to
    the entries, not to the table.

    Requires: keys uint64 (K,); ev_keys (K,), ev_vals (K, D) or (0, D).
    Returns the number removed.
    """
    n = keys.shape[0]
    mask = np.uint64(idx64.shape[0] - 1)
    now = ctx[CTX_NOW]
    exp_w = ctx[CTX_EXPIRE_W]
    removed = 0
    for base in range(0, n, GROUP):
        g = min(GROUP, n - base)
        for j in range(g):
            prefetch(idx64, np.int64(hash_key(keys[base + j], ctx[CTX_HASH_K0], ctx[CTX_HASH_K1]) & mask))
        for j in range(g):
            key = keys[base + j]
            h = hash_key(key, ctx[CTX_HASH_K0], ctx[CTX_HASH_K1])
            t = tag_of(h)
            b1 = np.int64(h & mask)
            b, s, r = locate(idx64, idx32, arena64, key, b1, alt_bucket(b1, t, mask), t)
            if r >= 0 and expired(arena32, r, exp_w, now):
                _remove(idx32, idx8, arena64, arena32, arenav, cnt, free, voff, dim,
                        b, s, r, ev_keys, ev_vals, ctx, ev_why, 1)
                removed += 1
    return removed


@kernel
def compact_step(
    idx64: np.ndarray, idx32: np.ndarray, arena64: np.ndarray, arena32: np.ndarray,
    arenav: np.ndarray, cnt: np.ndarray, holes: np.ndarray, h0: int, max_moves: int,
    k0: int, k1: int,
) -> tuple[int, int]:
    """Writer only. Move up to ``max_moves`` rows from the arena's tail into holes.

    ``holes`` are the free rows in ascending order, from position ``h0``. Each
    move copies the highest live row into the lowest hole and repoints its index
    slot, both under the seqlock of the key's bucket (a reader of that key
    retries), then the high-water mark drops past the rows now free.

    Returns ``(next hole position, moves)``. The caller rebuilds the free list
    from the holes left below the new high-water mark.
    """
    mask = np.uint64(idx64.shape[0] - 1)
    words = arenav.shape[1]
    high = cnt[CNT_HIGH]
    h = h0
    moves = 0
    while moves < max_moves:
        while high > 0 and not (arena32[high - 1, STAMP] & np.uint32(1)):
            high -= 1
        if h >= holes.shape[0] or high == 0 or np.int64(holes[h]) >= high - 1:
            break
        src = high - 1
        dst = np.int64(holes[h])
        key = arena64[src, 0]
        hh = hash_key(key, k0, k1)
        t = tag_of(hh)
        b1 = np.int64(hh & mask)
        b, s, _ = locate(idx64, idx32, arena64, key, b1, alt_bucket(b1, t, mask), t)
        lock(idx32, b)
        drow = arenav[dst]  # the whole row, header included (its stamp stays the data's)
        srow = arenav[src]
        for w in range(words):
            drow[w] = srow[w]
        idx32[b, ROW0 + s] = np.uint32(dst)
        arena32[src, STAMP] &= ~np.uint32(1)
        unlock(idx32, b)
        h += 1
        moves += 1
        high -= 1
    while high > 0 and not (arena32[high - 1, STAMP] & np.uint32(1)):
        high -= 1
    cnt[CNT_HIGH] = high
    return h, moves


@kernel
def export_rows(
    arena64: np.ndarray, arena32: np.ndarray, arenav: np.ndarray, voff: int,
    lo: int, hi: int, keys_out: np.ndarray, vals_out: np.ndarray, ctx: np.ndarray,
) -> int:
    """Writer only. Copy live, unexpired rows lo <= r < hi: keys, then W elements from the embedding.

    Requires: keys_out uint64 (hi-lo,); vals_out (hi-lo, W). Returns rows copied.
    """
    width = vals_out.shape[1]
    now = ctx[CTX_NOW]
    exp_w = ctx[CTX_EXPIRE_W]
    c = 0
    for r in range(lo, hi):
        if arena32[r, STAMP] & np.uint32(1) and not expired(arena32, r, exp_w, now):
            keys_out[c] = arena64[r, 0]
            src = arenav[r, voff:]
            for d in range(width):
                vals_out[c, d] = src[d]
            c += 1
    return c
