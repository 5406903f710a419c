"""Row lifecycle of EmbeddingTable against dict models: compaction, TTL, eviction, admission.

Each model is the obviously-correct reference: a dict from key to row (and, for
TTL, the row's expiry in whole seconds on the table's clock). The table runs on
a settable clock, so every expiry and every LRU/LFU stamp is chosen by the test.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from numpy.testing import assert_array_equal

from streamrec import EmbeddingTable, Initializer

T0 = 1_700_000_000  # a whole second: the table's epoch is int(clock()) at creation
INIT = 0.5  # the constant initializer's value (exact in both dtypes)

# Small pool: batches repeat keys, keys come back after erase, expiry or eviction.
KEY_POOL = [0, 1, 2, 3, 7, 42, 255, 256, 2**32 - 1, 2**32, 2**63, 0x9E3779B97F4A7C15, 2**64 - 1]
key_batches = st.lists(st.sampled_from(KEY_POOL), max_size=10)
dyadic = st.integers(-64, 64).map(lambda i: i / 4)  # exact in float32 and float64
learning_rates = st.sampled_from([0.25, 0.5, 1.0, 2.0])  # > 0: a zero rate is refused


class Clock:
    """A settable clock: the table calls it; the test moves ``now``."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _keys(batch: list[int]) -> np.ndarray:
    return np.array(batch, dtype=np.uint64)


def _draw_rows(data: st.DataObject, n: int, dim: int) -> np.ndarray:
    flat = data.draw(st.lists(dyadic, min_size=n * dim, max_size=n * dim))
    return np.array(flat, dtype=np.float64).reshape(n, dim)


