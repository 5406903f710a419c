"""STCA: the ragged attention against a dense per-target loop, request-level batching equal to
per-target computation (outputs and gradients), empty and one-event histories, shapes and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamrec.model.batch import RequestBatch
from streamrec.model.optimizer import SplitAdam
from streamrec.model.stca import STCA, ModelConfig, ragged_target_attention

torch.set_num_threads(1)


def make_batch(rng: np.random.Generator, lens: list[int], targets: list[int], *, dense: int = 2,
               sparse: int = 2) -> RequestBatch:
    r = len(lens)
    off = np.r_[0, np.cumsum(lens)]
    toff = np.r_[0, np.cumsum(targets)]
    n, t = int(off[-1]), int(toff[-1])
    now = 1_767_225_600_000
    return RequestBatch.from_numpy(
        hist_offsets=off, hist_item=rng.integers(0, 500, n), hist_action=rng.integers(1, 7, n),
        hist_ts_ms=now - rng.integers(0, 10**9, n), hist_value=rng.random(n) * 30,
        request_ts_ms=np.full(r, now), user_id=rng.integers(0, 50, r), target_offsets=toff,
        target_item=rng.integers(0, 500, t), target_category=rng.integers(0, 20, t),
        dense=rng.random((t, dense)), sparse=rng.integers(0, 100, (t, sparse)),
        labels=rng.integers(0, 2, (t, 3)))


def dense(g: torch.Tensor) -> torch.Tensor:
    """A gradient as a dense tensor (hashed embedding tables have sparse ones)."""
    return g.to_dense() if g.is_sparse else g


def _model(batch: RequestBatch, seed: int = 0, attn_chunk: int = 64) -> STCA:
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=16, heads=2, item_buckets=1024, user_buckets=64, sparse_buckets=256,
                      mlp=(32,), attn_chunk=attn_chunk).for_batch(batch)
    return STCA(cfg).double()


LENS = [0, 1, 7, 70, 33, 0]
TARGETS = [3, 1, 2, 4, 1, 2]


def test_ragged_attention_equals_a_dense_softmax_per_target() -> None:
    rng = np.random.default_rng(0)
    b = make_batch(rng, LENS, TARGETS)
    t, n, h, e = b.num_targets, b.num_events, 3, 5
    q, k, v = (torch.randn(x, h, e, dtype=torch.float64) for x in (t, n, n))
    got = ragged_target_attention(q, k, v, b.hist_offsets, b.target_offsets, chunk=8)
    off = b.hist_offsets.tolist()
    for i, r in enumerate(b.target_request.tolist()):
        s, end = off[r], off[r + 1]
        if s == end:
            assert torch.equal(got[i], torch.zeros(h, e, dtype=torch.float64))
            continue
        scores = torch.einsum("he,lhe->hl", q[i], k[s:end]) / e**0.5
        want = torch.einsum("hl,lhe->he", scores.softmax(dim=-1), v[s:end])
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)


def test_block_size_does_not_change_the_result() -> None:
    b = make_batch(np.random.default_rng(1), LENS, TARGETS)
    outs = [_model(b, attn_chunk=c)(b) for c in (1, 4, 64, 1024)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-10, atol=1e-12)


def test_shapes_and_every_parameter_gets_a_gradient() -> None:
    b = make_batch(np.random.default_rng(2), LENS, TARGETS)
    model = _model(b)
    logits = model(b)
    assert logits.shape == (b.num_targets, 3) and torch.isfinite(logits).all()
    model.loss(b, logits).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(dense(p.grad)).all(), name
        assert dense(p.grad).abs().sum() > 0, f"{name} got a zero gradient"


@pytest.mark.parametrize("seed", range(3))
def test_request_level_batching_equals_per_target_computation(seed: int) -> None:
    """Each target as its own request with a copy of the history: same logits, loss and gradients."""
    b = make_batch(np.random.default_rng(seed), LENS, TARGETS)
    model = _model(b, seed)
    per = b.repeat_per_target()
    assert per.num_requests == b.num_targets
    torch.testing.assert_close(model(b), model(per), rtol=1e-10, atol=1e-12)
    params = list(model.parameters())
    g_rlb = torch.autograd.grad(model.loss(b), params)
    g_per = torch.autograd.grad(model.loss(per), params)
    for (name, _), x, y in zip(model.named_parameters(), g_rlb, g_per, strict=True):
        torch.testing.assert_close(dense(x), dense(y), rtol=1e-9, atol=1e-12, msg=name)


def test_the_loss_is_the_mean_of_per_sample_losses() -> None:
    b = make_batch(np.random.default_rng(4), LENS, TARGETS)
    model = _model(b)
    per = b.repeat_per_target()
    singles = [model.loss(_one(per, i)) for i in range(per.num_requests)]
    torch.testing.assert_close(model.loss(b), torch.stack(singles).mean(), rtol=1e-10, atol=1e-12)


def _one(b: RequestBatch, r: int) -> RequestBatch:
    s, e = int(b.hist_offsets[r]), int(b.hist_offsets[r + 1])
    t0, t1 = int(b.target_offsets[r]), int(b.target_offsets[r + 1])
    return RequestBatch.from_numpy(
        hist_offsets=[0, e - s], hist_item=b.hist_item[s:e], hist_action=b.hist_action[s:e],
        hist_ts_ms=b.hist_ts_ms[s:e], hist_value=b.hist_value[s:e], request_ts_ms=b.request_ts_ms[r:r + 1],
        user_id=b.user_id[r:r + 1], target_offsets=[0, t1 - t0], target_item=b.target_item[t0:t1],
        target_category=b.target_category[t0:t1], dense=b.dense[t0:t1], sparse=b.sparse[t0:t1],
        labels=b.labels[t0:t1])


def test_empty_and_single_event_histories() -> None:
    b = make_batch(np.random.default_rng(5), [0, 0, 1], [2, 1, 1])
    model = _model(b)
    logits = model(b)
    assert torch.isfinite(logits).all()
    alone = make_batch(np.random.default_rng(5), [0], [1])
    assert torch.isfinite(model(alone)).all()
    model.loss(b).backward()
    assert all(torch.isfinite(dense(p.grad)).all() for p in model.parameters() if p.grad is not None)


def test_no_absolute_positions_only_time_since_action() -> None:
    """Shifting every time (events and requests) by a constant changes nothing: tokens see only
    the delay since their action."""
    b = make_batch(np.random.default_rng(6), [5, 9], [2, 3])
    model = _model(b)
    shifted = RequestBatch(**{**b.__dict__, "hist_ts_ms": b.hist_ts_ms + 12345,
                              "request_ts_ms": b.request_ts_ms + 12345})
    torch.testing.assert_close(model(b), model(shifted), rtol=0, atol=0)


def test_ragged_batch_equals_each_request_alone() -> None:
    b = make_batch(np.random.default_rng(7), LENS, TARGETS)
    model = _model(b)
    whole = model(b)
    parts = torch.cat([model(_one(b, r)) for r in range(b.num_requests)])
    torch.testing.assert_close(whole, parts, rtol=1e-10, atol=1e-12)


def test_a_mismatched_batch_is_refused() -> None:
    b = make_batch(np.random.default_rng(8), [3], [2])
    model = _model(b)
    with pytest.raises(ValueError, match="dense"):
        model(make_batch(np.random.default_rng(8), [3], [2], dense=3))


@pytest.mark.parametrize("lens", [[40, 40, 40], [1], [0, 0], [64]])
def test_the_fused_path_equals_the_blocks(lens: list[int]) -> None:
    b = make_batch(np.random.default_rng(9), lens, [3] * len(lens))
    t, n = b.num_targets, b.num_events
    q, k, v = (torch.randn(x, 2, 4, dtype=torch.float64, requires_grad=True) for x in (t, n, n))
    outs, grads = [], []
    for fused in (True, False):
        o = ragged_target_attention(q, k, v, b.hist_offsets, b.target_offsets, chunk=16, fused=fused)
        outs.append(o)
        if o.requires_grad:  # no history at all: constant zeros
            grads.append(torch.autograd.grad((o * o).sum(), (q, k, v), allow_unused=True))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    assert len(grads) == (0 if sum(lens) == 0 else 2)
    for x, y in zip(*grads, strict=True):
        if x is not None and y is not None:
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def category_task(rng: np.random.Generator, r: int, m: int = 8, length: int = 40, cats: int = 8,
                  items: int = 160) -> RequestBatch:
    """Each user mostly watches one category; a target is clicked iff it is of that category.

    Only the history tells the category (users are fresh each request), so a model that
    does not match targets against histories stays at AUC 0.5.
    """
    fav = rng.integers(0, cats, r)
    hist = rng.integers(0, items // cats, (r, length)) * cats + fav[:, None]
    hist = np.where(rng.random((r, length)) < 0.3, rng.integers(0, items, (r, length)), hist).reshape(-1)
    tgt = rng.integers(0, items, (r, m))
    n = r * length
    return RequestBatch.from_numpy(
        hist_offsets=np.arange(r + 1) * length, hist_item=hist, hist_action=np.ones(n),
        hist_ts_ms=np.zeros(n),
        request_ts_ms=np.full(r, 60_000), user_id=rng.integers(0, 2**40, r),
        target_offsets=np.arange(r + 1) * m, target_item=tgt.reshape(-1),
        labels=(tgt % cats == fav[:, None]).astype(np.float32).reshape(-1, 1), tasks=("click",))


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    ranks = np.empty(scores.size)
    ranks[np.argsort(scores)] = np.arange(scores.size)
    pos = labels == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() - 1) / 2) / (pos.sum() * (~pos).sum()))


def fit_category_task(model: torch.nn.Module, steps: int, seed: int = 0) -> float:
    """Train on fresh batches of the category task; the AUC on 64 unseen requests."""
    rng = np.random.default_rng(seed)
    opt = SplitAdam(model, lr=1e-2)
    for _ in range(steps):
        b = category_task(rng, 16)
        opt.zero_grad()
        model.loss(b).backward()  # type: ignore[operator]
        opt.step()
    model.eval()
    test = category_task(rng, 64)
    with torch.no_grad():
        return auc(model(test)[:, 0].numpy(), test.labels[:, 0].numpy())


def test_stca_learns_to_match_targets_against_the_history() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, heads=2, tasks=("click",), item_buckets=256, user_buckets=0, mlp=(32,))
    assert fit_category_task(STCA(cfg), steps=250) > 0.85


def test_a_model_trained_on_short_windows_serves_ten_thousand_events() -> None:
    """Train steps on windows of at most 64 events, then one 10,000-event request: finite scores,
    equal to its candidates scored alone (no position table caps the length)."""
    rng = np.random.default_rng(10)
    b = make_batch(rng, [300, 200, 120], [4, 4, 4])
    model = _model(b)
    opt = SplitAdam(model, lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model.loss(b.sample_lengths(rng, 8, 64)).backward()
        opt.step()
    long = make_batch(rng, [10_000], [3])
    with torch.no_grad():
        scores = model(long)
        assert scores.shape == (3, 3) and torch.isfinite(scores).all()
        torch.testing.assert_close(scores, model(long.repeat_per_target()), rtol=1e-9, atol=1e-12)
