"""Kernels of the sequence store: append, erase, expiry sweep, index rebuild, and the readers.

Owns: the user-record format, the size-class table format, and every kernel
``sequence.py`` calls. Inputs are checked by the caller (``Requires:`` lines say
what); kernels return a ``Status`` code (and the event they stopped at), never
raise. It must not touch the index's bucket format beyond ``_index``'s helpers.

User record (one 32-byte row per user in the user arena; "key in row", so the
cuckoo index of ``_index`` holds only a tag and the row number)::

    uint64  word 0   user id (what ``_index.locate`` compares)
    float64 word 1   clock() of the user's last append (TTL)
    int32   word 4   version: the record's seqlock (odd while the writer changes
                     the record or the user's ring)
    int32   word 5   slot within the user's size class
    int32   word 6   ring position of the user's oldest event
    int32   word 7   size class << 24 | events held (-1: a free row)

Events live in flat per-field arrays, passed as ``ev = (items uint64, acts
uint8/uint16, tss int64, ext (E, T) float32)``. Size class c owns positions
``base[c] + [0, maxslots[c] * cap[c])`` of each; slot s of class c is the ring
``base[c] + s * cap[c] + [0, cap[c])``. A class's slots are kept dense: freeing
slot s moves the class's last slot into it (``owner`` maps a slot back to its
user row, whose record is updated), so events in use are exactly
``sum(nslots[c] * cap[c])``.

Class table ``cls`` int64 (C, 5): cap, base, maxslots, owner base, nslots (the
last changed by the writer only; readers use the first three, which never change).

Thread safety: the readers (``lengths_batch``, ``read_ragged``,
``read_last_batch``) may run on any number of threads beside one writer; every
other kernel is writer only (the caller holds the store's writer lock). Two
seqlocks: the index's per-bucket versions guard the map from user to row (as in
the embedding table), and each record's version guards the record and the
user's ring. The writer changes a record or a ring only between
``_lock_rec``/``_unlock_rec`` of that row, so a reader that finds the user's row
under the bucket seqlock, then reads the record and copies the ring between two
equal, even reads of the record's version, has one state of the sequence. A
torn record is clamped to the reservations before it addresses anything, so
even a read that will be retried stays inside mapped memory. Rows are never
moved; a row freed and reused holds another key or the free mark, which the
reader checks.
"""


from __future__ import annotations

from enum import IntEnum
from typing import Any

import numpy as np
from numba import types
from numba.extending import intrinsic

from streamrec.store._index import (
    ROW0,
    VER,
    alt_bucket,
    hash_key,
    locate,
    make_room,
    match,
    publish,
    tag_of,
    unpublish,
)
from streamrec.store._jit import barrier, ctz, inline, kernel, load_acquire, prefetch

__all__ = [
    "CNT_EVENTS",
    "CNT_FREE",
    "CNT_HAND",
    "CNT_HIGH",
    "CNT_LIVE",
    "C_BASE",
    "C_CAP",
    "C_MAXSLOTS",
    "C_NSLOTS",
    "C_OBASE",
    "LEN_BITS",
    "USER_BYTES",
    "U_HEAD",
    "U_LC",
    "U_SLOT",
    "U_VER",
    "Status",
    "append_batch",
    "count_live",
    "erase_batch",
    "lengths_batch",
    "read_last_batch",
    "read_ragged",
    "sweep",
]


class Status(IntEnum):
    """What a kernel reports; ``sequence.py`` turns all but OK into retries or errors."""

    OK = 0
    STALE = 1  # the index was replaced while reading: retry on the new one
    INDEX_FULL = 2  # no slot even after displacement: grow the index, resume
    CLASS_FULL = 3  # a size class's reservation of events is used up
    USERS_FULL = 4  # the user arena's reservation is used up
    BUSY = 5  # a bucket or record stayed locked through SPIN retries


_OK, _STALE, _INDEX_FULL, _CLASS_FULL, _USERS_FULL, _BUSY = 0, 1, 2, 3, 4, 5

