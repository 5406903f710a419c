"""Benchmark: STCA's request-level batching and its cost in history length (issue 12).

What it measures (torch on CPU, ``STREAMREC_BENCH_THREADS`` threads, default 1: the host's
2 cores are shared, and torch's OpenMP pool slows down several-fold when oversubscribed):

- ``rlb_speedup``: training samples/s of STCA with request-level batching over the same
  model, same weights and optimizers, fed the same samples with the history copied per
  target (each target its own request), at L = 1,000 events and 32 targets per request.
  A training step is forward, backward (which pushes the item rows' gradients to the
  store) and the dense Adam step. ``rlb_samples_per_s`` and ``dup_samples_per_s`` are
  the two rates. ``rlb_speedup_ragged``: the same with history lengths drawn uniformly
  in [L/2, L] (the ragged block path; equal lengths take torch's fused attention).
- ``cost_ratio_10k_over_1k``: inference time per request (one user, 128 candidates,
  ``no_grad``) at L = 10,000 over L = 1,000; ``ms_per_request_10k`` and
  ``ms_per_request_1k`` are the absolute times.
- ``auc_by_len``, ``auc_gap_to_best``, ``p99_event_to_update_s``, ``ml100k``: reserved
  for the training figures (``model/train.py``); this script prints why each is null.

Model: ``STCA(ModelConfig())`` (D = 64, 4 heads, 2 layers, SwiGLU 8/3), its item and user
rows in in-process ``EmbeddingTable`` s (Adagrad) through ``StoreEmbedding``, the dense
weights in torch with Adam, 3 tasks with random labels (timing does not depend on them).

How answers are verified (a wrong answer fails the run with ``Wrong``): before and after
the timed rounds, and after every 8th timed step and each round's last, with the clock
stopped, the model in eval mode scores the timed batch both ways (request-level and
duplicated) and the logits must agree (within float32 tolerance); each timed step
checks that its batch has the shape of its label (R requests of 32 targets and L
events, or R x 32 requests of one target each with L events) and that the backward
pushed the batch's distinct item ids to the store. For inference, the scores of 4
candidates scored alone (one request each, the history copied) must equal their rows
in the 128-candidate request, before and after timing, and every timed call's output
must be finite with 128 rows.

Ratios are medians of per-round ratios between paths timed back to back.
Run: ``python benchmarks/model.py [--smoke | --quick] [--json]`` or ``streamrec bench model``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import Report, Wrong, bench_args, emit_json, median, paired_rates, ratio, size

from streamrec.model.batch import RequestBatch
from streamrec.model.embedding import StoreEmbedding
from streamrec.model.optimizer import SplitAdam
from streamrec.model.stca import STCA, ModelConfig
from streamrec.store.table import EmbeddingTable

KEYS = ("rlb_speedup", "rlb_samples_per_s", "dup_samples_per_s", "rlb_speedup_ragged",
        "cost_ratio_10k_over_1k", "ms_per_request_10k", "ms_per_request_1k", "auc_by_len",
        "auc_gap_to_best", "p99_event_to_update_s", "ml100k", "threads")

TARGETS_TRAIN = 32
TARGETS_SERVE = 128
NOW_MS = 1_767_225_600_000
ITEMS = 1_000_000  # item id range of the synthetic histories


def synthetic_batch(rng: np.random.Generator, lengths: np.ndarray, targets: int) -> RequestBatch:
    """R requests with the given history lengths, ``targets`` candidates each, random labels."""
    r = lengths.shape[0]
    off = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    n, t = int(off[-1]), r * targets
    return RequestBatch.from_numpy(
        hist_offsets=off, hist_item=rng.integers(0, ITEMS, n), hist_action=rng.integers(1, 7, n),
        hist_ts_ms=NOW_MS - rng.integers(0, 30 * 86_400_000, n), hist_value=rng.random(n) * 30,
        request_ts_ms=np.full(r, NOW_MS), user_id=rng.integers(0, 10_000, r),
        target_offsets=np.arange(r + 1) * targets, target_item=rng.integers(0, ITEMS, t),
        target_category=rng.integers(0, 100, t), labels=rng.integers(0, 2, (t, 3)))


def build_model(seed: int = 0) -> tuple[STCA, EmbeddingTable, SplitAdam]:
    """STCA with its item and user rows in store tables (Adagrad), the rest in torch (Adam)."""
    torch.manual_seed(seed)
    table = EmbeddingTable(dim=64, optimizer="adagrad", capacity=1 << 16)
    users = EmbeddingTable(dim=64, optimizer="adagrad", capacity=1 << 14)
    model = STCA(ModelConfig(), item_embedding=StoreEmbedding(table, lr=0.05),
                 user_embedding=StoreEmbedding(users, lr=0.05))
    return model, table, SplitAdam(model, lr=1e-3)


def check_agree(what: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or not torch.isfinite(a).all():
        raise Wrong(f"{what}: shapes {tuple(a.shape)} / {tuple(b.shape)} or non-finite logits")
    err = float((a - b).abs().max()) if a.numel() else 0.0
    if err > 1e-3 * max(1.0, float(a.abs().max())):
        raise Wrong(f"{what}: request-level and per-target logits differ by {err:.3g}")


# -- rlb_speedup ------------------------------------------------------------------------------


def bench_rlb(length: int, requests: int, rounds: int, min_seconds: float, ragged: bool,
              report: Report) -> tuple[float, float, float]:
    """(speedup, rlb samples/s, duplicated samples/s) of training steps."""
    rng = np.random.default_rng(1 if ragged else 0)
    lengths = (rng.integers(length // 2, length + 1, requests) if ragged
               else np.full(requests, length)).astype(np.int64)
    rlb = synthetic_batch(rng, lengths, TARGETS_TRAIN)
    dup = rlb.repeat_per_target()
    model, table, opt = build_model()
    bridge = model.item_embedding
    assert isinstance(bridge, StoreEmbedding)
    distinct = set(np.unique(np.r_[rlb.hist_item.numpy(), rlb.target_item.numpy()]).tolist())

    def step(batch: RequestBatch, label: str) -> int:
        want_r = requests if label == "rlb" else requests * TARGETS_TRAIN
        if batch.num_requests != want_r or batch.num_targets != requests * TARGETS_TRAIN:
            raise Wrong(f"{label}: batch of {batch.num_requests} requests, {batch.num_targets} targets")
        model.train()
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
        if len(bridge.pushed_keys) != len(distinct):
            raise Wrong(f"{label}: backward pushed {len(bridge.pushed_keys)} rows, "
                        f"the batch has {len(distinct)}")
        return batch.num_targets

    def verify() -> None:
        model.eval()
        with torch.no_grad():
            check_agree("rlb vs duplicated", model(rlb), model(dup))

    verify()
    rates = paired_rates({"rlb": lambda: step(rlb, "rlb"), "dup": lambda: step(dup, "dup")}, rounds,
                         min_seconds, verify={"rlb": verify, "dup": verify})
    verify()
    speed = ratio(rates["rlb"], rates["dup"])
    name = "rlb_speedup_ragged" if ragged else "rlb_speedup"
    shape = f"lengths U[{length // 2}, {length}]" if ragged else f"L={length}"
    report.add(f"{name}: training samples/s, RLB over history copied per target ({shape}, "
               f"{TARGETS_TRAIN} targets x {requests} requests)", f"{speed:.1f}x",
               f"{median(rates['rlb']):,.0f} vs {median(rates['dup']):,.0f} samples/s",
               ">= 5" if not ragged else "")
    del table
    return speed, median(rates["rlb"]), median(rates["dup"])


# -- cost_ratio_10k_over_1k ------------------------------------------------------------------


def bench_serving(short: int, long: int, rounds: int, min_seconds: float,
                  report: Report) -> tuple[float, float, float]:
    """(time ratio long/short, ms per request long, ms per request short) at inference."""
    rng = np.random.default_rng(2)
    model, table, _ = build_model()
    model.eval()
    batches = {n: synthetic_batch(rng, np.array([n]), TARGETS_SERVE) for n in (short, long)}
    for b in batches.values():  # the rows a served model would hold
        table.find_or_insert(np.unique(np.r_[b.hist_item.numpy(), b.target_item.numpy()]).astype(np.uint64))

    def serve(n: int) -> Callable[[], int]:
        def call() -> int:
            with torch.no_grad():
                out = model(batches[n])
            if out.shape != (TARGETS_SERVE, 3) or not torch.isfinite(out).all():
                raise Wrong(f"L={n}: logits {tuple(out.shape)}, finite: {bool(torch.isfinite(out).all())}")
            return 1
        return call

    def verify(n: int) -> None:
        b = batches[n]
        some = np.array([0, 5, 64, TARGETS_SERVE - 1])
        alone = RequestBatch.from_numpy(
            hist_offsets=[0, n], hist_item=b.hist_item, hist_action=b.hist_action, hist_ts_ms=b.hist_ts_ms,
            hist_value=b.hist_value, request_ts_ms=b.request_ts_ms, user_id=b.user_id,
            target_offsets=[0, some.size], target_item=b.target_item[some],
            target_category=b.target_category[some], labels=b.labels[some]).repeat_per_target()
        with torch.no_grad():
            check_agree(f"L={n}: 4 candidates scored alone", model(b)[some], model(alone))

    for n in (short, long):
        verify(n)
    rates = paired_rates({f"L={short}": serve(short), f"L={long}": serve(long)}, rounds, min_seconds)
    for n in (short, long):
        verify(n)
    cost = ratio(rates[f"L={short}"], rates[f"L={long}"])
    ms_long = 1000.0 / median(rates[f"L={long}"])
    ms_short = 1000.0 / median(rates[f"L={short}"])
    report.add(f"cost_ratio_10k_over_1k: inference time per request, L={long:,} over L={short:,} "
               f"({TARGETS_SERVE} candidates)", f"{cost:.1f}x",
               f"{ms_long:.1f} ms vs {ms_short:.1f} ms per request", "<= 12 (linear: 10)")
    return cost, ms_long, ms_short


# -- figures of the training helper (model/train.py) --------------------------------------------


def auc_by_len(report: Report) -> tuple[Any, Any]:
    """(AUC served at 100 / 1,000 / 10,000 events, best achievable minus ours at 10k)."""
    report.note("auc_by_len, auc_gap_to_best: null here: they need generated traffic trained through "
                "model/train.py (lengths <= 2,000) and are filled by the training benchmark")
    return None, None


def p99_event_to_update_s(report: Report) -> Any:
    """p99 seconds from an action's arrival to the store holding its sample's updated rows."""
    report.note("p99_event_to_update_s: null here: measured by online training (eager emission) in "
                "model/train.py")
    return None


def ml100k(report: Report) -> Any:
    """HR@10 and NDCG@10 per model on MovieLens-100k (leave-one-out, full ranking)."""
    report.note("ml100k: null here: the MovieLens-100k table comes from model/movielens.py + train.py")
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = bench_args(__doc__.splitlines()[0], argv)
    threads = int(os.environ.get("STREAMREC_BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    rounds = args.rounds or size(args, 5, 3, 1)
    min_seconds = size(args, 2.0, 1.0, 0.01)
    train_len = size(args, 1000, 1000, 200)
    requests = size(args, 4, 2, 1)
    short, long = size(args, (1000, 10_000), (1000, 10_000), (200, 2000))
    report = Report(f"streamrec bench model: STCA with request-level batching, torch {torch.__version__}, "
                    f"{threads} thread(s)")
    t0 = time.perf_counter()
    speed, rlb_rate, dup_rate = bench_rlb(train_len, requests, rounds, min_seconds, False, report)
    speed_ragged, _, _ = bench_rlb(train_len, requests, rounds, min_seconds, True, report)
    cost, ms_long, ms_short = bench_serving(short, long, rounds, min_seconds, report)
    auc, gap = auc_by_len(report)
    p99 = p99_event_to_update_s(report)
    ml = ml100k(report)
    report.note(f"{rounds} rounds of >= {min_seconds} s per path; medians; ratios are medians of "
                f"per-round ratios; {time.perf_counter() - t0:.0f} s in all")
    report.note("answers verified: RLB and duplicated logits agree on the timed batch (before, during, "
                "after); 4 candidates scored alone equal their rows in the served request")
    report.print()
    result = {"rlb_speedup": speed, "rlb_samples_per_s": rlb_rate, "dup_samples_per_s": dup_rate,
              "rlb_speedup_ragged": speed_ragged, "cost_ratio_10k_over_1k": cost,
              "ms_per_request_10k": ms_long, "ms_per_request_1k": ms_short, "auc_by_len": auc,
              "auc_gap_to_best": gap, "p99_event_to_update_s": p99, "ml100k": ml, "threads": threads}
    assert tuple(result) == KEYS
    if args.json:
        emit_json(result)
    return result


if __name__ == "__main__":
    main()