class Reports:
    """Collects ``on_evict`` calls; a test drains them after each table call."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], np.ndarray, str]] = []

    def __call__(self, keys: np.ndarray, values: np.ndarray, reason: str) -> None:
        assert keys.dtype == np.uint64 and values.shape[0] == keys.shape[0]
        self.calls.append((keys.tolist(), values.copy(), reason))

    def take(self, reason: str) -> list[tuple[int, np.ndarray]]:
        """Every (key, row) reported with ``reason`` since the last take, in order; no other reason."""
        out: list[tuple[int, np.ndarray]] = []
        for keys, values, why in self.calls:
            assert why == reason, f"reported {keys} as {why!r}, expected only {reason!r}"
            out.extend(zip(keys, values, strict=True))
        self.calls.clear()
        return out


# -- compaction --------------------------------------------------------------------------


class CompactionModel(RuleBasedStateMachine):
    """Writes interleaved with full and partial compaction; the table always equals the dict."""

    @initialize(dim=st.integers(1, 3), dtype=st.sampled_from(["float32", "float64"]),
                capacity=st.sampled_from([1, 64]))
    def make_table(self, dim: int, dtype: str, capacity: int) -> None:
        self.dim = dim
        self.table = EmbeddingTable(dim=dim, dtype=dtype, capacity=capacity, huge_pages=False,
                                    initializer=Initializer(kind="constant", value=INIT))
        self.model: dict[int, np.ndarray] = {}
        self.init_row = np.full(dim, INIT)

    @rule(batch=key_batches, data=st.data())
    def insert_or_assign(self, batch: list[int], data: st.DataObject) -> None:
        rows = _draw_rows(data, len(batch), self.dim)
        self.table.insert_or_assign(_keys(batch), rows)
        for k, row in zip(batch, rows, strict=True):
            self.model[k] = row

    @rule(batch=key_batches, data=st.data())
    def assign(self, batch: list[int], data: st.DataObject) -> None:
        rows = _draw_rows(data, len(batch), self.dim)
        self.table.assign(_keys(batch), rows)
        for k, row in zip(batch, rows, strict=True):
            if k in self.model:
                self.model[k] = row

    @rule(batch=key_batches)
    def find_or_insert(self, batch: list[int]) -> None:
        self.table.find_or_insert(_keys(batch))
        for k in batch:
            self.model.setdefault(k, self.init_row)

    @rule(batch=key_batches)
    def erase(self, batch: list[int]) -> None:
        found = self.table.erase(_keys(batch))
        want = [self.model.pop(k, None) is not None for k in batch]
        assert_array_equal(found, want)

    @rule(n=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
    def bulk_insert(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        keys = rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)
        rows = rng.integers(-64, 65, size=(n, self.dim)) / 4
        self.table.insert_or_assign(keys, rows)
        self.model.update(zip(keys.tolist(), rows, strict=True))

    @precondition(lambda self: len(self.model) > 0)
    @rule(fraction=st.floats(0.05, 1.0), seed=st.integers(0, 2**32 - 1))
    def bulk_erase(self, fraction: float, seed: int) -> None:
        """Holes anywhere in the arena, the top rows included or not."""
        rng = np.random.default_rng(seed)
        keys = np.array(sorted(self.model), dtype=np.uint64)
        gone = rng.choice(keys, size=max(1, int(fraction * keys.size)), replace=False)
        assert self.table.erase(gone).all()
        for k in gone.tolist():
            del self.model[k]

    @rule(max_moves=st.integers(0, 40))
    def compact_partly(self, max_moves: int) -> None:
        before = self.table.stats()
        moved = self.table.compact(max_moves=max_moves)
        after = self.table.stats()
        assert 0 <= moved <= max_moves
        assert after.wasted_fraction <= before.wasted_fraction
        assert after.high_water_rows <= before.high_water_rows - moved
        if moved < max_moves:  # it stopped early: nothing was left to move
            assert after.wasted_fraction == 0

    @rule()
    def compact_fully(self) -> None:
        before = self.table.stats()
        moved = self.table.compact()
        stats = self.table.stats()
        assert moved <= before.free_rows
        assert stats.wasted_fraction == 0
        assert stats.free_rows == 0
        assert stats.high_water_rows == len(self.model)
        assert self.table.compact() == 0  # nothing left to do

    @invariant()
    def table_equals_model(self) -> None:
        keys = KEY_POOL + list(self.model)
        values, found = self.table.find(_keys(keys))
        zero = np.zeros(self.dim)
        assert_array_equal(found, [k in self.model for k in keys])
        assert_array_equal(values, np.array([self.model.get(k, zero) for k in keys]).reshape(-1, self.dim))
        assert len(self.table) == len(self.model)
        stats = self.table.stats()
        assert stats.high_water_rows - stats.free_rows == len(self.model)


CompactionModel.TestCase.settings = settings(max_examples=60, stateful_step_count=30)
test_compaction_never_changes_contents = CompactionModel.TestCase


def test_compaction_in_steps_of_one_row_keeps_readers_right() -> None:
    """Many single moves, each checked: the row moved last is still its key's."""
    table = EmbeddingTable(dim=2, huge_pages=False)
    keys = np.arange(1, 2001, dtype=np.uint64)
    rows = np.stack([keys, -keys], axis=1).astype(np.float32)
    table.insert_or_assign(keys, rows)
    gone = keys[::3]
    table.erase(gone)
    kept = np.setdiff1d(keys, gone)
    total = 0
    while (moved := table.compact(max_moves=1)) == 1:
        total += 1
        if total % 97 == 0:
            values, found = table.find(kept)
            assert found.all()
            assert_array_equal(values, rows[kept.astype(np.int64) - 1])
    assert moved == 0
    assert table.stats().wasted_fraction == 0
    assert total <= gone.size
    values, found = table.find(keys)
    assert_array_equal(found, ~np.isin(keys, gone))
    assert_array_equal(values[found], rows[found])


# -- TTL ---------------------------------------------------------------------------------


@dataclass
class Entry:
    row: np.ndarray
    expires: int  # seconds since the table's epoch; 0 = never