USER_BYTES = 32
LEN_BITS = 24  # events held share word 7 with the class: max_len < 2**24
_LEN_MASK = (1 << LEN_BITS) - 1
_FREE = -1  # word 7 of a free row
U_STAMP = 1  # float64 word
U_VER, U_SLOT, U_HEAD, U_LC = 4, 5, 6, 7  # int32 words

C_CAP, C_BASE, C_MAXSLOTS, C_OBASE, C_NSLOTS = 0, 1, 2, 3, 4

CNT_HIGH = 0  # user rows ever handed out
CNT_FREE = 1  # user rows on the free list
CNT_LIVE = 2  # users in the index (expired ones until the sweep reaches them)
CNT_HAND = 3  # the expiry sweep's next row
CNT_EVENTS = 4  # events held

GROUP = 32  # events hashed and prefetched together by the writer, in four passes
AHEAD = 8  # bucket prefetch distance of the readers, in users
_SPIN = 1 << 16  # reader retries of one user before reporting BUSY

_ONE = np.uint64(1)
_ZERO = np.uint64(0)


# -- helpers -----------------------------------------------------------------------


def _borrow_impl(typingctx: Any, arr: Any) -> Any:
    """``arr`` without its reference count: a view whose meminfo is NULL.

    numba increfs and decrefs every array an inlined helper receives (atomic
    operations its pruning pass cannot remove across branches); on a borrowed
    view those calls see NULL and do nothing. Measured: they were a quarter of
    the time of a ring move. Safe only while the caller holds ``arr`` (a kernel
    borrows its own arguments, which live for the whole call).
    """
    if not isinstance(arr, types.Array):
        return None
    sig = arr(arr)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        aryty = signature.args[0]
        src = context.make_array(aryty)(context, builder, args[0])
        dst = context.make_array(aryty)(context, builder)
        for name in ("nitems", "itemsize", "data", "shape", "strides"):
            setattr(dst, name, getattr(src, name))
        dst.meminfo = context.get_constant_null(types.MemInfoPointer(types.voidptr))
        dst.parent = context.get_constant_null(types.pyobject)
        return dst._getvalue()

    return sig, codegen


_borrow: Any = intrinsic(_borrow_impl)


@inline
def _borrow4(t: tuple) -> tuple:
    return _borrow(t[0]), _borrow(t[1]), _borrow(t[2]), _borrow(t[3])


@inline
def _lock_rec(users32: np.ndarray, r: int) -> None:
    """Writer only. Make row r's version odd: its readers will retry."""
    users32[r, U_VER] += np.int32(1)
    barrier()


@inline
def _unlock_rec(users32: np.ndarray, r: int) -> None:
    barrier()
    users32[r, U_VER] += np.int32(1)


@inline
def _lc(c: int, n: int) -> np.int32:
    return np.int32((c << LEN_BITS) | n)


@inline
def _expired(usersf: np.ndarray, r: int, now: float, ttl: float) -> bool:
    return ttl > 0.0 and now - usersf[r, U_STAMP] > ttl


@inline
def _record(users32: np.ndarray, cls: np.ndarray, r: int) -> tuple[int, int, int, int]:
    """``(ring start, cap, head, len)`` of row r, clamped into the reservations.

    A reader may see a record half-written; clamping keeps every address it
    derives inside the class's reserved range (the read is then retried).
    """
    w = np.int64(users32[r, U_LC])
    c = w >> LEN_BITS
    if c < 0:
        c = np.int64(0)
    elif c >= cls.shape[0]:
        c = np.int64(cls.shape[0] - 1)
    cap = cls[c, C_CAP]
    slot = np.int64(users32[r, U_SLOT])
    if slot < 0 or slot >= cls[c, C_MAXSLOTS]:
        slot = np.int64(0)
    head = np.int64(users32[r, U_HEAD])
    if head < 0 or head >= cap:
        head = np.int64(0)
    n = w & _LEN_MASK
    if n > cap:
        n = np.int64(0)
    return cls[c, C_BASE] + slot * cap, cap, head, n


