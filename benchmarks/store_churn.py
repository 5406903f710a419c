"""Benchmark: arena waste and lookup speed of a table under heavy churn.

Fill a table (dim 64 float32; 5 M rows, 1 M with ``--quick``), then run rounds
that erase a random 30 % of the keys and insert as many new ones; a last round
erases 30 % more without replacing them (a shrinking table leaves holes that
inserts cannot fill). Then ``compact()``.

Figures (JSON keys):
- ``wasted_fraction``: holes over rows up to the arena's high-water mark, after
  compaction (the seed's target: memory waste <= 5 %). The waste before
  compaction is printed beside it.
- ``find_after_over_before``: ``find`` throughput (batches of 4096 random
  present keys) after churn and compaction, over the same on the freshly filled
  table (target >= 0.9). Each is the median of several rounds.

How answers are verified (a wrong row fails the run with ``Wrong``): every
row inserted is ``key_values(key)`` (``_common``). Before each timed find
figure, every live key is looked up and its row compared in full, untimed; the
same after it, together with a lookup of every erased key, which must be
absent. During timing every 8th call and each round's last are compared in
full with the clock stopped.

JSON keys: ``KEYS`` below (``wasted_fraction``, ``find_after_over_before``).

Run: ``python benchmarks/store_churn.py [--smoke | --quick] [--json]`` or ``streamrec bench store_churn``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Report,
    Wrong,
    bench_args,
    check_rows,
    console,
    finish,
    key_values,
    median,
    paired_rates,
    progress,
    size,
)
from store import fill, unique_keys

from streamrec import EmbeddingTable

DIM = 64
BATCH = 4096
KEYS = ("wasted_fraction", "find_after_over_before")


def verify_table(table: EmbeddingTable, live: np.ndarray, gone: np.ndarray, when: str) -> None:
    """Untimed: every live key's row compared in full, and every erased key absent."""
    out = np.empty((BATCH, DIM), np.float32)
    for lo in range(0, live.size, BATCH):
        part = live[lo:lo + BATCH]
        table.find(part, out[: part.size])
        check_rows(f"find {when}", part, out[: part.size])
    for lo in range(0, gone.size, 65536):
        if table.contains(gone[lo:lo + 65536]).any():
            raise Wrong(f"{when}: an erased key is still found")
    console.print(f"[dim]verified {live.size:,} live and {gone.size:,} erased keys {when}[/dim]")


def find_rate(table: EmbeddingTable, keys: np.ndarray, rounds: int, min_seconds: float) -> float:
    rng = np.random.default_rng(11)
    batches = [keys[rng.integers(0, keys.size, BATCH)] for _ in range(64)]
    out = np.empty((BATCH, DIM), np.float32)
    i = [0]

    def one() -> int:
        i[0] = (i[0] + 1) % len(batches)
        table.find(batches[i[0]], out)
        return BATCH

    def verify() -> None:
        check_rows(f"find, batch {i[0]}", batches[i[0]], out)

    return median(paired_rates({"find": one}, rounds, min_seconds, verify={"find": verify})["find"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = bench_args(__doc__.splitlines()[0], argv)
    rounds = args.rounds or size(args, 5, 3, 1)
    n = size(args, 5_000_000, 1_000_000, 50_000)
    churn_rounds = size(args, 5, 3, 2)
    min_seconds = size(args, 0.4, 0.4, 0.02)
    rng = np.random.default_rng(5)
    pool = unique_keys(n * (churn_rounds + 2), seed=99)
    live = pool[:n].copy()
    fresh = n
    table = EmbeddingTable(dim=DIM, capacity=n)
    fill(table, live, f"fill {n:,} keys")
    verify_table(table, live, live[:0], "before churn")
    before = find_rate(table, live, rounds, min_seconds)
    erased = []

    t0 = time.perf_counter()
    churned = 0
    with progress() as bar:
        task = bar.add_task("churn rounds", total=churn_rounds + 1)
        for r in range(churn_rounds + 1):
            k = int(0.3 * live.size)
            pick = rng.choice(live.size, k, replace=False)
            gone = live[pick]
            erased.append(gone)
            for lo in range(0, k, 65536):
                table.erase(gone[lo:lo + 65536])
            keep = np.ones(live.size, bool)
            keep[pick] = False
            live = live[keep]
            churned += k
            if r < churn_rounds:  # the last round only shrinks
                new = pool[fresh:fresh + k]
                fresh += k
                for lo in range(0, k, 65536):
                    part = new[lo:lo + 65536]
                    table.insert_or_assign(part, key_values(part, DIM))
                live = np.concatenate([live, new])
            bar.update(task, advance=1)
    churn_s = time.perf_counter() - t0
    wasted_before = table.stats().wasted_fraction
    mem_before = table.memory_bytes
    t0 = time.perf_counter()
    moved = table.compact()
    compact_s = time.perf_counter() - t0
    st = table.stats()
    verify_table(table, live, np.concatenate(erased), "after churn and compaction")
    after = find_rate(table, live, rounds, min_seconds)
    verify_table(table, live, live[:0], "after timing")

    fig = {"wasted_fraction": st.wasted_fraction, "find_after_over_before": after / before}
    rep = Report(f"streamrec bench store_churn: {n:,} rows, dim 64, {churn_rounds} rounds of "
                 "30 % erase + insert, then 30 % erase")
    rep.add("arena waste after compaction", f"{st.wasted_fraction:.4f}",
            f"before compaction {wasted_before:.3f}; {moved:,} rows moved in {compact_s:.2f} s", "<= 0.05")
    rep.add("find after churn / before", f"{after / before:.2f}",
            f"{after / 1e6:.2f} vs {before / 1e6:.2f} M keys/s", ">= 0.9")
    rep.add("memory", f"{table.memory_bytes / mem_before:.2f} of before compaction",
            f"{table.memory_bytes / 2**20:,.0f} MiB for {len(table):,} keys")
    rep.note(f"churn: {churned:,} keys erased in {churn_s:.1f} s; {rounds} timed rounds per find figure")
    return finish(rep, fig, args.json)


if __name__ == "__main__":
    main()
