"""Readers stay right while the writer compacts, evicts, reclaims expired rows and steps gradients.

Each scenario runs its writer in the test's thread beside two reader threads
(``EmbeddingTable.find``) and a one-sided reader in another process
(``OneSidedReader`` on the table's live files), all reading the keys the writer
is working on. Every element of a row is ``key * 2**20 + version`` (exact in
float64), so a torn row (elements of two writes), a row of another key, or a
value never written is seen in any read. Keys the writer published and never
removes must be found; keys never written must not be.

The seqlock's retry counters (``stats().read_retries``, ``OneSidedReader.retries``)
must be above zero in every scenario, in this process and in the other: a run
without retries would not have shown that readers met the writer at all, so it
fails. A scenario runs for at least ``_MIN_S`` and until both counters moved,
at most ``_MAX_S``.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamrec.store import EmbeddingTable

_SHIFT = float(2**20)
_NEVER = 1 << 29  # keys from here on are never written
_DIM = 8
_MIN_S = 1.0
_MAX_S = 8.0

Find = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _encode(keys: np.ndarray, version: int | np.ndarray) -> np.ndarray:
    col = keys.astype(np.float64) * _SHIFT + version
    return np.repeat(col[:, None], _DIM, axis=1)


def _problem(keys: np.ndarray, values: np.ndarray, found: np.ndarray, must: np.ndarray) -> str | None:
    """Why this read is impossible, or None. ``must``: keys published before the read, never removed."""
    if (must & ~found).any():
        return f"published keys missing, e.g. {keys[must & ~found][:3].tolist()}"
    if (found & (keys >= _NEVER)).any():
        return "a key never written was found"
    if values[~found].any():
        return "an absent key came with nonzero values"
    k, v = keys[found], values[found]
    torn = (v != v[:, :1]).any(axis=1)
    if torn.any():
        return f"torn row for key {k[torn][0]}: {v[torn][0].tolist()}"
    owner = np.floor(v[:, 0] / _SHIFT)
    if (owner != k).any():
        i = int(np.argmax(owner != k))
        return f"key {k[i]} read the row of key {int(owner[i])}"
    if (v[:, 0] - k * _SHIFT < 1).any():
        return "a version that was never written"
    return None


@dataclass
class _Feed:
    """What the readers read, and how far the writer got (shared with the other process).

    ``seq``: keys in the order the writer publishes them; once published (the first
    ``n_seq``) they are never removed. ``fresh``: keys the writer inserts (the first
    ``n_fresh`` so far) and may remove again.
    """

    seq: np.ndarray
    fresh: np.ndarray
    n_seq: Any
    n_fresh: Any


def _pick(rng: np.random.Generator, seq: np.ndarray, fresh: np.ndarray, ns: int, nf: int,
          window: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys around where the writer works (and some it never wrote), with the must-be-found mask."""
    parts, must = [], []
    if seq.size:
        lo, hi = max(0, ns - window), min(seq.size, ns + window // 4)
        recent = seq[lo:hi]
        older = seq[rng.integers(0, max(ns, 1), 64)] if ns else seq[:0]
        parts += [recent, older]
        must += [np.arange(lo, hi) < ns, np.ones(older.size, bool)]
    if fresh.size:
        got = fresh[max(0, nf - window): min(fresh.size, nf + window // 4)]
        parts.append(got)
        must.append(np.zeros(got.size, bool))
    never = rng.integers(_NEVER, 1 << 62, 16).astype(np.uint64)
    parts.append(never)
    must.append(np.zeros(never.size, bool))
    keys, where = np.unique(np.concatenate(parts), return_inverse=True)
    must_u = np.zeros(keys.size, bool)
    np.logical_or.at(must_u, where, np.concatenate(must))
    return keys, must_u


def _read_loop(find: Find, feed: _Feed, stop: Any, seed: int, after: Callable[[], None],
               window: int) -> str | None:
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        ns, nf = feed.n_seq.value, feed.n_fresh.value
        keys, must = _pick(rng, feed.seq, feed.fresh, ns, nf, window)
        values, found = find(keys)
        why = _problem(keys, values, found, must)
        if why is not None:
            return why
        after()
    return None


def _child(cmds: Any, results: Any, stop: Any, n_seq: Any, n_fresh: Any, retries: Any, reads: Any) -> None:
    """The other process: a one-sided reader on each table it is sent, until ``stop``."""
    from streamrec.ps.onesided import OneSidedReader

    while (cmd := cmds.get()) is not None:
        path, seq, fresh, window = cmd
        why: str | None
        try:
            with OneSidedReader(path) as reader:
                reader.find(np.array([_NEVER], np.uint64))  # the lookup kernel loaded before the clock runs
                results.put("ready")

                def after(reader: OneSidedReader = reader) -> None:
                    retries.value = reader.retries
                    reads.value += 1

                why = _read_loop(reader.find, _Feed(seq, fresh, n_seq, n_fresh), stop, 7, after, window)
        except Exception as exc:  # reported to the test, which fails with it
            why = f"one-sided reader: {exc!r}"
        results.put(why or "ok")


@dataclass
class _Other:
    proc: Any
    cmds: Any
    results: Any
    stop: Any
    n_seq: Any
    n_fresh: Any
    retries: Any
    reads: Any


def _warm_up(path: Path) -> None:
    """Run every kernel the scenarios use once: a cold numba cache compiles here, not while
    the readers hold both cores and the clock runs."""
    t = EmbeddingTable(dim=_DIM, dtype="float64", optimizer=None, huge_pages=False, path=path)
    keys = np.arange(1, 65, dtype=np.uint64)
    t.insert_or_assign(keys, _encode(keys, 1))
    t.apply_gradients(keys, np.ones((keys.size, _DIM)), lr=1.0)
    t.find(keys)
    t.contains(keys)
    t.erase(keys[::2])
    t.compact()
    t.close()
    now = [0.0]
    t = EmbeddingTable(dim=_DIM, dtype="float64", optimizer=None, huge_pages=False, ttl_s=1, ttl_slice_s=1,
                       max_live_rows=32, clock=lambda: now[0], path=path.with_name("live-ttl"))
    t.insert_or_assign(keys, _encode(keys, 1))
    now[0] += 3
    t.insert_or_assign(keys, _encode(keys, 1))  # reclaims the expired rows first
    t.find(keys)
    t.close()


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Other]:
    _warm_up(tmp_path_factory.mktemp("warm") / "live")
    ctx = mp.get_context("spawn")
    o = _Other(None, ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("q", 0), ctx.Value("q", 0),
               ctx.Value("q", 0), ctx.Value("q", 0))
    o.proc = ctx.Process(target=_child, args=(o.cmds, o.results, o.stop, o.n_seq, o.n_fresh, o.retries,
                                              o.reads), daemon=True)
    o.proc.start()
    yield o
    o.cmds.put(None)
    o.proc.join(10)
    if o.proc.is_alive():
        o.proc.kill()


@dataclass
class _Run:
    errors: list[str] = field(default_factory=list)
    reads: list[int] = field(default_factory=lambda: [0, 0])
    rounds: int = 0


def _run(other: _Other, table: EmbeddingTable, seq: np.ndarray, fresh: np.ndarray,
         write_round: Callable[[int], bool], window: int = 512) -> _Run:
    """Run ``write_round(r)`` (False: no more rounds) beside the readers; check what they saw."""
    o = other
    o.stop.clear()
    o.retries.value = o.reads.value = 0
    feed = _Feed(seq, fresh, o.n_seq, o.n_fresh)
    o.cmds.put((str(table.path), seq, fresh, window))
    assert o.results.get(timeout=60) == "ready"
    run = _Run()

    def reader(i: int) -> None:
        def after() -> None:
            run.reads[i] += 1

        try:
            why = _read_loop(lambda k: table.find(k), feed, o.stop, i, after, window)
        except Exception as exc:
            why = repr(exc)
        if why is not None:
            run.errors.append(f"reader thread {i}: {why}")

    threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    start = 0.0
    try:
        while not run.errors:
            more = write_round(run.rounds)
            run.rounds += 1
            start = start or time.monotonic()  # from the end of the first round
            took = time.monotonic() - start
            contended = table.stats().read_retries > 0 and o.retries.value > 0
            if not more or took >= _MAX_S or (took >= _MIN_S and contended and min(run.reads) > 0):
                break
    finally:
        o.stop.set()
        for t in threads:
            t.join(30)
        child = o.results.get(timeout=60)
    assert child == "ok", child
    assert not run.errors, run.errors
    assert min(run.reads) > 0 and o.reads.value > 0, (run.reads, o.reads.value)
    retries = table.stats().read_retries

    assert retries > 0, (f"no seqlock retry in this process in {run.rounds} rounds ({run.reads} reads): "
                         "the readers never met the writer, so this run showed nothing")
    assert o.retries.value > 0, (f"no seqlock retry in the one-sided reader in {run.rounds} rounds "
                                 f"({o.reads.value} reads): it never met the writer")
    return run


def _table(tmp_path: Path, **kw: Any) -> EmbeddingTable:
    return EmbeddingTable(dim=_DIM, dtype="float64", optimizer=None, huge_pages=False,
                          path=tmp_path / "live", **kw)


def test_apply_gradients(tmp_path: Path, other: _Other) -> None:
    """SGD steps of lr 1 on gradient -1 add 1 to every element: the version goes up by one a round."""
    t = _table(tmp_path)
    keys = np.arange(1, 513, dtype=np.uint64)
    t.insert_or_assign(keys, _encode(keys, 1))
    other.n_seq.value, other.n_fresh.value = keys.size, 0
    grads = -np.ones((keys.size, _DIM))

    def write_round(r: int) -> bool:
        assert t.apply_gradients(keys, grads, lr=1.0).all()
        return True

    run = _run(other, t, keys, keys[:0], write_round)
    values, found = t.find(keys)
    assert found.all()
    np.testing.assert_array_equal(values, _encode(keys, 1 + run.rounds))


def test_compact(tmp_path: Path, other: _Other) -> None:
    """Each round inserts churn keys, then keys that stay (above them), erases the churn and
    compacts: the staying keys' rows move down into the holes while they are read."""
    m, max_rounds = 1000, 150
    t = _table(tmp_path)
    stay = np.arange(1, m * max_rounds + 1, dtype=np.uint64)
    churn = (1 << 28) + np.arange(m * max_rounds, dtype=np.uint64)
    other.n_seq.value = other.n_fresh.value = 0

    def write_round(r: int) -> bool:
        c, s = churn[r * m:(r + 1) * m], stay[r * m:(r + 1) * m]
        t.insert_or_assign(c, _encode(c, 1))
        other.n_fresh.value = (r + 1) * m
        t.insert_or_assign(s, _encode(s, 1))
        other.n_seq.value = (r + 1) * m
        t.erase(c)
        assert t.compact() == m  # every staying row of this round moved into a churn row's hole
        return r + 1 < max_rounds

    run = _run(other, t, stay, churn, write_round, window=2 * m)
    n = run.rounds * m
    assert t.stats().wasted_fraction == 0.0 and len(t) == n
    values, found = t.find(stay[:n])
    assert found.all()
    np.testing.assert_array_equal(values, _encode(stay[:n], 1))
    assert not t.contains(churn[:n]).any()


def test_eviction_at_the_row_limit(tmp_path: Path, other: _Other) -> None:
    """At the row limit every insert evicts a row and reuses it for a new key."""
    m, limit, max_rounds = 256, 2048, 4000
    t = _table(tmp_path, max_live_rows=limit, max_rows=4 * limit)
    fresh = np.arange(1, m * max_rounds + 1, dtype=np.uint64)
    t.insert_or_assign(fresh[:limit], _encode(fresh[:limit], 1))
    other.n_seq.value, other.n_fresh.value = 0, limit

    def write_round(r: int) -> bool:
        k = fresh[limit + r * m: limit + (r + 1) * m]
        t.insert_or_assign(k, _encode(k, 1 + r % 5))
        other.n_fresh.value = limit + (r + 1) * m
        return limit + (r + 2) * m <= fresh.size

    run = _run(other, t, fresh[:0], fresh, write_round, window=2 * limit)
    assert len(t) == limit and t.stats().evicted == run.rounds * m
    assert t.stats().high_water_rows <= limit  # rows were reused, not added


def test_ttl_reclamation(tmp_path: Path, other: _Other) -> None:
    """One second a round on the table's clock: slices pass, their rows are reclaimed by the
    next write and reused for its keys. Keys written with no TTL must always be found."""
    m, max_rounds = 256, 4000
    now = [time.time()]
    t = _table(tmp_path, ttl_s=4, ttl_slice_s=1, clock=lambda: now[0])
    forever = np.arange(1, 257, dtype=np.uint64)
    t.insert_or_assign(forever, _encode(forever, 1), ttl_s=0)
    fresh = (1 << 20) + np.arange(m * max_rounds, dtype=np.uint64)
    other.n_seq.value, other.n_fresh.value = forever.size, 0

    def write_round(r: int) -> bool:
        now[0] += 1.0
        k = fresh[r * m:(r + 1) * m]
        t.insert_or_assign(k, _encode(k, 1))
        other.n_fresh.value = (r + 1) * m
        return r + 1 < max_rounds

    run = _run(other, t, forever, fresh, write_round)
    st = t.stats()
    assert st.expired > 0 and st.high_water_rows < forever.size + 8 * m  # expired rows were reused
    assert t.find(forever)[1].all()
    assert run.rounds > 4