@inline
def _copy_run(ev: tuple, src: int, out: tuple, dst: int, count: int) -> None:
    """Copy ``count`` events from flat position ``src`` of ``ev`` to ``dst`` of ``out``.

    Indices are unsigned, so numba emits no negative-index test and the loops
    vectorise (measured: 10,000 uint64 in 1.6 us, a slice copy's speed, 5x a
    signed-index loop) without the reference counting of slices.
    """
    if count <= 0:
        return
    items, acts, tss, ext = ev
    o_items, o_acts, o_tss, o_ext = out
    s = np.uint64(src)
    d = np.uint64(dst)
    m = np.uint64(count)
    for j in range(m):
        o_items[d + j] = items[s + j]
    for j in range(m):
        o_acts[d + j] = acts[s + j]
    for j in range(m):
        o_tss[d + j] = tss[s + j]
    for e in range(ext.shape[0]):
        for j in range(m):
            o_ext[e, d + j] = ext[e, s + j]


@inline
def _copy_ring(ev: tuple, start: int, cap: int, head: int, lo: int, count: int,
               out: tuple, dst: int) -> None:
    """Copy events lo..lo+count-1 (0 = the oldest) of a ring to dst.. of ``out``, in order."""
    p = head + lo
    if p >= cap:
        p -= cap
    first = min(count, cap - p)
    _copy_run(ev, start + p, out, dst, first)
    _copy_run(ev, start, out, dst + first, count - first)


@inline
def _put(ev: tuple, p: int, batch: tuple, i: int) -> None:
    items, acts, tss, ext = ev
    e_items, e_acts, e_tss, e_ext = batch
    items[p] = e_items[i]
    acts[p] = e_acts[i]
    tss[p] = e_tss[i]
    for e in range(ext.shape[0]):
        ext[e, p] = e_ext[e, i]


@inline
def _where(idx64: np.ndarray, idx32: np.ndarray, users64: np.ndarray, r: int, hk: np.ndarray
           ) -> tuple[int, int]:
    """Writer only. ``(bucket, slot)`` of the index entry of live user row r."""
    mask = np.uint64(idx64.shape[0] - 1)
    key = users64[r, 0]
    h = hash_key(key, hk[0], hk[1])
    t = tag_of(h)
    b1 = np.int64(h & mask)
    b, s, _ = locate(idx64, idx32, users64, key, b1, alt_bucket(b1, t, mask), t)
    return b, s


@inline
def _free_slot(users32: np.ndarray, cls: np.ndarray, owner: np.ndarray, ev: tuple,
               c: int, s: int) -> None:
    """Writer only. Free slot s of class c, moving the class's last slot into it.

    The moved user's events go oldest-first to the start of slot s (its head
    becomes 0), under its record's lock.
    """
    last = cls[c, C_NSLOTS] - 1
    if s != last:
        y = np.int64(owner[cls[c, C_OBASE] + last])
        cap = cls[c, C_CAP]
        _lock_rec(users32, y)
        _copy_ring(ev, cls[c, C_BASE] + last * cap, cap, np.int64(users32[y, U_HEAD]), 0,
                   np.int64(users32[y, U_LC]) & _LEN_MASK, ev, cls[c, C_BASE] + s * cap)
        users32[y, U_SLOT] = np.int32(s)
        users32[y, U_HEAD] = np.int32(0)
        _unlock_rec(users32, y)
        owner[cls[c, C_OBASE] + s] = np.uint32(y)
    cls[c, C_NSLOTS] = last


