"""``streamrec demo``: the whole system end to end, on the embedded default, no servers to start by hand.

Owns: the demo's script and its report. In order: generated traffic runs through the embedded pipeline
(the join and the default feature set) while STCA trains online on its subscription, scoring each batch
before learning from it, beside the generator's best achievable AUC; the trained version is published;
the parameter server's failover demo runs its storage processes (``demo_ps``); the ranking server
starts on the published version, reading the pipeline's sequence store and counters, and takes a
closed-loop load of ranking requests from separate processes. One summary table ends it, and
``./demo-out/`` gets a Markdown report with PNG plots (AUC over time, latency histogram, QPS over time).

It must not reach into the parts' internals: it composes their public entry points as a user would.
The load generator runs in its own processes, so its Python does not take the server's GIL.

Thread safety: runs once, on the main thread (the pipeline runs in a helper thread, the trainer here).
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

__all__ = ["FULL", "QUICK", "DemoConfig", "run_system_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run.

    Attributes:
        events: generated events (impressions plus actions) through the pipeline.
        users, items, categories: the generator's population; interests (of them ``rare``: seen
            every few hundred events, strongly liked) per user, and a frequent interest's click
            log-odds boost: a population small and clear enough that the model's learning shows
            within a demo's samples (the generator's defaults are 10k users, 100k items).
        impressions_per_s: simulated traffic rate (event time; the pipeline runs as fast as it can).
        window_s: the join's label window.
        history: newest history events a request reads (training and serving).
        min_len, max_len: training history cut (STCA's length extrapolation: train short, serve long).
        dim: the model's width; lr: its dense and sparse learning rate.
        ps_seconds: seconds per phase of the parameter-server demo; ps_rows: rows it loads.
        load_s: seconds of ranking load; clients: load processes; inflight: requests in flight each.
        candidates_median: median candidates per ranking request (log-normal, sigma 0.8, at most 2,000).
    """

    events: int = 200_000
    users: int = 1_000
    items: int = 10_000
    categories: int = 32
    interests: int = 3
    rare: int = 1
    affinity: float = 2.5
    impressions_per_s: float = 4_000.0
    window_s: int = 30
    history: int = 1_000
    min_len: int = 16
    max_len: int = 256
    dim: int = 32
    lr: float = 0.01
    ps_seconds: float = 3.0
    ps_rows: int = 400_000
    load_s: float = 20.0
    clients: int = 2
    inflight: int = 4
    candidates_median: int = 100


FULL = DemoConfig()
QUICK = replace(FULL, events=40_000, users=200, items=2_000, categories=16, history=500, max_len=128,
                ps_seconds=1.5, ps_rows=100_000, load_s=6.0)


@dataclass
class _Curve:
    """Progressive AUC of the model and of the ground truth, sampled during training."""

    samples: list[int]
    auc: list[float]
    best: list[float]


