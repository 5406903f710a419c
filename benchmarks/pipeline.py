"""Benchmark: the embedded sample pipeline (join + features) against an event-at-a-time Python join and a
pandas batch join on the same generated events, and its emit delays at 100 k events/s.

Traffic: the generator (``pipeline/generate.py``: 20 k impressions/s of event time plus about 0.7 actions per
impression, 1 % duplicates, 1 % late actions), 10 M events, about 290 s of event time (``--quick``: 1 M
events at 5 k impressions/s, about 120 s; ``--smoke`` 30 k), cut into micro-batches of one generator step
(1 s of event time), watermark = step end - 1 s. Join: 60 s window (``--quick`` 30 s), ``at_close``, late
actions dropped, late horizon twice the window. The stream spans several windows, so windows close in
every batch after the first window: the steady state, not a fill.

Figures (JSON keys, ``KEYS`` below):
- ``events_per_s``: events through ``Stores.observe`` + ``SampleJoin.process`` + ``FeatureSet.transform``
  (``default_features()``), one process, whole stream (``join_events_per_s``: the join alone, same events).
- ``embedded_over_python``: the join over an event-at-a-time Python join (a dict of pending rows plus a
  heap of deadlines, the same rules: duplicates, parking, late and too-old events, sequences) on the same
  prefix of micro-batches (full 2 M events, quick 300 k), median of paired rounds.
- ``embedded_over_pandas``: the join over a pandas batch join of the same prefix (drop duplicates, merge
  actions onto impressions, keep those in the window, aggregate labels per impression), which sees all the
  data at once: an offline bound.
- ``embedded_over_flink``: the embedded join over the Flink runner (``pipeline/flink.py``: the same join as
  Flink SQL in a local mini-cluster, parallelism 1) on the same prefix: the Flink job's run time (its
  JVM gateway's start is printed apart) over the embedded join's. Null, with the reason printed, where
  apache-flink or Java is missing, and under ``--smoke`` (the JVM's start alone is about 10 s).
- ``p99_close_to_emit_s``: at 100 k events/s replayed in real time (micro-batches of 100 ms released at
  their wall time, 30 s window), wall time from the moment the sources let the watermark pass a window's
  close (close + allowed lateness of 1 s) to the sample's emission. ``p99_action_to_sample_s``: the same
  replay with ``eager``: from a positive action's arrival to its eager sample.
- ``memory_per_pending_impression_bytes``: the pending table's bytes (index + rows) per row it holds, at
  the end of the stream; ``join_state_bytes_per_pending`` adds the closed and dedup tables.

How answers are verified (``Wrong`` fails the run): the Python join's samples (ids, labels, watch time) and
counters equal the embedded join's, row for row, on the prefix; every pandas label is a superset of the
streaming one (pandas cannot drop what arrived late) and at least 97 % of rows agree exactly; the whole
stream yields one sample per impression that was neither a duplicate nor late; every latency sample is
checked against its action or window; the Flink runner's samples are the same impressions with labels
a superset of the streaming ones (Flink's batch join cannot drop what arrived late) and at least 97 % of
rows equal.

Run: ``python benchmarks/pipeline.py [--smoke | --quick] [--json]`` or ``streamrec bench pipeline``.
"""

from __future__ import annotations

import heapq
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Report, Wrong, bench_args, console, finish, median, size

from streamrec.pipeline.events import ACTIONS
from streamrec.pipeline.features import default_features
from streamrec.pipeline.flink import flink_available, run_flink
from streamrec.pipeline.generate import GeneratorConfig, generate
from streamrec.pipeline.join import JoinConfig, SampleJoin

KEYS = ("events_per_s", "join_events_per_s", "embedded_over_python", "embedded_over_flink",
        "embedded_over_pandas", "p99_close_to_emit_s", "p99_action_to_sample_s",
        "memory_per_pending_impression_bytes", "join_state_bytes_per_pending")

