"""Counters against a brute-force model of their semantics (hypothesis), and their edges."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamrec.errors import ConfigError, FeatureError, MissingColumns
from streamrec.pipeline.counters import Channel, Counters, CounterSpec

CLICK, LIKE = 1, 2


def spec(bucket_ms: int = 1000, buckets: int = 3, horizon_ms: int = 2000) -> CounterSpec:
    return CounterSpec("user_id", window_ms=bucket_ms * buckets, bucket_ms=bucket_ms, horizon_ms=horizon_ms,
                       channels=(Channel("imps", "impressions"), Channel("clicks", action=CLICK),
                                 Channel("likes", action=LIKE)))


class Model:
    """Every accepted event kept in a list; reads sum them (the semantics of counters.py, spelled out)."""

    def __init__(self, s: CounterSpec) -> None:
        self.s = s
        self.head: dict[int, int] = {}
        self.kept: dict[int, list[tuple[int, int]]] = defaultdict(list)  # key -> (bucket, channel)
        self.late = 0
        self.watermark = 0

    def update(self, keys: list[int], ts: list[int], chans: list[int]) -> None:
        for k, t, c in zip(keys, ts, chans, strict=True):
            self.watermark = max(self.watermark, t)
            b = t // self.s.bucket_ms
            h = self.head.get(k)
            if h is not None and b <= h - self.s.ring:
                self.late += 1
                continue
            self.head[k] = b if h is None else max(h, b)
            self.kept[k].append((b, c))

    def read(self, k: int, t: int) -> list[int]:
        bq = t // self.s.bucket_ms
        out = [0, 0, 0]
        for b, c in self.kept[k]:
            if bq - self.s.buckets <= b <= bq - 1:
                out[c] += 1
        return out

    def stale(self, t: int) -> bool:
        return t // self.s.bucket_ms - self.s.buckets <= self.watermark // self.s.bucket_ms - self.s.ring


def batches(events: list[tuple[int, int, int]]) -> tuple[pa.RecordBatch, pa.RecordBatch]:
    """One event list (key, ts, channel) as the impressions and actions batches (each in list order)."""
    imp = [(k, t) for k, t, c in events if c == 0]
    act = [(k, t, c) for k, t, c in events if c > 0]
    ib = pa.record_batch({"user_id": pa.array([k for k, _ in imp], pa.int64()),
                          "ts_ms": pa.array([t for _, t in imp], pa.int64())})
    ab = pa.record_batch({"user_id": pa.array([k for k, _, _ in act], pa.int64()),
                          "ts_ms": pa.array([t for _, t, _ in act], pa.int64()),
                          "action": pa.array([c for _, _, c in act], pa.int8())})
    return ib, ab


event = st.tuples(st.integers(0, 4), st.integers(0, 7_900), st.integers(0, 2))


@given(st.lists(st.tuples(st.lists(event, max_size=30), st.lists(st.tuples(st.integers(0, 5),
                                                                          st.integers(0, 12_000)),
                                                                max_size=8)), min_size=1, max_size=6))
def test_counts_equal_brute_force(steps: list) -> None:
    """Batches of out-of-order events and reads at any time: every read within the horizon is exact,
    late drops and stale reads are counted as the model counts them. Times span under the rows' TTL
    (8 s here), so no row expires and the model needs no expiry."""
    s = spec()
    c = Counters(s)
    m = Model(s)
    stale = 0
    for n, (evs, reads) in enumerate(steps):
        # Impressions first, then actions: each batch in its own order, as update sees them.
        ordered = [e for e in evs if e[2] == 0] + [e for e in evs if e[2] > 0]
        ib, ab = batches(evs)
        if n % 2:
            c.update(ib)
            c.update(ab)
        else:
            c.update(ib, None, ab)  # one write for both, as Stores.observe does
        m.update([e[0] for e in ordered], [e[1] for e in ordered], [e[2] for e in ordered])
        if reads:
            got = c.read(np.array([k for k, _ in reads]), np.array([t for _, t in reads]))
            for (k, t), row in zip(reads, got.tolist(), strict=True):
                if m.stale(t):
                    stale += 1
                else:
                    assert row == m.read(k, t), (k, t)
    assert c.stats.late_dropped == m.late
    assert c.stats.stale_reads == stale
    assert c.watermark_ms == m.watermark


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 120_000), st.integers(0, 2)), max_size=60),
       st.integers(0, 130_000))
def test_expiry_keeps_reads_within_the_horizon_exact(evs: list, t: int) -> None:
    """Over spans far past the TTL rows expire on the event-time clock; reads within the horizon
    of the watermark stay exact."""
    s = spec()
    c = Counters(s)
    m = Model(s)
    for i in range(0, len(evs), 7):  # in time order per batch: rows age and expire between batches
        chunk = sorted(evs[i:i + 7], key=lambda e: e[1])
        for ev in chunk:
            ib, ab = batches([ev])
            c.update(ib if ev[2] == 0 else ab)
        m.update([e[0] for e in chunk], [e[1] for e in chunk], [e[2] for e in chunk])
    t = max(t, m.watermark - s.horizon_ms + s.bucket_ms)
    got = c.read(np.arange(4), t)
    for k in range(4):
        assert got[k].tolist() == m.read(k, t)


def test_no_leakage_of_the_samples_own_label() -> None:
    """A click at the impression's own time, or later, is never counted as of that time."""
    c = Counters(spec(bucket_ms=10, buckets=6))
    _, ab = batches([(7, 1005, CLICK), (7, 1050, CLICK), (7, 990, CLICK)])
    c.update(ab)
    assert c.read([7], 1005).tolist() == [[0, 1, 0]]  # the click in bucket 99 only
    assert c.read([7], 1051).tolist() == [[0, 2, 0]]  # not the click at 1050, in the read's own bucket
    assert c.read([7], 1060).tolist() == [[0, 2, 0]]  # 990 has left the 60 ms window [1000, 1060)