def _train(cfg: DemoConfig, out: Path, console: Console) -> tuple[Any, Any, Any, _Curve]:
    """Pipeline in a thread, STCA online on its subscription; returns (runner, report, stats, curve)."""
    from streamrec.model._layers import ModelConfig
    from streamrec.model.train import TrainConfig, Trainer, make_model, sample_batches, train_stream
    from streamrec.pipeline.generate import GeneratorConfig
    from streamrec.pipeline.join import JoinConfig
    from streamrec.pipeline.runner import EmbeddedRunner, PipelineConfig

    gen = GeneratorConfig(users=cfg.users, items=cfg.items, categories=cfg.categories,
                          interests_per_user=cfg.interests, rare_interests=cfg.rare,
                          rare_period=(100.0, 1000.0), affinity=cfg.affinity,
                          impressions_per_s=cfg.impressions_per_s, seed=1)
    pcfg = PipelineConfig(source="generate", events=cfg.events, generator=gen,
                          join=JoinConfig(window_s=cfg.window_s, huge_pages=False), features="default",
                          output=str(out / "samples"), progress=False)
    runner = EmbeddedRunner(pcfg, resume=False)
    sub = runner.subscribe()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            runner.run()
        except BaseException as exc:  # handed to the main thread below
            failed.append(exc)

    thread = threading.Thread(target=run, name="pipeline", daemon=True)
    thread.start()
    steps = sample_batches(sub, runner.join.sequences, max_len=cfg.history, max_targets=2048)
    first = next(steps, None)
    if first is None:
        thread.join()
        raise RuntimeError(f"the pipeline emitted no samples: {failed[0] if failed else 'no events'}")
    model, tables = make_model("stca", ModelConfig(dim=cfg.dim).for_batch(first.batch), store_embeddings=True)
    trainer = Trainer(model, TrainConfig(lr=cfg.lr, min_len=cfg.min_len, max_len=cfg.max_len, window=5000,
                                         max_targets=512, publish_every_s=0),
                      model_dir=out / "model", tables=tables, features=runner.features.to_manifest())
    curve = _Curve([], [], [])

    def sample(t: Any) -> None:
        if t.batches % 10 == 0:
            s, b = t.summary()["click"], t.best_summary()["click"]
            curve.samples.append(t.samples)
            curve.auc.append(s.window_auc)
            curve.best.append(b.window_auc)

    report = train_stream(trainer, itertools.chain([first], steps), progress=console.is_terminal,
                          on_step=sample)
    thread.join()
    if failed:
        raise failed[0]
    return runner, report, runner.stats, curve