class TTLModel(RuleBasedStateMachine):
    """Every write mode, with table-level, per-write and per-key TTLs, on a settable clock.

    The model: a row with expiry e (> 0) reads as absent once now >= e; it is
    reclaimed (and reported as "expired") at the latest by the first write or
    ``expire()`` at which its expiry slice [s*S, (s+1)*S) has passed, i.e.
    now >= (e // S + 1) * S, never before e. Until then it still counts in
    ``len``; an erase removes it silently and an insert re-creates it in place.
    """

    @initialize(
        dim=st.integers(1, 3),
        dtype=st.sampled_from(["float32", "float64"]),
        ttl_s=st.sampled_from([1, 2, 5, 40]),
        ttl_slice_s=st.sampled_from([0, 1, 3]),
        start_fraction=st.sampled_from([0.0, 0.25, 0.75]),
    )
    def make_table(self, dim: int, dtype: str, ttl_s: int, ttl_slice_s: int, start_fraction: float) -> None:
        self.dim = dim
        self.ttl_s = ttl_s
        self.slice_s = ttl_slice_s or max(1, ttl_s // 16)
        self.clock = Clock(T0 + start_fraction)
        self.reports = Reports()
        self.table = EmbeddingTable(
            dim=dim, dtype=dtype, huge_pages=False, capacity=8, ttl_s=ttl_s, ttl_slice_s=ttl_slice_s,
            clock=self.clock, on_evict=self.reports, initializer=Initializer(kind="constant", value=INIT),
        )
        self.model: dict[int, Entry] = {}
        self.expired_total = 0
        self.init_row = np.full(dim, INIT)

    # -- the model -------------------------------------------------------------------

    def _now(self) -> int:
        return int(self.clock.now) - T0

    def _live(self, k: int) -> bool:
        """Present and not past its expiry: what a read sees."""
        e = self.model.get(k)
        return e is not None and not (e.expires and e.expires <= self._now())

    def _expiry(self, ttl: float | None) -> int:
        if ttl is None:
            return self._now() + self.ttl_s
        whole = math.ceil(ttl)
        return self._now() + whole if whole > 0 else 0

    def _reclaim(self) -> int:
        """What the table does first in every write: drop rows whose expiry slice passed.

        Every row whose slice [s*S, (s+1)*S) has passed must go; a row that has
        merely expired may go too (a stale wheel entry from an earlier write of
        the key can reach it first); a row that has not expired must stay. Checks
        the table's "expired" reports against that, each key reported once with
        its last row, and drops the reported keys from the model.
        """
        now, s = self._now(), self.slice_s
        due = {k for k, e in self.model.items() if e.expires and (e.expires // s + 1) * s <= now}
        expired = {k for k in self.model if not self._live(k)}
        reported = self.reports.take("expired")
        got = Counter(k for k, _ in reported)
        assert all(c == 1 for c in got.values()), f"reported twice: {got}"
        assert due <= set(got) <= expired, (
            f"reclaimed {sorted(got)} at now={now}: must {sorted(due)}, may {sorted(expired)}")
        for k, row in reported:
            assert_array_equal(row, self.model.pop(k).row, err_msg=f"expired key {k}")
        self.expired_total += len(got)
        return len(got)

    def _ttl_arg(self, data: st.DataObject, n: int) -> tuple[object, list[float | None]]:
        """A ttl_s argument (None, a scalar, or one per key) and its per-key meaning."""
        kind = data.draw(st.sampled_from(["table", "scalar", "per_key"]))
        seconds = st.sampled_from([0, 0.5, 1, 2, 3, 3.25, 9])
        if kind == "table":
            return None, [None] * n
        if kind == "scalar":
            t = data.draw(seconds)
            return t, [t] * n
        ts = data.draw(st.lists(seconds, min_size=n, max_size=n))
        return np.array(ts, dtype=np.float64), ts

    # -- time ------------------------------------------------------------------------

    @rule(dt=st.sampled_from([0, 0.25, 0.5, 1, 1, 2, 3, 7, 45]))
    def advance(self, dt: float) -> None:
        self.clock.now += dt

    # -- reads: never show an expired row, never reclaim ------------------------------

    @rule(batch=key_batches)
    def find(self, batch: list[int]) -> None:
        values, found = self.table.find(_keys(batch))
        want = [self._live(k) for k in batch]
        assert_array_equal(found, want)
        zero = np.zeros(self.dim)
        expect = [self.model[k].row if ok else zero for k, ok in zip(batch, want, strict=True)]
        assert_array_equal(values, np.array(expect).reshape(-1, self.dim))
        assert_array_equal(self.table.contains(_keys(batch)), want)
        assert not self.reports.calls

    @rule()
    def export(self) -> None:
        got = {k: v for keys, vals in self.table.export(chunk_rows=5)
               for k, v in zip(keys.tolist(), vals, strict=True)}
        assert set(got) == {k for k in self.model if self._live(k)}
        for k, v in got.items():
            assert_array_equal(v, self.model[k].row)

    # -- writes ----------------------------------------------------------------------

    @rule()
    def expire(self) -> None:
        n = self.table.expire()
        assert n == self._reclaim()

    @rule(batch=key_batches, data=st.data())
    def insert_or_assign(self, batch: list[int], data: st.DataObject) -> None:
        rows = _draw_rows(data, len(batch), self.dim)
        arg, ttls = self._ttl_arg(data, len(batch))
        inserted = self.table.insert_or_assign(_keys(batch), rows, ttl_s=arg)
        self._reclaim()
        want = []
        for k, row, t in zip(batch, rows, ttls, strict=True):
            want.append(not self._live(k))
            self.model[k] = Entry(row, self._expiry(t))
        assert_array_equal(inserted, want)

    @rule(batch=key_batches, data=st.data())
    def assign(self, batch: list[int], data: st.DataObject) -> None:
        rows = _draw_rows(data, len(batch), self.dim)
        arg, ttls = self._ttl_arg(data, len(batch))
        found = self.table.assign(_keys(batch), rows, ttl_s=arg)
        self._reclaim()
        want = []
        for k, row, t in zip(batch, rows, ttls, strict=True):
            want.append(self._live(k))
            if want[-1]:
                self.model[k] = Entry(row, self._expiry(t))
        assert_array_equal(found, want)

    @rule(batch=key_batches)
    def find_or_insert(self, batch: list[int]) -> None:
        values = self.table.find_or_insert(_keys(batch))
        self._reclaim()
        for k in batch:
            if not self._live(k):  # absent, or expired and re-created in place
                self.model[k] = Entry(self.init_row, self._expiry(None))
        assert_array_equal(values, np.array([self.model[k].row for k in batch]).reshape(-1, self.dim))

    @rule(batch=key_batches)
    def erase(self, batch: list[int]) -> None:
        found = self.table.erase(_keys(batch))
        self._reclaim()
        want = []
        for k in batch:
            want.append(self._live(k))
            self.model.pop(k, None)  # an expired row goes too, unreported
        assert_array_equal(found, want)

    @rule(batch=key_batches, lr=learning_rates, data=st.data())
    def apply_gradients(self, batch: list[int], lr: float, data: st.DataObject) -> None:
        grads = _draw_rows(data, len(batch), self.dim)
        found = self.table.apply_gradients(_keys(batch), grads, lr=lr)
        self._reclaim()
        want = [self._live(k) for k in batch]
        assert_array_equal(found, want)
        sums: dict[int, np.ndarray] = {}
        for k, g, ok in zip(batch, grads, want, strict=True):
            if ok:
                sums[k] = sums[k] + g if k in sums else g
        for k, g in sums.items():  # one step per distinct key; the TTL restarts
            self.model[k] = Entry(self.model[k].row - lr * g, self._expiry(None))

    @rule(max_moves=st.sampled_from([None, 0, 1, 3]))
    def compact(self, max_moves: int | None) -> None:
        """Moves rows, expired-but-unreclaimed ones too; later reclaims must still find them."""
        self.table.compact(max_moves)
        assert not self.reports.calls

    @invariant()
    def counts_agree(self) -> None:
        assert len(self.table) == len(self.model)
        assert self.table.stats().expired == self.expired_total


TTLModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40)
test_ttl_matches_model = TTLModel.TestCase


def test_expiry_is_reported_once_and_memory_is_reused() -> None:
    """A worked example: 1000 rows, two TTLs, a long idle stretch, one expire()."""
    clock = Clock(T0)
    reports = Reports()
    table = EmbeddingTable(dim=2, ttl_s=10, clock=clock, on_evict=reports, huge_pages=False)
    short, long_ = np.arange(500, dtype=np.uint64), np.arange(500, 1000, dtype=np.uint64)
    table.insert_or_assign(short, np.ones((500, 2)))
    table.insert_or_assign(long_, np.ones((500, 2)), ttl_s=100)
    clock.now += 10
    assert not table.contains(short).any() and table.contains(long_).all()
    assert len(table) == 1000  # not reclaimed yet: reads hide them
    clock.now += 1
    assert table.expire() == 500
    assert sorted(k for k, _ in reports.take("expired")) == short.tolist()
    assert len(table) == 500 and table.stats().expired == 500
    assert table.expire() == 0 and not reports.calls
    high = table.stats().high_water_rows
    table.insert_or_assign(short, np.zeros((500, 2)))  # the expired rows' memory is reused
    assert table.stats().high_water_rows == high
    clock.now += 100
    assert table.expire() == 1000
    assert sorted(k for k, _ in reports.take("expired")) == list(range(1000))


# -- eviction ----------------------------------------------------------------------------


class EvictionModel(RuleBasedStateMachine):
    """Inserts past ``max_live_rows``: each vanished key reported once, with its last value.

    The model replays each batch in order: a new key at the limit takes the next
    reported victim, which must be a live key holding exactly the row the model
    last gave it.
    """

    @initialize(
        dim=st.integers(1, 3),
        limit=st.sampled_from([1, 2, 3, 8, 40]),
        eviction=st.sampled_from(["lru", "lfu"]),
        sample=st.sampled_from([1, 8]),
    )
    def make_table(self, dim: int, limit: int, eviction: str, sample: int) -> None:
        self.dim = dim
        self.limit = limit
        self.clock = Clock(T0)
        self.reports = Reports()
        self.table = EmbeddingTable(
            dim=dim, huge_pages=False, capacity=4, max_live_rows=limit, eviction=eviction,
            eviction_sample=sample, clock=self.clock, on_evict=self.reports,
            initializer=Initializer(kind="constant", value=INIT),
        )
        self.model: dict[int, np.ndarray] = {}
        self.evicted_total = 0
        self.init_row = np.full(dim, INIT)

    def _replay(self, batch: list[int], rows: np.ndarray | None) -> list[np.ndarray]:
        """Apply an inserting batch to the model; return the row each position saw."""
        victims = iter(self.reports.take("evicted"))
        seen = []
        for i, k in enumerate(batch):
            if k not in self.model:
                if len(self.model) >= self.limit:
                    victim, vrow = next(victims, (None, None))
                    assert victim is not None, f"inserting {k} at the limit evicted nothing"
                    assert victim in self.model, f"evicted {victim}, not a live key"
                    assert_array_equal(vrow, self.model.pop(victim), err_msg=f"evicted {victim}")
                    self.evicted_total += 1
                self.model[k] = self.init_row if rows is None else rows[i]
            elif rows is not None:
                self.model[k] = rows[i]
            seen.append(self.model[k])
        assert next(victims, None) is None, "more evictions than inserts at the limit"
        return seen

    @rule(dt=st.sampled_from([0, 1, 61]))
    def advance(self, dt: int) -> None:
        self.clock.now += dt

    @rule(batch=key_batches, data=st.data())
    def insert_or_assign(self, batch: list[int], data: st.DataObject) -> None:
        rows = _draw_rows(data, len(batch), self.dim)
        self.table.insert_or_assign(_keys(batch), rows)
        self._replay(batch, rows)

    @rule(batch=key_batches)
    def find_or_insert(self, batch: list[int]) -> None:
        values = self.table.find_or_insert(_keys(batch))
        seen = self._replay(batch, None)
        assert_array_equal(values, np.array(seen).reshape(-1, self.dim))

    @rule(n=st.integers(1, 120), seed=st.integers(0, 2**32 - 1))
    def bulk_insert(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        keys = rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)
        rows = rng.integers(-64, 65, size=(n, self.dim)) / 4
        self.table.insert_or_assign(keys, rows)
        self._replay(keys.tolist(), rows)

    @rule(batch=key_batches, data=st.data())
    def assign(self, batch: list[int], data: st.DataObject) -> None:
        rows = _draw_rows(data, len(batch), self.dim)
        found = self.table.assign(_keys(batch), rows)
        assert not self.reports.calls
        want = []
        for k, row in zip(batch, rows, strict=True):
            want.append(k in self.model)
            if k in self.model:
                self.model[k] = row
        assert_array_equal(found, want)

    @rule(batch=key_batches)
    def erase(self, batch: list[int]) -> None:
        found = self.table.erase(_keys(batch))
        assert not self.reports.calls  # an erase is not an eviction
        assert_array_equal(found, [self.model.pop(k, None) is not None for k in batch])

    @rule(batch=key_batches)
    def find(self, batch: list[int]) -> None:
        """Reads touch rows (changing what gets evicted next), never evict."""
        _, found = self.table.find(_keys(batch))
        assert_array_equal(found, [k in self.model for k in batch])
        assert not self.reports.calls

    @rule()
    def compact(self) -> None:
        self.table.compact()

    @invariant()
    def table_equals_model(self) -> None:
        assert len(self.table) == len(self.model) <= self.limit
        keys = KEY_POOL + list(self.model)
        values, found = self.table.find(_keys(keys))
        assert_array_equal(found, [k in self.model for k in keys])
        zero = np.zeros(self.dim)
        assert_array_equal(values, np.array([self.model.get(k, zero) for k in keys]).reshape(-1, self.dim))
        assert self.table.stats().evicted == self.evicted_total


EvictionModel.TestCase.settings = settings(max_examples=120, stateful_step_count=30)
test_eviction_matches_model = EvictionModel.TestCase


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_recently_read_keys_survive_a_burst_of_inserts(eviction: str) -> None:
    """Sampled LRU/LFU keeps the hot set: statistical, with a loose bound.

    1000 rows at the limit, 100 of them read (LRU: later on the clock; LFU: five
    times); then 300 new keys. Each eviction takes the worst of 8 sampled rows,
    so a hot row goes only when all 8 samples are hot or new (under 0.4 % per
    eviction even at the end of the burst).
    """
    clock = Clock(T0)
    reports = Reports()
    table = EmbeddingTable(dim=2, max_live_rows=1000, eviction=eviction, clock=clock,
                           on_evict=reports, huge_pages=False)
    rng = np.random.default_rng(7)
    keys = np.unique(rng.integers(0, 2**64, size=1100, dtype=np.uint64, endpoint=False))[:1000]
    table.insert_or_assign(keys, np.zeros((1000, 2)))
    hot, cold = keys[:100], keys[100:]
    clock.now += 5  # within the same minute: LFU counts do not decay
    for _ in range(5):
        table.find(hot)
    burst = np.arange(1, 301, dtype=np.uint64)
    for part in np.array_split(burst, 30):
        table.insert_or_assign(part, np.ones((part.size, 2)))
    evicted = [k for k, _ in reports.take("evicted")]
    assert len(evicted) == 300 == len(set(evicted))
    assert len(table) == 1000
    hot_kept = table.contains(hot).mean()
    cold_kept = table.contains(cold).mean()
    assert hot_kept >= 0.95, f"{eviction}: only {hot_kept:.0%} of the hot keys survived"
    assert cold_kept <= 0.8
    if eviction == "lru":  # new rows are as recent as the hot ones, so cold rows go first
        assert table.contains(burst).mean() >= 0.9


def test_callable_initializer_with_eviction_returns_rows_not_zeros() -> None:
    """find_or_insert with an initializer function must not lose rows of its own batch."""
    table = EmbeddingTable(dim=2, max_live_rows=1, huge_pages=False,
                           initializer=lambda keys: np.full((keys.size, 2), 7.0))
    table.insert_or_assign([1], [[1.0, 1.0]])
    values = table.find_or_insert(np.array([1, 2], dtype=np.uint64))
    # Key 1 was present when the call began: it gets its row, as the Initializer path gives it.
    assert values.tolist() == [[1.0, 1.0], [7.0, 7.0]]


# -- admission ---------------------------------------------------------------------------


@given(
    admit_after=st.integers(1, 4),
    ops=st.lists(
        st.tuples(st.sampled_from(["find_or_insert", "find_or_insert", "insert_or_assign", "erase"]),
                  key_batches),
        max_size=25,
    ),
)
@settings(max_examples=60)
def test_admission_matches_model(admit_after: int, ops: list[tuple[str, list[int]]]) -> None:
    """A key gets a row on its N-th find_or_insert sighting while absent; before, only values."""
    table = EmbeddingTable(dim=2, huge_pages=False, admit_after=admit_after, admission_sketch_width=1 << 16,
                           initializer=Initializer(kind="constant", value=INIT))
    model: dict[int, float] = {}
    sightings: Counter[int] = Counter()
    refused = 0
    for i, (op, batch) in enumerate(ops):
        keys = _keys(batch)
        if op == "find_or_insert":
            values = table.find_or_insert(keys)
            want = []
            for k in batch:
                if k not in model:
                    sightings[k] += 1  # only an absent key is counted
                    if sightings[k] >= admit_after:
                        model[k] = INIT
                    else:
                        refused += 1
                want.append(model.get(k, INIT))  # refused keys get the initializer's values
            assert_array_equal(values, np.repeat(np.array(want)[:, None], 2, axis=1).reshape(-1, 2))
        elif op == "insert_or_assign":  # a write is not filtered
            table.insert_or_assign(keys, np.full((len(batch), 2), float(i)))
            model.update((k, float(i)) for k in batch)
        else:
            table.erase(keys)
            for k in batch:
                model.pop(k, None)
        assert_array_equal(table.contains(_keys(KEY_POOL)), [k in model for k in KEY_POOL])
        assert len(table) == len(model)
        assert table.stats().not_admitted == refused


def test_admission_applies_with_a_callable_initializer() -> None:
    table = EmbeddingTable(dim=2, huge_pages=False, admit_after=3, admission_sketch_width=1 << 10,
                           initializer=lambda keys: np.full((keys.size, 2), 7.0))
    values = table.find_or_insert(np.array([5], dtype=np.uint64))
    assert values.tolist() == [[7.0, 7.0]]
    assert not table.contains([5])[0]
    assert table.stats().not_admitted == 1


def test_an_expired_victim_is_reported_as_expired_not_evicted() -> None:
    now = [1000.0]
    seen: list[tuple[str, list[int]]] = []
    # slices of 100 s: the wheel will not reclaim key 1 before the eviction picks it
    t = EmbeddingTable(dim=2, ttl_s=10, ttl_slice_s=100, max_live_rows=2, eviction_sample=64,
                       clock=lambda: now[0],
                       huge_pages=False,
                       on_evict=lambda k, v, why: seen.append((why, sorted(k.tolist()))))
    t.insert_or_assign([1, 2], np.ones((2, 2)))
    now[0] += 5
    t.insert_or_assign([2], np.ones((1, 2)))  # 2 lives until 1015, 1 until 1010
    now[0] += 6  # 1011: key 1 has expired, its slice not yet reclaimed
    t.insert_or_assign([3], np.ones((1, 2)))  # at the limit: the expired row goes first
    assert ("expired", [1]) in seen
    assert all(why != "evicted" for why, _ in seen)
    assert t.stats().expired == 1 and t.stats().evicted == 0
    assert t.contains([2, 3]).all()
