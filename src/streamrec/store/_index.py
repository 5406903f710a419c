"""The cuckoo index: bucket layout, key hashing, tag matching, placement.

Owns: the 64-byte bucket format and every kernel helper that reads or writes
buckets (hash, SWAR tag match, seqlock lock/unlock, breadth-first cuckoo
displacement, rebuilding into a larger index). It must not know the row
layout beyond "the key is the row's first uint64".

Bucket format (one cache line, ``NB`` buckets, a power of two)::

    bytes  0..11  tags of slots 0..11 (uint8; 0 = empty slot)
    bytes 12..15  version (uint32 seqlock: odd while the writer changes the bucket)
    bytes 16..63  row numbers of slots 0..11 (uint32)

The same memory is viewed three ways: ``idx64`` (NB, 8) uint64 for SWAR tag
matching (word 0 = tags 0-7, low half of word 1 = tags 8-11), ``idx32`` (NB, 16)
uint32 for the version (word 3) and rows (words 4..15), ``idx8`` (NB, 64) uint8
to write one tag.

Hashing: ``h = hash_key(key, k0, k1)``, SipHash-1-3 of the key's 8 bytes under
the table's 128-bit hash key ``(k0, k1)``. Bucket 1 is ``h & mask``; the tag is
the top byte of ``h`` (0 is remapped to 1, leaving 0 for "empty"); bucket 2 is
``b1 ^ (TAG_HASH[tag] & mask)``, an involution that needs only the bucket and
the tag, so a key moves to its other bucket without reading its row (libcuckoo's
scheme). ``TAG_HASH`` entries are odd, so the two buckets always differ.

Why keyed, and why SipHash: the index used to hash with splitmix64's finaliser,
a public bijection. Inverting it gives keys whose hashes share any chosen bits:
about 25 keys sharing the low bits and the tag fill both of their buckets, and
the index then doubled until it asked for 2**39 buckets. Every table now draws
its own 128-bit key from ``secrets`` when it is created (``new_hash_key``) and
records it in its files and snapshots, so a reopened table and one-sided
readers hash alike, while keys crafted against one table are ordinary keys to
every other. SipHash-1-3 is what Rust's ``HashMap`` and CPython's ``str`` hash
use against hash flooding: a PRF whose key cannot be recovered from its
outputs, so the key does not leak through which keys collide. A cheaper keyed
mix (two multiply-xorshift finalisers around key words) was measured beside
it and rejected: it is not a PRF, and differential attacks on such mixes are
known. Cost, measured 2026-12-03 on this 2-core VM (thread CPU time, medians
of 3 alternating runs, a loaded machine): ``find`` on a cache-resident table
(10 k keys, dim 4, batches of 4096) took 21.9 ns/key with the unkeyed hash,
22.9 with the keyed double mix and 28.9 with SipHash-1-3, so about 7 ns per
key; on 5 M keys of dim 64 (100-150 ns/key, memory-bound) that is under 7 %,
inside this machine's noise there (``_ops.find_batch`` has the figures).
The unkeyed ``mix64`` stays for what is not the index: the initializer's
PRNG (a row's initial values must be a function of key and initializer seed
alone, equal on every replica and after a reopen), the admission sketch (a
crafted collision there only admits a key sooner, which sending it again
achieves too; it costs no memory) and ``apply_gradients``' duplicate map
(it hashes row numbers, which no client chooses).

Growth has a floor (``TableConfig.min_load_factor``, libcuckoo's
``minimum_load_factor``) and a ceiling (``max_index_bytes``): an insert that
cannot be placed below the floor, or that would take the index past the
ceiling, is refused instead of doubling the index. ``first_unplaceable``
finds such an insert before a batch changes anything, so the refusal leaves
the table as it was.

Thread safety: one writer, many readers. The writer brackets every change of a
bucket (and of the rows it points to) with two increments of that bucket's
version; readers read both candidate versions, probe, copy, and re-read them,
retrying on a difference or an odd value (a seqlock). Requires: callers hold
the table's writer lock for every function documented "writer only".
"""

from __future__ import annotations

import secrets

import numpy as np

from streamrec.store._jit import barrier, ctz, inline, kernel, prefetch
from streamrec.store._memory import Region