def _client(url: str, seconds: float, inflight: int, users: int, items: int, median: int,
            seed: int) -> tuple[list[float], list[float], int]:
    """One load process: ``inflight`` closed-loop threads; returns (send times, latencies, errors)."""
    import httpx

    rng = np.random.default_rng(seed)
    plans = [(int(u), rng.integers(0, items, max(1, min(2000, int(m)))).tolist())
             for u, m in zip(rng.integers(0, users, 4096), rng.lognormal(math.log(median), 0.8, 4096),
                             strict=True)]
    sent: list[float] = []
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    end = time.perf_counter() + seconds

    def loop(k: int) -> None:
        with httpx.Client(base_url=url, timeout=10.0) as c:
            for i in itertools.count(k):
                if time.perf_counter() >= end:
                    return
                user, cands = plans[(i * 7919) % len(plans)]
                t0 = time.perf_counter()
                try:
                    r = c.post("/rank", json={"user_id": user, "item_ids": cands,
                                              "context": {"device": 1, "hour": 12}})
                    ok = r.status_code == 200 and len(r.json()["scores"]) == len(cands)
                except httpx.HTTPError:
                    ok = False
                t1 = time.perf_counter()
                with lock:
                    if ok:
                        sent.append(t0)
                        lat.append(t1 - t0)
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=loop, args=(k * 104729,)) for k in range(inflight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sent, lat, errors[0]


def _load(url: str, cfg: DemoConfig) -> tuple[np.ndarray, np.ndarray, int]:
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(cfg.clients, mp_context=ctx) as pool:
        futs = [pool.submit(_client, url, cfg.load_s, cfg.inflight, cfg.users, cfg.items,
                            cfg.candidates_median, k) for k in range(cfg.clients)]
        parts = [f.result() for f in futs]
    sent = np.concatenate([np.asarray(p[0]) for p in parts]) if parts else np.zeros(0)
    lat = np.concatenate([np.asarray(p[1]) for p in parts]) if parts else np.zeros(0)
    return sent, lat, sum(p[2] for p in parts)


def _plots(out: Path, curve: _Curve, sent: np.ndarray, lat: np.ndarray) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(curve.samples, curve.auc, label="STCA (progressive, last window)")
    ax.plot(curve.samples, curve.best, label="ground truth (best achievable)", linestyle="--")
    ax.set_xlabel("samples trained")
    ax.set_ylabel("click AUC")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "auc.png", dpi=100)
    names.append("auc.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lat * 1e3, bins=60)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("requests")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=100)
    names.append("latency.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if sent.size:
        t = sent - sent.min()
        edges = np.arange(0, t.max() + 1.0, 1.0)
        counts, _ = np.histogram(t, bins=edges) if edges.size > 1 else (np.array([sent.size]), None)
        ax.plot(edges[:-1] if edges.size > 1 else [0], counts)
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests / s")
    fig.tight_layout()
    fig.savefig(out / "qps.png", dpi=100)
    names.append("qps.png")
    plt.close(fig)
    return names


def _rows(figs: dict[str, str]) -> Iterator[str]:
    for k, v in figs.items():
        yield f"| {k} | {v} |"


def run_system_demo(cfg: DemoConfig = FULL, out_dir: str = "demo-out") -> int:
    """Run the whole system once; 0 when nothing failed (no failed request, no failed PS call)."""
    import torch

    from streamrec.demo_ps import run_demo
    from streamrec.serving.config import ServeConfig
    from streamrec.serving.server import Server

    console = Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    torch.set_num_threads(2)
    console.rule("streamrec demo: traffic -> join + features -> STCA online -> serving")
    console.print(f"1-3. {cfg.events:,} generated events through the embedded pipeline (join window "
                  f"{cfg.window_s} s, default features); STCA trains online on its samples")
    runner, report, stats, curve = _train(cfg, out, console)
    click, best = report.tasks["click"], report.best["click"]
    console.print(f"     pipeline {stats.events:,} events -> {stats.samples:,} samples; trained "
                  f"{report.samples:,} samples; click AUC {click.auc:.4f} (best achievable {best.auc:.4f})")
    console.rule("4. the parameter server: storage processes, failover")
    ps = run_demo(seconds_per_phase=cfg.ps_seconds, rows=cfg.ps_rows, console=console)
    console.rule("5. the ranking server on the published version, under load")
    server = Server(ServeConfig(port=0), model_dir=out / "model", features=runner.features,
                    stores=runner.stores).start()
    try:
        console.print(f"   serving {server.url} (OIP v2 at /v2/models/stca/infer, /rank, /metrics); "
                      f"{cfg.clients} load processes x {cfg.inflight} in flight for {cfg.load_s:g} s")
        sent, lat, errors = _load(server.url, cfg)
    finally:
        server.stop()
    span = (sent.max() - sent.min()) if sent.size > 1 else float("nan")
    qps = sent.size / span if sent.size > 1 else 0.0
    p50, p99 = (np.percentile(lat, [50, 99]) * 1e3) if lat.size else (math.nan, math.nan)
    rate = f"{stats.events / stats.seconds:,.0f}" if stats.seconds else "-"
    figs = {
        "events/s (pipeline, join + features; paced by training)": rate,
        "samples/s (online training)": f"{report.samples_per_s:,.0f}",
        "click AUC (progressive) / best achievable": f"{click.auc:.4f} / {best.auc:.4f}",
        "ranking QPS (closed loop)": f"{qps:,.1f}",
        "latency p50 / p99 (ms)": f"{p50:.1f} / {p99:.1f}",
        "failed requests": f"{errors}",
        "PS failover: calls / failed / wrong rows": (f"{ps.failover_calls:,} / {ps.failover_failed} / "
                                                     f"{ps.failover_wrong}"),
    }
    table = Table("figure", "value", title="streamrec demo: summary")
    for k, v in figs.items():
        table.add_row(k, v)
    console.print(table)
    pngs = _plots(out, curve, sent, lat)
    md = ["# streamrec demo report", "",
          f"{cfg.events:,} generated events, {cfg.users:,} users, {cfg.items:,} items; "
          f"{time.monotonic() - started:.0f} s on {mp.cpu_count()} cores.", "",
          "| figure | value |", "|---|---|", *_rows(figs), "",
          *[f"![{p}]({p})" for p in pngs], ""]
    (out / "report.md").write_text("\n".join(md))
    ok = errors == 0 and ps.ok and lat.size > 0
    console.print(f"[{'green' if ok else 'red'}]report: {out / 'report.md'}[/] · total "
                  f"{time.monotonic() - started:.0f} s")
    return 0 if ok else 1