LATENESS_MS = 1000
LABELS = sorted(ACTIONS, key=ACTIONS.__getitem__)
POSITIVE = sum(1 << (c - 1) for n, c in ACTIONS.items() if n != "skip")
Batch = tuple[pa.RecordBatch, pa.RecordBatch, int]


def traffic(events: int, imps_per_s: float, step_s: float = 1.0, seed: int = 0) -> list[Batch]:
    """The first ``events`` events of an endless stream, one micro-batch per generator step (a cut
    stream: actions still in flight at the end never arrive, as when a log is read up to a point)."""
    cfg = GeneratorConfig(impressions_per_s=imps_per_s, step_s=step_s, seed=seed)
    out = []
    step_ms = round(step_s * 1000)
    n = 0
    for k, (imps, acts) in enumerate(generate(cfg)):
        out.append((imps, acts, cfg.start_ms + (k + 1) * step_ms - LATENESS_MS))
        n += imps.num_rows + acts.num_rows
        if n >= events:
            return out
    return out


def n_events(batches: list[Batch]) -> int:
    return sum(i.num_rows + a.num_rows for i, a, _ in batches)


def flush_wm(batches: list[Batch], cfg: JoinConfig) -> int:
    return batches[-1][2] + (cfg.window_s + cfg.late_horizon_s) * 1000 + 2 * cfg.close_tick_ms


def sample_key(t: pa.Table) -> np.ndarray:
    """(n, 9) int64 rows: request, item, six labels, watch time (ms): the comparable part of a sample."""
    cols = [t.column("request_id"), t.column("item_id"), *(t.column(n) for n in LABELS)]
    out = np.stack([np.asarray(c.to_numpy(), dtype=np.int64) for c in cols]
                   + [np.round(t.column("watch_time").to_numpy().astype(np.float64) * 1000).astype(np.int64)],
                   axis=1)
    return out[np.lexsort(out.T[::-1])]


# -- the embedded join ---------------------------------------------------------------------------------


def run_embedded(batches: list[Batch], cfg: JoinConfig, features: bool, timed_flush: bool = False
                 ) -> tuple[pa.Table, float, SampleJoin, dict[str, float]]:
    """Every batch through the pipeline, then a flush that closes every window (timed if asked)."""
    join = SampleJoin(cfg)
    fs = default_features() if features else None
    stores = fs.make_stores(sequences=join.sequences, capacity=65536) if fs is not None else None
    out: list[pa.RecordBatch] = []
    mem: dict[str, float] = {}
    t0 = time.perf_counter()
    for imps, acts, wm in batches:
        if stores is not None:
            stores.observe(imps, acts)
        s = join.process(imps, acts, wm)
        if fs is not None and stores is not None and s.num_rows:
            s = fs.transform(s, stores)
        out.append(s)
    if timed_flush:
        out.append(join.process(None, None, flush_wm(batches, cfg)))
    dt = time.perf_counter() - t0
    if join.pending:
        mem["pending"] = join.pending_bytes() / join.pending
        mem["all"] = join.memory_bytes() / join.pending
    if not timed_flush:
        out.append(join.process(None, None, flush_wm(batches, cfg)))  # untimed: closes what is left
    return pa.Table.from_batches([b.select(range(20)) for b in out]), dt, join, mem


# -- the event-at-a-time Python join (same rules as SampleJoin, at_close, late dropped) ----------------