__all__ = [
    "BUCKET_BYTES",
    "MAX_BFS_NODES",
    "ROW0",
    "SLOTS",
    "VER",
    "IndexGeneration",
    "alt_bucket",
    "as_ctx_words",
    "find_empty",
    "first_unplaceable",
    "hash_key",
    "hash_key_of_seed",
    "hash_keys",
    "locate",
    "lock",
    "make_room",
    "match",
    "mix64",
    "new_hash_key",
    "publish",
    "rebuild_from",
    "scan",
    "tag_of",
    "unlock",
    "unpublish",
]

SLOTS = 12  # 12 tags + 12 uint32 rows + a uint32 version fill a 64-byte line exactly
BUCKET_BYTES = 64
VER = 3  # uint32 word of the version
ROW0 = 4  # uint32 word of slot 0's row number
MAX_BFS_NODES = 1024  # buckets a displacement search may visit (3 levels of 12-way)
_MAX_BFS_DEPTH = 3  # displacements per insert at most; deeper means "grow instead"

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
_S30, _S27, _S31, _S56, _S7 = _U64(30), _U64(27), _U64(31), _U64(56), _U64(7)
_SIP0 = _U64(0x736F6D6570736575)  # "somepseudorandomlygeneratedbytes", SipHash's IV
_SIP1 = _U64(0x646F72616E646F6D)
_SIP2 = _U64(0x6C7967656E657261)
_SIP3 = _U64(0x7465646279746573)
_SIP_LEN8 = _U64(8 << 56)  # the final block of an 8-byte message: its length in the top byte
_LO = _U64(0x0101010101010101)
_LOW7 = _U64(0x7F7F7F7F7F7F7F7F)
_LOW_HALF_HIGHBITS = _U64(0x80808080)
_MOVEMASK = _U64(0x0102040810204080)  # gathers the 8 byte flags into the top byte
_ONE = _U64(1)
_ZERO = _U64(0)