@inline
def _relocate(users32: np.ndarray, cls: np.ndarray, owner: np.ndarray, ev: tuple,
              r: int, c2: int, keep: int) -> None:
    """Writer only, with row r locked. Move user r to a new slot of class c2.

    Keeps r's newest ``keep`` events, oldest-first from the slot's start. The
    caller checked that class c2 has a free slot.
    """
    w = np.int64(users32[r, U_LC])
    c = w >> LEN_BITS
    s = np.int64(users32[r, U_SLOT])
    cap = cls[c, C_CAP]
    s2 = cls[c2, C_NSLOTS]
    cls[c2, C_NSLOTS] = s2 + 1
    _copy_ring(ev, cls[c, C_BASE] + s * cap, cap, np.int64(users32[r, U_HEAD]),
               (w & _LEN_MASK) - keep, keep, ev, cls[c2, C_BASE] + s2 * cls[c2, C_CAP])
    owner[cls[c2, C_OBASE] + s2] = np.uint32(r)
    users32[r, U_SLOT] = np.int32(s2)
    users32[r, U_HEAD] = np.int32(0)
    users32[r, U_LC] = _lc(c2, keep)
    _free_slot(users32, cls, owner, ev, c, s)


@inline
def _drop(idx32: np.ndarray, idx8: np.ndarray, users32: np.ndarray, cls: np.ndarray,
          owner: np.ndarray, free_rows: np.ndarray, cnt: np.ndarray, ev: tuple,
          r: int, b: int, s: int) -> None:
    """Writer only. Remove user r (in slot s of bucket b): its events, row and index entry."""
    w = np.int64(users32[r, U_LC])
    _lock_rec(users32, r)
    users32[r, U_LC] = np.int32(_FREE)
    _unlock_rec(users32, r)
    if b >= 0:  # always: r is live, so the index holds it
        unpublish(idx32, idx8, b, s)
    cnt[CNT_EVENTS] -= w & _LEN_MASK
    _free_slot(users32, cls, owner, ev, w >> LEN_BITS, np.int64(users32[r, U_SLOT]))
    free_rows[cnt[CNT_FREE]] = np.uint32(r)
    cnt[CNT_FREE] += 1
    cnt[CNT_LIVE] -= 1


@inline
def _candidate(idx64: np.ndarray, idx32: np.ndarray, b1: int, b2: int, tag: int) -> int:
    """The row of the first slot of b1, else b2, whose tag matches (-1 if none): a prefetch hint."""
    m = match(idx64, b1, tag)
    if m != _ZERO:
        return np.int64(idx32[b1, ROW0 + np.int64(ctz(m))])
    m = match(idx64, b2, tag)
    if m != _ZERO:
        return np.int64(idx32[b2, ROW0 + np.int64(ctz(m))])
    return np.int64(-1)


# -- writer kernels ------------------------------------------------------------------