def run_python(batches: list[Batch], cfg: JoinConfig) -> tuple[list[tuple], dict[str, int]]:
    W, H, tick = cfg.window_ms, cfg.late_horizon_s * 1000, cfg.close_tick_ms

    def C(ms: int) -> int:
        return -(-ms // tick) * tick

    pending: dict[tuple[int, int], list[Any]] = {}  # pair -> [imp tuple | None, labels, watch, park, close]
    deadlines: list[tuple[int, tuple[int, int]]] = []
    closed: dict[tuple[int, int], int] = {}
    closed_heap: list[tuple[int, tuple[int, int]]] = []
    dedup: dict[tuple[int, int, int, int], int] = {}
    dedup_heap: list[tuple[int, tuple[int, int, int, int]]] = []
    seq: dict[int, list[tuple[int, int, int, float]]] = {}
    counts = dict.fromkeys(("duplicate_impressions", "duplicate_actions", "late_impressions",
                            "late_actions_dropped", "too_old_actions", "parked_unmatched"), 0)
    out: list[tuple] = []
    final = flush_wm(batches, cfg)
    batches = [*batches, (batches[0][0].slice(0, 0), batches[0][1].slice(0, 0), final)]
    for imps, acts, wm in batches:
        cols = [imps.column(i).to_pylist() for i in range(imps.num_columns)]
        seen = set()
        for imp in zip(*cols, strict=True):
            pair = (imp[0], imp[2])
            if pair in seen:
                counts["duplicate_impressions"] += 1
                continue
            seen.add(pair)
            close = C(imp[3] + W)
            if close <= wm:
                counts["late_impressions"] += 1
                continue
            row = pending.get(pair)
            if row is not None and row[0] is not None:
                counts["duplicate_impressions"] += 1
                continue
            new = [imp, 0, 0.0, [], close]
            if row is not None:  # parked actions: applied now
                for code, ts, v in row[3]:
                    if ts < imp[3] + W:
                        new[1] |= 1 << (code - 1)
                        new[2] += v
                    else:
                        counts["late_actions_dropped"] += 1
            pending[pair] = new
            heapq.heappush(deadlines, (close, pair))
        acols = [acts.column(i).to_pylist() for i in range(acts.num_columns)]
        dseen = set()
        for req, user, item, ts, code, value in zip(*acols, strict=True):
            gone = C(ts + W + H)
            if gone <= wm:
                counts["too_old_actions"] += 1
                continue
            dk = (req, item, code, ts)
            if dk in dseen or dk in dedup:
                counts["duplicate_actions"] += 1
                continue
            dseen.add(dk)
            dedup[dk] = gone
            heapq.heappush(dedup_heap, (gone, dk))
            seq.setdefault(user, []).append((item, code, ts, value))
            pair = (req, item)
            row = pending.get(pair)
            if row is not None and row[0] is not None:
                if ts < row[0][3] + W:
                    row[1] |= 1 << (code - 1)
                    row[2] += value
                else:
                    counts["late_actions_dropped"] += 1
            elif row is None and pair in closed:
                counts["late_actions_dropped"] += 1
            else:
                if row is None:
                    row = pending[pair] = [None, 0, 0.0, [], 0]
                if len(row[3]) < 4:
                    row[3].append((code, ts, value))
                    close = C(max(t for _, t, _ in row[3]) + W)
                    if close != row[4]:
                        row[4] = close
                        heapq.heappush(deadlines, (close, pair))
        while closed_heap and closed_heap[0][0] <= wm:
            _, pair = heapq.heappop(closed_heap)
            closed.pop(pair, None)
        while dedup_heap and dedup_heap[0][0] <= wm:
            _, dk = heapq.heappop(dedup_heap)
            dedup.pop(dk, None)
        while deadlines and deadlines[0][0] <= wm:
            close, pair = heapq.heappop(deadlines)
            row = pending.get(pair)
            if row is None or row[4] != close:  # superseded deadline
                continue
            del pending[pair]
            if row[0] is None:
                counts["parked_unmatched"] += len(row[3])
                continue
            imp = row[0]
            out.append((imp[0], imp[2], *((row[1] >> (ACTIONS[n] - 1)) & 1 for n in LABELS),
                        round(float(np.float32(row[2])) * 1000)))
            until = C(imp[3] + W + H)
            if until > wm:
                closed[pair] = until
                heapq.heappush(closed_heap, (until, pair))
    return out, counts


# -- the pandas batch join (sees all the data at once) -----------------------------------------------------


def run_pandas(batches: list[Batch], cfg: JoinConfig) -> pd.DataFrame:
    imps = pa.Table.from_batches([b[0] for b in batches]).to_pandas()
    acts = pa.Table.from_batches([b[1] for b in batches]).to_pandas()
    imps = imps.drop_duplicates(["request_id", "item_id"])
    acts = acts.drop_duplicates(["request_id", "item_id", "action", "ts_ms"])
    m = acts.merge(imps[["request_id", "item_id", "ts_ms"]], on=["request_id", "item_id"],
                   suffixes=("", "_imp"))
    m = m[m["ts_ms"] < m["ts_ms_imp"] + cfg.window_ms]
    m = m.assign(bit=np.left_shift(1, m["action"].astype(np.int64) - 1))
    g = m.groupby(["request_id", "item_id"]).agg(bits=("bit", lambda b: np.bitwise_or.reduce(b.to_numpy())),
                                                  watch=("value", "sum"))
    out = imps[["request_id", "item_id"]].merge(g, left_on=["request_id", "item_id"], right_index=True,
                                                how="left").fillna({"bits": 0, "watch": 0.0})
    return out


def pandas_key(df: pd.DataFrame) -> np.ndarray:
    bits = df["bits"].to_numpy().astype(np.int64)
    cols = [df["request_id"].to_numpy(), df["item_id"].to_numpy(),
            *((bits >> (ACTIONS[n] - 1)) & 1 for n in LABELS),
            np.round(df["watch"].to_numpy().astype(np.float32).astype(np.float64) * 1000).astype(np.int64)]
    out = np.stack([np.asarray(c, dtype=np.int64) for c in cols], axis=1)
    return out[np.lexsort(out.T[::-1])]


# -- emit delays at 100 k events/s ------------------------------------------------------------------------


def latency(seconds: float, policy: Literal["at_close", "eager"], speed: float, rate: float) -> np.ndarray:
    """Delays (s) of a real-time replay: closes (at_close) or positive actions (eager) to their samples."""
    imps_per_s = rate / 1.7  # about 0.7 actions per impression: ``rate`` events/s in all
    # sized for the impressions of a window and a half: no index doubling stalls a batch mid-replay
    cfg = JoinConfig(window_s=30, policy=policy, capacity=int(imps_per_s * 45))
    batches = traffic(int(rate * seconds), imps_per_s, step_s=0.1, seed=1)
    join = SampleJoin(cfg)
    join.process(None, None, batches[0][2] - 100)  # tables made before the clock starts
    start_ms = batches[0][2] + LATENESS_MS - 100  # event time of the first batch's start
    delays: list[np.ndarray] = []
    wall0 = time.perf_counter()

    def wall_of(ms: np.ndarray) -> np.ndarray:
        return wall0 + (ms - start_ms) / 1000 / speed

    for imps, acts, wm in batches:
        cut = wm + LATENESS_MS
        ahead = wall_of(np.array(cut)) - time.perf_counter()
        if ahead > 0:
            time.sleep(float(ahead))
        s = join.process(imps, acts, wm)
        now = time.perf_counter()
        if policy == "at_close":
            k = s.filter(pa.compute.equal(s.column("kind"), 0))
            closes = join.close_ms(k.column("ts_ms").to_numpy() + cfg.window_ms)
            if (closes > wm).any():
                raise Wrong("a window was emitted before the watermark reached its close")
            delays.append(now - wall_of(closes + LATENESS_MS))
        else:
            k = s.filter(pa.compute.equal(s.column("kind"), 1))
            if not k.num_rows:
                continue
            a = acts.to_pandas()
            a = a[(np.left_shift(1, a["action"].to_numpy().astype(np.int64) - 1) & POSITIVE) != 0]
            first = a.groupby(["request_id", "item_id"])["ts_ms"].min()
            got = k.to_pandas().join(first.rename("act_ts"), on=["request_id", "item_id"])
            if got["act_ts"].isna().any():
                raise Wrong("an eager sample without a positive action in its micro-batch")
            delays.append(now - wall_of(got["act_ts"].to_numpy()))
    behind = time.perf_counter() - wall_of(np.array(batches[-1][2] + LATENESS_MS))
    console.print(f"[dim]{policy}: replay ended {behind:+.3f} s from its schedule[/dim]")
    return np.concatenate(delays) if delays else np.zeros(0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = bench_args(__doc__.splitlines()[0], argv)
    events = size(args, 10_000_000, 1_000_000, 30_000)
    prefix = size(args, 2_000_000, 300_000, 30_000)
    rounds = args.rounds or size(args, 3, 2, 1)
    window = size(args, 60, 30, 30)
    cfg = JoinConfig(window_s=window, late_horizon_s=2 * window)
    console.print(f"[dim]generating {events:,} events ...[/dim]")
    batches = traffic(events, size(args, 20_000, 5_000, 5_000))
    total = n_events(batches)

    # whole stream, join + features, then join alone
    table, dt_feat, join, mem = run_embedded(batches, cfg, features=True)
    c = join.counts
    if table.num_rows != c["impressions"] - c["duplicate_impressions"] - c["late_impressions"]:
        raise Wrong(f"{table.num_rows} samples for {c['impressions']} impressions "
                    f"({c['duplicate_impressions']} duplicates, {c['late_impressions']} late)")
    _, dt_join, _, _ = run_embedded(batches, cfg, features=False)

    # the prefix: embedded vs Python vs pandas, paired rounds
    head: list[Batch] = []
    for b in batches:
        head.append(b)
        if n_events(head) >= prefix:
            break
    n_head = n_events(head)
    emb_t, py_t, pd_t = [], [], []
    for r in range(rounds):
        emb, dt_e, ejoin, _ = run_embedded(head, cfg, features=False, timed_flush=True)
        emb_t.append(dt_e)
        t0 = time.perf_counter()
        py, py_counts = run_python(head, cfg)
        py_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pdf = run_pandas(head, cfg)
        pd_t.append(time.perf_counter() - t0)
        if r == 0:  # verify, untimed
            ek = sample_key(emb)
            pk = np.array(sorted(py), dtype=np.int64).reshape(-1, 9)
            if ek.shape != pk.shape or not (ek == pk).all():
                diff = next((i for i in range(min(len(ek), len(pk))) if (ek[i] != pk[i]).any()), None)
                raise Wrong(f"Python join: {pk.shape[0]} samples, embedded {ek.shape[0]}; first difference "
                            f"at sorted row {diff}")
            for k, v in py_counts.items():
                if ejoin.counts[k] != v:
                    raise Wrong(f"counter {k}: Python {v}, embedded {ejoin.counts[k]}")
            full = sample_key(emb)
            pk2 = pandas_key(pdf)
            if full.shape != pk2.shape or not (full[:, :2] == pk2[:, :2]).all():
                raise Wrong("pandas join: not the same impressions")
            sub = ((full[:, 2:8] <= pk2[:, 2:8]).all(axis=1))
            same = (full == pk2).all(axis=1).mean()
            if not sub.all() or same < 0.97:
                raise Wrong(f"pandas join: {int((~sub).sum())} rows with a label pandas lacks; "
                            f"{same:.1%} rows equal")
            console.print(f"[dim]verified: Python join equal ({pk.shape[0]:,} samples, counters); pandas "
                          f"labels a superset, {same:.2%} of rows equal[/dim]")
    over_py = median([p / e for p, e in zip(py_t, emb_t, strict=True)])
    over_pd = median([p / e for p, e in zip(pd_t, emb_t, strict=True)])

    # emit delays at 100 k events/s (real time; --smoke replays 20x faster and means nothing)
    speed = 20.0 if args.smoke else 1.0
    rate = size(args, 100_000.0, 100_000.0, 2_000.0)
    secs = size(args, 60.0, 36.0, 36.0)
    close_d = latency(secs, "at_close", speed, rate)
    act_d = latency(min(secs, 15.0), "eager", speed, rate)
    p99_close = float(np.percentile(close_d, 99)) if close_d.size else None
    p99_act = float(np.percentile(act_d, 99)) if act_d.size else None

    missing = flink_available() or ("--smoke: the Flink JVM's start alone is about 10 s" if args.smoke
                                    else None)
    over_flink = None
    if missing is None:
        res = run_flink([b[0] for b in head], [b[1] for b in head], cfg)
        fk, ek = sample_key(res.samples), sample_key(emb)
        if fk.shape != ek.shape or not (fk[:, :2] == ek[:, :2]).all():
            raise Wrong(f"Flink runner: {fk.shape[0]} samples for {ek.shape[0]} embedded, or others")
        agree = (fk == ek).all(axis=1).mean()
        if not (ek[:, 2:8] <= fk[:, 2:8]).all() or agree < 0.97:
            raise Wrong(f"Flink runner: labels not a superset of the embedded, or {agree:.1%} rows equal")
        over_flink = res.job_s / median(emb_t)
        flink = (f"{n_head / median(emb_t):,.0f} vs {n_head / res.job_s:,.0f} ev/s (Flink job "
                 f"{res.job_s:.1f} s + gateway start {res.startup_s:.1f} s; {agree:.2%} rows equal)")
    else:
        flink = missing.replace("[", "\\[")  # rich markup would eat "[flink]"
    fig = {
        "events_per_s": total / dt_feat,
        "join_events_per_s": total / dt_join,
        "embedded_over_python": over_py,
        "embedded_over_flink": over_flink,
        "embedded_over_pandas": over_pd,
        "p99_close_to_emit_s": p99_close,
        "p99_action_to_sample_s": p99_act,
        "memory_per_pending_impression_bytes": mem.get("pending"),
        "join_state_bytes_per_pending": mem.get("all"),
    }
    assert tuple(fig) == KEYS
    rep = Report(f"streamrec bench pipeline: {total:,} generated events ({len(batches)} micro-batches of "
                 f"1 s), {window} s window, at_close; prefix {n_head:,} events x {rounds} rounds")
    rep.add("embedded / Python event-at-a-time", f"{over_py:.2f}x",
            f"{n_head / median(emb_t):,.0f} vs {n_head / median(py_t):,.0f} ev/s", ">= 3")
    rep.add("embedded / pandas batch", f"{over_pd:.2f}x",
            f"{n_head / median(emb_t):,.0f} vs {n_head / median(pd_t):,.0f} ev/s", ">= 0.25")
    rep.add("embedded / Flink", f"{over_flink:.1f}x" if over_flink is not None else "null", flink, ">= 20")
    rep.add("events/s, join + features", "", f"{fig['events_per_s']:,.0f}", ">= 1 M")
    rep.add("events/s, join alone", "", f"{fig['join_events_per_s']:,.0f}", "")
    def show(x: float | None) -> str:
        return f"{x:.3f} s" if x is not None else "-"

    rep.add(f"p99 close -> emit ({rate / 1000:.0f} k ev/s)", "", show(p99_close), "<= 1.0 s")
    rep.add("p99 action -> sample, eager", "", show(p99_act), "<= 0.5 s")
    rep.add("bytes per pending impression", "", f"{mem.get('pending', 0):,.0f} (all tables "
            f"{mem.get('all', 0):,.0f})", "")
    if over_flink is None:
        rep.note(f"embedded_over_flink is null: {flink}")
    rep.note("close -> emit counts from when the watermark could pass the close (close + 1 s lateness)")
    if args.smoke:
        rep.note("--smoke: tiny sizes, delays replayed 20x faster than real time; figures mean nothing")
    return finish(rep, fig, args.json)


if __name__ == "__main__":
    main()
