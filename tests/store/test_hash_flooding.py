"""Hash flooding: the keyed index hash, the growth floor and ceiling, and the hash key in files.

Keys are crafted the way an attacker would: against the old unkeyed hash by
inverting splitmix64's finaliser, and against a known SipHash key by search.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamrec.errors import IndexGrowthRefused, SnapshotError
from streamrec.store import EmbeddingTable
from streamrec.store._index import SLOTS, hash_key_of_seed, hash_keys

M64 = (1 << 64) - 1
GOLDEN, M1, M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


# -- references ------------------------------------------------------------------------


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & M64


def _sipround(v: list[int]) -> list[int]:
    v0, v1, v2, v3 = v
    v0 = (v0 + v1) & M64
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & M64
    v3 = _rotl(v3, 16) ^ v2
    v0 = (v0 + v3) & M64
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & M64
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return [v0, v1, v2, v3]


def siphash(k0: int, k1: int, msg: bytes, c: int, d: int) -> int:
    """SipHash-c-d from the paper, on any message (slow, obviously right)."""
    v = [k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D, k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573]
    full = len(msg) // 8
    last = bytearray(8)
    last[: len(msg) - 8 * full] = msg[8 * full:]
    last[7] = len(msg) & 0xFF
    blocks = [int.from_bytes(msg[8 * i:8 * i + 8], "little") for i in range(full)]
    for m in [*blocks, int.from_bytes(bytes(last), "little")]:
        v[3] ^= m
        for _ in range(c):
            v = _sipround(v)
        v[0] ^= m
    v[2] ^= 0xFF
    for _ in range(d):
        v = _sipround(v)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def splitmix(x: int) -> int:
    z = (x + GOLDEN) & M64
    z = ((z ^ (z >> 30)) * M1) & M64
    z = ((z ^ (z >> 27)) * M2) & M64
    return z ^ (z >> 31)


def _unxorshift(y: int, s: int) -> int:
    x = y
    for _ in range(64 // s + 1):
        x = y ^ (x >> s)
    return x


def unsplitmix(h: int) -> int:
    """The key whose splitmix64 finaliser is ``h`` (the inversion the attack used)."""
    z = _unxorshift(h, 31)
    z = (z * pow(M2, -1, 1 << 64)) & M64
    z = _unxorshift(z, 27)
    z = (z * pow(M1, -1, 1 << 64)) & M64
    z = _unxorshift(z, 30)
    return (z - GOLDEN) & M64


def crafted_unkeyed(n: int) -> np.ndarray:
    """n keys whose unkeyed hashes share the low 44 bits and the tag byte (the issue's attack)."""
    low, tag = 0x5A5A5A5A5A5, 0x77
    keys = [unsplitmix((tag << 56) | (mid << 44) | low) for mid in range(1, n + 1)]
    assert all(splitmix(k) & ((1 << 44) - 1) == low and splitmix(k) >> 56 == tag for k in keys)
    return np.array(keys, dtype=np.uint64)


def crafted_keyed(key: tuple[int, int], buckets: int, n: int, seed: int = 1) -> np.ndarray:
    """n keys with the same first bucket and tag at ``buckets`` under a known hash key (by search)."""
    rng = np.random.default_rng(seed)
    cand = rng.integers(0, 2**64 - 1, 1 << 23, dtype=np.uint64, endpoint=True)
    h = np.empty_like(cand)
    hash_keys(cand, np.uint64(key[0]), np.uint64(key[1]), h)
    sig = (h & np.uint64(buckets - 1)) | ((h >> np.uint64(56)) << np.uint64(32))
    want = sig[0]
    picked = cand[sig == want]
    assert picked.size >= n, picked.size
    return picked[:n]


# -- the hash ----------------------------------------------------------------------------


def test_reference_siphash_matches_the_papers_vectors() -> None:
    k0 = int.from_bytes(bytes(range(8)), "little")
    k1 = int.from_bytes(bytes(range(8, 16)), "little")
    assert siphash(k0, k1, b"", 2, 4) == 0x726FDB47DD0E0E31
    assert siphash(k0, k1, bytes(range(8)), 2, 4) == 0x93F5F5799A932462
    assert siphash(k0, k1, bytes(range(15)), 2, 4) == 0xA129CA6149BE45E5


@pytest.mark.parametrize("key", [(0, 0), (1, 2), (2**64 - 1, 2**63 + 5), hash_key_of_seed(7)])
def test_index_hash_is_siphash13_of_the_key_bytes(key: tuple[int, int]) -> None:
    keys = np.array([0, 1, 2**63, 2**64 - 1, 0x0123456789ABCDEF, 42], dtype=np.uint64)
    got = np.empty_like(keys)
    hash_keys(keys, np.uint64(key[0]), np.uint64(key[1]), got)
    want = [siphash(key[0], key[1], int(k).to_bytes(8, "little"), 1, 3) for k in keys.tolist()]
    assert got.tolist() == want


# -- crafted keys ------------------------------------------------------------------------


def test_keys_crafted_against_the_unkeyed_hash_are_ordinary_now() -> None:
    keys = crafted_unkeyed(200)
    t = EmbeddingTable(dim=4, huge_pages=False)
    buckets = t.stats().buckets
    t.insert_or_assign(keys, np.ones((keys.size, 4)))
    assert len(t) == keys.size and t.contains(keys).all()
    assert t.stats().buckets == buckets and t.stats().index_grows == 0
    h = np.empty_like(keys)
    hash_keys(keys, *(np.uint64(x) for x in t._hash_key), h)
    # Under the table's key their first buckets spread like random keys'.
    assert np.unique(h & np.uint64(buckets - 1)).size > 0.6 * min(keys.size, buckets)


def test_two_tables_draw_different_hash_keys() -> None:
    a, b = EmbeddingTable(dim=2, huge_pages=False), EmbeddingTable(dim=2, huge_pages=False)
    assert a._hash_key != b._hash_key
    assert EmbeddingTable(dim=2, hash_seed=9, huge_pages=False)._hash_key == hash_key_of_seed(9)


def _state(t: EmbeddingTable, keys: np.ndarray) -> tuple:
    vals, found = t.find(keys)
    st = t.stats()
    return (len(t), st.buckets, st.high_water_rows, st.free_rows, t.memory_bytes, vals.tobytes(),
            found.tobytes())


@pytest.mark.parametrize("mode", ["insert_or_assign", "find_or_insert"])
def test_crafted_keys_against_a_known_key_are_refused_and_change_nothing(mode: str) -> None:
    t = EmbeddingTable(dim=4, hash_seed=12345, huge_pages=False, optimizer="adagrad")
    buckets = t.stats().buckets
    rng = np.random.default_rng(3)
    base = rng.integers(1, 2**63, 30, dtype=np.uint64)
    t.insert_or_assign(base, rng.normal(size=(base.size, 4)))
    t.erase(base[:10])  # a free list, so that refused inserts would have taken rows from it
    bad = crafted_keyed(t._hash_key, buckets, 40)
    ordinary = rng.integers(2**63, 2**64 - 1, 8, dtype=np.uint64)
    before = _state(t, np.concatenate([base, ordinary, bad]))
    batch = np.concatenate([ordinary, base[20:30], bad])
    with pytest.raises(IndexGrowthRefused) as info:
        if mode == "insert_or_assign":
            t.insert_or_assign(batch, np.full((batch.size, 4), 9.0))
        else:
            t.find_or_insert(batch)
    e = info.value
    assert e.limit == "floor" and e.position == 0 and e.buckets == buckets
    assert e.load_factor < 0.05 and "below the floor" in str(e)
    assert _state(t, np.concatenate([base, ordinary, bad])) == before
    # Still a working table: the crafted keys that fit go in, ordinary ones too.
    t.insert_or_assign(bad[:16], np.ones((16, 4)))
    more = rng.integers(1, 2**64 - 1, 5000, dtype=np.uint64)
    t.insert_or_assign(more, np.zeros((more.size, 4)))
    assert t.contains(bad[:16]).all() and t.contains(more).all()
    assert t.memory_bytes < 8 << 20


def test_the_ceiling_refuses_growth_even_above_the_floor() -> None:
    t = EmbeddingTable(dim=4, hash_seed=77, huge_pages=False, min_load_factor=0.001,
                       max_index_bytes=256 * 64)
    assert t.stats().buckets == 128
    bad = crafted_keyed(t._hash_key, 256, 40, seed=2)  # they collide at 128 buckets and at 256
    base = np.arange(1, 30, dtype=np.uint64)
    t.insert_or_assign(base, np.ones((base.size, 4)))
    with pytest.raises(IndexGrowthRefused) as info:
        t.insert_or_assign(bad, np.ones((bad.size, 4)))
    assert info.value.limit == "ceiling" and info.value.position == 0
    assert t.stats().buckets <= 256 and len(t) == base.size and not t.contains(bad).any()
    with pytest.raises(ValueError, match="max_index_bytes"):
        t.reserve(100_000)


def test_a_batch_far_above_the_floor_still_grows_the_index() -> None:
    """The check before a batch grows the index as the batch would have (one large batch, empty table)."""
    t = EmbeddingTable(dim=2, capacity=16, huge_pages=False)
    keys = np.random.default_rng(5).permutation(np.arange(1, 200_001, dtype=np.uint64))
    t.insert_or_assign(keys, np.ones((keys.size, 2)))
    assert len(t) == keys.size and t.contains(keys).all()
    assert t.load_factor > 0.3 and t.stats().buckets * SLOTS >= keys.size


# -- the key in files ----------------------------------------------------------------------


def test_live_files_and_snapshots_keep_the_hash_key(tmp_path) -> None:
    keys = np.random.default_rng(1).integers(1, 2**64 - 1, 3000, dtype=np.uint64)
    t = EmbeddingTable(dim=3, huge_pages=False, path=tmp_path / "live")
    t.insert_or_assign(keys, np.ones((keys.size, 3)))
    t.snapshot(tmp_path / "snap")
    t.close()
    k = t._hash_key
    for where in ("live", "snap"):
        r = EmbeddingTable.open(tmp_path / where)
        assert r._hash_key == k and r.contains(keys).all() and not r.contains(keys + np.uint64(1)).any()
        r.close()


def test_files_without_a_hash_key_are_refused(tmp_path) -> None:
    t = EmbeddingTable(dim=3, huge_pages=False, path=tmp_path / "live")
    t.insert_or_assign([1, 2], np.ones((2, 3)))
    t.close()
    meta = json.loads((tmp_path / "live" / "TABLE.json").read_text())
    (tmp_path / "live" / "TABLE.json").write_text(json.dumps({**meta, "format": 2}))
    with pytest.raises(SnapshotError, match="keyed index hash"):
        EmbeddingTable.open(tmp_path / "live")
    del meta["hash_key"]
    (tmp_path / "live" / "TABLE.json").write_text(json.dumps(meta))
    with pytest.raises(SnapshotError, match="hash key missing"):
        EmbeddingTable.open(tmp_path / "live")


# -- the sequence store's user index ----------------------------------------------------------


def test_sequence_store_keys_its_user_index_and_refuses_crafted_ids(tmp_path) -> None:
    from streamrec.store import SequenceStore

    s = SequenceStore(max_len=8, huge_pages=False)
    assert s._hash_key.tolist() != SequenceStore(max_len=8, huge_pages=False)._hash_key.tolist()
    buckets = s._index.buckets
    plain = crafted_unkeyed(30)  # ordinary ids to this store (few: the crafted ones must fail below 0.05)
    s.append(plain, plain, np.zeros(30, np.uint8), np.arange(30))
    assert (s.length(plain) == 1).all() and s._index.buckets == buckets
    bad = crafted_keyed(tuple(int(x) for x in s._hash_key), buckets, 40)
    with pytest.raises(IndexGrowthRefused) as info:
        s.append(bad, bad, np.zeros(40, np.uint8), np.arange(40))
    p = info.value.position
    assert info.value.limit == "floor" and 20 <= p <= 24  # appends before the refusal stay (as TableFull)
    assert s._index.buckets == buckets and (s.length(bad[:p]) == 1).all() and not s.length(bad[p:]).any()
    s.snapshot(tmp_path / "seq")
    r = SequenceStore.open(tmp_path / "seq", huge_pages=False)
    assert r._hash_key.tolist() == s._hash_key.tolist() and (r.length(plain) == 1).all()
