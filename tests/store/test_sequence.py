"""SequenceStore against a dict-of-lists model, input checks, memory, and lock-free readers."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from numpy.testing import assert_array_equal

from streamrec.errors import CorruptFile, SnapshotError
from streamrec.store import sequence
from streamrec.store._files import read_snapshot, snapshot_info, write_snapshot
from streamrec.store._sequence_kernels import C_CAP, C_NSLOTS
from streamrec.store.sequence import SequenceStore

U64_MAX = 2**64 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1

# A small pool, so batches repeat users and users come back after an erase or an
# expiry; the edges of uint64 included.
USER_POOL = [0, 1, 2, 3, 7, 42, 2**32, 2**63, 0x9E3779B97F4A7C15, U64_MAX - 1, U64_MAX]
EXTRA = ("dwell", "price")
# Snapshots fsync every file; on tmpfs that costs nothing, so the model can take many.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None

items_st = st.sampled_from([0, 1, 5, 2**32 + 3, 2**63, U64_MAX])
ts_st = st.sampled_from([I64_MIN, -1, 0, 1, 1_700_000_000_000, I64_MAX])
dyadic = st.integers(-64, 64).map(lambda i: i / 4)  # exact in float32


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


Event = tuple[int, int, int, float, float]  # item, action, timestamp, dwell, price


class SequenceModel(RuleBasedStateMachine):
    """Random appends, reads, erases and clock moves, mirrored on a dict of lists."""

    @initialize(
        max_len=st.sampled_from([1, 2, 3, 5, 9]),
        capacity=st.sampled_from([0, 1, 30]),
        with_ttl=st.booleans(),
        wide_actions=st.booleans(),
    )
    def make(self, max_len: int, capacity: int, with_ttl: bool, wide_actions: bool) -> None:
        self.clock = FakeClock()
        self.ttl = 10.0 if with_ttl else None
        self.amax = 65535 if wide_actions else 255
        self.store = SequenceStore(
            max_len=max_len, extra_fields=EXTRA, capacity_users=capacity, ttl_s=self.ttl,
            clock=self.clock, action_dtype="uint16" if wide_actions else "uint8", huge_pages=False,
        )
        self.max_len = max_len
        self.seqs: dict[int, list[Event]] = {}
        self.stamp: dict[int, float] = {}
        self.bulk_next = 10**6

    # -- model helpers ------------------------------------------------------------------

    def _expired(self, u: int) -> bool:
        return self.ttl is not None and self.clock.t - self.stamp[u] > self.ttl

    def _visible(self, u: int) -> list[Event]:
        if u not in self.seqs or self._expired(u):
            return []
        return self.seqs[u]

    def _reclaim_expired(self) -> None:
        for u in [u for u in self.seqs if self._expired(u)]:
            del self.seqs[u], self.stamp[u]

    def _model_append(self, users: list[int], events: list[Event]) -> None:
        for u, ev in zip(users, events, strict=True):
            if u in self.seqs and self._expired(u):
                self.seqs[u] = []
            seq = self.seqs.setdefault(u, [])
            seq.append(ev)
            del seq[: -self.max_len]
            self.stamp[u] = self.clock.t
        if self.ttl is not None and users:
            # With fewer user rows than one sweep step, every (non-empty) append sweeps them all.
            self._reclaim_expired()

    def _append(self, users: list[int], events: list[Event]) -> None:
        cols: list[Any] = list(zip(*events, strict=True)) if events else [[]] * 5
        self.store.append(
            np.array(users, dtype=np.uint64), np.array(cols[0], dtype=np.uint64),
            np.array(cols[1], dtype=np.int64), np.array(cols[2], dtype=np.int64),
            extras={"dwell": np.array(cols[3], dtype=np.float64), "price": list(cols[4])},
        )
        self._model_append(users, events)

    # -- writes -----------------------------------------------------------------------------

    @rule(data=st.data(), users=st.lists(st.sampled_from(USER_POOL), max_size=24))
    def append(self, data: st.DataObject, users: list[int]) -> None:
        events = [
            (data.draw(items_st), data.draw(st.integers(0, self.amax)), data.draw(ts_st),
             data.draw(dyadic), data.draw(dyadic))
            for _ in users
        ]
        self._append(users, events)

    @rule(n_users=st.integers(1, 120), per_user=st.integers(1, 4))
    def bulk_new_users(self, n_users: int, per_user: int) -> None:
        """Many new users at once: the index grows from its tiny start."""
        users = [self.bulk_next + i for i in range(n_users)] * per_user
        self.bulk_next += n_users
        events = [(i, i % (self.amax + 1), i, 0.25, -0.5) for i in range(len(users))]
        self._append(users, events)

    @rule(users=st.lists(st.sampled_from(USER_POOL), max_size=8))
    def erase(self, users: list[int]) -> None:
        found = self.store.erase(np.array(users, dtype=np.uint64))
        want = []
        for u in users:
            want.append(bool(self._visible(u)))
            self.seqs.pop(u, None)
            self.stamp.pop(u, None)
        assert_array_equal(found, np.array(want, dtype=bool))

    @precondition(lambda self: self.ttl is not None)
    @rule(dt=st.sampled_from([0.0, 0.5, 4.0, 9.5, 10.0, 10.5, 30.0]))
    def tick(self, dt: float) -> None:
        self.clock.t += dt

    @precondition(lambda self: self.ttl is not None)
    @rule()
    def expire(self) -> None:
        before = set(self.seqs)
        self._reclaim_expired()
        assert self.store.expire() == len(before - set(self.seqs))

    @rule()
    def snapshot_and_reopen(self) -> None:
        """The store carries on from its snapshot as if nothing happened (the model is unchanged)."""
        with tempfile.TemporaryDirectory(dir=SCRATCH) as root:
            self.store.snapshot(root)
            self.store = SequenceStore.open(root, clock=self.clock, huge_pages=False)

    # -- reads ------------------------------------------------------------------------------

    def _query(self, data: st.DataObject) -> list[int]:
        pool = USER_POOL + list(self.seqs)[:20] + [12345]
        return data.draw(st.lists(st.sampled_from(pool), max_size=12))

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        users = self._query(data)
        offsets, cols = self.store.read(np.array(users, dtype=np.uint64))
        assert offsets.dtype == np.int64 and offsets.shape == (len(users) + 1,)
        assert list(cols) == list(self.store.fields)
        want = [self._visible(u) for u in users]
        assert_array_equal(np.diff(offsets), [len(w) for w in want])
        flat = [ev for w in want for ev in w]
        for f, name in enumerate(self.store.fields):
            assert cols[name].dtype == self.store.dtypes[name]
            assert cols[name].shape == (int(offsets[-1]),)
            assert_array_equal(cols[name], np.array([ev[f] for ev in flat], dtype=cols[name].dtype))

    @rule(data=st.data(), n=st.integers(0, 11))
    def read_last(self, data: st.DataObject, n: int) -> None:
        users = self._query(data)
        lengths, cols = self.store.read_last(np.array(users, dtype=np.uint64), n)
        want = [self._visible(u)[len(self._visible(u)) - min(n, len(self._visible(u))):] for u in users]
        assert_array_equal(lengths, [len(w) for w in want])
        for f, name in enumerate(self.store.fields):
            col = cols[name]
            assert col.dtype == self.store.dtypes[name] and col.shape == (len(users), n)
            expect = np.zeros((len(users), n), dtype=col.dtype)
            for i, w in enumerate(want):
                if w:
                    expect[i, n - len(w):] = [ev[f] for ev in w]
            assert_array_equal(col, expect)

    @rule(data=st.data())
    def length(self, data: st.DataObject) -> None:
        users = self._query(data)
        assert_array_equal(self.store.length(users), [len(self._visible(u)) for u in users])

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def counts_and_memory(self) -> None:
        assert len(self.store) == sum(1 for u in self.seqs if self._visible(u))
        assert self.store.events_held == sum(len(s) for s in self.seqs.values())
        # Ring slots in use stay within max(2 len, smallest ring) per user held.
        s = self.store
        slots = int((s._cls[:, C_CAP] * s._cls[:, C_NSLOTS]).sum())
        cap0 = s.class_capacities[0]
        assert slots <= sum(max(2 * len(q), cap0) for q in self.seqs.values())
        assert int(s._cls[:, C_NSLOTS].sum()) == len(self.seqs)


TestSequenceModel = SequenceModel.TestCase


# -- direct checks ----------------------------------------------------------------------------


def small(**kw: Any) -> SequenceStore:
    return SequenceStore(huge_pages=False, **kw)


def test_docstring_example() -> None:
    s = small(max_len=3, extra_fields=("dwell",))
    s.append([7, 7, 9, 7, 7], items=[1, 2, 3, 4, 5], actions=[0, 1, 0, 0, 2],
             timestamps=[10, 11, 12, 13, 14], extras={"dwell": [0.5, 1, 2, 3, 4]})
    offsets, cols = s.read([7, 8, 9])
    assert_array_equal(offsets, [0, 3, 3, 4])
    assert_array_equal(cols["item"], [2, 4, 5, 3])
    assert_array_equal(cols["dwell"], [1, 3, 4, 2])
    lengths, last = s.read_last([7], 2)
    assert_array_equal(lengths, [2])
    assert_array_equal(last["item"], [[4, 5]])
    assert len(s) == 2


def test_size_classes_and_long_history() -> None:
    s = small(max_len=10_000)
    assert s.class_capacities == (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 10_000)
    n = 25_000
    s.append(np.full(n, 5, np.uint64), np.arange(n, dtype=np.uint64), np.zeros(n, np.uint8),
             np.arange(n, dtype=np.int64))
    offsets, cols = s.read([5])
    assert_array_equal(offsets, [0, 10_000])
    assert_array_equal(cols["item"], np.arange(n - 10_000, n))
    lengths, last = s.read_last([5, 6], 12_000)
    assert_array_equal(lengths, [10_000, 0])
    assert_array_equal(last["timestamp"][0, 2000:], np.arange(n - 10_000, n))
    assert not last["timestamp"][0, :2000].any() and not last["item"][1].any()


def test_memory_follows_events() -> None:
    """A million-user-shaped store pays per event held, not users x max_len."""
    s = small(max_len=10_000, capacity_users=20_000)
    users = np.arange(20_000, dtype=np.uint64)
    s.append(users, users, np.zeros(20_000, np.uint8), np.zeros(20_000, np.int64))
    per_user = (s.memory_bytes - s._index.buckets * 64) / 20_000
    assert per_user <= 32 + 4 * 17 + 4  # row + ring of 4 events + owner entry
    s.append(np.full(10_000, 1, np.uint64), np.arange(10_000, dtype=np.uint64), np.zeros(10_000, np.uint8),
             np.zeros(10_000, np.int64))
    grown = s.memory_bytes - s._index.buckets * 64 - 19_999 * (32 + 4 * 17 + 4)
    assert grown <= 32 + 10_000 * 17 + 4
    assert s.erase([1]).tolist() == [True]
    assert s.memory_bytes - s._index.buckets * 64 <= 20_000 * (32 + 4 * 17 + 4)


def test_ttl_with_a_fake_clock() -> None:
    clock = FakeClock()
    s = small(max_len=4, ttl_s=5, clock=clock)
    s.append([1, 2], [10, 20], [0, 0], [0, 0])
    clock.t += 3
    s.append([2], [21], [0], [1])
    clock.t += 2.5  # user 1: 5.5 s since its last append; user 2: 2.5 s
    assert s.length([1, 2]).tolist() == [0, 2]
    assert len(s) == 1 and s.read([1])[0].tolist() == [0, 0]
    assert s.events_held == 3  # user 1 is not reclaimed until the sweep reaches it
    assert s.expire() == 1 and s.events_held == 2
    s.append([1], [11], [0], [2])  # an expired user restarts empty
    assert s.read([1])[1]["item"].tolist() == [11]
    clock.t += 100
    s.append([3], [30], [0], [0])  # the sweep after this append reclaims users 1 and 2
    assert s.events_held == 1 and len(s) == 1
    assert s.erase([2, 3]).tolist() == [False, True]


def test_read_under_the_writer_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The last resort of a ragged read that keeps colliding with the writer gives the same answer."""
    s = small(max_len=6)
    s.append([1, 2, 1, 1], [10, 20, 11, 12], [0, 0, 0, 0], [0, 1, 2, 3])
    want_offsets, want = s.read([2, 1, 3])
    monkeypatch.setattr(sequence, "_LOCK_FREE_TRIES", 0)
    offsets, got = s.read([2, 1, 3])
    assert_array_equal(offsets, want_offsets)
    assert_array_equal(got["item"], want["item"])
    assert got["item"].tolist() == [20, 10, 11, 12]


