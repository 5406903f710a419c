"""The sample join against a per-event model on random streams: windows, both policies, late events,
duplicates, out-of-order arrival, parked actions, sequences and resuming from a snapshot."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamrec.errors import ConfigError
from streamrec.pipeline.events import ACTION_SCHEMA, ACTIONS, IMPRESSION_SCHEMA, SAMPLE_SCHEMA
from streamrec.pipeline.join import JoinConfig, SampleJoin

T0 = 1_767_225_600_000
POSITIVE = sum(1 << (c - 1) for n, c in ACTIONS.items() if n != "skip")
LABELS = sorted(ACTIONS, key=ACTIONS.__getitem__)


# -- the model: one event at a time, dicts, the rules of join.py's docstring ----------------------------


@dataclass
class Row:
    imp: Any  # (req, user, item, ts, pos, cat, dev, hour, gtc, gtl, gtf)
    lab: int = 0
    watch: float = 0.0
    elab: int = -1
    ewatch: float = 0.0
    llab: int = 0
    lwatch: float = 0.0
    park: list = field(default_factory=list)  # (code, ts, value)


class Model:
    def __init__(self, cfg: JoinConfig) -> None:
        self.cfg = cfg
        self.W = cfg.window_ms
        self.H = cfg.late_horizon_s * 1000
        self.pending: dict[tuple[int, int], Row] = {}
        self.closed: dict[tuple[int, int], Row] = {}
        self.dedup: dict[tuple, int] = {}
        self.seq: dict[int, list[tuple]] = {}
        self.counts: dict[str, int] = {}

    def C(self, ms: int) -> int:
        t = self.cfg.close_tick_ms
        return -(-ms // t) * t

    def count(self, k: str, n: int = 1) -> None:
        self.counts[k] = self.counts.get(k, 0) + n

    def process(self, imps: list[tuple], acts: list[tuple], wm: int) -> list[tuple]:
        out: list[tuple] = []
        seen: set = set()
        replay: list[tuple] = []
        for imp in imps:
            pair = (imp[0], imp[2])
            if pair in seen:
                self.count("duplicate_impressions")
                continue
            seen.add(pair)
            if self.C(imp[3] + self.W) <= wm:
                self.count("late_impressions")
                continue
            row = self.pending.get(pair)
            if row is not None and row.imp is not None:
                self.count("duplicate_impressions")
                continue
            self.pending[pair] = Row(imp=imp)
            if row is not None:
                replay += [(pair, c, t, v) for c, t, v in row.park]
        new: list[tuple] = []
        dseen: set = set()
        for a in acts:
            req, user, item, ts, code, value = a
            if self.C(ts + self.W + self.H) <= wm:
                self.count("too_old_actions")
                continue
            dk = (req, item, code, ts)
            if dk in dseen or dk in self.dedup:
                self.count("duplicate_actions")
                continue
            dseen.add(dk)
            self.dedup[dk] = ts + self.W + self.H
            self.seq.setdefault(user, []).append((item, code, ts, value))
            new.append(((req, item), code, ts, value))
        touched: set = set()
        changed_closed: list = []
        for pair, code, ts, value in replay + new:
            bit = 1 << (code - 1)
            row = self.pending.get(pair)
            if row is not None and row.imp is not None:
                if ts < row.imp[3] + self.W:
                    row.lab |= bit
                    row.watch += value
                    touched.add(pair)
                elif self.cfg.late == "correct":
                    row.llab |= bit
                    row.lwatch += value
                    touched.add(pair)
                    self.count("late_corrections")
                else:
                    self.count("late_actions_dropped")
            elif row is None and pair in self.closed:
                c = self.closed[pair]
                if self.cfg.late == "drop":
                    self.count("late_actions_dropped")
                    continue
                self.count("late_corrections")
                before = (c.lab, c.watch)
                c.lab |= bit
                c.watch += value
                if (c.lab, c.watch) != before and pair not in changed_closed:
                    changed_closed.append(pair)
            else:
                if row is None:
                    row = self.pending[pair] = Row(imp=None)
                if len(row.park) < 4:
                    row.park.append((code, ts, value))
                    self.count("parked_actions")
                else:
                    self.count("parked_overflow")
        if self.cfg.policy == "eager":
            for pair in touched:
                r = self.pending[pair]
                if r.elab < 0 and r.lab & POSITIVE:
                    out.append(sample(r.imp, r.lab, r.watch, 1, wm))
                elif r.elab >= 0 and (r.lab != r.elab or r.watch != r.ewatch):
                    out.append(sample(r.imp, r.lab, r.watch, 2, wm))
                else:
                    continue
                r.elab, r.ewatch = r.lab, r.watch
        # closed pairs whose late actions changed them: a kind 3 now (only pairs that had one before this
        # batch; emitted per pair with every label so far)
        for pair in changed_closed:
            c = self.closed[pair]
            out.append(sample(c.imp, c.lab, c.watch, 3, wm))
        # close
        self.closed = {p: r for p, r in self.closed.items() if self.C(r.imp[3] + self.W + self.H) > wm}
        self.dedup = {k: u for k, u in self.dedup.items() if self.C(u) > wm}
        for pair, r in list(self.pending.items()):
            if r.imp is None:
                if self.C(max(t for _, t, _ in r.park) + self.W) <= wm:
                    self.count("parked_unmatched", len(r.park))
                    del self.pending[pair]
                continue
            if self.C(r.imp[3] + self.W) > wm:
                continue
            del self.pending[pair]
            if r.elab < 0:
                out.append(sample(r.imp, r.lab, r.watch, 0, wm))
            if r.llab or r.lwatch:
                out.append(sample(r.imp, r.lab | r.llab, r.watch + r.lwatch, 3, wm))
            r.lab |= r.llab
            r.watch += r.lwatch
            if self.C(r.imp[3] + self.W + self.H) > wm:
                self.closed[pair] = r
        return out


def sample(imp: tuple, lab: int, watch: float, kind: int, wm: int) -> tuple:
    bits = tuple((lab >> (ACTIONS[n] - 1)) & 1 for n in LABELS)
    gt = tuple(None if g is None else np.float32(g) for g in imp[8:11])
    return (*imp[:8], *bits, np.float32(watch), kind, wm, *gt)


def rows_of(batch: pa.RecordBatch) -> list[tuple]:
    cols = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
    out = []
    for r in zip(*cols, strict=True):
        v: list[Any] = list(r)
        v[14] = np.float32(v[14])
        v[17:] = [None if g is None else np.float32(g) for g in v[17:]]
        out.append(tuple(v))
    return out


def key(r: tuple) -> tuple:
    return tuple(-1 if v is None else v for v in r)


# -- streams --------------------------------------------------------------------------------------


def imp_batch(imps: list[tuple]) -> pa.RecordBatch:
    cols: list[Any] = list(zip(*imps, strict=True)) if imps else [[] for _ in IMPRESSION_SCHEMA]
    return pa.RecordBatch.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, IMPRESSION_SCHEMA,
                                                                                 strict=True)],
                                      schema=IMPRESSION_SCHEMA)


def act_batch(acts: list[tuple]) -> pa.RecordBatch:
    cols: list[Any] = list(zip(*acts, strict=True)) if acts else [[] for _ in ACTION_SCHEMA]
    return pa.RecordBatch.from_arrays([pa.array(c, type=f.type) for c, f in zip(cols, ACTION_SCHEMA,
                                                                                 strict=True)],
                                      schema=ACTION_SCHEMA)


@st.composite
def streams(draw: st.DrawFn) -> tuple[JoinConfig, list[tuple[list, list, int]]]:
    """Impressions and actions on a few (request, item) pairs over ~3 windows, with duplicates, copies,
    actions before their impressions, late and too-old events, cut into micro-batches by watermark."""
    cfg = JoinConfig(window_s=30, policy=draw(st.sampled_from(["at_close", "eager"])),
                     late=draw(st.sampled_from(["drop", "correct"])),
                     late_horizon_s=draw(st.sampled_from([1, 20, 60])),
                     close_tick_ms=draw(st.sampled_from([1, 10, 1000])), capacity=8, huge_pages=False,
                     sequence_max_len=1000)
    W = cfg.window_ms
    span = 3 * W
    n_imp = draw(st.integers(0, 12))
    events: list[tuple[int, str, tuple]] = []  # (arrival time, kind, event)
    pairs: list[Any] = []
    for _ in range(n_imp):
        req, item = draw(st.integers(0, 4)), draw(st.integers(0, 3))
        ts = T0 + draw(st.integers(0, span))
        gt = draw(st.sampled_from([None, 0.25]))
        imp = (req, req * 10 + 1, item, ts, draw(st.integers(0, 9)), item % 3, 1, 7, gt, 0.5, None)
        pairs.append(imp)
        events.append((ts + draw(st.integers(0, 3000)), "i", imp))
    for _ in range(draw(st.integers(0, 25))):
        if len(pairs) > 0 and draw(st.booleans()):
            imp = draw(st.sampled_from(pairs))
            req, user, item, base = imp[0], imp[1], imp[2], imp[3]
        else:
            req, item = draw(st.integers(0, 4)), draw(st.integers(0, 3))
            user, base = req * 10 + 1, T0 + draw(st.integers(0, span))
        ts = base + draw(st.integers(-2000, 2 * W))
        code = draw(st.integers(1, 6))
        value = draw(st.sampled_from([0.0, 0.5, 3.0]))
        events.append((ts + draw(st.integers(0, 3000)), "a", (req, user, item, ts, code, value)))
    copies = draw(st.lists(st.sampled_from(events), max_size=6)) if events else []  # duplicates
    events += [(ev[0] + draw(st.integers(0, W)), ev[1], ev[2]) for ev in copies]
    for i in draw(st.lists(st.integers(0, max(len(events) - 1, 0)), max_size=3)) if events else []:
        a, k, e = events[i]  # very late arrivals: after their window, some after the horizon too
        events[i] = (a + draw(st.sampled_from([W, 2 * W, 3 * W])), k, e)
    events.sort(key=lambda e: e[0])
    lateness = draw(st.sampled_from([0, 1000, 3000]))
    step = draw(st.sampled_from([500, 4000, 15_000]))
    batches = []
    cut = T0 + step
    i = 0
    end = T0 + 8 * W
    while cut <= end:
        imps: list[Any] = []
        acts: list[Any] = []
        while i < len(events) and events[i][0] < cut:
            (imps if events[i][1] == "i" else acts).append(events[i][2])
            i += 1
        batches.append((imps, acts, cut - lateness))
        cut += step
    return cfg, batches


def run_both(cfg: JoinConfig, batches: list, join: SampleJoin | None = None, model: Model | None = None
             ) -> tuple[SampleJoin, Model]:
    join = join or SampleJoin(cfg)
    model = model or Model(cfg)
    for imps, acts, wm in batches:
        got = join.process(imp_batch(imps), act_batch(acts), wm)
        assert got.schema == SAMPLE_SCHEMA
        want = model.process(imps, acts, wm)
        assert sorted(map(key, rows_of(got))) == sorted(map(key, want)), f"at watermark {wm - T0}"
    return join, model


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_join_matches_the_model(case: tuple[JoinConfig, list]) -> None:
    cfg, batches = case
    join, model = run_both(cfg, batches)
    for k, v in model.counts.items():
        assert join.counts[k] == v, k
    users = sorted(model.seq)
    if users:
        offsets, cols = join.sequences.read(users)
        for j, u in enumerate(users):
            lo, hi = offsets[j], offsets[j + 1]
            got = list(zip(cols["item"][lo:hi].tolist(), cols["action"][lo:hi].tolist(),
                           cols["timestamp"][lo:hi].tolist(), cols["value"][lo:hi].tolist(), strict=True))
            assert got == model.seq[u]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(streams(), st.integers(0, 30))
def test_resume_from_a_snapshot_mid_stream(tmp_path: Path, case: tuple[JoinConfig, list], at: int) -> None:
    """A join reopened from its snapshot goes on exactly as the one that wrote it."""
    cfg, batches = case
    at = min(at, len(batches))
    join, model = run_both(cfg, batches[:at])
    d = tmp_path / f"snap{at}-{id(batches)}"
    join.snapshot(d)
    run_both(cfg, batches[at:], SampleJoin(cfg, store_dir=d), model)


def test_worked_example_eager() -> None:
    """Impression, click 2 s later (kind 1), like 5 s later (kind 2), nothing at close; an impression
    with no action is a negative at close (kind 0); a duplicate click and impression change nothing."""
    cfg = JoinConfig(window_s=30, policy="eager", huge_pages=False)
    join = SampleJoin(cfg)
    imp1 = (1, 100, 7, T0, 0, 3, 1, 9, 0.5, None, None)
    imp2 = (1, 100, 8, T0, 1, 3, 1, 9, None, None, None)
    click = (1, 100, 7, T0 + 2000, ACTIONS["click"], 0.0)
    got = rows_of(join.process(imp_batch([imp1, imp2, imp1]), act_batch([click, click]), T0 + 1000))
    assert [(r[2], r[8], r[15]) for r in got] == [(7, 1, 1)]
    like = (1, 100, 7, T0 + 5000, ACTIONS["like"], 0.0)
    got = rows_of(join.process(None, act_batch([like, click]), T0 + 6000))
    assert [(r[2], r[8], r[9], r[15]) for r in got] == [(7, 1, 1, 2)]
    got = rows_of(join.process(None, None, T0 + 30_000))
    assert sorted((r[2], r[8], r[15], r[16]) for r in got) == [(8, 0, 0, T0 + 30_000)]
    assert join.counts["duplicate_impressions"] == 1 and join.counts["duplicate_actions"] == 2
    assert join.pending == 0


def test_config_checks_name_the_field() -> None:
    with pytest.raises(ConfigError, match="window_s"):
        JoinConfig(window_s=10)
    with pytest.raises(ConfigError, match="policy"):
        JoinConfig(policy=cast(Any, "soon"))
