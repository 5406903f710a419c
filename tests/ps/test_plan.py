"""make_plan and sum_rows against numpy: np.unique for the distinct keys, np.add.at for the sums."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_array_equal

from streamrec.cluster.spec import embedded_spec
from streamrec.ps._plan import Plan, make_plan, sum_rows

ShardOf = Callable[[np.ndarray], np.ndarray]
U64_MAX = 2**64 - 1
# Few keys, so batches repeat them; uint64 edges and keys equal in their low or high bits included.
KEY_POOL = [0, 1, 2, 3, 7, 255, 256, 2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1, 2**63, 2**63 + 1,
            0x9E3779B97F4A7C15, 0xDEADBEEFCAFEBABE, U64_MAX - 1, U64_MAX]
key_lists = st.one_of(
    st.lists(st.sampled_from(KEY_POOL), max_size=40),
    st.lists(st.integers(0, U64_MAX), max_size=40),
    st.lists(st.integers(0, 20), max_size=200),  # many repeats: long probe chains in the dedup table
)


def shard(plan: Plan, s: int) -> slice:
    """Shard s's slice of ``plan.keys``, as the client cuts it from ``plan.bounds``."""
    return slice(int(plan.bounds[s]), int(plan.bounds[s + 1]))


def shard_by(nshards: int, how: str) -> ShardOf:
    if how == "mod":
        return lambda u: (u % np.uint64(nshards)).astype(np.int64)
    if how == "high":
        return lambda u: (u >> np.uint64(60)).astype(np.int64) % nshards
    return lambda u: np.zeros(u.shape[0], np.int64) + (nshards - 1)  # every key on the last shard


def check_plan(keys: np.ndarray, nshards: int, shard_of: ShardOf, plan: Plan) -> None:
    b = keys.shape[0]
    uniq = np.unique(keys)
    # distinct, and exactly the caller's keys
    assert plan.keys.dtype == np.uint64 and plan.keys.shape == uniq.shape
    assert_array_equal(np.sort(plan.keys), uniq)
    # every caller key reachable through inverse
    assert plan.inverse.dtype == np.int64 and plan.inverse.shape == (b,)
    assert_array_equal(plan.keys[plan.inverse], keys)
    # grouped by shard, each shard's keys one slice
    assert plan.bounds.dtype == np.int64 and plan.bounds.shape == (nshards + 1,)
    assert plan.bounds[0] == 0 and plan.bounds[-1] == uniq.shape[0]
    assert (np.diff(plan.bounds) >= 0).all()
    sid = shard_of(uniq) if uniq.size else np.zeros(0, np.int64)
    for s in range(nshards):
        sl = shard(plan, s)
        assert_array_equal(np.sort(plan.keys[sl]), np.sort(uniq[sid == s]))
    # last occurrence of each distinct key
    assert plan.last.dtype == np.int64 and plan.last.shape == plan.keys.shape
    for j, k in enumerate(plan.keys.tolist()):
        assert plan.last[j] == np.flatnonzero(keys == np.uint64(k))[-1]


@given(key_lists, st.integers(1, 7), st.sampled_from(["mod", "high", "one"]))
def test_make_plan_matches_numpy(batch: list[int], nshards: int, how: str) -> None:
    keys = np.array(batch, dtype=np.uint64)
    shard_of = shard_by(nshards, how)
    check_plan(keys, nshards, shard_of, make_plan(keys, nshards, shard_of))


@given(key_lists, st.integers(1, 8))
def test_make_plan_with_the_cluster_shard_function(batch: list[int], nshards: int) -> None:
    spec = embedded_spec(shards=nshards)
    keys = np.array(batch, dtype=np.uint64)
    shard_of = lambda u: spec.shard_of(0, u)  # noqa: E731
    check_plan(keys, nshards, shard_of, make_plan(keys, nshards, shard_of))


def test_distinct_keys_keep_first_seen_order_within_a_shard() -> None:
    keys = np.array([9, 4, 9, 7, 4, 1], dtype=np.uint64)
    plan = make_plan(keys, 1, lambda u: np.zeros(u.shape[0], np.int64))
    assert plan.keys.tolist() == [9, 4, 7, 1]
    assert plan.inverse.tolist() == [0, 1, 0, 2, 1, 3]
    assert plan.last.tolist() == [2, 4, 3, 5]
    assert plan.bounds.tolist() == [0, 4]


def test_one_shard_never_calls_shard_of() -> None:
    def boom(u: np.ndarray) -> np.ndarray:
        raise AssertionError("shard_of called for one shard")

    plan = make_plan(np.array([3, 3, 5], np.uint64), 1, boom)
    assert shard(plan, 0) == slice(0, 2)


@pytest.mark.parametrize("nshards", [1, 2, 5])
def test_empty_input(nshards: int) -> None:
    plan = make_plan(np.zeros(0, np.uint64), nshards, shard_by(nshards, "mod"))
    assert plan.keys.shape == plan.inverse.shape == plan.last.shape == (0,)
    assert plan.bounds.tolist() == [0] * (nshards + 1)
    assert all(shard(plan, s) == slice(0, 0) for s in range(nshards))
    out = sum_rows(np.zeros((0, 3), np.float32), plan)
    assert out.shape == (0, 3) and out.dtype == np.float32


def test_shards_without_keys_get_empty_slices() -> None:
    plan = make_plan(np.array([4, 8, 4], np.uint64), 4, shard_by(4, "mod"))
    assert plan.bounds.tolist() == [0, 2, 2, 2, 2]


@given(key_lists, st.integers(1, 4), st.sampled_from([np.float32, np.float64]), st.integers(1, 5))
def test_sum_rows_matches_add_at(batch: list[int], nshards: int, dtype: type, dim: int) -> None:
    keys = np.array(batch, dtype=np.uint64)
    plan = make_plan(keys, nshards, shard_by(nshards, "mod"))
    # dyadic values of few bits: every sum is exact in either order
    ints = np.random.default_rng(len(batch)).integers(-64, 64, size=(keys.shape[0], dim))
    rows: np.ndarray = (ints / 4).astype(dtype)
    want = np.zeros((plan.keys.shape[0], dim), dtype=dtype)
    np.add.at(want, plan.inverse, rows)
    got = sum_rows(rows, plan)
    assert got.dtype == dtype and got.shape == want.shape
    assert_array_equal(got, want)


def test_large_batch() -> None:
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 50_000, size=100_000, dtype=np.uint64)
    spec = embedded_spec(shards=8)
    shard_of = lambda u: spec.shard_of(0, u)  # noqa: E731
    check_plan_fast(keys, 8, shard_of, make_plan(keys, 8, shard_of))


def check_plan_fast(keys: np.ndarray, nshards: int, shard_of: ShardOf, plan: Plan) -> None:
    uniq, last_rev = np.unique(keys[::-1], return_index=True)
    assert_array_equal(np.sort(plan.keys), uniq)
    assert_array_equal(plan.keys[plan.inverse], keys)
    order = np.argsort(plan.keys)
    assert_array_equal(plan.last[order], keys.shape[0] - 1 - last_rev)
    sid = shard_of(plan.keys)
    assert (np.diff(sid) >= 0).all()  # grouped
    assert_array_equal(plan.bounds, np.searchsorted(sid, np.arange(nshards + 1)))