def test_empty_batches() -> None:
    s = small(max_len=4, extra_fields=("x",))
    s.append([], [], [], [], extras={"x": []})
    offsets, cols = s.read([])
    assert offsets.tolist() == [0] and all(c.shape == (0,) for c in cols.values())
    lengths, cols = s.read_last(np.array([], np.uint64), 3)
    assert lengths.shape == (0,) and cols["x"].shape == (0, 3)
    assert s.erase([]).shape == (0,) and s.length([]).shape == (0,)
    _, cols = s.read_last([1, 2], 0)
    assert cols["item"].shape == (2, 0)


# -- snapshots ---------------------------------------------------------------------------------


def _filled(clock: FakeClock | None = None) -> SequenceStore:
    s = small(max_len=40, extra_fields=("a", "b"), ttl_s=100 if clock else None, clock=clock,
              action_dtype="uint16")
    rng = np.random.default_rng(5)
    n = 6000
    u = rng.integers(0, 400, n).astype(np.uint64)
    s.append(u, rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True), rng.integers(0, 2**16, n),
             rng.integers(-(2**62), 2**62, n), extras={"a": rng.random(n), "b": rng.random(n)})
    s.erase(np.arange(0, 400, 3, dtype=np.uint64))
    return s


def _same(a: SequenceStore, b: SequenceStore, users: np.ndarray) -> None:
    oa, ca = a.read(users)
    ob, cb = b.read(users)
    assert_array_equal(oa, ob)
    assert list(ca) == list(cb)
    for name in ca:
        assert ca[name].dtype == cb[name].dtype
        assert_array_equal(ca[name], cb[name])
    assert len(a) == len(b) and a.events_held == b.events_held and a.memory_bytes == b.memory_bytes


