"""MovieLens loader: a tiny synthetic atomic file checked against a per-user loop, and the real
ml-100k when the recbole wheel is cached or reachable."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamrec.model.movielens import (
    MovieLens,
    cache_dir,
    fetch_wheel,
    leave_one_out,
    load_ml100k,
    parse_atomic,
    ranking_requests,
    training_requests,
)
from streamrec.pipeline.events import ACTIONS

_ITEM = b"item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n" \
        b"10\tA Film\t1995\tDrama Comedy\n20\tB\t1996\tAction\n30\tC\t1997\t\n"


def _inter(rows: list[tuple[int, int, float, int]]) -> bytes:
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in rows]
    return ("\n".join(lines) + "\n").encode()


def test_parse_tiny_file() -> None:
    ml = parse_atomic(_inter([(1, 10, 5, 300), (2, 20, 3, 100), (1, 40, 4, 200)]), _ITEM)
    assert ml.ts_ms.tolist() == [100_000, 200_000, 300_000]
    assert ml.user_id.tolist() == [2, 1, 1] and ml.item_id.tolist() == [20, 40, 10]
    assert ml.action.tolist() == [ACTIONS["click"], ACTIONS["like"], ACTIONS["like"]]
    assert ml.items.tolist() == [10, 20, 30, 40]  # 40 is rated but missing from .item
    assert ml.genres == ("Action", "Comedy", "Drama")
    assert ml.item_category.tolist() == [2, 0, 0, 0]  # first genre; none -> 0
    assert ml.item_genres.tolist() == [[False, True, True], [True, False, False], [False] * 3, [False] * 3]


def test_parse_names_missing_column() -> None:
    with pytest.raises(ValueError, match="'timestamp' missing"):
        parse_atomic(b"user_id:token\titem_id:token\trating:float\n1\t2\t3\n")


_rows = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 7), st.integers(1, 5), st.integers(0, 30)),
                 min_size=1, max_size=40, unique_by=lambda r: (r[0], r[1]))


@given(_rows)
def test_leave_one_out_equals_per_user_loop(rows: list[tuple[int, int, int, int]]) -> None:
    ml = parse_atomic(_inter([(u, i, float(r), t) for u, i, r, t in rows]))
    loo = leave_one_out(ml)
    # the brute force: walk the time-ordered log per user
    order = sorted(range(len(rows)), key=lambda k: (rows[k][3], k))
    want_train = np.zeros(len(rows), dtype=bool)
    users, targets, histories = [], [], []
    for user in sorted({r[0] for r in rows}):
        evs = [k for k in order if rows[k][0] == user]
        pos = [j for j, k in enumerate(evs) if rows[k][2] >= 4]
        if len(pos) >= 2:
            last = pos[-1]
            users.append(user)
            targets.append(rows[evs[last]][1])
            histories.append([rows[k][1] for k in evs[:last]])
            kept = evs[:last]
        else:
            kept = evs
        for k in kept:
            want_train[order.index(k)] = True
    assert loo.train.tolist() == want_train.tolist()
    assert loo.users.tolist() == users
    assert loo.target_item.tolist() == targets
    off = loo.history_offsets
    got_hist = [loo.history_item[a:b].tolist() for a, b in itertools.pairwise(off)]
    assert got_hist == histories
    for row, h in enumerate(histories):
        assert sorted(ml.items[loo.exclude[row]].tolist()) == sorted(h)
    for a, b in itertools.pairwise(loo.history_offsets):
        assert (np.diff(loo.history_ts_ms[a:b]) >= 0).all()


@given(_rows, st.integers(1, 3), st.integers(0, 2))
def test_requests_equal_per_user_loop(rows: list[tuple[int, int, int, int]], max_len: int, negs: int) -> None:
    ml = parse_atomic(_inter([(u, i, float(r), t) for u, i, r, t in rows]))
    loo = leave_one_out(ml)
    # training: one request per positive training event with an earlier training event
    train = [k for k in range(len(ml)) if loo.train[k]]
    want = []
    for k in train:
        before = [j for j in train if ml.user_id[j] == ml.user_id[k] and j < k]
        if ml.positive[k] and before:
            hist = [int(ml.item_id[j]) for j in before[-max_len:]]
            want.append((int(ml.user_id[k]), int(ml.item_id[k]), hist))
    batches = training_requests(ml, loo, np.random.default_rng(0), negatives=negs, max_len=max_len,
                                requests=2)
    got = []
    for b in batches:
        assert b.labels[:, 0].tolist() == ([1.0] + [0.0] * negs) * b.num_requests
        for r in range(b.num_requests):
            h = b.hist_item[b.hist_offsets[r]:b.hist_offsets[r + 1]].tolist()
            assert (b.hist_ts_ms[b.hist_offsets[r]:b.hist_offsets[r + 1]] <= b.request_ts_ms[r]).all()
            got.append((int(b.user_id[r]), int(b.target_item[b.target_offsets[r]]), h))
    assert sorted(got) == sorted(want)
    # ranking: every item a candidate of each evaluated user's request, the split's history
    pairs = ranking_requests(ml, loo, max_len=max_len, users=2)
    seen = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, np.int64)
    assert seen.tolist() == list(range(loo.users.size))
    for eval_rows, b in pairs:
        assert b.target_item.tolist() == np.tile(ml.items, eval_rows.size).tolist()
        for r, row in enumerate(eval_rows):
            want_h = loo.history_item[loo.history_offsets[row]:loo.history_offsets[row + 1]][-max_len:]
            assert b.hist_item[b.hist_offsets[r]:b.hist_offsets[r + 1]].tolist() == want_h.tolist()
            assert int(b.user_id[r]) == loo.users[row]


def _wheel_or_skip() -> MovieLens:
    try:
        return load_ml100k(fetch_wheel(timeout_s=120))
    except FileNotFoundError as exc:
        pytest.skip(f"recbole wheel neither in {cache_dir()} nor downloadable: {exc}")


def test_real_ml100k() -> None:
    ml = _wheel_or_skip()
    assert len(ml) == 100_000
    assert np.unique(ml.user_id).size == 943 and ml.items.size == 1682
    assert (np.diff(ml.ts_ms) >= 0).all()
    assert int(ml.positive.sum()) == 55_375  # ratings 4 and 5 in ml-100k
    assert len(ml.genres) == 19 and ml.genres[-1] == "unknown"
    loo = leave_one_out(ml)
    assert loo.users.size == 942  # one user has a single positive
    # no history event is at or after its user's target
    rows = np.repeat(np.arange(loo.users.size), np.diff(loo.history_offsets))
    assert (loo.history_ts_ms <= loo.target_ts_ms[rows]).all()
    assert not loo.exclude[np.arange(loo.users.size), ml.item_index(loo.target_item)].any()