def _tag_hashes() -> np.ndarray:
    out = np.empty(256, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for t in range(256):
            z = np.uint64(t) + _GOLDEN
            z = (z ^ (z >> _S30)) * _M1
            z = (z ^ (z >> _S27)) * _M2
            out[t] = (z ^ (z >> _S31)) | _ONE
    return out


TAG_HASH = _tag_hashes()


@inline
def mix64(x: int) -> int:
    """splitmix64's finaliser: an unkeyed bijection on uint64 with full avalanche.

    Not for the index (module doc): for the initializer's PRNG and the sketch.
    """
    z = x + _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@inline
def _rotl(x: int, b: int) -> int:
    return (x << _U64(b)) | (x >> _U64(64 - b))


@inline
def _sipround(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    v0 += v1
    v1 = _rotl(v1, 13)
    v1 ^= v0
    v0 = _rotl(v0, 32)
    v2 += v3
    v3 = _rotl(v3, 16)
    v3 ^= v2
    v0 += v3
    v3 = _rotl(v3, 21)
    v3 ^= v0
    v2 += v1
    v1 = _rotl(v1, 17)
    v1 ^= v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


@inline
def hash_key(key: int, k0: int, k1: int) -> int:
    """SipHash-1-3 of the 8 little-endian bytes of ``key`` under the key ``(k0, k1)``.

    One compression round for the key word, one for the length block, three
    to finalise: five SipRounds, about 60 ALU operations and no memory access.
    """
    key, k0, k1 = _U64(key), _U64(k0), _U64(k1)  # no-ops for uint64; int64 ^ uint64 would be float64
    v0 = k0 ^ _SIP0
    v1 = k1 ^ _SIP1
    v2 = k0 ^ _SIP2
    v3 = k1 ^ _SIP3 ^ key
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0 ^= key
    v3 ^= _SIP_LEN8
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0 ^= _SIP_LEN8
    v2 ^= _U64(0xFF)
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


def new_hash_key() -> tuple[int, int]:
    """A fresh 128-bit index hash key ``(k0, k1)`` from the OS's CSPRNG."""
    return secrets.randbits(64), secrets.randbits(64)


def hash_key_of_seed(seed: int) -> tuple[int, int]:
    """The hash key an explicit ``TableConfig.hash_seed`` stands for (tests, reproducible runs)."""
    a = int(mix64(_U64(seed)))
    return a, int(mix64(_U64(a ^ seed)))


def as_ctx_words(k: tuple[int, int]) -> tuple[int, int]:
    """The hash key as two int64 words, as ``ctx`` and the sequence store carry it."""
    a, b = (int(np.array(x, dtype=np.uint64).view(np.int64)) for x in k)
    return a, b


@kernel
def hash_keys(keys: np.ndarray, k0: int, k1: int, out: np.ndarray) -> None:
    """out[i] = hash_key(keys[i], k0, k1), for tests and tools (crafting collisions).

    Requires: keys uint64 (B,), out uint64 (B,).
    """
    a, b = _U64(k0), _U64(k1)
    for i in range(keys.shape[0]):
        out[i] = hash_key(keys[i], a, b)


@inline
def tag_of(h: int) -> int:
    t = h >> _S56
    if t == _ZERO:
        t = _ONE
    return t


@inline
def alt_bucket(b: int, tag: int, mask: int) -> int:
    return np.int64(_U64(b) ^ (TAG_HASH[np.int64(tag)] & mask))


@inline
def _zero_bytes(x: int) -> int:
    """0x80 in every byte of ``x`` that is zero, 0 elsewhere (exact: no borrow)."""
    y = (x & _LOW7) + _LOW7
    return ~(y | x | _LOW7)


@inline
def _movemask(m: int) -> int:
    return ((m >> _S7) * _MOVEMASK) >> _S56


@inline
def match(idx64: np.ndarray, b: int, tag: int) -> int:
    """Bit s set iff slot s of bucket b holds ``tag`` (tag 0 finds empty slots).

    One XOR and one exact zero-byte test per 64-bit word compare all 12 tags
    (SwissTable's portable group match, without its false positives).
    """
    pat = tag * _LO
    m0 = _zero_bytes(idx64[b, 0] ^ pat)
    m1 = _zero_bytes(idx64[b, 1] ^ pat) & _LOW_HALF_HIGHBITS
    return _movemask(m0) | (_movemask(m1) << _U64(8))


@inline
def lock(idx32: np.ndarray, b: int) -> None:
    """Writer only. Make bucket b's version odd: readers of it will retry."""
    idx32[b, VER] += np.uint32(1)
    barrier()


@inline
def unlock(idx32: np.ndarray, b: int) -> None:
    """Writer only. Make bucket b's version even again (one more than at lock)."""
    barrier()
    idx32[b, VER] += np.uint32(1)


@inline
def scan(idx64: np.ndarray, idx32: np.ndarray, arena64: np.ndarray, key: int, b: int, tag: int
         ) -> tuple[int, int]:
    """``(slot, row)`` of ``key`` in bucket b, or ``(-1, -1)``: tag match, then key check.

    Readers call it between their two version reads; the writer calls it bare.
    """
    m = match(idx64, b, tag)
    while m != _ZERO:
        s = np.int64(ctz(m))
        r = np.int64(idx32[b, ROW0 + s])
        if arena64[r, 0] == key:
            return s, r
        m &= m - _ONE
    return np.int64(-1), np.int64(-1)


@inline
def locate(
    idx64: np.ndarray, idx32: np.ndarray, arena64: np.ndarray, key: int,
    b1: int, b2: int, tag: int,
) -> tuple[int, int, int]:
    """Writer only (no seqlock). ``(bucket, slot, row)`` of ``key``, or ``(-1, -1, -1)``."""
    s, r = scan(idx64, idx32, arena64, key, b1, tag)
    if r >= 0:
        return b1, s, r
    s, r = scan(idx64, idx32, arena64, key, b2, tag)
    if r >= 0:
        return b2, s, r
    return np.int64(-1), np.int64(-1), np.int64(-1)


@inline
def find_empty(idx64: np.ndarray, b: int) -> int:
    m = match(idx64, b, _ZERO)
    if m == _ZERO:
        return np.int64(-1)
    return np.int64(ctz(m))


@inline
def publish(
    idx32: np.ndarray, idx8: np.ndarray, b: int, s: int, tag: int, row: int
) -> None:
    """Writer only. Put (tag, row) in empty slot s of bucket b under the seqlock."""
    lock(idx32, b)
    idx32[b, ROW0 + s] = np.uint32(row)
    idx8[b, s] = np.uint8(tag)
    unlock(idx32, b)


@inline
def unpublish(idx32: np.ndarray, idx8: np.ndarray, b: int, s: int) -> None:
    """Writer only. Empty slot s of bucket b under the seqlock."""
    lock(idx32, b)
    idx8[b, s] = np.uint8(0)
    unlock(idx32, b)


@inline
def _on_path(nodes: np.ndarray, n: int, bucket: int) -> bool:
    while n >= 0:
        if nodes[n, 0] == bucket:
            return True
        n = nodes[n, 1]
    return False


@kernel
def make_room(
    idx64: np.ndarray, idx32: np.ndarray, idx8: np.ndarray,
    b1: int, b2: int, mask: int, nodes: np.ndarray,
) -> tuple[int, int]:
    """Writer only. An empty slot in b1 or b2, displacing keys if both are full.

    Breadth-first search from both buckets for the nearest bucket with an empty
    slot (at most ``_MAX_BFS_DEPTH`` displacements, ``MAX_BFS_NODES`` buckets
    visited), then moves keys along the path from its end, each move under the
    seqlock of both buckets involved, so a concurrent reader of a moving key
    always retries rather than missing it. No bucket appears twice on a path.

    Args:
        nodes: scratch, int64 (MAX_BFS_NODES, 3): bucket, parent node, slot.

    Returns:
        ``(bucket, slot)`` now empty, or ``(-1, -1)``: the index needs to grow
        (nothing was moved).
    """
    s = find_empty(idx64, b1)
    if s >= 0:
        return b1, s
    s = find_empty(idx64, b2)
    if s >= 0:
        return b2, s
    nodes[0, 0] = b1
    nodes[0, 1] = -1
    nodes[0, 2] = -1
    nodes[1, 0] = b2
    nodes[1, 1] = -1
    nodes[1, 2] = -1
    head = 0
    tail = 2
    depth_end = 2  # nodes before this index are at the current depth
    depth = 0
    found = np.int64(-1)
    empty_slot = np.int64(-1)
    while head < tail:
        if head == depth_end:
            depth += 1
            depth_end = tail
        x = nodes[head, 0]
        e = find_empty(idx64, x) if head >= 2 else np.int64(-1)
        if e >= 0:
            found = head
            empty_slot = e
            break
        if depth < _MAX_BFS_DEPTH:
            for sl in range(SLOTS):
                if tail >= MAX_BFS_NODES:
                    break
                y = alt_bucket(x, _U64(idx8[x, sl]), mask)
                if _on_path(nodes, head, y):
                    continue
                nodes[tail, 0] = y
                nodes[tail, 1] = head
                nodes[tail, 2] = sl
                tail += 1
        head += 1
    if found < 0:
        return np.int64(-1), np.int64(-1)
    # Walk back: move the parent's slot into the free slot, which frees the
    # parent's slot for the grandparent's key, and so on up to a root bucket.
    n = found
    free_b = nodes[n, 0]
    free_s = empty_slot
    while nodes[n, 1] >= 0:
        p = nodes[n, 1]
        pb = nodes[p, 0]
        ps = nodes[n, 2]
        lock(idx32, pb)
        lock(idx32, free_b)
        idx32[free_b, ROW0 + free_s] = idx32[pb, ROW0 + ps]
        idx8[free_b, free_s] = idx8[pb, ps]
        idx8[pb, ps] = np.uint8(0)
        unlock(idx32, free_b)
        unlock(idx32, pb)
        free_b = pb
        free_s = ps
        n = p
    return free_b, free_s


_REBUILD_GROUP = 16


@kernel
def rebuild_from(
    idx64: np.ndarray, idx32: np.ndarray, idx8: np.ndarray, keys: np.ndarray, live: np.ndarray,
    nodes: np.ndarray, k0: int, k1: int,
) -> bool:
    """Writer only. Fill an empty index with row r -> ``keys[r]`` for every ``live[r]``.

    Rows are taken in order (their keys are read sequentially), in groups: hash
    a group and prefetch its buckets, then place it. Tables and the sequence
    store rebuild their index this way when it doubles.

    Requires: keys uint64 (R,) (any stride: a column of a row arena), live bool (R,),
    nodes int64 (MAX_BFS_NODES, 3); (k0, k1) the table's hash key.
    Returns False if this size cannot hold them (the caller doubles and retries).
    """
    mask = np.uint64(idx64.shape[0] - 1)
    n = keys.shape[0]
    rows = np.empty(_REBUILD_GROUP, np.int64)
    b1s = np.empty(_REBUILD_GROUP, np.int64)
    tags = np.empty(_REBUILD_GROUP, np.uint64)
    for base in range(0, n, _REBUILD_GROUP):
        g = 0
        for r in range(base, min(base + _REBUILD_GROUP, n)):
            if not live[r]:
                continue
            h = hash_key(keys[r], k0, k1)
            b1 = np.int64(h & mask)
            rows[g] = r
            b1s[g] = b1
            tags[g] = tag_of(h)
            prefetch(idx64, b1)
            g += 1
        for j in range(g):
            b, s = make_room(idx64, idx32, idx8, b1s[j], alt_bucket(b1s[j], tags[j], mask), mask, nodes)
            if b < 0:
                return False
            publish(idx32, idx8, b, s, tags[j], rows[j])
    return True


# -- placement without changing anything -------------------------------------------------
#
# ``first_unplaceable`` runs ``make_room``'s search and moves on a copy-on-write
# overlay of the buckets it changes (tags only: a search never reads rows), so
# a writer can learn, before a batch touches the table, which of the batch's new
# keys the index could not place at its present size.


@inline
def _ov_find(ov_b: np.ndarray, b: int) -> int:
    """Overlay position of bucket b, or -1 (open addressing, linear probing)."""
    m = ov_b.shape[0] - 1
    p = np.int64(mix64(_U64(b))) & m
    while ov_b[p] != -1:
        if ov_b[p] == b:
            return p
        p = (p + 1) & m
    return np.int64(-1)


@inline
def _ov_take(ov_b: np.ndarray, ov_t: np.ndarray, idx8: np.ndarray, b: int) -> int:
    """Overlay position of bucket b, copying its tags in on first use."""
    m = ov_b.shape[0] - 1
    p = np.int64(mix64(_U64(b))) & m
    while ov_b[p] != -1:
        if ov_b[p] == b:
            return p
        p = (p + 1) & m
    ov_b[p] = b
    for s in range(SLOTS):
        ov_t[p, s] = idx8[b, s]
    return p


@inline
def _ov_tag(ov_b: np.ndarray, ov_t: np.ndarray, idx8: np.ndarray, b: int, s: int) -> int:
    p = _ov_find(ov_b, b)
    return np.int64(ov_t[p, s]) if p >= 0 else np.int64(idx8[b, s])


@inline
def _ov_empty(ov_b: np.ndarray, ov_t: np.ndarray, idx64: np.ndarray, b: int) -> int:
    """As ``find_empty``, through the overlay."""
    p = _ov_find(ov_b, b)
    if p < 0:
        return find_empty(idx64, b)
    for s in range(SLOTS):
        if ov_t[p, s] == 0:
            return np.int64(s)
    return np.int64(-1)


@inline
def _ov_make_room(idx64: np.ndarray, idx8: np.ndarray, ov_b: np.ndarray, ov_t: np.ndarray,
                  b1: int, b2: int, mask: int, nodes: np.ndarray) -> tuple[int, int]:
    """``make_room`` on the overlay: the same search in the same order, the same moves."""
    s = _ov_empty(ov_b, ov_t, idx64, b1)
    if s >= 0:
        return b1, s
    s = _ov_empty(ov_b, ov_t, idx64, b2)
    if s >= 0:
        return b2, s
    nodes[0, 0] = b1
    nodes[0, 1] = -1
    nodes[0, 2] = -1
    nodes[1, 0] = b2
    nodes[1, 1] = -1
    nodes[1, 2] = -1
    head = 0
    tail = 2
    depth_end = 2
    depth = 0
    found = np.int64(-1)
    empty_slot = np.int64(-1)
    while head < tail:
        if head == depth_end:
            depth += 1
            depth_end = tail
        x = nodes[head, 0]
        e = _ov_empty(ov_b, ov_t, idx64, x) if head >= 2 else np.int64(-1)
        if e >= 0:
            found = head
            empty_slot = e
            break
        if depth < _MAX_BFS_DEPTH:
            for sl in range(SLOTS):
                if tail >= MAX_BFS_NODES:
                    break
                y = alt_bucket(x, _U64(_ov_tag(ov_b, ov_t, idx8, x, sl)), mask)
                if _on_path(nodes, head, y):
                    continue
                nodes[tail, 0] = y
                nodes[tail, 1] = head
                nodes[tail, 2] = sl
                tail += 1
        head += 1
    if found < 0:
        return np.int64(-1), np.int64(-1)
    n = found
    free_b = nodes[n, 0]
    free_s = empty_slot
    while nodes[n, 1] >= 0:
        p = nodes[n, 1]
        pb = nodes[p, 0]
        ps = nodes[n, 2]
        qf = _ov_take(ov_b, ov_t, idx8, free_b)
        qp = _ov_take(ov_b, ov_t, idx8, pb)
        ov_t[qf, free_s] = ov_t[qp, ps]
        ov_t[qp, ps] = 0
        free_b = pb
        free_s = ps
        n = p
    return free_b, free_s


@kernel
def first_unplaceable(idx64: np.ndarray, idx8: np.ndarray, keys: np.ndarray, k0: int, k1: int,
                      nodes: np.ndarray) -> int:
    """Writer only; changes nothing. Where inserting ``keys`` in order would first fail.

    Places each key as ``write_batch`` would (``make_room``, then a tag in the
    slot it frees), on an overlay of the buckets that would change, and stops at
    the first key for which no slot can be made.

    Requires: keys uint64 (K,), distinct and absent from the index, in the
    order the batch would insert them; nodes int64 (MAX_BFS_NODES, 3).
    Returns the position of that key, or -1 if every key fits.
    """
    n = keys.shape[0]
    mask = np.uint64(idx64.shape[0] - 1)
    size = 16
    while size < 8 * n + 16:  # a placement changes at most _MAX_BFS_DEPTH + 1 buckets
        size *= 2
    ov_b = np.full(size, -1, np.int64)
    ov_t = np.zeros((size, SLOTS), np.uint8)
    for i in range(n):
        h = hash_key(keys[i], k0, k1)
        t = tag_of(h)
        b1 = np.int64(h & mask)
        b, s = _ov_make_room(idx64, idx8, ov_b, ov_t, b1, alt_bucket(b1, t, mask), mask, nodes)
        if b < 0:
            return i
        ov_t[_ov_take(ov_b, ov_t, idx8, b), s] = np.uint8(t)
    return -1


class IndexGeneration:
    """One index generation: its memory, the three views, and its retired flag.

    A table replaces its generation when it grows; readers still on the old one
    see ``retired`` set and restart on the new one. In a file-backed generation
    (``region.path`` set) the flag is the int64 right after the buckets (the
    trailer of ``index-N.bin``, see ``_persist``), so readers in other processes
    that map the file see the retirement too; otherwise it is private memory.
    """

    def __init__(self, buckets: int, huge_pages: bool, region: Region | None = None) -> None:
        self.region = region or Region(buckets * BUCKET_BYTES, huge_pages=huge_pages)
        mem = self.region.array(np.uint8, (self.region.nbytes,))
        self.idx64, self.idx32, self.idx8 = self.views(mem, buckets)
        # Set to 1 (once, by the writer) when a newer index replaces this one;
        # readers still on it see the flag and restart on the new one.
        self.retired = self.file_flag(mem, buckets) if self.region.path is not None else np.zeros(1, np.int64)
        self.buckets = buckets

    @staticmethod
    def views(mem: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(idx64, idx32, idx8)`` over the first ``buckets`` * 64 bytes of ``mem``.

        Requires: mem uint8, C-contiguous, 8-byte aligned (a mapping's start).
        """
        raw = mem[: buckets * BUCKET_BYTES]
        return (raw.view(np.uint64).reshape(buckets, BUCKET_BYTES // 8),
                raw.view(np.uint32).reshape(buckets, BUCKET_BYTES // 4),
                raw.reshape(buckets, BUCKET_BYTES))

    @staticmethod
    def file_flag(mem: np.ndarray, buckets: int) -> np.ndarray:
        """The retired flag of a file-backed generation: int64 (1,), right after the buckets."""
        at = buckets * BUCKET_BYTES
        return mem[at:at + 8].view(np.int64)