def test_snapshot_round_trip(tmp_path: Path) -> None:
    clock = FakeClock()
    s = _filled(clock)
    users = np.arange(410, dtype=np.uint64)
    assert s.snapshot(tmp_path) == tmp_path
    gen = snapshot_info(tmp_path).path
    assert gen.parent == tmp_path
    t = SequenceStore.open(tmp_path, clock=clock, huge_pages=False)
    assert t.fields == s.fields and t.max_len == s.max_len and t.ttl_s == s.ttl_s
    _same(s, t, users)
    more = np.arange(380, 420, dtype=np.uint64)  # old and new users, some ring wraps
    for store in (s, t):
        store.append(np.repeat(more, 30), np.arange(1200, dtype=np.uint64), np.ones(1200, np.int64),
                     np.arange(1200), extras={"a": np.zeros(1200), "b": np.ones(1200)})
        store.erase([1, 2, 4])
    _same(s, t, users)
    clock.t += 101  # TTL stamps survive the trip
    assert len(t) == 0 and t.expire() == s.expire() > 0
    s.snapshot(tmp_path)  # a second generation replaces the first
    _same(s, SequenceStore.open(tmp_path, clock=clock, huge_pages=False), users)


def test_corrupt_or_missing_snapshot_refused(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="no snapshot"):
        SequenceStore.open(tmp_path / "nothing")
    s = _filled()
    s.snapshot(tmp_path / "good")
    gen = snapshot_info(tmp_path / "good").path
    victim = gen / "c3_item.arr"
    data = bytearray(victim.read_bytes())
    data[4096 + 100] ^= 0x40  # one bit of the payload
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptFile, match="checksum mismatch"):
        SequenceStore.open(tmp_path / "good")


