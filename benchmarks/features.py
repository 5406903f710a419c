"""Benchmark: ``default_features()`` rows/s on generated traffic, against a row-at-a-time Python version.

Ours is ``FeatureSet.transform`` on one batch of every impression of the run as samples (about 1.25 M rows
from 1.7 M generated events on the default config; fewer with ``--quick``/``--smoke``), after
``Stores.observe`` counted the whole run and its actions were appended to a ``SequenceStore``, as the
embedded runner does. Rows of a batch are read as of their own ``ts_ms``, so the store holds events newer
than most rows (the worst case for the sequence reads; a runner emitting at window close holds fewer).
The baseline computes the same features without the user's sequence, one row at a time in plain Python:
SipHash-1-3 in Python integers, counters as a dict of (key, bucket) counts summed per read, ``bisect``.

Figures (JSON keys):
- ``rows_per_s``: our rows/s with the default set (50 behaviours of history per row).
- ``rows_per_cpu_s``: the same rows over this process's CPU time: what one core does when the machine is
  shared and the wall clock also counts other processes' turns.
- ``rows_per_s_no_history``: rows/s of ``default_features(history=0)`` (for a model that reads
  histories from the sequence store itself).
- ``observe_events_per_s``: impressions plus actions counted per second by ``Stores.observe``, per
  generated step (the counters' update path).
- ``over_python``: ``rows_per_s_no_history`` over the row-at-a-time baseline, per round, median.

How answers are verified: with the clock stopped, the baseline's rows are compared value by value with
ours for the same rows (every feature but the sequence) after the warm-up, every 8th call and each
round's last; and ours are checked to hold every row and only non-negative counts and ids in range.

Run: ``python benchmarks/features.py [--smoke | --quick] [--json]`` or ``streamrec bench features``.
"""

from __future__ import annotations

import bisect
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Report, Wrong, bench_args, finish, median, paired_rates, ratio, size

from streamrec.pipeline.features import (
    Bucketize,
    Categorical,
    Cross,
    FeatureSet,
    HashedId,
    Ratio,
    Stores,
    WindowCount,
    default_features,
)
from streamrec.pipeline.generate import GeneratorConfig, generate
from streamrec.store import SequenceStore
from streamrec.store._index import hash_key_of_seed

KEYS = ("rows_per_s", "rows_per_cpu_s", "rows_per_s_no_history", "observe_events_per_s", "over_python")

_M64 = (1 << 64) - 1


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _M64