@kernel
def append_batch(
    index: tuple, users: tuple, free_rows: np.ndarray, cnt: np.ndarray, cls: np.ndarray,
    owner: np.ndarray, ev: tuple, e_users: np.ndarray, batch: tuple, start: int, now: float,
    ttl: float, nodes: np.ndarray,
) -> tuple[int, int]:
    """Writer only. Append events start.. in batch order, each to its user's ring.

    A new user gets a row and a slot of class 0; a user whose ring is full moves
    to the next class (twice the capacity, at most max_len), or, in the top
    class, overwrites its oldest event. A user past its TTL (``ttl`` > 0) is
    first emptied (moved back to class 0). Events are placed in groups of
    ``GROUP``, four passes each, so the misses of a group overlap: hash and
    prefetch both buckets; find the first tag match and prefetch its record;
    prefetch where its event will go; place every event in order.

    Requires: index = (idx64, idx32, idx8, hash key uint64 (2,)); users = (users64, users32, usersf);
    ev the arena (module doc); e_users uint64 (B,); batch = (items uint64 (B,),
    actions (B,) of the arena's dtype, timestamps int64 (B,), extras float32
    (E, B)); nodes int64 (MAX_BFS_NODES, 3).

    Returns ``(status, position)``: OK with B, or INDEX_FULL / CLASS_FULL /
    USERS_FULL with the first event not appended (nothing of it was written).
    """
    idx64, idx32, idx8 = _borrow(index[0]), _borrow(index[1]), _borrow(index[2])
    hk = index[3]
    users64, users32, usersf = _borrow(users[0]), _borrow(users[1]), _borrow(users[2])
    free_rows, cnt, cls, owner = _borrow(free_rows), _borrow(cnt), _borrow(cls), _borrow(owner)
    ev = _borrow4(ev)
    batch = _borrow4(batch)
    items, acts, tss, _ = ev
    n = e_users.shape[0]
    mask = np.uint64(idx64.shape[0] - 1)
    top = cls.shape[0] - 1
    max_rows = users64.shape[0]
    b1s = np.empty(GROUP, np.int64)
    b2s = np.empty(GROUP, np.int64)
    tags = np.empty(GROUP, np.uint64)
    cands = np.empty(GROUP, np.int64)
    for base in range(start, n, GROUP):
        g = min(GROUP, n - base)
        for j in range(g):  # (A) hash, prefetch both buckets
            h = hash_key(e_users[base + j], hk[0], hk[1])
            t = tag_of(h)
            b1 = np.int64(h & mask)
            b1s[j] = b1
            b2s[j] = alt_bucket(b1, t, mask)
            tags[j] = t
            prefetch(idx64, b1)
            prefetch(idx64, b2s[j])
        for j in range(g):  # (B) first tag match: prefetch that user's record
            cands[j] = _candidate(idx64, idx32, b1s[j], b2s[j], tags[j])
            if cands[j] >= 0:
                prefetch(users64, cands[j])
        for j in range(g):  # (C) prefetch where the event will go (stale for repeats: harmless)
            if cands[j] >= 0:
                rs, rcap, rhead, rn = _record(users32, cls, cands[j])
                p = rhead + rn
                p = rs + (p - rcap if p >= rcap else p)
                prefetch(items, p)
                prefetch(tss, p)
                prefetch(acts, p)
        for j in range(g):  # (D) place each event, in order
            i = base + j
            key = e_users[i]
            b, s, r = locate(idx64, idx32, users64, key, b1s[j], b2s[j], tags[j])
            if r < 0:
                if cnt[CNT_FREE] == 0 and cnt[CNT_HIGH] >= max_rows:
                    return _USERS_FULL, i
                if cls[0, C_NSLOTS] >= cls[0, C_MAXSLOTS]:
                    return _CLASS_FULL, i
                b, s = make_room(idx64, idx32, idx8, b1s[j], b2s[j], mask, nodes)
                if b < 0:
                    return _INDEX_FULL, i
                if cnt[CNT_FREE] > 0:
                    cnt[CNT_FREE] -= 1
                    r = np.int64(free_rows[cnt[CNT_FREE]])
                else:
                    r = cnt[CNT_HIGH]
                    cnt[CNT_HIGH] += 1
                slot = cls[0, C_NSLOTS]
                cls[0, C_NSLOTS] = slot + 1
                owner[cls[0, C_OBASE] + slot] = np.uint32(r)
                _lock_rec(users32, r)  # a reused row: stale readers of its old user must retry
                users64[r, 0] = key
                usersf[r, U_STAMP] = now
                users32[r, U_SLOT] = np.int32(slot)
                users32[r, U_HEAD] = np.int32(0)
                users32[r, U_LC] = _lc(0, 1)
                _put(ev, cls[0, C_BASE] + slot * cls[0, C_CAP], batch, i)
                _unlock_rec(users32, r)
                publish(idx32, idx8, b, s, tags[j], r)
                cnt[CNT_LIVE] += 1
                cnt[CNT_EVENTS] += 1
                continue
            w = np.int64(users32[r, U_LC])
            c = w >> LEN_BITS
            ln = w & _LEN_MASK
            expired = _expired(usersf, r, now, ttl)
            grow = (not expired) and ln == cls[c, C_CAP] and c < top
            if expired and c != 0 and cls[0, C_NSLOTS] >= cls[0, C_MAXSLOTS]:
                return _CLASS_FULL, i
            if grow and cls[c + 1, C_NSLOTS] >= cls[c + 1, C_MAXSLOTS]:
                return _CLASS_FULL, i
            _lock_rec(users32, r)
            if expired:
                cnt[CNT_EVENTS] -= ln
                if c != 0:
                    _relocate(users32, cls, owner, ev, r, 0, 0)
                    c = np.int64(0)
                users32[r, U_HEAD] = np.int32(0)
                ln = np.int64(0)
            elif grow:
                _relocate(users32, cls, owner, ev, r, c + 1, ln)
                c += 1
            cap = cls[c, C_CAP]
            head = np.int64(users32[r, U_HEAD])
            if ln < cap:
                p = head + ln
                if p >= cap:
                    p -= cap
                users32[r, U_LC] = _lc(c, ln + 1)
                cnt[CNT_EVENTS] += 1
            else:  # full at max_len: the newest event takes the oldest one's place
                p = head
                head += 1
                users32[r, U_HEAD] = np.int32(head if head < cap else 0)
            _put(ev, cls[c, C_BASE] + np.int64(users32[r, U_SLOT]) * cap + p, batch, i)
            usersf[r, U_STAMP] = now
            _unlock_rec(users32, r)
    return _OK, n