def test_snapshot_that_is_not_a_consistent_store_refused(tmp_path: Path) -> None:
    """Checksums pass (the files were written whole) but the structure does not hold."""
    s = _filled()
    s.snapshot(tmp_path / "src")
    meta, arrays = read_snapshot(tmp_path / "src")
    users = arrays["users"].copy()
    live = np.flatnonzero(users.view(np.int32)[:, 7] >= 0)[0]
    users.view(np.int32)[live, 5] = 10**6  # a slot far past the class's end
    write_snapshot(tmp_path / "bad", {**arrays, "users": users}, meta, fsync=False)
    with pytest.raises(CorruptFile, match="inconsistent store: a user record"):
        SequenceStore.open(tmp_path / "bad")
    index = arrays["index"].copy()
    index.view(np.uint32)[:, 4:] = 0  # every entry points at row 0
    write_snapshot(tmp_path / "bad2", {**arrays, "index": index}, meta, fsync=False)
    with pytest.raises(CorruptFile, match="the index does not hold exactly the live users"):
        SequenceStore.open(tmp_path / "bad2")
    write_snapshot(tmp_path / "bad3", arrays, {**meta, "format": "something else"}, fsync=False)
    with pytest.raises(CorruptFile, match="not a sequence store snapshot"):
        SequenceStore.open(tmp_path / "bad3")


# -- input checks ----------------------------------------------------------------------------