def _round(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    v0 = (v0 + v1) & _M64
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & _M64
    v3 = _rotl(v3, 16) ^ v2
    v0 = (v0 + v3) & _M64
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & _M64
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash13(x: int, k0: int, k1: int) -> int:
    """SipHash-1-3 of one uint64, as ``store._index.hash_key`` computes it."""
    v0, v1 = k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D
    v2, v3 = k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573 ^ x
    v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    v0 ^= x
    v3 ^= 8 << 56
    v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    v0 ^= 8 << 56
    v2 ^= 0xFF
    for _ in range(3):
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


class PythonFeatures:
    """``default_features(history=0)``, one event and one row at a time."""

    def __init__(self, fs: FeatureSet) -> None:
        self.fs = fs
        self.counts: dict[tuple[str, int, int], int] = {}  # (channel, key, bucket) -> events
        self.f = {f.name: f for f in fs.features}

    def observe(self, imps: pa.RecordBatch, acts: pa.RecordBatch) -> None:
        for i, t in zip(imps.column("item_id").to_pylist(), imps.column("ts_ms").to_pylist(), strict=True):
            self._add("item_impression", i, t // 60_000)
        cols = [acts.column(c).to_pylist() for c in ("user_id", "item_id", "ts_ms", "action")]
        for u, i, t, a in zip(*cols, strict=True):
            if a == 1:
                self._add("user_click", u, t // 60_000)
                self._add("item_click", i, t // 60_000)

    def _add(self, ch: str, key: int, b: int) -> None:
        self.counts[(ch, key, b)] = self.counts.get((ch, key, b), 0) + 1

    def _window(self, ch: str, key: int, t: int, buckets: int) -> int:
        bq = t // 60_000
        return sum(self.counts.get((ch, key, b), 0) for b in range(bq - buckets, bq))

    def row(self, r: dict[str, Any]) -> dict[str, Any]:
        f = self.f
        out: dict[str, Any] = {}
        for name in ("user_hash", "item_hash"):
            hid = f[name]
            assert isinstance(hid, HashedId)
            k0, k1 = hash_key_of_seed(hid.seed)
            out[name] = siphash13(r[hid.column], k0, k1) % hid.buckets
        for name in ("category_id", "device_id", "hour_id"):
            c = f[name]
            assert isinstance(c, Categorical)
            x = r[c.column]
            out[name] = x if 0 <= x < c.size else c.size
        out["day_of_week"] = (r["ts_ms"] // 86_400_000 + 3) % 7
        pb = f["position_bucket"]
        assert isinstance(pb, Bucketize)
        out["position_bucket"] = bisect.bisect_right(pb.boundaries, r["position"])
        for name, ch, key, n in (("user_clicks_1h", "user_click", "user_id", 60),
                                 ("item_impressions_10m", "item_impression", "item_id", 10),
                                 ("item_clicks_10m", "item_click", "item_id", 10)):
            w = f[name]
            assert isinstance(w, WindowCount) and w.window_ms == n * 60_000
            out[name] = float(self._window(ch, r[key], r["ts_ms"], n))
        ctr = f["item_ctr_10m"]
        assert isinstance(ctr, Ratio)
        out["item_ctr_10m"] = float(np.float32((out["item_clicks_10m"] + ctr.prior * ctr.weight)
                                               / (out["item_impressions_10m"] + ctr.weight)))
        x = f["user_x_category"]
        assert isinstance(x, Cross)
        k0, k1 = hash_key_of_seed(x.seed)
        h = siphash13(r["user_id"], k0, k1)
        out["user_x_category"] = siphash13(r["category"], k0 ^ h, k1) % x.buckets
        return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = bench_args(__doc__.splitlines()[0], argv)
    rounds = args.rounds or size(args, 3, 3, 1)
    min_seconds = size(args, 2.0, 1.0, 0.2)
    events = size(args, 1_700_000, 600_000, 40_000)
    cfg = size(args, GeneratorConfig(), GeneratorConfig(),
               GeneratorConfig(users=1000, items=10_000, categories=100, impressions_per_s=20_000))
    steps = list(generate(cfg, events=events))
    imps = pa.Table.from_batches([s[0] for s in steps]).combine_chunks().to_batches()[0]
    acts = pa.Table.from_batches([s[1] for s in steps]).combine_chunks().to_batches()[0]
    n_events = imps.num_rows + acts.num_rows

    full = default_features()
    lean = default_features(history=0)
    seq = SequenceStore(max_len=10_000, extra_fields=("value",))
    full.transform(imps.slice(0, 64), full.make_stores(sequences=seq))  # compile or load the kernels
    stores = full.make_stores(sequences=seq)
    w0, c0 = time.perf_counter(), time.process_time()
    for i, a in steps:
        stores.observe(i, a)
    observe_w = time.perf_counter() - w0
    observe_c = time.process_time() - c0
    for _, a in steps:
        seq.append(a.column("user_id"), a.column("item_id"), a.column("action").to_numpy().astype(np.uint8),
                   a.column("ts_ms"), {"value": a.column("value")})
    lean_stores = Stores(stores.counters, seq)  # the same counter groups: the lean set is a prefix

    py = PythonFeatures(lean)
    for i, a in steps:
        py.observe(i, a)
    rows = imps.select(["user_id", "item_id", "ts_ms", "position", "category", "device", "hour"]).to_pylist()
    chunk = size(args, 2000, 1000, 200)
    cursor = [0]
    got: dict[str, Any] = {}
    cpu = {"rows": 0, "s": 0.0}

    def ours() -> int:
        c = time.process_time()
        got["full"] = full.transform(imps, stores)
        cpu["s"] += time.process_time() - c
        cpu["rows"] += imps.num_rows
        return imps.num_rows

    def ours_lean() -> int:
        got["lean"] = lean.transform(imps, lean_stores)
        return imps.num_rows

    def python() -> int:
        lo = cursor[0]
        got["py"] = (lo, [py.row(r) for r in rows[lo:lo + chunk]])
        cursor[0] = (lo + chunk) % max(len(rows) - chunk, 1)
        return chunk

    def check_ours() -> None:
        out = got["full"]
        if out.num_rows != imps.num_rows:
            raise Wrong(f"transform returned {out.num_rows} rows for {imps.num_rows}")
        for name in ("user_clicks_1h", "item_impressions_10m", "item_clicks_10m"):
            if float(np.min(out.column(name).to_numpy())) < 0:
                raise Wrong(f"{name}: a negative count")
        if int(np.max(out.column("user_hash").to_numpy())) >= 1 << 22:
            raise Wrong("user_hash out of its buckets")

    def check_python() -> None:
        lo, mine = got["py"]
        if "lean" not in got:
            ours_lean()
        theirs = got["lean"].slice(lo, len(mine)).to_pylist()
        for k, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            for name, v in a.items():
                if b[name] != v:
                    raise Wrong(f"row {lo + k}: {name} = {b[name]} here, {v} in the Python baseline")

    rates = paired_rates({"full": ours, "lean": ours_lean, "python": python}, rounds, min_seconds,
                         verify={"full": check_ours, "python": check_python})
    rows_s = median(rates["full"])
    lean_s = median(rates["lean"])
    over = ratio(rates["lean"], rates["python"])
    per_cpu = cpu["rows"] / cpu["s"] if cpu["s"] > 0 else None
    observe_s = n_events / observe_w
    fig = {"rows_per_s": rows_s, "rows_per_cpu_s": per_cpu, "rows_per_s_no_history": lean_s,
           "observe_events_per_s": observe_s, "over_python": over}
    rep = Report(f"streamrec bench features: default_features() on {imps.num_rows:,} sample rows "
                 f"({n_events:,} generated events, {cfg.users:,} users, {cfg.items:,} items)")
    rep.add("no-history rows/s over row-at-a-time Python", f"{over:.0f}x",
            f"{lean_s / 1e6:.2f} M rows/s vs {median(rates['python']) / 1e3:.1f} k", "")
    rep.add("rows/s, default set (50 events of history)", "", f"{rows_s / 1e6:.2f} M rows/s", "")
    if per_cpu is not None:
        rep.add("rows per CPU second, default set", f"{per_cpu / rows_s:.2f} of wall",
                f"{per_cpu / 1e6:.2f} M", "wall < CPU: the machine is shared")
    rep.add("counters: events counted/s (observe)", f"{observe_c / observe_w:.2f} CPU/wall",
            f"{observe_s / 1e6:.2f} M events/s", "")
    return finish(rep, fig, args.json)


if __name__ == "__main__":
    main()
