"""Metrics against brute-force definitions (pair counting, per-user loops, explicit tie orders)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamrec.model.metrics import (
    ProgressiveMetrics,
    auc,
    gauc,
    hr_ndcg_at_k,
    logloss,
    target_ranks,
)

# Few distinct score values so that ties are common.
_scores = st.lists(st.integers(-3, 3), min_size=0, max_size=40)


def _brute_auc(y: Sequence[int], s: Sequence[float]) -> float:
    pos = [b for a, b in zip(y, s, strict=True) if a]
    neg = [b for a, b in zip(y, s, strict=True) if not a]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _brute_gauc(y: Sequence[int], s: Sequence[float], u: Sequence[int]) -> float:
    num = den = 0.0
    for user in set(u):
        idx = [i for i in range(len(u)) if u[i] == user]
        a = _brute_auc([y[i] for i in idx], [s[i] for i in idx])
        if not math.isnan(a):
            num += a * len(idx)
            den += len(idx)
    return num / den if den else math.nan


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-12


@given(st.data())
def test_auc_equals_pair_counting(data: st.DataObject) -> None:
    s = data.draw(_scores)
    y = data.draw(st.lists(st.integers(0, 1), min_size=len(s), max_size=len(s)))
    assert _same(auc(y, s), _brute_auc(y, s))


@given(st.data())
def test_gauc_equals_per_user_loop(data: st.DataObject) -> None:
    s = data.draw(_scores)
    n = len(s)
    y = data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    u = data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    assert _same(gauc(y, s, u), _brute_gauc(y, s, u))


def test_auc_known_values() -> None:
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75  # sklearn's docstring example
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    assert math.isnan(auc([1, 1], [0.1, 0.2]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        auc([0, 1], [0.1, math.nan])


def test_gauc_skips_one_class_users() -> None:
    # user 7 has only positives: skipped, and its 3 impressions do not weigh
    y = [0, 1, 1, 1, 1, 0, 1, 0]
    s = [0.1, 0.9, 0.2, 0.3, 0.4, 0.6, 0.5, 0.2]
    u = [1, 1, 7, 7, 7, 2, 2, 2]
    # user 1: AUC 1 (2 impressions); user 2: pos 0.5 vs negs 0.6, 0.2 -> 0.5 (3 impressions)
    assert gauc(y, s, u) == pytest.approx((1.0 * 2 + 0.5 * 3) / 5)


@given(st.lists(st.tuples(st.integers(0, 1), st.floats(0, 1)), max_size=30))
def test_logloss_is_clipped_mean_cross_entropy(rows: list[tuple[int, float]]) -> None:
    y = [r[0] for r in rows]
    p = [r[1] for r in rows]
    got = logloss(y, p)
    if not rows:
        assert math.isnan(got)
        return
    eps = 1e-7
    want = -sum(math.log(min(max(q, eps), 1 - eps)) if a else math.log(1 - min(max(q, eps), 1 - eps))
                for a, q in rows) / len(rows)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def _brute_hr_ndcg(scores: np.ndarray, targets: list[int], exclude: np.ndarray,
                   k: int) -> tuple[float, float]:
    """Average over every order of the tied candidates: the expectation of a random tie-break."""
    hr = nd = 0.0
    for row, t in enumerate(targets):
        st_ = scores[row, t]
        others = [j for j in range(scores.shape[1]) if j != t and not exclude[row, j]]
        above = sum(scores[row, j] > st_ for j in others)
        tied = [j for j in others if scores[row, j] == st_]
        h = d = 0.0
        perms = list(itertools.permutations([*tied, -1]))  # -1 is the target among its ties
        for perm in perms:
            rank = above + perm.index(-1)
            if rank < k:
                h += 1
                d += 1 / math.log2(rank + 2)
        hr += h / len(perms)
        nd += d / len(perms)
    return hr / len(targets), nd / len(targets)


@given(st.data())
def test_hr_ndcg_equal_tie_order_average(data: st.DataObject) -> None:
    users = data.draw(st.integers(1, 4))
    items = data.draw(st.integers(1, 6))
    k = data.draw(st.integers(1, 7))
    scores = np.array(data.draw(st.lists(st.integers(0, 2), min_size=users * items, max_size=users * items)),
                      dtype=np.float64).reshape(users, items)
    targets = data.draw(st.lists(st.integers(0, items - 1), min_size=users, max_size=users))
    exclude = np.array(data.draw(st.lists(st.booleans(), min_size=users * items, max_size=users * items)),
                       dtype=bool).reshape(users, items)
    g, t = target_ranks(scores, targets, exclude)
    hr, nd = hr_ndcg_at_k(g, t, k)
    bhr, bnd = _brute_hr_ndcg(scores, targets, exclude, k)
    assert hr == pytest.approx(bhr, abs=1e-12)
    assert nd == pytest.approx(bnd, abs=1e-12)


def test_hr_ndcg_known_values() -> None:
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    g, t = target_ranks(scores, [0, 0])  # user 0: rank 0; user 1: rank 1
    assert (g.tolist(), t.tolist()) == ([0, 1], [0, 0])
    assert hr_ndcg_at_k(g, t, 1) == (0.5, 0.5)
    assert hr_ndcg_at_k(g, t, 2) == pytest.approx((1.0, (1 + 1 / math.log2(3)) / 2))
    # a constant scorer over n items gets HR@K = K / n exactly
    g, t = target_ranks(np.zeros((3, 20)), [0, 5, 19])
    assert hr_ndcg_at_k(g, t, 10)[0] == pytest.approx(0.5)


@given(st.data())
def test_progressive_matches_batch_metrics(data: st.DataObject) -> None:
    n_batches = data.draw(st.integers(1, 5))
    pm = ProgressiveMetrics(["click", "like"], window=25)
    ys, zs, us = [], [], []
    for _ in range(n_batches):
        n = data.draw(st.integers(0, 12))
        y = np.array(data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
        # logits on a 0.25 grid: distinct values never share a bin, so the binned AUC is exact
        z = np.array(data.draw(st.lists(st.integers(-20, 20), min_size=n, max_size=n))) / 4.0
        u = np.array(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
        pm.update({"click": y}, {"click": z}, users=u)
        ys.append(y)
        zs.append(z)
        us.append(u)
    y, z, u = np.concatenate(ys), np.concatenate(zs), np.concatenate(us)
    s = pm.summary()
    c = s["click"]
    assert c.samples == y.size and c.positives == int(y.sum())
    assert _same(c.auc, _brute_auc(y.tolist(), z.tolist()))
    assert _same(c.window_auc, _brute_auc(y[-25:].tolist(), z[-25:].tolist()))
    assert _same(c.gauc, _brute_gauc(y[-25:].tolist(), z[-25:].tolist(), u[-25:].tolist()))
    want_ll = logloss(y, 1 / (1 + np.exp(-z)), eps=1e-300) if y.size else math.nan
    assert _same(round(c.logloss, 9), round(want_ll, 9))
    assert s["like"].samples == 0 and math.isnan(s["like"].auc)


def test_auc_is_fast_and_exact_on_a_large_input() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1_000_000)
    s = y * 0.3 + rng.normal(size=y.size)
    # the binormal AUC with separation 0.3 is Phi(0.3 / sqrt 2)
    assert auc(y, s) == pytest.approx(0.5 + 0.5 * math.erf(0.3 / 2), abs=2e-3)
