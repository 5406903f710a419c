"""RequestBatch: the contract's checks, the ragged reshapes against a list-of-lists model, and
``from_samples`` against a store holding events before and after each request."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from streamrec.model.batch import RequestBatch
from streamrec.pipeline.events import SAMPLE_SCHEMA
from streamrec.store.sequence import SequenceStore


def _random_batch(rng: np.random.Generator, r: int = 6) -> tuple[RequestBatch, list[list[int]]]:
    lens = rng.integers(0, 9, size=r)
    lens[0] = 0
    lens[1] = 1
    hists = [list(rng.integers(1, 1000, size=n)) for n in lens]
    m = rng.integers(1, 4, size=r)
    off = np.r_[0, np.cumsum(lens)]
    toff = np.r_[0, np.cumsum(m)]
    n = int(off[-1])
    b = RequestBatch.from_numpy(
        hist_offsets=off, hist_item=np.concatenate([np.array(h, np.int64) for h in hists]),
        hist_action=rng.integers(1, 7, size=n), hist_ts_ms=np.arange(n), hist_value=rng.random(n),
        request_ts_ms=np.full(r, 10_000), user_id=np.arange(r) + 100, target_offsets=toff,
        target_item=rng.integers(0, 50, size=int(toff[-1])), dense=rng.random((int(toff[-1]), 2)),
        labels=rng.integers(0, 2, size=(int(toff[-1]), 3)))
    return b, hists


def _runs(b: RequestBatch) -> list[list[int]]:
    off = b.hist_offsets.tolist()
    return [b.hist_item[off[i]:off[i + 1]].tolist() for i in range(b.num_requests)]


def test_shapes_and_derived_indices() -> None:
    b, hists = _random_batch(np.random.default_rng(0))
    assert b.num_requests == 6 and b.num_events == sum(map(len, hists))
    assert b.hist_lengths.tolist() == [len(h) for h in hists]
    assert b.event_request.tolist() == [r for r, h in enumerate(hists) for _ in h]
    per = b.targets_per_request.tolist()
    assert b.target_request.tolist() == [r for r, m in enumerate(per) for _ in range(m)]
    assert b.dense.shape == (b.num_targets, 2) and b.sparse.shape == (b.num_targets, 0)


def test_bad_fields_are_named() -> None:
    b, _ = _random_batch(np.random.default_rng(1))
    with pytest.raises(ValueError, match="hist_offsets"):
        RequestBatch(**{**b.__dict__, "hist_offsets": b.hist_offsets.flip(0)})
    with pytest.raises(ValueError, match="labels"):
        RequestBatch(**{**b.__dict__, "labels": b.labels[:, :2]})
    with pytest.raises(ValueError, match="hist_item"):
        RequestBatch(**{**b.__dict__, "hist_item": b.hist_item.float()})


@pytest.mark.parametrize("seed", range(5))
def test_reshapes_match_a_list_model(seed: int) -> None:
    rng = np.random.default_rng(seed)
    b, hists = _random_batch(rng)
    assert _runs(b.truncate(3)) == [h[-3:] if h else [] for h in hists]
    assert _runs(b.truncate(0)) == [[] for _ in hists]
    want = rng.integers(0, 10, size=len(hists))
    cut = b.with_history_lengths(want)
    assert _runs(cut) == [h[len(h) - min(len(h), w):] for h, w in zip(hists, want, strict=True)]
    rep = b.repeat_per_target()
    assert rep.num_requests == b.num_targets and rep.targets_per_request.tolist() == [1] * b.num_targets
    assert _runs(rep) == [hists[r] for r in b.target_request.tolist()]
    assert torch.equal(rep.user_id, b.user_id[b.target_request])
    assert torch.equal(rep.target_item, b.target_item) and torch.equal(rep.labels, b.labels)
    assert torch.equal(rep.hist_value, b.hist_value[torch.cat(
        [torch.arange(int(b.hist_offsets[r]), int(b.hist_offsets[r + 1])) for r in b.target_request.tolist()]
        + [torch.zeros(0, dtype=torch.int64)])])


def test_sampled_lengths_stay_in_range_and_keep_the_newest() -> None:
    rng = np.random.default_rng(3)
    r = 2000
    off = np.arange(r + 1) * 100
    b = RequestBatch.from_numpy(hist_offsets=off, hist_item=np.tile(np.arange(100), r),
                                hist_action=np.ones(r * 100), hist_ts_ms=np.zeros(r * 100),
                                request_ts_ms=np.ones(r), target_offsets=np.arange(r + 1),
                                target_item=np.zeros(r))
    cut = b.sample_lengths(rng, 10, 90)
    lens = cut.hist_lengths.numpy()
    assert lens.min() >= 10 and lens.max() <= 90
    assert ((lens % 8 == 0) | (lens == 90)).all()
    # U-shaped: both ends of the range are more common than the middle.
    assert (lens <= 30).sum() > (np.abs(lens - 50) <= 10).sum()
    assert (lens >= 70).sum() > (np.abs(lens - 50) <= 10).sum()
    for run, n in zip(_runs(cut)[:50], lens[:50], strict=True):
        assert run == list(range(100 - n, 100))


def _samples(rows: list[dict[str, int]]) -> pa.RecordBatch:
    cols = {}
    for f in SAMPLE_SCHEMA:
        cols[f.name] = pa.array([row.get(f.name, 0) for row in rows], type=f.type)
    cols["ctr_feat"] = pa.array([0.5] * len(rows), type=pa.float32())
    cols["user_cat"] = pa.array([7] * len(rows), type=pa.int64())
    return pa.RecordBatch.from_pydict(cols)


def test_from_samples_groups_requests_and_drops_future_events() -> None:
    store = SequenceStore(max_len=100, extra_fields=("value",), huge_pages=False)
    # user 1: events at t = 10..19 (items 10..19); user 2: none.
    store.append(np.ones(10, np.int64), items=np.arange(10, 20), actions=np.full(10, 4),
                 timestamps=np.arange(10, 20), extras={"value": np.arange(10) * 1.5})
    rows = [
        dict(request_id=5, user_id=1, item_id=100, ts_ms=15, click=1),
        dict(request_id=9, user_id=2, item_id=101, ts_ms=30),
        dict(request_id=5, user_id=1, item_id=102, ts_ms=16, like=1),
        dict(request_id=7, user_id=1, item_id=103, ts_ms=100),
    ]
    b = RequestBatch.from_samples(_samples(rows), store, max_len=3)
    assert b.request_id is not None and b.sample_index is not None
    assert b.request_id.tolist() == [5, 7, 9] and b.user_id.tolist() == [1, 1, 2]
    assert b.request_ts_ms.tolist() == [15, 100, 30]
    assert b.target_item.tolist() == [100, 102, 103, 101]
    assert b.sample_index.tolist() == [0, 2, 3, 1]
    # request 5 at t=15 sees events 10..14 only (newest 3: 12, 13, 14); request 7 sees 17..19.
    assert _runs(b) == [[12, 13, 14], [17, 18, 19], []]
    assert b.hist_value.tolist() == [3.0, 4.5, 6.0, 10.5, 12.0, 13.5]
    assert b.labels.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 0]]
    assert b.dense.shape == (4, 1) and b.sparse.shape == (4, 4)  # device, hour, position, user_cat
    assert b.truth is not None and b.truth.shape == (4, 3)


def test_from_samples_refuses_a_request_of_two_users() -> None:
    rows = [dict(request_id=5, user_id=1, item_id=1, ts_ms=1),
            dict(request_id=5, user_id=2, item_id=2, ts_ms=1)]
    with pytest.raises(ValueError, match="request 5"):
        RequestBatch.from_samples(_samples(rows), None)


def test_from_samples_keeps_only_events_that_had_arrived_when_served() -> None:
    """A like of t=12 that arrived after the request of t=20 (a delayed action) is not in its history
    when the sample says the user's sequence held 3 events at serving time."""
    store = SequenceStore(max_len=100, extra_fields=("value",), huge_pages=False)
    # arrival order: events of t=10, 11, 13 (held 3 when request 5 is served at t=20), then the
    # delayed like of t=12, then an event of t=25.
    store.append(np.ones(5, np.int64), items=[10, 11, 13, 12, 25], actions=[1, 1, 1, 2, 1],
                 timestamps=[10, 11, 13, 12, 25], extras={"value": np.zeros(5)})
    rows = [dict(request_id=5, user_id=1, item_id=100, ts_ms=20, click=1),
            dict(request_id=6, user_id=1, item_id=101, ts_ms=30)]
    batch = _samples(rows)
    with_len = batch.append_column("hist_len", pa.array([3, 5], type=pa.int32()))
    assert _runs(RequestBatch.from_samples(batch, store)) == [[10, 11, 13, 12], [10, 11, 13, 12, 25]]
    b = RequestBatch.from_samples(with_len, store)
    assert _runs(b) == [[10, 11, 13], [10, 11, 13, 12, 25]]
    assert b.sparse.shape[1] == 4  # hist_len is not a feature
    # A user whose sequence reached max_len may have dropped events: the event-time rule alone.
    small = SequenceStore(max_len=4, extra_fields=("value",), huge_pages=False)
    small.append(np.ones(5, np.int64), items=[10, 11, 13, 12, 25], actions=[1, 1, 1, 2, 1],
                 timestamps=[10, 11, 13, 12, 25], extras={"value": np.zeros(5)})
    assert _runs(RequestBatch.from_samples(with_len, small)) == [[11, 13, 12], [11, 13, 12, 25]]
