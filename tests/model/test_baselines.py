"""The baselines take the same batch and objective as STCA: shapes and gradients, request-level batching
equal to per-target computation, empty and one-event histories, their windows (DIN 100, SASRec 200),
SASRec's causal padding, and popularity counting only the past."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from streamrec.model.baselines import DIN, MeanPool, Popularity, SASRec
from streamrec.model.batch import RequestBatch
from streamrec.model.stca import ModelConfig
from tests.model.test_stca import LENS, TARGETS, dense, fit_category_task, make_batch

torch.set_num_threads(1)

SEQUENCE_MODELS = (MeanPool, DIN, SASRec)


def _cfg(b: RequestBatch) -> ModelConfig:
    return ModelConfig(dim=16, heads=2, item_buckets=1024, user_buckets=64, sparse_buckets=256,
                       mlp=(32,), max_len_din=10, max_len_sasrec=20).for_batch(b)


def _model(cls: type[nn.Module], b: RequestBatch, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls(_cfg(b)).double()


@pytest.mark.parametrize("cls", SEQUENCE_MODELS, ids=lambda c: c.__name__)
def test_shapes_gradients_and_empty_histories(cls: type[nn.Module]) -> None:
    b = make_batch(np.random.default_rng(0), [0, 1, 7, 30, 0], [2, 1, 3, 2, 1])
    model = _model(cls, b)
    logits = model(b)
    assert logits.shape == (b.num_targets, 3) and torch.isfinite(logits).all()
    model.loss(b, logits).backward()  # type: ignore[operator]
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(dense(p.grad)).all(), name
        assert dense(p.grad).abs().sum() > 0, f"{name} got a zero gradient"


@pytest.mark.parametrize("cls", SEQUENCE_MODELS, ids=lambda c: c.__name__)
def test_request_level_batching_equals_per_target_computation(cls: type[nn.Module]) -> None:
    b = make_batch(np.random.default_rng(1), LENS, TARGETS)
    model = _model(cls, b)
    per = b.repeat_per_target()
    torch.testing.assert_close(model(b), model(per), rtol=1e-10, atol=1e-12)
    params = list(model.parameters())
    g_rlb = torch.autograd.grad(model.loss(b), params)  # type: ignore[operator]
    g_per = torch.autograd.grad(model.loss(per), params)  # type: ignore[operator]
    for x, y in zip(g_rlb, g_per, strict=True):
        torch.testing.assert_close(dense(x), dense(y), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("cls", "window"), [(DIN, 10), (SASRec, 20)], ids=["DIN", "SASRec"])
def test_events_older_than_the_window_are_ignored(cls: type[nn.Module], window: int) -> None:
    b = make_batch(np.random.default_rng(2), [window + 15, 3], [2, 2])
    model = _model(cls, b)
    items = b.hist_item.clone()
    items[:15] += 1  # older than the window
    older = RequestBatch(**{**b.__dict__, "hist_item": items})
    torch.testing.assert_close(model(b), model(older), rtol=0, atol=0)
    items = b.hist_item.clone()
    items[window + 14] += 1  # the newest event of request 0
    newer = RequestBatch(**{**b.__dict__, "hist_item": items})
    assert not torch.allclose(model(b)[:2], model(newer)[:2])


def test_sasrec_padding_is_invisible() -> None:
    """A short history scores the same beside a long one (left padding) as alone."""
    b = make_batch(np.random.default_rng(3), [2, 19], [2, 1])
    model = _model(SASRec, b)
    alone = b
    short = RequestBatch.from_numpy(
        hist_offsets=[0, 2], hist_item=alone.hist_item[:2], hist_action=alone.hist_action[:2],
        hist_ts_ms=alone.hist_ts_ms[:2], hist_value=alone.hist_value[:2],
        request_ts_ms=alone.request_ts_ms[:1],
        user_id=alone.user_id[:1], target_offsets=[0, 2], target_item=alone.target_item[:2],
        target_category=alone.target_category[:2], dense=alone.dense[:2], sparse=alone.sparse[:2],
        labels=alone.labels[:2])
    torch.testing.assert_close(model(b)[:2], model(short), rtol=1e-10, atol=1e-12)


def test_popularity_scores_the_past_then_counts_the_batch() -> None:
    b = make_batch(np.random.default_rng(4), [1, 1], [3, 3])
    model = Popularity(_cfg(b))
    first = model(b)
    assert torch.equal(first, torch.zeros_like(first))  # nothing counted yet: log1p(0) * a + 0
    positives = (b.labels.sum(dim=1) > 0).sum()
    assert model.counts.sum() == positives  # type: ignore[operator]
    again = model(b)
    hits = (b.labels.sum(dim=1) > 0)
    assert bool((again[hits] > 0).all())
    model.loss(b).backward()
    assert model.scale.grad is not None and model.bias.grad is not None
    model.eval()
    before = model.counts.clone()  # type: ignore[operator]
    model(b)
    assert torch.equal(model.counts, before)  # type: ignore[arg-type]


@pytest.mark.parametrize(("cls", "floor"), [(MeanPool, 0.8), (DIN, 0.9), (SASRec, 0.8)],
                         ids=["MeanPool", "DIN", "SASRec"])
def test_sequence_baselines_learn_to_match_targets_against_the_history(cls: type[nn.Module],
                                                                       floor: float) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=16, heads=2, tasks=("click",), item_buckets=256, user_buckets=0, mlp=(32,))
    assert fit_category_task(cls(cfg), steps=250) > floor
