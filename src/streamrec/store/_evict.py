"""Row lifecycle helpers for kernels: access tracking, eviction choice, admission.

Owns: the per-call context array (``ctx``) layout shared by reader and writer
kernels, the meaning of a row's ``meta`` word under LRU and LFU, choosing an
eviction victim by sampling, and the count-min admission sketch. It must not
change the index (callers do, under the seqlock).

Thread safety: ``touch`` is called by readers and is a benign race (a lost
access update only blurs the eviction order); everything else is writer only.
"""

from __future__ import annotations

import numpy as np

from streamrec.store._index import mix64
from streamrec.store._jit import inline
from streamrec.store._rows import META, STAMP

__all__ = [
    "CTX_ADMIT",
    "CTX_DECAY_MIN",
    "CTX_EVICTED",
    "CTX_EXPIRE_W",
    "CTX_HASH_K0",
    "CTX_HASH_K1",
    "CTX_MAX_LIVE",
    "CTX_NOW",
    "CTX_POLICY",
    "CTX_REFRESH",
    "CTX_REFUSED",
    "CTX_RETRIES",
    "CTX_RNG",
    "CTX_SAMPLE",
    "CTX_SIZE",
    "POLICY_LFU",
    "POLICY_LRU",
    "POLICY_NONE",
    "admit",
    "expired",
    "fresh_meta",
    "pick_victim",
    "touch",
]

# ctx: one int64 array per call, so kernel signatures stay short.
CTX_NOW = 0  # seconds on the table's clock (uint32 range)
CTX_EXPIRE_W = 1  # uint32 word of a row's expiry, 0 when the table has no TTL
CTX_POLICY = 2  # eviction policy (POLICY_*)
CTX_MAX_LIVE = 3  # row limit, 0 = none
CTX_ADMIT = 4  # sightings before a key gets a row, 0 = admit at once
CTX_DECAY_MIN = 5  # LFU: counts halve every this many minutes
CTX_RNG = 6  # xorshift64 state for victim sampling (writer)
CTX_EVICTED = 7  # out: keys written to the eviction buffers this call
CTX_SAMPLE = 8  # rows sampled per eviction
CTX_REFRESH = 9  # expiry that apply_gradients gives the rows it updates, 0 = keep
CTX_REFUSED = 10  # out: keys refused a row by the admission filter this call
CTX_HASH_K0 = 11  # the table's index hash key, two words (``_index.hash_key``)
CTX_HASH_K1 = 12
CTX_RETRIES = 13  # out: seqlock retries of a read call (keys re-read after a torn or locked bucket)
CTX_SIZE = 14

POLICY_NONE, POLICY_LRU, POLICY_LFU = 0, 1, 2

_U16 = np.uint32(0xFFFF)
_S16 = np.uint32(16)
_XS13, _XS7, _XS17 = np.uint64(13), np.uint64(7), np.uint64(17)
_SKETCH_SEEDS = (np.uint64(0x243F6A8885A308D3), np.uint64(0x13198A2E03707344),
                 np.uint64(0xA4093822299F31D0), np.uint64(0x082EFA98EC4E6C89))


@inline
def expired(arena32: np.ndarray, r: int, expire_w: int, now: int) -> bool:
    """Whether row r has a TTL that has passed (``expire_w`` 0: never)."""
    if expire_w == 0:
        return False
    e = arena32[r, expire_w]
    return e != 0 and np.int64(e) <= now


@inline
def fresh_meta(policy: int, now: int) -> np.uint32:
    """``meta`` of a new row: accessed now, counted once."""
    if policy == POLICY_LFU:
        return (np.uint32(1) << _S16) | (np.uint32(now // 60) & _U16)
    return np.uint32(now)


@inline
def _lfu_count(m: np.uint32, now: int, decay_min: int) -> np.uint32:
    cnt = m >> _S16
    if decay_min > 0:
        elapsed = (np.uint32(now // 60) - (m & _U16)) & _U16
        periods = elapsed // np.uint32(decay_min)
        cnt = cnt >> min(periods, np.uint32(16))
    return cnt


@inline
def touch(arena32: np.ndarray, r: int, policy: int, now: int, decay_min: int) -> None:
    """Record an access to row r under the table's policy."""
    if policy == POLICY_LRU:
        arena32[r, META] = np.uint32(now)
    elif policy == POLICY_LFU:
        cnt = _lfu_count(arena32[r, META], now, decay_min)
        if cnt < _U16:
            cnt += np.uint32(1)
        arena32[r, META] = (cnt << _S16) | (np.uint32(now // 60) & _U16)


@inline
def _score(arena32: np.ndarray, r: int, ctx: np.ndarray) -> np.int64:
    """Lower is evicted first: expired rows, then oldest access / lowest count."""
    now = ctx[CTX_NOW]
    if expired(arena32, r, ctx[CTX_EXPIRE_W], now):
        return np.int64(-1)
    if ctx[CTX_POLICY] == POLICY_LFU:
        return np.int64(_lfu_count(arena32[r, META], now, ctx[CTX_DECAY_MIN]))
    return np.int64(arena32[r, META])


@inline
def _rand(ctx: np.ndarray) -> np.uint64:
    x = np.uint64(ctx[CTX_RNG])
    x ^= x << _XS13
    x ^= x >> _XS7
    x ^= x << _XS17
    ctx[CTX_RNG] = np.int64(x)
    return x


@inline
def pick_victim(arena32: np.ndarray, high: int, ctx: np.ndarray) -> int:
    """A live row to evict: the lowest score of ``CTX_SAMPLE`` live rows drawn at random.

    Redis's approximated LRU/LFU: a sample of 8 finds a row in the oldest few
    percent with high probability, at 8 cache misses instead of a global order.
    Returns -1 only if no live row was drawn in many tries (an empty table).
    """
    best = np.int64(-1)
    best_score = np.int64(0)
    got = 0
    for _ in range(64 * ctx[CTX_SAMPLE]):
        r = np.int64(_rand(ctx) % np.uint64(high))
        if not (arena32[r, STAMP] & np.uint32(1)):
            continue
        sc = _score(arena32, r, ctx)
        if best < 0 or sc < best_score:
            best = r
            best_score = sc
        got += 1
        if got >= ctx[CTX_SAMPLE] or sc < 0:
            break
    return best


@inline
def admit(sketch: np.ndarray, key: int, threshold: int) -> bool:
    """Count a sighting of ``key``; True once it has been seen ``threshold`` times.

    A count-min sketch of 4 rows of saturating uint8 counters (Monolith's
    frequency filter): a few bytes per distinct key, never under-counting.
    Hashed with the unkeyed ``mix64``: crafted collisions here only admit a
    key sooner (as sending it again would) and cost no memory.
    """
    width_mask = np.uint64(sketch.shape[1] - 1)
    est = 255
    for i in range(4):
        j = np.int64(mix64(key ^ _SKETCH_SEEDS[i]) & width_mask)
        c = sketch[i, j]
        if c < 255:
            c += 1
            sketch[i, j] = c
        est = min(est, np.int64(c))
    return est >= threshold