@kernel
def erase_batch(index: tuple, users: tuple, free_rows: np.ndarray, cnt: np.ndarray,
                cls: np.ndarray, owner: np.ndarray, ev: tuple, keys: np.ndarray, now: float,
                ttl: float, found: np.ndarray) -> int:
    """Writer only. Remove the users ``keys``; found[i] = it held an unexpired sequence.

    Requires: as ``append_batch``; keys uint64 (B,); found bool (B,).
    Returns the users removed.
    """
    idx64, idx32, idx8 = _borrow(index[0]), _borrow(index[1]), _borrow(index[2])
    hk = index[3]
    users64, users32, usersf = _borrow(users[0]), _borrow(users[1]), _borrow(users[2])
    ev = _borrow4(ev)
    mask = np.uint64(idx64.shape[0] - 1)
    removed = 0
    for i in range(keys.shape[0]):
        key = keys[i]
        h = hash_key(key, hk[0], hk[1])
        t = tag_of(h)
        b1 = np.int64(h & mask)
        b, s, r = locate(idx64, idx32, users64, key, b1, alt_bucket(b1, t, mask), t)
        if r < 0:
            found[i] = False
            continue
        found[i] = not _expired(usersf, r, now, ttl)
        _drop(idx32, idx8, users32, cls, owner, free_rows, cnt, ev, r, b, s)
        removed += 1
    return removed


@kernel
def sweep(index: tuple, users: tuple, free_rows: np.ndarray, cnt: np.ndarray, cls: np.ndarray,
          owner: np.ndarray, ev: tuple, rows: int, now: float, ttl: float) -> int:
    """Writer only. Visit the next ``rows`` user rows (a clock hand) and drop the expired.

    Returns the users dropped. ``rows`` >= the high-water mark visits every row.
    """
    idx64, idx32, idx8 = _borrow(index[0]), _borrow(index[1]), _borrow(index[2])
    hk = index[3]
    users64, users32, usersf = _borrow(users[0]), _borrow(users[1]), _borrow(users[2])
    ev = _borrow4(ev)
    high = cnt[CNT_HIGH]
    if high == 0 or ttl <= 0.0:
        return 0
    hand = cnt[CNT_HAND]
    dropped = 0
    for _ in range(min(rows, high)):
        if hand >= high:
            hand = 0
        r = hand
        hand += 1
        if users32[r, U_LC] < 0 or not _expired(usersf, r, now, ttl):
            continue
        b, s = _where(idx64, idx32, users64, r, hk)
        _drop(idx32, idx8, users32, cls, owner, free_rows, cnt, ev, r, b, s)
        dropped += 1
    cnt[CNT_HAND] = hand
    return dropped