def test_serving_and_training_read_the_same() -> None:
    c = Counters(spec())
    ib, ab = batches([(1, 100, 0), (1, 1500, 1), (2, 2500, 0), (1, 3100, 2)])
    c.update(ib)
    c.update(ab)
    ts = np.array([3200, 3999, 4000, 5500])
    per_row = c.read(np.array([1, 1, 2, 1]), ts)
    for i, t in enumerate(ts.tolist()):
        assert c.read([[1, 1, 2, 1][i]], t).tolist() == [per_row[i].tolist()]


def test_snapshot_round_trip(tmp_path) -> None:
    s = spec()
    c = Counters(s)
    ib, _ = batches([(1, 1500, 0), (2, 2500, 0)])
    c.update(ib)
    c.snapshot(tmp_path / "snap")
    d = Counters.open(tmp_path / "snap", s)
    assert d.watermark_ms == 2500
    assert d.read([1, 2], 3000).tolist() == c.read([1, 2], 3000).tolist()
    ib, _ = batches([(1, 2600, 0)])
    d.update(ib)
    assert d.read([1], 3000).tolist() == [[2, 0, 0]]


def test_bad_input() -> None:
    c = Counters(spec())
    with pytest.raises(MissingColumns) as e:
        c.update(pa.record_batch({"user_id": pa.array([1]), "action": pa.array([1], pa.int8())}))
    assert e.value.columns == ["ts_ms"]
    with pytest.raises(FeatureError, match="null"):
        c.update(pa.record_batch({"user_id": pa.array([1, None]), "ts_ms": pa.array([1, 2])}))
    with pytest.raises(FeatureError, match="non-negative"):
        c.update(pa.record_batch({"user_id": pa.array([-1]), "ts_ms": pa.array([1])}))
    with pytest.raises(FeatureError, match="now_ms"):
        c.read([1, 2], np.array([1.0, 2.0]))
    with pytest.raises(ConfigError, match="bucket_ms"):
        CounterSpec("user_id", window_ms=1000, bucket_ms=300, channels=(Channel("x", action=1),))
    with pytest.raises(ConfigError, match="channels"):
        CounterSpec("user_id", window_ms=1000)
