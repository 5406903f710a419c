"""Benchmark: the sequence store against plain Python: a dict of per-field deques.

What it measures (one thread, events of item uint64, action uint8, timestamp int64):
- ``append_events_per_s``: ``SequenceStore.append`` of a stream of events for
  1,000,000 distinct users (each user the same number of events, the stream
  shuffled, cut into batches of 4096), from an empty store: index growth and
  ring growth through the size classes included. The store's memory is fresh
  each round (the kernel zeroes every page) but the machine has backed it once
  before: a first, untimed fill of cold memory is printed beside it.
- ``append_over_python``: against a dict of user -> three
  ``deque(maxlen=max_len)``, one per field (item, action, timestamp), fed the
  same batches (``tolist()`` of the batch's arrays, one Python loop over its
  events appending to each field's deque), also from empty.
- ``read_users_per_s``: ``SequenceStore.read`` of 100 random users per call, out
  of users holding full 10,000-event histories (their rings wrapped), as ragged
  arrays (offsets and one flat array per field).
- ``read_over_python``: against the same histories in the per-field deques,
  turned into the same ragged arrays: each field's deque of every user read
  with ``np.fromiter(deque, dtype, count=len)`` and the users' arrays
  concatenated (the faster of ``np.fromiter`` and ``np.array`` here, checked
  each run and printed).

How answers are verified (a wrong answer fails the run with ``Wrong``): a
reference built straight from the event arrays (each user's events in stream
order, the newest ``max_len`` kept) holds what every read must return. Before
and after timing, every pre-drawn query is answered by the store (``read`` and
``read_last``) and by the deques and compared in full with the reference,
untimed; during timing every 8th call of each path and each round's last are
compared the same way with the clock stopped. After each timed append round,
untimed, ``length`` of every user must equal its events (capped at
``max_len``) in both the store and the deques, and the store's newest events of
a sample of 1,000 users must match the reference.

Also printed: ``read_last`` of the newest 512 events of 100 users, the store's
bytes per event held, and the first calls of the kernels (compile, or numba's
on-disk cache), which no figure includes.

JSON keys: ``KEYS`` below.

Ratios are medians of per-round ratios between paths timed back to back.
Run: ``python benchmarks/sequence.py [--smoke | --quick] [--json]`` or ``streamrec bench sequence``.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Report,
    Wrong,
    bench_args,
    console,
    emit_json,
    median,
    paired_rates,
    progress,
    ratio,
    size,
)

from streamrec.store import _sequence_kernels
from streamrec.store.sequence import SequenceStore

MAX_LEN = 10_000
BATCH = 4096
READ_USERS = 100  # users per read call
LAST = 512  # events per user of the read_last figure
FIELDS = ("item", "action", "timestamp")
DTYPES = (np.uint64, np.uint8, np.int64)
KEYS = ("append_events_per_s", "append_over_python", "read_users_per_s", "read_over_python",
        "python_read_with")

Events = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Deques = dict[int, tuple[deque, deque, deque]]
Ragged = tuple[np.ndarray, dict[str, np.ndarray]]
Reference = dict[int, tuple[np.ndarray, ...]]


def compile_first_calls() -> tuple[float, str]:
    """Time the first call of every kernel the benchmark uses, on a tiny store (index growth too)."""
    # Every dispatcher of the kernel module, whatever its names: a fixed list of names
    # is what broke this benchmark once (a kernel renamed by a refactor).
    kernels = [k for k in vars(_sequence_kernels).values()
               if hasattr(getattr(k, "stats", None), "cache_hits")]
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


def reference(ev: Events) -> dict[int, tuple[np.ndarray, ...]]:
    """user -> (items, actions, stamps): its events in stream order, the newest MAX_LEN kept."""
    order = np.argsort(ev[0], kind="stable")  # each user's events, in stream order
    bounds = np.flatnonzero(np.diff(ev[0][order])) + 1
    ref: Reference = {}
    for run in np.split(order, bounds):
        run = run[-MAX_LEN:]
        ref[int(ev[0][run[0]])] = (ev[1][run], ev[2][run], ev[3][run])
    return ref


def expected_read(ref: dict[int, tuple[np.ndarray, ...]], users: np.ndarray) -> Ragged:
    lens = np.array([0] + [ref[u][0].size for u in users.tolist()], dtype=np.int64)
    cols = {f: np.concatenate([ref[u][j] for u in users.tolist()]) for j, f in enumerate(FIELDS)}
    return np.cumsum(lens), cols


def check_ragged(what: str, got: Ragged, want: Ragged) -> None:
    if not np.array_equal(got[0], want[0]):
        raise Wrong(f"{what}: offsets differ from the reference")
    for f in FIELDS:
        if got[1][f].dtype != want[1][f].dtype or not np.array_equal(got[1][f], want[1][f]):
            raise Wrong(f"{what}: field {f!r} differs from the reference")


def check_last(what: str, got: Ragged, ref: dict[int, tuple[np.ndarray, ...]], users: np.ndarray,
               n: int) -> None:
    lengths, cols = got
    for i, u in enumerate(users.tolist()):
        want = ref[u]
        m = min(n, want[0].size)
        if lengths[i] != m:
            raise Wrong(f"{what}: user {u}: {lengths[i]} events, want {m}")
        for j, f in enumerate(FIELDS):
            row = cols[f][i]
            if not np.array_equal(row[n - m:], want[j][want[j].size - m:]) or row[: n - m].any():
                raise Wrong(f"{what}: user {u}: field {f!r} differs from the reference")


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


def python_fill(chunks: list[Events], label: str) -> tuple[float, Deques]:
    d: Deques = {}
    n = sum(c[0].size for c in chunks)
    with progress() as bar:
        task = bar.add_task(label, total=n)
        done = 0
        t0 = time.perf_counter()
        for k, (u, it, ac, ts) in enumerate(chunks):
            for user, item, action, stamp in zip(u.tolist(), it.tolist(), ac.tolist(), ts.tolist(),
                                                 strict=True):
                q = d.get(user)
                if q is None:
                    q = d[user] = (deque(maxlen=MAX_LEN), deque(maxlen=MAX_LEN), deque(maxlen=MAX_LEN))
                q[0].append(item)
                q[1].append(action)
                q[2].append(stamp)
            done += u.size
            if k % 64 == 0:
                bar.update(task, completed=done)
        dt = time.perf_counter() - t0
    return n / dt, d


def python_read_fromiter(d: Deques, users: np.ndarray) -> Ragged:
    """What ``SequenceStore.read`` returns, from the per-field deques, with ``np.fromiter``."""
    lens = [0]
    parts: tuple[list[np.ndarray], ...] = ([], [], [])
    for u in users.tolist():
        q = d.get(u)
        n = len(q[0]) if q else 0
        lens.append(n)
        if q:
            for j in range(3):
                parts[j].append(np.fromiter(q[j], DTYPES[j], n))
    return np.cumsum(np.array(lens, dtype=np.int64)), {
        f: np.concatenate(parts[j] or [np.empty(0, DTYPES[j])]) for j, f in enumerate(FIELDS)}


def python_read_array(d: Deques, users: np.ndarray) -> Ragged:
    """The same with ``np.array(deque, dtype)``."""
    lens = [0]
    parts: tuple[list[np.ndarray], ...] = ([], [], [])
    for u in users.tolist():
        q = d.get(u)
        lens.append(len(q[0]) if q else 0)
        if q:
            for j in range(3):
                parts[j].append(np.array(q[j], dtype=DTYPES[j]))
    return np.cumsum(np.array(lens, dtype=np.int64)), {
        f: np.concatenate(parts[j] or [np.empty(0, DTYPES[j])]) for j, f in enumerate(FIELDS)}


def check_lengths(ev: Events, s: SequenceStore, d: Deques, ref: dict[int, tuple[np.ndarray, ...]],
                  rng: np.random.Generator) -> None:
    """Untimed, after an append round: every user's length in both, and a sample's newest events."""
    ids = np.fromiter(ref.keys(), np.uint64, len(ref))
    want = np.fromiter((v[0].size for v in ref.values()), np.int64, len(ref))
    if not np.array_equal(s.length(ids), want):
        raise Wrong("append: the store's lengths differ from the events appended")
    if [len(d[u][0]) for u in ids.tolist()] != want.tolist():
        raise Wrong("append: the deques' lengths differ from the events appended")
    sample = ids[rng.integers(0, ids.size, min(1000, ids.size))]
    check_last("append: the store's newest events", s.read_last(sample, 8), ref, sample, 8)


def bench_append(n_users: int, per_user: int, rounds: int, report: Report) -> dict[str, float]:
    _, ev = event_stream(n_users, per_user, seed=1)
    chunks = batches(ev)
    ref = reference(ev)
    rng = np.random.default_rng(5)
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
        rate, d = python_fill(chunks, f"round {r + 1}/{rounds}: dict of per-field deques, {n:,} events")
        py_rates.append(rate)
        check_lengths(ev, s, d, ref, rng)
        del s, d
    a = median(store_rates)
    over = ratio(store_rates, py_rates)
    report.add(f"append: {n_users:,} users x {per_user} events, batches of {BATCH}",
               f"{over:.1f}x", f"{a / 1e6:.2f} vs {median(py_rates) / 1e6:.3f} M events/s")
    report.add("  the same, first fill of cold memory (not in the figure)", "",
               f"{cold / 1e6:.2f} M events/s")
    report.add("  store memory per event held (index, user rows, rings)", "",
               f"{bytes_per_event:.1f} bytes (17 bytes of fields)")
    return {"append_events_per_s": a, "append_over_python": over}


def bench_read(n_full: int, rounds: int, min_seconds: float, n_queries: int,
               report: Report) -> dict[str, Any]:
    per_user = MAX_LEN + MAX_LEN // 20  # every ring has wrapped
    ids, ev = event_stream(n_full, per_user, seed=2)
    _, s = store_fill(batches(ev), f"fill {n_full:,} users x {per_user:,} events (store)")
    console.print(f"[dim]building the reference and the deques of {n_full:,} full histories…[/dim]")
    ref = reference(ev)
    d: Deques = {u: tuple(deque(col.tolist(), maxlen=MAX_LEN) for col in cols)  # type: ignore[misc]
                 for u, cols in ref.items()}
    rng = np.random.default_rng(3)
    queries = [ids[rng.integers(0, n_full, READ_USERS)] for _ in range(n_queries)]
    wants = [expected_read(ref, q) for q in queries]

    # The baseline reads with whichever of np.fromiter and np.array is faster here.
    speed = paired_rates({"fromiter": lambda: (python_read_fromiter(d, queries[0]), READ_USERS)[1],
                          "array": lambda: (python_read_array(d, queries[0]), READ_USERS)[1]},
                         1, min_seconds)
    with_ = "fromiter" if median(speed["fromiter"]) >= median(speed["array"]) else "array"
    python_read = python_read_fromiter if with_ == "fromiter" else python_read_array

    cyc = {"s": 0, "p": 0, "l": 0}
    last: dict[str, Ragged] = {}

    def nxt(name: str) -> np.ndarray:
        cyc[name] = (cyc[name] + 1) % len(queries)
        return queries[cyc[name]]

    def store_read() -> int:
        last["s"] = s.read(nxt("s"))
        return READ_USERS

    def dict_read() -> int:
        last["p"] = python_read(d, nxt("p"))
        return READ_USERS

    def store_last() -> int:
        last["l"] = s.read_last(nxt("l"), LAST)
        return READ_USERS

    paths = {"read": store_read, "python": dict_read, "last": store_last}
    verify = {
        "read": lambda: check_ragged(f"store read, query {cyc['s']}", last["s"], wants[cyc["s"]]),
        "python": lambda: check_ragged(f"deques read, query {cyc['p']}", last["p"], wants[cyc["p"]]),
        "last": lambda: check_last(f"store read_last, query {cyc['l']}", last["l"], ref,
                                   queries[cyc["l"]], LAST),
    }

    def verify_all(when: str) -> None:
        for name, fn in paths.items():
            for _ in queries:
                fn()
                verify[name]()
        console.print(f"[dim]verified every query of every path {when} timing[/dim]")

    verify_all("before")
    rates = paired_rates(paths, rounds, min_seconds, verify=verify)
    verify_all("after")
    r = median(rates["read"])
    over = ratio(rates["read"], rates["python"])
    report.add(f"read: {READ_USERS} users x {MAX_LEN:,} events, ragged arrays", f"{over:.1f}x",
               f"{r:,.0f} vs {median(rates['python']):,.0f} users/s "
               f"({r * MAX_LEN / 1e6:,.0f} M events/s)")
    report.add(f"  baseline read with np.{with_} (np.fromiter {median(speed['fromiter']):,.0f}, "
               f"np.array {median(speed['array']):,.0f} users/s)", "", "")
    report.add(f"  read_last: newest {LAST} of {READ_USERS} users, padded (B, {LAST})", "",
               f"{median(rates['last']):,.0f} users/s")
    return {"read_users_per_s": r, "read_over_python": over, "python_read_with": f"np.{with_}"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = bench_args(__doc__.splitlines()[0], argv)
    rounds = args.rounds or size(args, 3, 2, 1)
    n_users = size(args, 1_000_000, 1_000_000, 20_000)
    per_user = size(args, 8, 3, 3)
    n_full = size(args, 1000, 300, 20)
    min_seconds = size(args, 0.4, 0.4, 0.02)
    compile_s, how = compile_first_calls()
    report = Report(f"streamrec bench sequence: SequenceStore, max_len {MAX_LEN:,}, 1 thread")
    fig: dict[str, Any] = dict(bench_append(n_users, per_user, rounds, report))
    # --smoke: 4 pre-drawn queries, since the deques' read of each takes ~0.2 s and every
    # query of every path is verified twice.
    fig.update(bench_read(n_full, args.rounds or size(args, 3, 3, 1), min_seconds, size(args, 64, 64, 4),
                          report))
    report.add("first calls of the kernels (not in any figure)", "", f"{compile_s:.2f} s: {how}")
    report.note(f"append: {rounds} rounds, each from an empty store and an empty dict; "
                f"{n_users:,} users x {per_user} events")
    report.note(f"read: histories of {n_full:,} users; medians; ratios are medians of per-round ratios")
    report.note("answers verified: every query before and after timing, every 8th timed call and each "
                "round's last, against a reference built from the event arrays; lengths after each append")
    report.print()
    result = {k: fig[k] for k in KEYS}
    if args.json:
        emit_json(result)
    return result


if __name__ == "__main__":
    main()
