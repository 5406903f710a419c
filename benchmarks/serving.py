"""Benchmark: the ranking server under closed-loop load, and each of its parts turned off (issue 13).

What it measures. One STCA model (``ModelConfig(sparse_features=3)``: D = 64, 4 heads, 2 layers;
smoke: D = 16), one ``SequenceStore`` of users with histories of 1,000 and 10,000 events (a quarter
of them 10,000; smoke: 50 and 200), and a workload of ranking requests whose candidate counts are
log-normal (median 200, sigma 1, clipped to 10..2,000) over users drawn uniformly. Every server
below runs in this process under uvicorn (httptools, uvloop), all at once; the load comes from
two separate processes (``_load.py``: closed loop, each of ``concurrency / 2`` asyncio clients
sends its next request when the last is answered) for ``duration`` seconds per measurement. While
load runs, a thread appends an event to a random user every 50 ms, time-stamped after the
requests' time: answers do not change (they stay checkable) but the user's sequence state does,
so cached encodings miss, and the server reads the history again and extends the old encoding
(here: reuses all of it, as the new event is not older than the request).

- ``full_qps``, ``full_p50_ms``, ``full_p99_ms``: the whole server (caches, orchestrator, eager).
- ``pda_gain``: full QPS over the same server with the near-model caches and reused buffers off
  (``pda = false``: every request reads and encodes its history). Target >= 1.9x.
- ``dso_gain``: full QPS over the server with the orchestrator off (``dso = false``: one request
  per model call, one at a time, in arrival order). Target >= 1.3x.
- ``compiled_gain``: QPS of the full server with ``executor = "compile"`` over eager. Target
  >= 1.3x. Full runs only (compiling takes 20-80 s here); null in --quick and --smoke.
- ``full_over_naive``: full QPS over a plain Starlette endpoint that runs the eager model once per
  request (history read from the store, no caches, no batching, no preprocessing split). >= 5x.
- ``qps_at_p99_50ms``: the highest QPS whose p99 stays <= 50 ms, over closed-loop concurrencies,
  at L = 1,000 for every user (median 200 candidates), full server. 0 if none holds it.
- ``http_overhead_ms``: p50 of a minimal infer (one candidate, a user with no history) on the full
  server minus the p50 of a bare Starlette echo on the same uvicorn settings; ``infer_p50_ms`` and
  ``echo_p50_ms`` are the two, one client sending requests one at a time.
- ``history_hit_rate``: the full server's encoded-history cache hits over lookups, and
  ``history_event_reuse`` the share of history events served from a cached encoding (whole, or
  extended by ``ModelRunner.extend`` after a change), both over the timed runs only.

Ratios are medians of per-round ratios: in each round every configuration is loaded in turn, so
machine drift hits all alike. The host has 2 cores shared with other work: absolute figures are
low and noisy; the load processes compete with the server for the same cores.

How answers are verified (a wrong answer fails the run with ``Wrong``): every answer of every
timed run must be 200 (a 4xx/5xx fails the run), and every 8th answer's scores are kept and, with
the clock stopped, compared to a direct ``model(batch)`` call on the same history read from the
store (rtol 1e-4). Each configuration must have taken its labelled path: the full server's cache
hit and its model calls packed several requests; with PDA off there is no cache and every request
encoded its history; with DSO off every model call held one request; the compiled server's runner
is compiled; the naive endpoint answered every request itself.

Run: ``python benchmarks/serving.py [--smoke | --quick] [--json]`` or ``streamrec bench serving``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson
import torch
import uvicorn
from _common import Report, Wrong, bench_args, emit_json, median, size
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from streamrec.model.batch import RequestBatch
from streamrec.model.stca import STCA, ModelConfig
from streamrec.pipeline.features import Stores
from streamrec.serving import ModelRunner, ServeConfig, Server
from streamrec.store import SequenceStore

KEYS = ("pda_gain", "dso_gain", "compiled_gain", "full_over_naive", "qps_at_p99_50ms", "http_overhead_ms",
        "full_qps", "full_p50_ms", "full_p99_ms", "no_pda_qps", "no_dso_qps", "compiled_qps", "naive_qps",
        "history_hit_rate", "history_event_reuse", "infer_p50_ms", "echo_p50_ms")

NOW_MS = 1_767_225_600_000 + 30 * 86_400_000
LOAD = Path(__file__).resolve().parent / "_load.py"
SAMPLE_EVERY = 8


@dataclass
class Run:
    """One timed load: answers by status, their latencies, sampled scores."""

    qps: float
    p50_ms: float
    p99_ms: float
    answered: int
    statuses: dict[str, int]
    samples: list[tuple[int, list]] = field(default_factory=list)


def _uvicorn(app: Any) -> tuple[str, uvicorn.Server, threading.Thread]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, loop="uvloop", http="httptools", lifespan="off",
                                           log_level="warning", access_log=False))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, t


# -- the world ------------------------------------------------------------------------------------


def build_store(users: np.ndarray, lengths: np.ndarray, rng: np.random.Generator) -> SequenceStore:
    # Room above the longest history: the churn thread's appends must not push old events out.
    store = SequenceStore(max_len=int(lengths.max()) + 4096, extra_fields=("value",))
    for u, n in zip(users.tolist(), lengths.tolist(), strict=True):
        store.append(np.full(n, u), rng.integers(0, 10**6, n), rng.integers(1, 7, n),
                     np.sort(NOW_MS - rng.integers(1_000, 30 * 86_400_000, n)),
                     extras={"value": rng.random(n) * 30})
    return store


def workload(path: Path, users: np.ndarray, n: int, rng: np.random.Generator, median_m: float = 200,
             lo: int = 10, hi: int = 2000) -> dict[str, np.ndarray]:
    who = rng.choice(users, n)
    m = np.clip(np.exp(rng.normal(np.log(median_m), 1.0, n)), lo, hi).astype(np.int64)
    offsets = np.r_[0, np.cumsum(m)].astype(np.int64)
    items = rng.integers(0, 10**6, int(offsets[-1]))
    w: dict[str, Any] = {"users": who, "offsets": offsets, "items": items, "ts_ms": np.int64(NOW_MS)}
    np.savez(path, **w)
    return w


def direct(model: torch.nn.Module, store: SequenceStore, user: int, items: np.ndarray,
           max_len: int) -> np.ndarray:
    _, cols = store.read(np.array([user], np.uint64))
    idx = np.flatnonzero(cols["timestamp"] < NOW_MS)[-max_len:]
    m = items.shape[0]
    hour = (NOW_MS // 3_600_000) % 24
    b = RequestBatch.from_numpy(
        hist_offsets=[0, idx.size], hist_item=cols["item"][idx].astype(np.int64),
        hist_action=cols["action"][idx].astype(np.int64), hist_ts_ms=cols["timestamp"][idx],
        hist_value=cols["value"][idx], request_ts_ms=[NOW_MS], user_id=[user], target_offsets=[0, m],
        target_item=items, sparse=np.stack([np.zeros(m), np.full(m, hour), np.zeros(m)], axis=1))
    with torch.no_grad():
        return torch.sigmoid(model(b)).numpy()


def naive_app(model: torch.nn.Module, store: SequenceStore, max_len: int, calls: list[int]) -> Starlette:
    """The plain baseline: one eager model call per request, in Starlette's thread pool."""

    async def handler(request: Request) -> Response:
        body = orjson.loads(await request.body())
        items = np.asarray(body["item_ids"], np.int64)
        scores = await run_in_threadpool(direct, model, store, int(body["user_id"]), items, max_len)
        calls[0] += 1
        return Response(orjson.dumps({"scores": scores}, option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json")

    return Starlette(routes=[Route("/rank", handler, methods=["POST"])])


def echo_app() -> Starlette:
    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/json")

    return Starlette(routes=[Route("/echo", echo, methods=["POST"])])


# -- load -----------------------------------------------------------------------------------------


def load(url: str, path: str, wl_file: Path, concurrency: int, duration: float, seed: int, *,
         procs: int = 2, sample_every: int = SAMPLE_EVERY) -> Run:
    procs = max(1, min(procs, concurrency))
    per = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    ps = [subprocess.Popen([sys.executable, str(LOAD), url, path, str(wl_file), str(c), str(duration),
                            str(seed * 100 + i), str(sample_every)], stdout=subprocess.PIPE, text=True)
          for i, c in enumerate(per)]
    outs = []
    for p in ps:
        out, _ = p.communicate(timeout=duration + 300)
        if p.returncode != 0:
            raise RuntimeError(f"a load process failed ({p.returncode})")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    lat: dict[str, list[float]] = {}
    for o in outs:
        for k, v in o["latency_ms"].items():
            lat.setdefault(k, []).extend(v)
    ok = np.array(lat.get("200", []))
    wall = max(o["wall_s"] for o in outs)
    return Run(qps=ok.size / wall, p50_ms=float(np.percentile(ok, 50)) if ok.size else float("nan"),
               p99_ms=float(np.percentile(ok, 99)) if ok.size else float("nan"), answered=int(ok.size),
               statuses={k: len(v) for k, v in lat.items()},
               samples=[(int(s[0]), s[1]) for o in outs for s in o["samples"]])


def check(name: str, run: Run, wl: dict[str, np.ndarray], model: torch.nn.Module, store: SequenceStore,
          max_len: int, limit: int) -> None:
    bad = {k: v for k, v in run.statuses.items() if k != "200"}
    if bad or not run.answered:
        raise Wrong(f"{name}: answers other than 200: {bad} (200: {run.answered})")
    for i, scores in run.samples[:limit]:
        a, b = wl["offsets"][i], wl["offsets"][i + 1]
        want = direct(model, store, int(wl["users"][i]), wl["items"][a:b], max_len)
        got = np.asarray(scores, np.float32)
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-6):
            raise Wrong(f"{name}: request {i} scored {got.ravel()[:3]}..., the model says "
                        f"{want.ravel()[:3]}...")


class Churn:
    """Appends one event to a random user every ``every_s`` (newer than the requests: answers keep)."""

    def __init__(self, store: SequenceStore, users: np.ndarray, every_s: float = 0.05) -> None:
        self.store, self.users, self.every_s = store, users, every_s
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self.appended = 0

    def _run(self) -> None:
        rng = np.random.default_rng(7)
        while not self._stop.wait(self.every_s):
            u = int(rng.choice(self.users))
            self.store.append([u], [int(rng.integers(0, 10**6))], [1], [NOW_MS + 1 + self.appended],
                              extras={"value": [1.0]})
            self.appended += 1

    def __enter__(self) -> Churn:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = bench_args(__doc__.splitlines()[0], argv)
    smoke, quick = args.smoke, args.quick
    rounds = args.rounds or size(args, 3, 1, 1)
    duration = size(args, 8.0, 4.0, 0.6)
    conc = size(args, 8, 8, 4)
    users_n = size(args, 64, 32, 8)
    long_l, short_l = size(args, (10_000, 1_000), (10_000, 1_000), (200, 50))
    sweep = size(args, (1, 2, 4, 8, 16), (1, 4, 8), (2,))
    with_compiled = not (smoke or quick)
    procs = size(args, 2, 2, 1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = ModelConfig(sparse_features=3) if not smoke else ModelConfig(dim=16, heads=2, mlp=(32,),
                                                                         sparse_features=3)
    model = STCA(cfg).eval()
    users = np.arange(1, users_n + 1)
    lengths = np.where(np.arange(users_n) % 4 == 0, long_l, short_l)
    short_users = np.arange(10_001, 10_001 + users_n // 2)
    store = build_store(np.r_[users, short_users], np.r_[lengths, np.full(short_users.size, short_l)], rng)
    tmp = Path(tempfile.mkdtemp(prefix="streamrec-serving-bench-"))
    wl = workload(tmp / "skewed.npz", users, 4000, rng)
    wl_short = workload(tmp / "short.npz", short_users, 4000, rng)
    np.savez(tmp / "tiny.npz", users=np.array([999_999]), offsets=np.array([0, 1]), items=np.array([1]),
             ts_ms=np.int64(NOW_MS))
    stores = Stores(sequences=store)
    max_len = long_l
    torch.set_num_threads(1)

    def server(**kw: Any) -> Server:
        compiled = kw.get("executor") == "compile"
        # Deadline 60 s: a 2,000-candidate request over 10,000 events takes about a second alone
        # here, and the benchmark measures throughput, not the deadline.
        return Server(ServeConfig(port=0, max_history=max_len, deadline_ms=60_000.0, **kw), stores=stores,
                      runner=ModelRunner(model, 1, compiled=compiled)).start()

    servers = {"full": server(), "no_pda": server(pda=False), "no_dso": server(dso=False)}
    if with_compiled:
        t0 = time.perf_counter()
        servers["compiled"] = server(executor="compile")
        compile_s = time.perf_counter() - t0
    naive_calls = [0]
    naive_url, naive_srv, naive_t = _uvicorn(naive_app(model, store, max_len, naive_calls))
    echo_url, echo_srv, echo_t = _uvicorn(echo_app())
    urls = {**{k: s.url for k, s in servers.items()}, "naive": naive_url}
    runs: dict[str, list[Run]] = {k: [] for k in urls}
    limit = 2 if smoke else 4
    try:
        # Warm-up outside the clock: caches filled, compiled paths traced (smoke: none, its
        # figures mean nothing and it must stay short).
        for url in urls.values() if not smoke else ():
            load(url, "/rank", tmp / "skewed.npz", conc, size(args, 6.0, 3.0, 0.5), seed=99, sample_every=0)
        hits0, lookups0 = (servers["full"].cache.stats.hits, servers["full"].cache.stats.lookups
                           ) if servers["full"].cache else (0, 0)
        pre0 = servers["full"].pre
        reused0, encoded0 = pre0.reused_events, pre0.encoded_events
        with Churn(store, users):
            for r in range(rounds):
                for name, url in urls.items():
                    run = load(url, "/rank", tmp / "skewed.npz", conc, duration, seed=r, procs=procs)
                    runs[name].append(run)
            fc = servers["full"].cache
            hit = (fc.stats.hits - hits0) / max(1, fc.stats.lookups - lookups0) if fc else float("nan")
            reused, encoded = pre0.reused_events - reused0, pre0.encoded_events - encoded0
            reuse = reused / max(1, reused + encoded)
            for name, rs in runs.items():
                for run in rs:
                    check(name, run, wl, model, store, max_len, limit)
        # Labelled paths.
        full, no_pda, no_dso = servers["full"], servers["no_pda"], servers["no_dso"]
        answered = {k: sum(r.answered for r in v) for k, v in runs.items()}
        if full.cache is None or full.cache.stats.hits == 0:
            raise Wrong("full: the history cache never hit")
        if full.orchestrator.batches >= full.orchestrator.answered:
            raise Wrong("full: no model call packed several requests")
        if no_pda.cache is not None or no_pda.pre.encoded_events < answered["no_pda"] * short_l:
            raise Wrong("no_pda: requests did not encode their histories")
        if no_dso.orchestrator.batches != no_dso.orchestrator.answered:
            raise Wrong("no_dso: a model call held more than one request")
        comp = servers["compiled"].slot.runner if with_compiled else None
        if with_compiled and not (comp is not None and comp.compiled and comp.split):
            raise Wrong("compiled: the runner is not compiled")
        if naive_calls[0] < answered["naive"]:
            raise Wrong("naive: answers not made by the naive endpoint")
        # QPS held at p99 <= 50 ms, L = 1,000 for everyone.
        if not smoke:
            load(full.url, "/rank", tmp / "short.npz", conc, size(args, 4.0, 2.0, 0.4), seed=98,
                 sample_every=0)
        sweep_runs = {c: load(full.url, "/rank", tmp / "short.npz", c, duration, seed=50 + c, procs=procs)
                      for c in sweep}
        for c, run in sweep_runs.items():
            check(f"sweep c={c}", run, wl_short, model, store, max_len, 1)
        held = [run.qps for run in sweep_runs.values() if run.p99_ms <= 50.0]
        # HTTP overhead: one client, one request at a time.
        tiny_s = size(args, 4.0, 2.0, 0.5)
        infer = load(full.url, "/rank", tmp / "tiny.npz", 1, tiny_s, seed=1, procs=1, sample_every=0)
        echo = load(echo_url, "/echo", tmp / "tiny.npz", 1, tiny_s, seed=1, procs=1, sample_every=0)
    finally:
        for s in servers.values():
            s.stop()
        for srv, t in ((naive_srv, naive_t), (echo_srv, echo_t)):
            srv.should_exit = True
            t.join(timeout=30)

    def per_round(a: str, b: str) -> float:
        return median([x.qps / y.qps for x, y in zip(runs[a], runs[b], strict=True)])

    def med(name: str, attr: str) -> float:
        return median([getattr(r, attr) for r in runs[name]])

    fig: dict[str, Any] = {
        "pda_gain": per_round("full", "no_pda"), "dso_gain": per_round("full", "no_dso"),
        "compiled_gain": per_round("compiled", "full") if with_compiled else None,
        "full_over_naive": per_round("full", "naive"), "qps_at_p99_50ms": max(held) if held else 0.0,
        "http_overhead_ms": infer.p50_ms - echo.p50_ms, "full_qps": med("full", "qps"),
        "full_p50_ms": med("full", "p50_ms"), "full_p99_ms": med("full", "p99_ms"),
        "no_pda_qps": med("no_pda", "qps"), "no_dso_qps": med("no_dso", "qps"),
        "compiled_qps": med("compiled", "qps") if with_compiled else None, "naive_qps": med("naive", "qps"),
        "history_hit_rate": hit, "history_event_reuse": reuse, "infer_p50_ms": infer.p50_ms,
        "echo_p50_ms": echo.p50_ms,
    }
    assert tuple(fig) == KEYS
    rep = Report(f"serving: {users_n} users (L = {long_l:,} for a quarter, {short_l:,} the rest), "
                 f"log-normal candidates (median 200, 10..2,000), {conc} closed-loop clients in 2 processes, "
                 f"{duration:g} s x {rounds} round(s), {os.cpu_count()} CPUs shared")
    for name, base, key, target in (("full", "no_pda", "pda_gain", ">= 1.9x"),
                                    ("full", "no_dso", "dso_gain", ">= 1.3x"),
                                    ("full", "naive", "full_over_naive", ">= 5x")):
        rep.add(f"{key}: {name} / {base}", f"{fig[key]:.2f}x",
                f"{med(name, 'qps'):.1f} vs {med(base, 'qps'):.1f} QPS; p99 {med(name, 'p99_ms'):.0f} vs "
                f"{med(base, 'p99_ms'):.0f} ms", target)
    if with_compiled:
        rep.add("compiled_gain: compile / eager", f"{fig['compiled_gain']:.2f}x",
                f"{fig['compiled_qps']:.1f} vs {fig['full_qps']:.1f} QPS (compiled in {compile_s:.0f} s)",
                ">= 1.3x")
    else:
        rep.note("compiled_gain: not measured at this size (compiling takes 20-80 s here); "
                 "full runs measure it")
    rep.add("full server", "", f"{fig['full_qps']:.1f} QPS, p50 {fig['full_p50_ms']:.1f} ms, "
            f"p99 {fig['full_p99_ms']:.1f} ms; history cache hit rate {hit:.2f}, events reused {reuse:.2f}")
    rep.add("qps_at_p99_50ms (L = 1,000)", "", ", ".join(f"c={c}: {r.qps:.1f} QPS p99 {r.p99_ms:.0f} ms"
                                                         for c, r in sweep_runs.items()), "")
    rep.add("http_overhead_ms", f"{fig['http_overhead_ms']:.2f} ms",
            f"infer p50 {infer.p50_ms:.2f} ms vs echo p50 {echo.p50_ms:.2f} ms")
    rep.note(f"answers verified: every timed answer 200; {limit} sampled per run equal model(batch); "
             "labelled paths checked")
    rep.print()
    if args.json:
        emit_json(fig)
    return fig


if __name__ == "__main__":
    main()