@kernel
def count_live(users32: np.ndarray, usersf: np.ndarray, high: int, now: float, ttl: float) -> int:
    """Users in rows below ``high`` holding a sequence that has not expired (a plain scan)."""
    c = 0
    for r in range(high):
        if users32[r, U_LC] > 0 and not _expired(usersf, r, now, ttl):
            c += 1
    return c


# -- readers: any thread ---------------------------------------------------------------


@inline
def _pin(idx64: np.ndarray, idx32: np.ndarray, retired: np.ndarray, users64: np.ndarray,
         key: int, b1: int, b2: int, tag: int) -> tuple[int, int]:
    """``(status, row)``: the row the index maps ``key`` to (-1: absent), read under the
    buckets' seqlock (found in a bucket: that bucket's version held; absent: both)."""
    for _ in range(_SPIN):
        v1 = load_acquire(idx32, b1, VER)
        v2 = load_acquire(idx32, b2, VER)
        if (v1 | v2) & np.uint32(1):
            if retired[0] != 0:
                return _STALE, np.int64(-1)
            continue
        row = np.int64(-1)
        ok = False
        m = match(idx64, b1, tag)
        while m != _ZERO:
            r = np.int64(idx32[b1, ROW0 + np.int64(ctz(m))])
            if users64[r, 0] == key:
                row = r
                break
            m &= m - _ONE
        barrier()
        if row >= 0:
            ok = idx32[b1, VER] == v1
        else:
            m = match(idx64, b2, tag)
            while m != _ZERO:
                r = np.int64(idx32[b2, ROW0 + np.int64(ctz(m))])
                if users64[r, 0] == key:
                    row = r
                    break
                m &= m - _ONE
            barrier()
            ok = idx32[b2, VER] == v2 and (row >= 0 or idx32[b1, VER] == v1)
        if retired[0] != 0:
            return _STALE, np.int64(-1)
        if ok:
            return _OK, row
    return _BUSY, np.int64(-1)


@inline
def _hash_all(keys: np.ndarray, mask: int, b1s: np.ndarray, b2s: np.ndarray, tags: np.ndarray,
              hk: np.ndarray) -> None:
    for i in range(keys.shape[0]):
        h = hash_key(keys[i], hk[0], hk[1])
        t = tag_of(h)
        b1 = np.int64(h & mask)
        b1s[i] = b1
        b2s[i] = alt_bucket(b1, t, mask)
        tags[i] = t


@kernel
def _user_read(index: tuple, users: tuple, cls: np.ndarray, ev: tuple, keys: np.ndarray,
               now: float, ttl: float, mode: int, arg: np.ndarray, out: tuple, width: int,
               mismatched: np.ndarray) -> int:
    """The three readers in one loop (``mode``: 0 lengths, 1 ragged copy, 2 last ``width``).

    Per user: find its row under the bucket seqlock, then read its record (and
    copy its ring) between two equal even reads of the record's version; a row
    that now holds another key or the free mark means the user was erased
    meanwhile (reported empty). Retried until stable.
    """
    idx64, idx32, retired = _borrow(index[0]), _borrow(index[1]), _borrow(index[2])
    users64, users32, usersf = _borrow(users[0]), _borrow(users[1]), _borrow(users[2])
    cls, arg = _borrow(cls), _borrow(arg)
    ev = _borrow4(ev)
    out = _borrow4(out)
    o_items, o_acts, o_tss, o_ext = out
    n = keys.shape[0]
    mask = np.uint64(idx64.shape[0] - 1)
    b1s = np.empty(n, np.int64)
    b2s = np.empty(n, np.int64)
    tags = np.empty(n, np.uint64)
    _hash_all(keys, mask, b1s, b2s, tags, index[3])
    for i in range(min(AHEAD, n)):
        prefetch(idx64, b1s[i])
    for i in range(n):
        if i + AHEAD < n:
            prefetch(idx64, b1s[i + AHEAD])
        key = keys[i]
        want = arg[i + 1] - arg[i] if mode == 1 else np.int64(0)
        ln = np.int64(0)
        k = np.int64(0)
        done = False
        for _ in range(_SPIN):
            ln = np.int64(0)
            k = np.int64(0)
            st, r = _pin(idx64, idx32, retired, users64, key, b1s[i], b2s[i], tags[i])
            if st != _OK:
                return st
            if r < 0:
                done = True
                break
            v = load_acquire(users32, r, U_VER)
            if v & np.int32(1):
                continue
            if users64[r, 0] == key and users32[r, U_LC] >= 0 and not _expired(usersf, r, now, ttl):
                start, cap, head, ln = _record(users32, cls, r)
                if mode == 1 and ln == want:
                    _copy_ring(ev, start, cap, head, 0, ln, out, arg[i])
                elif mode == 2:
                    k = ln if ln < width else np.int64(width)
                    _copy_ring(ev, start, cap, head, ln - k, k, out, i * width + width - k)
            barrier()
            if users32[r, U_VER] == v:
                done = True
                break
        if not done:
            return _BUSY
        if mode == 0:
            arg[i] = ln
        elif mode == 1:
            if ln != want:
                mismatched[0] += 1
        else:
            arg[i] = k
            row = i * width
            pad = np.uint64(width - k)
            for j in range(pad):
                o_items[row + j] = 0
                o_acts[row + j] = 0
                o_tss[row + j] = 0
            for e in range(o_ext.shape[0]):
                for j in range(pad):
                    o_ext[e, row + j] = 0
    return _OK