GOOD: dict[str, Any] = {"users": [1, 2], "items": [3, 4], "actions": [0, 1], "timestamps": [5, 6]}


@pytest.mark.parametrize(
    ("change", "exc", "words"),
    [
        ({"users": [1, 2, 3]}, ValueError, "items: expected 3 values"),
        ({"items": [3]}, ValueError, "items: expected 2 values"),
        ({"actions": [0]}, ValueError, "actions: expected 2 values"),
        ({"timestamps": [[5, 6]]}, ValueError, "timestamps: expected a 1-D array"),
        ({"users": [1.5, 2.0]}, TypeError, "users"),
        ({"users": [-1, 2]}, ValueError, "users: expected non-negative"),
        ({"items": np.array([1.0, 2.0])}, TypeError, "items"),
        ({"actions": [0, 256]}, ValueError, "actions: expected integers in [0, 255]"),
        ({"actions": [-1, 0]}, ValueError, "actions: expected integers in [0, 255]"),
        ({"actions": [0.0, 1.0]}, TypeError, "actions: expected integers"),
        ({"actions": [True, False]}, TypeError, "actions: expected integers"),
        ({"timestamps": np.array([0, 2**63], dtype=np.uint64)}, ValueError, "timestamps: expected integers"),
        ({"timestamps": [0.5, 1.0]}, TypeError, "timestamps: expected integers"),
    ],
)
def test_append_rejects(change: dict[str, object], exc: type[Exception], words: str) -> None:
    s = small(max_len=4)
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        s.append(**{**GOOD, **change})
    assert len(s) == 0


def test_extras_rejected() -> None:
    s = small(max_len=4, extra_fields=("a", "b"))
    with pytest.raises(ValueError, match=r"missing \['b'\], unknown \['c'\]"):
        s.append(**GOOD, extras={"a": [1, 2], "c": [1, 2]})
    with pytest.raises(ValueError, match=r"missing \['a', 'b'\]"):
        s.append(**GOOD)
    with pytest.raises(ValueError, match=r"extras\['a'\]: expected shape \(2,\)"):
        s.append(**GOOD, extras={"a": [1], "b": [1, 2]})
    with pytest.raises(TypeError, match=r"extras\['b'\]: expected real numbers"):
        s.append(**GOOD, extras={"a": [1, 2], "b": ["x", "y"]})
    with pytest.raises(TypeError, match="extras: expected a mapping"):
        s.append(**GOOD, extras=[[1, 2], [1, 2]])
    assert len(s) == 0


def test_reads_and_constructor_reject() -> None:
    s = small(max_len=4)
    with pytest.raises(ValueError, match="n: expected an int >= 0, got -1"):
        s.read_last([1], -1)
    with pytest.raises(TypeError, match="n: expected an int"):
        s.read_last([1], 2.0)
    with pytest.raises(ValueError, match="users: expected a 1-D"):
        s.read([[1, 2]])
    with pytest.raises(ValueError, match="max_len"):
        small(max_len=0)
    with pytest.raises(TypeError, match="max_len"):
        small(max_len=5.0)
    with pytest.raises(ValueError, match="ttl_s"):
        small(ttl_s=0)
    with pytest.raises(TypeError, match="clock"):
        small(clock=3)
    with pytest.raises(ValueError, match="action_dtype"):
        small(action_dtype="int8")
    with pytest.raises(TypeError, match="extra_fields: expected an iterable of names, got the single"):
        small(extra_fields="dwell")
    with pytest.raises(ValueError, match="built-in field"):
        small(extra_fields=("item",))
    with pytest.raises(ValueError, match="repeat"):
        small(extra_fields=("a", "a"))


@given(st.lists(st.integers(0, 2**16 - 1), min_size=1, max_size=8))
def test_wide_actions_round_trip(actions: list[int]) -> None:
    s = small(max_len=16, action_dtype="uint16")
    n = len(actions)
    s.append([9] * n, list(range(n)), actions, list(range(n)))
    assert s.read([9])[1]["action"].tolist() == actions


# -- lock-free readers beside a writer ---------------------------------------------------------


