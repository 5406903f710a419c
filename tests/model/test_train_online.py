"""Online training on a short generated stream: the pipeline runs in-process, STCA trains on its
subscription with progressive validation, and its AUC rises well above 0.5 without passing the
generator's best achievable (which would mean a leak)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal

import pytest
import torch

from streamrec.model._layers import ModelConfig
from streamrec.model.checkpoint import load_current
from streamrec.model.train import StreamReport, TrainConfig, make_model, train_online
from streamrec.pipeline.generate import GeneratorConfig
from streamrec.pipeline.join import JoinConfig
from streamrec.pipeline.runner import PipelineConfig

torch.set_num_threads(1)

# 50 users with 2 strong interests among 10 categories: a signal a small model finds in ~150 steps.
_GEN = GeneratorConfig(users=50, items=500, categories=10, interests_per_user=2, rare_interests=0,
                       affinity=3.0, impressions_per_s=1000, duplicate_rate=0.0, late_rate=0.0, seed=3)
_MODEL = ModelConfig(dim=16, heads=2, layers=1, mlp=(32,), item_buckets=1 << 12, user_buckets=1 << 8,
                     sparse_buckets=1 << 12, category_buckets=64)


def _run(tmp: Path, policy: Literal["at_close", "eager"], model_dir: Path | None = None) -> StreamReport:
    pcfg = PipelineConfig(events=30_000, generator=_GEN, features="default", output=str(tmp / "samples"),
                          join=JoinConfig(window_s=30, policy=policy, huge_pages=False, capacity=4096),
                          batch_ms=1000, progress=False)
    _, report, stats = train_online(
        pcfg, lambda b: make_model("stca", _MODEL.for_batch(b)),
        TrainConfig(lr=0.02, window=5000, max_targets=128, publish_every_s=0, seed=0),
        model_dir=model_dir, history_len=200)
    assert report.samples == stats.samples > 10_000
    return report


def test_online_training_lifts_auc_without_leaking(tmp_path: Path) -> None:
    report = _run(tmp_path, "at_close", model_dir=tmp_path / "model")
    click, best = report.tasks["click"], report.best["click"]
    assert click.samples == report.samples  # at_close: every sample is a first emission
    # the last 5,000 samples: learnt (a margin of 0.2 over chance), and not past the truth's AUC
    assert click.window_auc > 0.7, click
    assert click.window_auc < best.window_auc + 0.02, (click, best)
    assert click.auc < best.auc + 0.02
    ck = load_current(tmp_path / "model", tables=False)
    assert ck.manifest["counters"]["samples"] == report.samples
    assert ck.manifest["features"]  # the feature set's manifest travels with the model


@pytest.mark.xfail(strict=True, reason="eager positives are emitted seconds after their impression, "
                   "negatives at the window close; the history read at emission time differs by that "
                   "(actions still arriving), so it tells the label (notes/train-findings.md)")
def test_eager_emission_does_not_leak(tmp_path: Path) -> None:
    report = _run(tmp_path, "eager")
    assert report.tasks["click"].auc < report.best["click"].auc + 0.02


def test_event_to_update_latency_probe() -> None:
    from streamrec.model.train import event_to_update

    # short delays, no late or duplicate deliveries: else the generator steps on for minutes of event
    # time (thousands of 100 ms micro-batches) to deliver the last actions
    gen = GeneratorConfig(users=50, items=500, categories=10, impressions_per_s=1000, duplicate_rate=0.0,
                          late_rate=0.0, action_delay_s=0.5, reaction_delay_s=1.0, seed=4)
    r = event_to_update(gen, JoinConfig(window_s=30, huge_pages=False, capacity=4096), _MODEL,
                        events=3000, history_len=100)
    assert r["eager_samples"] > 50 and r["samples"] >= r["eager_samples"] and r["steps"] > 5
    assert 0 < r["p50_s"] <= r["p99_s"] <= r["max_s"] and r["wait_max_s"] == 0.1


def test_a_failed_pipeline_is_raised_not_waited_for(tmp_path: Path) -> None:
    pcfg = PipelineConfig(source="files", impressions=str(tmp_path / "none.parquet"),
                          actions=str(tmp_path / "none2.parquet"), output=str(tmp_path / "s"), progress=False)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            train_online(pcfg, lambda b: make_model("mean", _MODEL.for_batch(b)))
        except BaseException as exc:
            raised.append(exc)

    t = threading.Thread(target=run, daemon=True)  # a hang fails the test instead of the suite
    t.start()
    t.join(60)
    assert not t.is_alive(), "train_online still waiting on a pipeline that failed"
    assert raised and isinstance(raised[0], FileNotFoundError), raised