def lengths_batch(index: tuple, users: tuple, cls: np.ndarray, ev: tuple, keys: np.ndarray,
                  now: float, ttl: float, out: np.ndarray, empty: tuple) -> int:
    """Events held by each user (0: unknown or expired). Any thread.

    Requires: index = (idx64, idx32, retired, hash key uint64 (2,)); users = (users64, users32,
    usersf); keys uint64 (B,); out int64 (B,); ``empty`` a zero-length output
    tuple like ``read_ragged``'s. Returns OK, STALE or BUSY.
    """
    return int(_user_read(index, users, cls, ev, keys, now, ttl, 0, out, empty, 0, _NO_COUNT))


def read_ragged(index: tuple, users: tuple, cls: np.ndarray, ev: tuple, keys: np.ndarray,
                now: float, ttl: float, offsets: np.ndarray, out: tuple, mismatched: np.ndarray) -> int:
    """Copy each user's whole sequence, oldest first, to offsets[i]..offsets[i+1] of ``out``.

    A user whose length is no longer offsets[i+1] - offsets[i] (the writer
    changed it since the lengths were taken) is counted in ``mismatched[0]`` and
    left unwritten: the caller sizes again. Any thread.

    Requires: offsets int64 (B+1,); out = (items uint64 (N,), actions (N,),
    timestamps int64 (N,), extras float32 (E, N)) with N = offsets[B];
    mismatched int64 (1,). Returns OK, STALE or BUSY.
    """
    return int(_user_read(index, users, cls, ev, keys, now, ttl, 1, offsets, out, 0, mismatched))


def read_last_batch(index: tuple, users: tuple, cls: np.ndarray, ev: tuple, keys: np.ndarray,
                    now: float, ttl: float, width: int, lengths: np.ndarray, out: tuple) -> int:
    """The newest ``width`` events of each user, newest last, left-padded with zeros. Any thread.

    Row i of the (B, width) outputs, passed flat (row-major), holds
    ``lengths[i] = min(width, len)`` events at its right end.

    Requires: lengths int64 (B,); out = (items uint64 (B*width,), actions
    (B*width,), timestamps int64 (B*width,), extras float32 (E, B*width)).
    Returns OK, STALE or BUSY.
    """
    return int(_user_read(index, users, cls, ev, keys, now, ttl, 2, lengths, out, width, _NO_COUNT))


_NO_COUNT = np.zeros(1, dtype=np.int64)
