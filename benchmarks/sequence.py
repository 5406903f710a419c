"""Benchmark: the sequence store against a plain-Python dict of capped deques.

What it measures (one thread, events of item uint64, action uint8, timestamp int64):
- ``append_events_per_s``: ``SequenceStore.append`` of a stream of events for
  1,000,000 distinct users (each user the same number of events, the stream
  shuffled, cut into batches of 4096), from an empty store: index growth and
  ring growth through the size classes included. The store's memory is fresh
  each round (the kernel zeroes every page) but the machine has backed it once
  before: a first, untimed fill of cold memory is printed beside it.
- ``append_over_python``: against a dict of user -> ``deque(maxlen=max_len)`` of
  event tuples, fed the same batches (``tolist()`` of the batch's arrays, one
  Python loop over its events), also from empty.
- ``read_users_per_s``: ``SequenceStore.read`` of 100 random users per call, out
  of users holding full 10,000-event histories (their rings wrapped), as ragged
  arrays (offsets and one flat array per field).
- ``read_over_python``: against the same histories in the deques, turned into
  the same ragged numpy arrays (``np.fromiter`` over the deque per field,
  concatenated: the fastest plain-Python way measured here; ``zip(*deque)``
  ran 6x slower, mostly in the garbage collector).

Also printed: ``read_last`` of the newest 512 events of 100 users, the store's
bytes per event held, and the first calls of the kernels (compile, or numba's
on-disk cache), which no figure includes.

Ratios are medians of per-round ratios between paths timed back to back.
Run: ``python benchmarks/sequence.py [--quick] [--json]``.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Report, bench_args, console, emit_json, median, paired_rates, progress, ratio

from streamrec.store import _sequence_kernels
from streamrec.store.sequence import SequenceStore

MAX_LEN = 10_000
BATCH = 4096
READ_USERS = 100  # users per read call
LAST = 512  # events per user of the read_last figure

Events = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def compile_first_calls() -> tuple[float, str]:
    """Time the first call of every kernel the benchmark uses, on a tiny store (index growth too)."""
    kernels = [getattr(_sequence_kernels, name) for name in
               ("append_batch", "rebuild_index", "erase_batch", "_user_read")]
    t0 = time.perf_counter()
    s = SequenceStore(max_len=8, capacity_users=0, huge_pages=False)
    u = np.arange(100, dtype=np.uint64) % np.uint64(40)
    s.append(u, u, np.zeros(100, np.uint8), np.arange(100))
    s.read(u)
    s.read_last(u, 4)
    s.length(u)
    s.erase(u[:1])
    elapsed = time.perf_counter() - t0
    hits = sum(sum(k.stats.cache_hits.values()) for k in kernels)
    misses = sum(sum(k.stats.cache_misses.values()) for k in kernels)
    return elapsed, f"{hits} kernels loaded from numba's on-disk cache, {misses} compiled"


def event_stream(n_users: int, per_user: int, seed: int) -> tuple[np.ndarray, Events]:
    """Users (distinct random ids) and a shuffled stream of ``per_user`` events for each."""
    rng = np.random.default_rng(seed)
    ids = np.unique(rng.integers(0, 2**64 - 1, int(n_users * 1.01) + 16, dtype=np.uint64, endpoint=True))
    ids = rng.permutation(ids)[:n_users]
    users = rng.permutation(np.repeat(ids, per_user))
    n = users.size
    items = rng.integers(0, 2**40, n, dtype=np.uint64)
    actions = rng.integers(0, 8, n).astype(np.uint8)
    stamps = 1_700_000_000_000 + np.arange(n, dtype=np.int64)
    return ids, (users, items, actions, stamps)


def batches(ev: Events) -> list[Events]:
    n = ev[0].size
    return [(ev[0][lo:lo + BATCH], ev[1][lo:lo + BATCH], ev[2][lo:lo + BATCH], ev[3][lo:lo + BATCH])
            for lo in range(0, n, BATCH)]


def store_fill(chunks: list[Events], label: str) -> tuple[float, SequenceStore]:
    s = SequenceStore(max_len=MAX_LEN)
    n = sum(c[0].size for c in chunks)
    with progress() as bar:
        task = bar.add_task(label, total=n)
        done = 0
        t0 = time.perf_counter()
        for k, (u, it, ac, ts) in enumerate(chunks):
            s.append(u, it, ac, ts)
            done += u.size
            if k % 64 == 0:
                bar.update(task, completed=done)
        dt = time.perf_counter() - t0
    return n / dt, s


def python_fill(chunks: list[Events], label: str) -> tuple[float, dict[int, deque]]:
    d: dict[int, deque] = {}
    n = sum(c[0].size for c in chunks)
    with progress() as bar:
        task = bar.add_task(label, total=n)
        done = 0
        t0 = time.perf_counter()
        for k, (u, it, ac, ts) in enumerate(chunks):
            for user, event in zip(u.tolist(), zip(it.tolist(), ac.tolist(), ts.tolist(), strict=True),
                                   strict=True):
                q = d.get(user)
                if q is None:
                    q = d[user] = deque(maxlen=MAX_LEN)
                q.append(event)
            done += u.size
            if k % 64 == 0:
                bar.update(task, completed=done)
        dt = time.perf_counter() - t0
    return n / dt, d


def python_read(d: dict[int, deque], users: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """What ``SequenceStore.read`` returns, from the dict of deques."""
    lens = [0]
    items, actions, stamps = [], [], []
    for u in users.tolist():
        q = d.get(u)
        if not q:
            lens.append(0)
            continue
        n = len(q)
        items.append(np.fromiter((e[0] for e in q), np.uint64, n))
        actions.append(np.fromiter((e[1] for e in q), np.uint8, n))
        stamps.append(np.fromiter((e[2] for e in q), np.int64, n))
        lens.append(n)
    offsets = np.cumsum(np.array(lens, dtype=np.int64))
    cols: dict[str, np.ndarray] = {"item": np.concatenate(items or [np.empty(0, np.uint64)]),
            "action": np.concatenate(actions or [np.empty(0, np.uint8)]),
            "timestamp": np.concatenate(stamps or [np.empty(0, np.int64)])}
    return offsets, cols


def bench_append(n_users: int, per_user: int, rounds: int, report: Report) -> dict[str, float]:
    _, ev = event_stream(n_users, per_user, seed=1)
    chunks = batches(ev)
    n = ev[0].size
    # The first fill of fresh memory in this VM pays the host for every page it backs;
    # a store refilled on a warm machine does not. Fill once cold, untimed but reported.
    cold, s = store_fill(chunks, f"cold memory: SequenceStore.append, {n:,} events")
    del s
    store_rates, py_rates = [], []
    bytes_per_event = 0.0
    for r in range(rounds):
        rate, s = store_fill(chunks, f"round {r + 1}/{rounds}: SequenceStore.append, {n:,} events")
        store_rates.append(rate)
        bytes_per_event = s.memory_bytes / s.events_held
        del s
        rate, d = python_fill(chunks, f"round {r + 1}/{rounds}: dict of deques, {n:,} events")
        py_rates.append(rate)
        del d
    a = median(store_rates)
    over = ratio(store_rates, py_rates)
    report.add(f"append: {n_users:,} users x {per_user} events, batches of {BATCH}",
               f"{over:.1f}x", f"{a / 1e6:.2f} vs {median(py_rates) / 1e6:.3f} M events/s")
    report.add("  the same, first fill of cold memory (not in the figure)", "",
               f"{cold / 1e6:.2f} M events/s")
    report.add("  store memory per event held (index, user rows, rings)", "",
               f"{bytes_per_event:.1f} bytes (17 bytes of fields)")
    return {"append_events_per_s": a, "append_over_python": over}


def bench_read(n_full: int, rounds: int, report: Report) -> dict[str, float]:
    per_user = MAX_LEN + MAX_LEN // 20  # every ring has wrapped
    ids, ev = event_stream(n_full, per_user, seed=2)
    chunks = batches(ev)
    _, s = store_fill(chunks, f"fill {n_full:,} users x {per_user:,} events (store)")
    console.print(f"[dim]building the deques of {n_full:,} full histories…[/dim]")
    order = np.argsort(ev[0], kind="stable")  # each user's events, in stream order
    users_sorted = ev[0][order]
    bounds = np.flatnonzero(np.diff(users_sorted)) + 1
    d: dict[int, deque] = {}
    for run in np.split(order, bounds):
        u = int(ev[0][run[0]])
        d[u] = deque(zip(ev[1][run].tolist(), ev[2][run].tolist(), ev[3][run].tolist(), strict=True),
                     maxlen=MAX_LEN)
    rng = np.random.default_rng(3)
    queries = [ids[rng.integers(0, n_full, READ_USERS)] for _ in range(64)]
    o1, c1 = s.read(queries[0])
    o2, c2 = python_read(d, queries[0])
    if not (np.array_equal(o1, o2) and all(np.array_equal(c1[k], c2[k]) for k in c2)):
        raise AssertionError("the store and the deques disagree")
    cyc = {"s": 0, "p": 0, "l": 0}

    def nxt(name: str) -> np.ndarray:
        cyc[name] = (cyc[name] + 1) % len(queries)
        return queries[cyc[name]]

    def store_read() -> int:
        s.read(nxt("s"))
        return READ_USERS

    def dict_read() -> int:
        python_read(d, nxt("p"))
        return READ_USERS

    def store_last() -> int:
        s.read_last(nxt("l"), LAST)
        return READ_USERS

    rates = paired_rates({"read": store_read, "python": dict_read, "last": store_last}, rounds)
    r = median(rates["read"])
    over = ratio(rates["read"], rates["python"])
    report.add(f"read: {READ_USERS} users x {MAX_LEN:,} events, ragged arrays", f"{over:.1f}x",
               f"{r:,.0f} vs {median(rates['python']):,.0f} users/s "
               f"({r * MAX_LEN / 1e6:,.0f} M events/s)")
    report.add(f"  read_last: newest {LAST} of {READ_USERS} users, padded (B, {LAST})", "",
               f"{median(rates['last']):,.0f} users/s")
    return {"read_users_per_s": r, "read_over_python": over}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = bench_args(__doc__.splitlines()[0], argv)
    rounds = args.rounds or (2 if args.quick else 3)
    n_users = 1_000_000
    per_user = 3 if args.quick else 8
    n_full = 300 if args.quick else 1000
    compile_s, how = compile_first_calls()
    report = Report(f"streamrec bench sequence: SequenceStore, max_len {MAX_LEN:,}, 1 thread")
    fig = bench_append(n_users, per_user, rounds, report)
    fig.update(bench_read(n_full, args.rounds or 3, report))
    report.add("first calls of the kernels (not in any figure)", "", f"{compile_s:.2f} s: {how}")
    report.note(f"append: {rounds} rounds, each from an empty store and an empty dict; "
                + ("--quick: 3 events per user (8 without --quick)" if args.quick else "8 events per user"))
    report.note(f"read: histories of {n_full:,} users" + (" (--quick; 1,000 without)" if args.quick else "")
                + "; medians; ratios are medians of per-round ratios")
    report.print()
    result = {k: fig[k] for k in ("append_events_per_s", "append_over_python", "read_users_per_s",
                                  "read_over_python")}
    if args.json:
        emit_json(result)
    return result


if __name__ == "__main__":
    main()