def test_readers_see_whole_sequences_while_the_writer_appends() -> None:
    """Item and timestamp encode (user, sequence number); a torn read would break the pattern.

    Hot users are only appended to; churn users are also erased now and then,
    so the slots of their size classes are refilled by moving other users (hot
    ones included) while readers copy them; fresh users keep the index growing.
    """
    max_len = 300
    s = small(max_len=max_len, capacity_users=1, extra_fields=("echo",))
    hot = np.arange(1, 33, dtype=np.uint64)
    churn = np.arange(33, 65, dtype=np.uint64)
    both = np.concatenate([hot, churn])
    written = np.zeros(both.size + 1, dtype=np.int64)  # events appended per user since its erase
    stop = threading.Event()
    errors: list[str] = []
    steps = [0]
    # First calls outside the threads: a kernel compiled inside the timed window would stall it.
    s.append([10**9], [0], [0], [0], extras={"echo": [0.0]})
    s.read([10**9])
    s.read_last([10**9], 2)
    s.erase([10**9])

    def writer() -> None:
        rng = np.random.default_rng(3)
        new_user = 10_000
        step = 0
        while not stop.is_set():
            u = rng.choice(both, size=512)
            seq = np.empty(512, dtype=np.int64)
            for j, x in enumerate(u.tolist()):  # test bookkeeping, not the store's hot path
                written[x] += 1
                seq[j] = written[x]
            items = u * np.uint64(1 << 32) + seq.astype(np.uint64)
            fresh = np.arange(new_user, new_user + 64, dtype=np.uint64)
            new_user += 64
            s.append(np.concatenate([u, fresh]), np.concatenate([items, fresh]),
                     np.zeros(576, np.uint8), np.concatenate([seq, np.zeros(64, np.int64)]),
                     extras={"echo": np.concatenate([seq, np.zeros(64)]).astype(np.float32)})
            s.erase(fresh[::2])
            step += 1
            steps[0] = step
            if step % 3 == 0:
                gone = rng.choice(churn, size=6, replace=False)
                s.erase(gone)
                written[gone.astype(np.int64)] = 0

    def check(u: int, items: np.ndarray, ts: np.ndarray, echo: np.ndarray, last_seen: dict[int, int],
              width: int = max_len) -> None:
        if ts.size == 0:
            return
        if ts.size > width or not (np.diff(ts) == 1).all():
            errors.append(f"user {u}: not one contiguous run: {ts[:5]}...{ts[-5:]}")
        if ts.size < width and ts[0] != 1:
            errors.append(f"user {u}: short sequence does not start at 1: {ts[:5]}")
        if not (items == np.uint64(u) * np.uint64(1 << 32) + ts.astype(np.uint64)).all():
            errors.append(f"user {u}: items and timestamps disagree")
        if not (echo == ts).all():
            errors.append(f"user {u}: extra field and timestamps disagree")
        if ts[-1] < last_seen.get(u, 0):
            errors.append(f"user {u}: went back in time")
        last_seen[u] = int(ts[-1])

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        last_seen: dict[int, int] = {}
        while not stop.is_set() and not errors:
            q = rng.choice(both, size=8)
            offsets, cols = s.read(q)
            for i, u in enumerate(q.tolist()):
                a, b = offsets[i], offsets[i + 1]
                check(u, cols["item"][a:b], cols["timestamp"][a:b], cols["echo"][a:b],
                      last_seen if u <= hot[-1] else {})
            lengths, last = s.read_last(q, 50)
            for i, u in enumerate(q.tolist()):
                k = lengths[i]
                check(u, last["item"][i, 50 - k:], last["timestamp"][i, 50 - k:],
                      last["echo"][i, 50 - k:], {}, width=50)

    threads = [threading.Thread(target=writer)]
    threads += [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30 and not errors:  # at least 1.5 s and 60 writer steps
        if time.monotonic() - t0 > 1.5 and steps[0] >= 60:
            break
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert written.max() > max_len  # rings wrapped while readers read
    assert s._index.buckets > 2  # the index grew under the readers


def test_appends_during_a_background_snapshot_stay_out_of_it(tmp_path: Path) -> None:
    s = SequenceStore(max_len=50, huge_pages=False)
    users = np.repeat(np.arange(200, dtype=np.uint64), 5)
    s.append(users, users * 10, np.ones(users.size, np.uint8), np.arange(users.size))
    before = s.read(np.arange(200, dtype=np.uint64))
    job = s.snapshot(tmp_path, wait=False)
    # while the child writes:
    s.append(users, users * 11, np.full(users.size, 2, np.uint8), np.arange(users.size))
    assert job.wait() == tmp_path
    back = SequenceStore.open(tmp_path)
    got = back.read(np.arange(200, dtype=np.uint64))
    assert_array_equal(got[0], before[0])
    for name in before[1]:
        assert_array_equal(got[1][name], before[1][name])
