"""Benchmark: the traffic generator's rows/s, against an event-at-a-time Python generator of the same model.

Ours is ``streamrec.pipeline.generate.generate`` on the default config (10k users, 100k items, 200
categories, 100k impressions per simulated second; smaller with ``--smoke``): one call is one simulated
step, a record batch of impressions and one of actions. The baseline draws the same model one request, one
candidate and one action at a time in plain Python (``random``, ``bisect``, ``math``), from the same
``GroundTruth`` arrays. Rows are impressions plus actions on both sides.

Figures (JSON keys):
- ``events_per_s``: our rows/s (target >= 2 M, so the generator is never the pipeline's bottleneck).
- ``events_per_cpu_s``: the same rows over the generating thread's CPU time (``time.thread_time``): what
  one core does when the machine is shared and the wall clock also counts other processes' turns.
- ``over_python``: ours over the baseline, per round, median.
- ``ctr_minus_gt_click``: the clicked fraction of (deduplicated) impressions minus their mean ``gt_click``,
  on a drained run; the run fails unless it is within 5 binomial standard errors.
- ``deterministic``: two generators with one seed gave equal batches and another seed different ones.
- ``rare_auc_last100`` / ``rare_auc_full``: how well a user's click-through on a category, estimated from the
  last 100 events of a warm-up history or from all of it (5,000; 2,000 with --smoke), tells the user's rare
  long-period interests from categories they do not care about (AUC). The long-range signal the model
  issue's STCA is meant to find: near 0.6 from 100 events, near 1 from thousands.

How answers are verified: every timed batch of ours is checked with the clock stopped (schema, sorted
``ts_ms``, gt columns in [0, 1]) after every 8th call and each round's last; baseline rows are checked the
same way (ids in range, probabilities in [0, 1]). Determinism and the CTR are checked on untimed runs and
fail the benchmark with ``Wrong``.

Run: ``python benchmarks/generate.py [--smoke | --quick] [--json]`` or ``streamrec bench generate``.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Report, Wrong, bench_args, console, finish, median, paired_rates, ratio, size

from streamrec.pipeline.events import ACTION_SCHEMA, ACTIONS, IMPRESSION_SCHEMA
from streamrec.pipeline.generate import GeneratorConfig, GroundTruth, generate, histories

KEYS = ("events_per_s", "events_per_cpu_s", "over_python", "ctr_minus_gt_click", "deterministic",
        "rare_auc_last100", "rare_auc_full")


class PythonGenerator:
    """The same model, one event at a time: the baseline a plain-Python simulator would be."""

    def __init__(self, cfg: GeneratorConfig, truth: GroundTruth) -> None:
        self.cfg, self.t = cfg, truth
        self.rng = random.Random(cfg.seed)
        self.user_cum = list(np.cumsum(truth.rate / truth.rate.sum()))
        self.item_cum = list(np.cumsum(truth.catalog.popularity))
        cat = truth.catalog.category
        order = np.argsort(cat, kind="stable")
        self.by_cat: list[list[int]] = [[] for _ in range(cfg.categories)]
        self.cat_cum: list[list[float]] = [[] for _ in range(cfg.categories)]
        for c in range(cfg.categories):
            items = order[cat[order] == c]
            self.by_cat[c] = items.tolist()
            w = truth.catalog.popularity[items]
            self.cat_cum[c] = list(np.cumsum(w / w.sum()))
        self.category = cat.tolist()
        self.quality = truth.catalog.quality.tolist()
        self.duration = truth.catalog.duration_s.tolist()
        self.strength = truth.interest_strength.tolist()
        self.rare_cum = truth._rare_cum.tolist()
        self.user_bias = truth._user_bias.tolist()
        self.like_bias = truth._like_bias.tolist()
        self.home = truth._home_device.tolist()
        self.tz = truth._tz_hours.tolist()
        self.dev_eff = truth._device_effect.tolist()
        self.request = 0

    def requests(self, n: int, t0: int, step_ms: int) -> list[tuple[Any, ...]]:
        cfg, rng = self.cfg, self.rng
        out: list[tuple[Any, ...]] = []
        kf = cfg.interests_per_user - cfg.rare_interests
        for _ in range(n):
            u = min(bisect.bisect(self.user_cum, rng.random()), cfg.users - 1)
            ts = t0 + rng.randrange(step_ms)
            interests = self.t.interests_at(np.array([u]), np.array([ts]))[0].tolist()
            drawn = round(cfg.candidates_median * math.exp(cfg.candidates_sigma * rng.gauss(0, 1)))
            m = int(min(max(drawn, 1), cfg.max_candidates))
            device = self.home[u] if rng.random() < 0.8 else rng.randrange(cfg.devices)
            hour = (ts // 3_600_000 + self.tz[u]) % 24
            context = cfg.base_logit + self.user_bias[u] + self.dev_eff[device] + \
                0.25 * math.cos((hour - 21.0) * 2 * math.pi / 24)
            rare = self.rare_cum[u]
            seen: set[int] = set()
            pos = 0
            for _ in range(m):
                x = rng.random()
                if rare and x < rare[-1]:
                    k = kf + bisect.bisect(rare, x)
                elif x < (rare[-1] if rare else 0.0) + cfg.interest_share:
                    k = min(int((x - (rare[-1] if rare else 0.0)) / cfg.interest_share * kf), kf - 1)
                else:
                    k = -1
                if k >= 0:
                    c = interests[k]
                    j = bisect.bisect(self.cat_cum[c], rng.random())
                    item = self.by_cat[c][min(j, len(self.by_cat[c]) - 1)]
                else:
                    item = min(bisect.bisect(self.item_cum, rng.random()), cfg.items - 1)
                if item in seen:
                    continue
                seen.add(item)
                cat = self.category[item]
                aff = max([s for c2, s in zip(interests, self.strength[u], strict=True) if c2 == cat],
                          default=0.0)
                q = self.quality[item]
                click = 1 / (1 + math.exp(-(context + q + aff - 0.15 * math.log1p(pos))))
                like = click / (1 + math.exp(-(-1.0 + self.like_bias[u] + 0.6 * aff + 0.5 * q)))
                fin = click / (1 + math.exp(-(1.5 - self.duration[item] / 30.0 + 0.5 * aff)))
                out.append((self.request, u, item, ts, pos, cat, device, hour, click, like, fin))
                pos += 1
                y = rng.random()
                if y < click:
                    ct = ts + int(cfg.action_delay_s * 1000 * min(math.exp(rng.gauss(0, 1)), 30.0))
                    out.append((self.request, u, item, ct, ACTIONS["click"], 0.0))
                    if rng.random() * click < like:
                        out.append((self.request, u, item, ct + 15_000, ACTIONS["like"], 0.0))
                    if rng.random() * click < fin:
                        ft = ct + int(self.duration[item] * 1000)
                        out.append((self.request, u, item, ft, ACTIONS["finish"], self.duration[item]))
                elif y - click < cfg.skip_prob * (1 - click):
                    out.append((self.request, u, item, ts + 2000, ACTIONS["skip"], 0.0))
            self.request += 1
        return out


def check_batches(imps: pa.RecordBatch, acts: pa.RecordBatch) -> None:
    if imps.schema != IMPRESSION_SCHEMA or acts.schema != ACTION_SCHEMA:
        raise Wrong("a batch does not follow its schema")
    for b in (imps, acts):
        ts = b.column("ts_ms").to_numpy()
        if ts.size and not np.all(ts[1:] >= ts[:-1]):
            raise Wrong("a batch is not sorted by ts_ms")
    for name in ("gt_click", "gt_like", "gt_finish"):
        v = imps.column(name).to_numpy()
        if v.size and not ((v >= 0) & (v <= 1)).all():
            raise Wrong(f"{name} outside [0, 1]")


def check_determinism(cfg: GeneratorConfig, truth: GroundTruth, steps: int) -> bool:
    a = [p for _, p in zip(range(steps), generate(cfg, truth=truth), strict=False)]
    b = [p for _, p in zip(range(steps), generate(cfg, truth=truth), strict=False)]
    if not all(x[0].equals(y[0]) and x[1].equals(y[1]) for x, y in zip(a, b, strict=True)):
        raise Wrong("the same seed gave different batches")
    other = next(generate(dataclasses.replace(cfg, seed=cfg.seed + 1)))
    if other[0].equals(a[0][0]):
        raise Wrong("another seed gave the same batch")
    return True


def ctr_gap(cfg: GeneratorConfig, truth: GroundTruth, events: int) -> float:
    pairs = list(generate(cfg, events=events, truth=truth))
    imp = pa.Table.from_batches([p[0] for p in pairs]).select(["request_id", "item_id", "gt_click"])
    act = pa.Table.from_batches([p[1] for p in pairs]).select(["request_id", "item_id", "action"])
    return _check_ctr(imp.to_pandas(), act.to_pandas())


def _check_ctr(imp: pd.DataFrame, act: pd.DataFrame) -> float:
    imp = imp.drop_duplicates(["request_id", "item_id"])
    clicked = act[act["action"] == ACTIONS["click"]].drop_duplicates(["request_id", "item_id"])
    rate, want = len(clicked) / len(imp), float(imp["gt_click"].mean())
    se = math.sqrt(want * (1 - want) / len(imp))
    if abs(rate - want) > 5 * se:
        raise Wrong(f"click rate {rate:.5f} vs mean gt_click {want:.5f}: more than 5 standard errors apart")
    console.print(f"[dim]verified: click rate {rate:.5f} vs mean gt_click {want:.5f} over {len(imp):,} "
                  f"impressions (5 se = {5 * se:.5f})[/dim]")
    return rate - want


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    r = pd.Series(score).rank().to_numpy()
    n1 = int(y.sum())
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * (y.size - n1)))


def rare_interest_aucs(users: int, n: int) -> tuple[float, float]:
    cfg = GeneratorConfig(users=users, items=20_000, categories=200, impressions_per_s=10 * users)
    truth = GroundTruth(cfg)
    hist = histories(cfg, n, truth=truth)
    imps = pa.Table.from_batches([p[0] for p in generate(cfg, events=30 * users * 10, truth=truth)])
    u, c = imps.column("user_id").to_numpy(), imps.column("category").to_numpy()
    aff = truth.affinity(u, c, imps.column("ts_ms").to_numpy())
    rare, none = aff == cfg.rare_affinity, aff == 0
    both = rare | none

    def estimate(last: int) -> np.ndarray:
        act = hist.action.reshape(users, n)[:, -last:].ravel()
        cat = hist.category.reshape(users, n)[:, -last:].ravel()
        usr = np.repeat(np.arange(users), last)
        clicks, shown = np.zeros((users, cfg.categories)), np.zeros((users, cfg.categories))
        np.add.at(clicks, (usr[act == ACTIONS["click"]], cat[act == ACTIONS["click"]]), 1)
        seen = (act == ACTIONS["click"]) | (act == ACTIONS["skip"])
        np.add.at(shown, (usr[seen], cat[seen]), 1)
        return ((clicks + 0.1) / (shown + 1.0))[u, c]

    return _auc(rare[both], estimate(100)[both]), _auc(rare[both], estimate(n)[both])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = bench_args(__doc__.splitlines()[0], argv)
    rounds = args.rounds or size(args, 5, 3, 1)
    min_seconds = size(args, 2.0, 1.0, 0.2)
    cfg = size(args, GeneratorConfig(), GeneratorConfig(),
               GeneratorConfig(users=1000, items=10_000, categories=100, impressions_per_s=20_000))
    t0 = time.perf_counter()
    truth = GroundTruth(cfg)
    world_s = time.perf_counter() - t0
    stream = generate(cfg, truth=truth)
    last: list[pa.RecordBatch] = []
    cpu = {"calls": 0, "rows": 0, "s": 0.0}

    def ours() -> int:
        c0 = time.thread_time()
        imps, acts = next(stream)
        c1 = time.thread_time()
        last[:] = [imps, acts]
        cpu["calls"] += 1
        if cpu["calls"] > 1:  # not the warm-up call
            cpu["rows"] += imps.num_rows + acts.num_rows
            cpu["s"] += c1 - c0
        return imps.num_rows + acts.num_rows

    py = PythonGenerator(cfg, truth)
    py_rows: list[tuple[Any, ...]] = []
    clock = [cfg.start_ms]

    def python() -> int:
        py_rows[:] = py.requests(50, clock[0], 1000)
        clock[0] += 1000
        return len(py_rows)

    def check_python() -> None:
        for r in py_rows:
            if not (0 <= r[1] < cfg.users and 0 <= r[2] < cfg.items):
                raise Wrong(f"python baseline row with ids out of range: {r}")
            if len(r) == 11 and not all(0 <= p <= 1 for p in r[8:]):
                raise Wrong(f"python baseline probability outside [0, 1]: {r}")

    rates = paired_rates({"ours": ours, "python": python}, rounds, min_seconds,
                         verify={"ours": lambda: check_batches(*last), "python": check_python})
    ev_s = median(rates["ours"])
    over = ratio(rates["ours"], rates["python"])
    deterministic = check_determinism(cfg, truth, size(args, 5, 3, 2))
    gap = ctr_gap(cfg, truth, size(args, 3_000_000, 1_000_000, 100_000))
    auc_short, auc_full = rare_interest_aucs(size(args, 300, 300, 100), size(args, 5000, 5000, 2000))

    per_cpu_s = cpu["rows"] / cpu["s"] if cpu["s"] > 0 else None
    fig = {"events_per_s": ev_s, "events_per_cpu_s": per_cpu_s, "over_python": over,
           "ctr_minus_gt_click": gap, "deterministic": deterministic, "rare_auc_last100": auc_short,
           "rare_auc_full": auc_full}
    rep = Report(f"streamrec bench generate: {cfg.users:,} users, {cfg.items:,} items, {cfg.categories} "
                 f"categories, {cfg.impressions_per_s:,.0f} impressions per simulated s")
    rep.add("rows/s over event-at-a-time Python", f"{over:.0f}x",
            f"{ev_s / 1e6:.2f} M rows/s vs {median(rates['python']) / 1e3:.1f} k", ">= 2 M rows/s")
    if per_cpu_s is not None:
        rep.add("rows per CPU second", f"{per_cpu_s / ev_s:.2f} of wall", f"{per_cpu_s / 1e6:.2f} M rows/s",
                "wall < CPU: the machine is shared")
    rep.add("click rate - mean gt_click", f"{gap:+.5f}", "deduplicated impressions of a drained run",
            "|.| < 5 se")
    rep.add("rare interest vs none, AUC", f"{auc_full:.3f} full", f"{auc_short:.3f} from the last 100 events",
            "full >> last 100")
    rep.add("deterministic", str(deterministic), "same seed equal batches; another seed different")
    rep.note(f"world built in {world_s:.2f} s (not timed); {rounds} rounds of >= {min_seconds} s per path")
    return finish(rep, fig, args.json)


if __name__ == "__main__":
    main()
