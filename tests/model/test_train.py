"""The trainer: progressive validation scores each batch before learning from it, it learns a
planted signal, it publishes checkpoints that restore the model, and it reads sample Parquet."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from streamrec.model.batch import RequestBatch
from streamrec.model.checkpoint import load_current
from streamrec.model.metrics import auc
from streamrec.model.optimizer import SplitAdam
from streamrec.model.train import TrainConfig, Trainer, parquet_samples, sample_batches, train_stream
from streamrec.pipeline.events import SAMPLE_SCHEMA

torch.set_num_threads(1)
TASKS = ("click", "like")


@dataclass(frozen=True)
class _Cfg:
    tasks: tuple[str, ...] = TASKS


class _ItemModel(nn.Module):
    """logit_k = w_k[item mod 64] + b_k: enough to learn a per-item signal."""

    def __init__(self) -> None:
        super().__init__()
        self.config = _Cfg()
        self.w = nn.Parameter(torch.zeros(64, len(TASKS)))
        self.b = nn.Parameter(torch.zeros(len(TASKS)))

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        return self.w[torch.remainder(batch.target_item, 64)] + self.b

    def loss(self, batch: RequestBatch, logits: torch.Tensor | None = None) -> torch.Tensor:
        z = self(batch) if logits is None else logits
        return nn.functional.binary_cross_entropy_with_logits(z, batch.labels, reduction="none").sum(1).mean()


def _batch(rng: np.random.Generator, requests: int = 16, per: int = 8) -> RequestBatch:
    """Items below 32 are clicked 80 % of the time, the rest 20 %; likes are independent noise."""
    t = requests * per
    item = rng.integers(0, 64, t)
    click = rng.random(t) < np.where(item < 32, 0.8, 0.2)
    like = rng.random(t) < 0.3
    hist_len = rng.integers(0, 5, requests)
    off = np.r_[0, np.cumsum(hist_len)]
    n = int(off[-1])
    return RequestBatch.from_numpy(
        hist_offsets=off, hist_item=rng.integers(0, 64, n), hist_action=np.ones(n), hist_ts_ms=np.zeros(n),
        request_ts_ms=np.full(requests, 10), user_id=rng.integers(0, 5, requests),
        target_offsets=np.arange(requests + 1) * per, target_item=item,
        labels=np.stack([click, like], axis=1).astype(np.float32), tasks=TASKS,
        truth=np.stack([np.where(item < 32, 0.8, 0.2), np.full(t, 0.3)], axis=1))


def test_each_batch_is_scored_before_it_is_trained_on() -> None:
    rng = np.random.default_rng(1)
    model = _ItemModel()
    trainer = Trainer(model, TrainConfig(lr=0.5, window=10_000))
    labels, before = [], []
    for _ in range(5):
        b = _batch(rng)
        with torch.no_grad():
            before.append(model(b)[:, 0].numpy().copy())
        labels.append(b.labels[:, 0].numpy())
        trainer.step(b)
    y, z = np.concatenate(labels), np.concatenate(before)
    s = trainer.summary()["click"]
    assert s.samples == y.size == trainer.samples
    assert s.window_auc == pytest.approx(auc(y, z), abs=1e-12)
    # the first batch was scored by the untrained model: constant scores, so its AUC would be 0.5;
    # scores taken after the step would rank the first batch well above that
    with torch.no_grad():
        after = model(_batch(np.random.default_rng(1)))[:, 0].numpy()
    assert auc(labels[0], before[0]) == 0.5
    assert auc(labels[0], after) > 0.7


def test_learns_the_planted_signal_and_reports_the_best_achievable() -> None:
    rng = np.random.default_rng(2)
    trainer = Trainer(_ItemModel(), TrainConfig(lr=0.05, window=2_000))
    report = train_stream(trainer, (_batch(rng) for _ in range(200)))
    click, best = report.tasks["click"], report.best["click"]
    assert report.samples == 200 * 128 and report.batches == 200
    # truth separates 0.8 from 0.2: AUC 0.8*0.8 / (0.8*0.8 + 0.2*0.2)-ish ~ 0.8; the model gets close
    assert best.window_auc > 0.75
    assert click.window_auc > best.window_auc - 0.02
    assert abs(report.tasks["like"].window_auc - 0.5) < 0.05  # noise stays noise
    assert report.update_latency_s.shape == (200,) and (report.update_latency_s > 0).all()


def test_publishes_checkpoints_that_restore_the_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    model = _ItemModel()
    trainer = Trainer(model, TrainConfig(lr=0.1, publish_every_s=0), model_dir=tmp_path,
                      features={"name": "test"})
    report = train_stream(trainer, (_batch(rng) for _ in range(10)))
    assert report.versions == [1]
    ck = load_current(tmp_path)
    assert ck.manifest["counters"] == {"samples": 1280, "batches": 10}
    assert ck.model_config == {"class": "_ItemModel", "tasks": list(TASKS)}
    assert ck.manifest["features"] == {"name": "test"}
    twin = _ItemModel()
    twin.load_state_dict(ck.dense)
    b = _batch(rng)
    assert torch.equal(twin(b), model(b))
    # the optimizer state resumes training exactly
    opt = SplitAdam(twin, lr=0.1)
    assert ck.optimizer is not None and ck.optimizer["sparse"] is None  # no hashed tables in this model
    opt.load_state_dict(ck.optimizer)
    trainer.step(b)
    twin_trainer = Trainer(twin, TrainConfig(lr=0.1))
    twin_trainer.optimizer = opt
    twin_trainer.step(b)
    assert torch.equal(twin.w, model.w)


def _samples(rng: np.random.Generator, n: int) -> pa.RecordBatch:
    cols = {}
    for f in SAMPLE_SCHEMA:
        if pa.types.is_floating(f.type):
            cols[f.name] = pa.array(rng.random(n).astype(f.type.to_pandas_dtype()), type=f.type)
        else:
            cols[f.name] = pa.array(rng.integers(0, 2, n), type=f.type)
    cols["request_id"] = pa.array(np.arange(n) // 4, type=pa.int64())
    cols["user_id"] = pa.array(np.arange(n) // 4 % 3, type=pa.int64())
    cols["kind"] = pa.array(np.arange(n) % 3, type=pa.int8())
    return pa.RecordBatch.from_pydict(cols, schema=SAMPLE_SCHEMA)


def test_sample_parquet_to_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    rb = _samples(rng, 40)
    pq.write_table(pa.Table.from_batches([rb]), tmp_path / "part-0.parquet")
    pq.write_table(pa.Table.from_batches([_samples(rng, 8)]), tmp_path / "part-1.parquet")
    got = list(sample_batches(parquet_samples([tmp_path], batch_rows=16), None, tasks=TASKS, max_targets=10))
    # 40 rows in record batches of 16, 16, 8, each cut to <= 10 rows; then the second file's 8
    assert [s.batch.num_targets for s in got] == [10, 6, 10, 6, 8, 8]
    first = got[0].batch
    assert first.sample_index is not None
    want = rb.column("click").to_numpy()[:10][first.sample_index.numpy()]
    assert first.labels[:, 0].numpy().tolist() == want.astype(float).tolist()
    # first emissions (kind 0, 1) are scored, corrections (2) only trained on
    kinds = rb.column("kind").to_numpy()[:10][first.sample_index.numpy()]
    assert got[0].scored is not None and got[0].scored.tolist() == (kinds < 2).tolist()
    kept = list(sample_batches([rb], None, tasks=TASKS, kinds=[0]))
    assert sum(s.batch.num_targets for s in kept) == int((rb.column("kind").to_numpy() == 0).sum())
    trainer = Trainer(_ItemModel(), TrainConfig())
    report = train_stream(trainer, got)
    assert report.samples == 48 and not math.isnan(report.tasks["click"].logloss)
    scored = sum(int(s.scored.sum()) for s in got if s.scored is not None)
    assert report.tasks["click"].samples == scored < 48


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="min_len"):
        TrainConfig(min_len=10, max_len=5)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)


def test_compare_ml100k_small() -> None:
    from streamrec.model.movielens import compare_ml100k, fetch_wheel, load_ml100k

    try:
        data = load_ml100k(fetch_wheel(timeout_s=120))
    except FileNotFoundError as exc:
        pytest.skip(f"recbole wheel not available: {exc}")
    table = compare_ml100k(("popularity", "stca"), users=100, epochs=1, dim=8, heads=2, layers=1,
                           negatives=4, data=data)
    assert set(table) == {"popularity", "stca"}
    for row in table.values():
        assert 0.0 <= row["ndcg"] <= row["hr"] <= 1.0 and row["samples"] > 0
    # chance is 10 / 1682 = 0.006; the most popular items are a far better guess than that
    assert table["popularity"]["hr"] > 0.04
