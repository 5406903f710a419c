"""The split model path equals ``model(batch)``, a refreshed encoding equals a fresh one, the
compiled path equals the eager one, and the history cache behaves as a byte-bounded LRU model."""

from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamrec.model.batch import RequestBatch
from streamrec.model.stca import STCA
from streamrec.serving.cache import HistoryCache
from streamrec.serving.executor import Encoded, ModelRunner
from tests.serving.conftest import NOW_MS, small_model


def _batch(rng: np.random.Generator, lens: list[int], targets: list[int], now: int) -> RequestBatch:
    n, t = sum(lens), sum(targets)
    return RequestBatch.from_numpy(
        hist_offsets=np.r_[0, np.cumsum(lens)], hist_item=rng.integers(0, 10**6, n),
        hist_action=rng.integers(1, 7, n), hist_ts_ms=now - rng.integers(1, 10**9, n),
        hist_value=rng.random(n) * 20, request_ts_ms=[now] * len(lens), user_id=np.arange(len(lens)),
        target_offsets=np.r_[0, np.cumsum(targets)], target_item=rng.integers(0, 10**6, t),
        target_category=rng.integers(0, 40, t), sparse=rng.integers(0, 30, (t, 3)))


def _encode(r: ModelRunner, b: RequestBatch, now: int) -> list[Encoded]:
    off = b.hist_offsets.numpy()
    return [r.encode(b.hist_item.numpy()[a:c], b.hist_action.numpy()[a:c], b.hist_ts_ms.numpy()[a:c],
                     b.hist_value.numpy()[a:c], now) for a, c in itertools.pairwise(off)]


def test_split_and_refresh_equal_the_model() -> None:
    rng = np.random.default_rng(0)
    r = ModelRunner(small_model(), 1)
    assert r.split
    b = _batch(rng, [50, 0, 3, 700], [5, 2, 9, 40], NOW_MS)
    with torch.no_grad():
        want = r.model(b)
    enc = _encode(r, b, NOW_MS)
    torch.testing.assert_close(r.score(b, enc), want, rtol=1e-4, atol=1e-5)
    later = NOW_MS + 5 * 3_600_000
    moved = [r.refresh(e, later) for e in enc]
    assert 0 < sum(n for _, n in moved) < sum(e.length for e in enc)  # only some buckets moved
    b2 = RequestBatch(**{**b.__dict__, "request_ts_ms": torch.full((4,), later)})
    with torch.no_grad():
        want2 = r.model(b2)
    torch.testing.assert_close(r.score(b2, [e for e, _ in moved]), want2, rtol=1e-4, atol=1e-5)
    assert all(e.request_ts_ms == NOW_MS for e in enc)  # the cached values are never changed


def test_a_model_the_split_does_not_reproduce_runs_whole() -> None:
    class Changed(STCA):
        def interest(self, batch: RequestBatch, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return super().interest(batch, tokens, target) * 2

    model = small_model()
    model.__class__ = Changed
    assert not ModelRunner(model, 1).split


@pytest.mark.slow
def test_compiled_equals_eager() -> None:
    rng = np.random.default_rng(1)
    model = small_model()
    eager, compiled = ModelRunner(model, 1), ModelRunner(model, 1, compiled=True)
    for lens, targets in (([30, 5], [4, 7]), ([300], [100]), ([0, 1, 64], [1, 1, 3])):
        b = _batch(rng, lens, targets, NOW_MS)
        torch.testing.assert_close(compiled.score(b, _encode(compiled, b, NOW_MS)),
                                   eager.score(b, _encode(eager, b, NOW_MS)), rtol=1e-4, atol=1e-5)


def _enc(n: int) -> Encoded:
    z = torch.zeros(n, dtype=torch.int64)
    return Encoded(z, z, z, torch.zeros(n), z, (torch.zeros(n, 4),), 0)


@given(st.lists(st.tuples(st.sampled_from(["get", "put"]), st.integers(0, 5), st.integers(0, 2),
                          st.integers(0, 30)), max_size=60))
def test_history_cache_is_a_byte_bounded_lru(ops: list[tuple[str, int, int, int]]) -> None:
    cache = HistoryCache(max_bytes=_enc(10).nbytes * 3)
    ref: OrderedDict[int, tuple[int, int]] = OrderedDict()  # user -> (fingerprint, bytes)
    hits = 0
    for op, user, fp, n in ops:
        key = (fp, 0, 0, 0)
        if op == "put":
            e = _enc(n)
            if e.nbytes <= cache.max_bytes:
                ref.pop(user, None)
                ref[user] = (fp, e.nbytes)
                while sum(b for _, b in ref.values()) > cache.max_bytes:
                    ref.popitem(last=False)
            cache.put(user, 1, key, e, (-1, 10))
        else:
            got = cache.get(user, 1, key, 5)
            want = user in ref and ref[user][0] == fp
            assert (got is not None) == want
            if want:
                ref.move_to_end(user)
                hits += 1
            assert cache.get(user, 1, key, 11) is None  # outside the window of the same events
        assert cache.bytes == sum(b for _, b in ref.values()) <= cache.max_bytes
    assert cache.stats.hits == hits


def test_extend_reuses_the_old_events_and_equals_a_fresh_encoding() -> None:
    rng = np.random.default_rng(3)
    r = ModelRunner(small_model(), 1)
    n = 120
    cols: list[np.ndarray] = [rng.integers(0, 10**6, n + 30), rng.integers(1, 7, n + 30),
                              np.sort(NOW_MS - rng.integers(1, 10**9, n + 30)),
                              (rng.random(n + 30) * 9).astype(np.float32)]
    old = r.encode(cols[0][:n], cols[1][:n], cols[2][:n], cols[3][:n], NOW_MS)
    later = NOW_MS + 3 * 3_600_000
    for d, k in ((0, 0), (0, 30), (25, 30), (40, 0)):  # d oldest dropped, k new appended
        new = [c[d:n + k] for c in cols]
        got = r.extend(old, new[0], new[1], new[2], new[3], later)
        assert got is not None
        enc, reused = got
        assert reused == n - d
        fresh = r.encode(new[0], new[1], new[2], new[3], later)
        for a, b in zip(enc.kv, fresh.kv, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(enc.buckets, fresh.buckets)
    edited = [c[:n].copy() for c in cols]
    edited[3][60] += 1.0  # an event in the middle differs: nothing lines up
    assert r.extend(old, edited[0], edited[1], edited[2], edited[3], later) is None
