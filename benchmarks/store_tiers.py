"""Benchmark: a RAM tier over a disk tier, under a Zipf(1.0) key distribution.

A ``TieredTable`` holding N keys (dim 64 float32; N = 4 M, 1 M with
``--quick``) with a RAM tier of N/2 rows (LRU) over a file-backed disk tier in
the system's temporary directory; lookups are batches of 4096 keys drawn from
Zipf(1.0) over a random ranking of the keys (p(rank k) proportional to 1/k).
After a warm-up that lets hot rows move up, it reports:

- ``ram_hit_rate``: keys answered from RAM over keys found.
- ``tiered_over_ram``: the tiered table's ``find`` throughput (promotions
  included) over an all-RAM ``EmbeddingTable`` holding the same N keys, on the
  same batches, timed back to back.

How answers are verified (a wrong row fails the run with ``Wrong``): every
row inserted is ``key_values(key)`` (``_common``). Every warm-up batch's
output is compared in full, untimed; during timing every 8th call of each
table and the last call of each round are compared in full with the clock
stopped; after timing, every key of both tables is looked up and its row
compared, untimed (the tiered table from RAM and disk alike).

JSON keys: ``KEYS`` below (``ram_hit_rate``, ``tiered_over_ram``).

Run: ``python benchmarks/store_tiers.py [--smoke | --quick] [--json]`` or ``streamrec bench store_tiers``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    Report,
    bench_args,
    check_rows,
    console,
    finish,
    key_values,
    median,
    paired_rates,
    progress,
    ratio,
    size,
)
from store import fill, unique_keys

from streamrec import EmbeddingTable
from streamrec.store.tiers import TieredTable

DIM = 64
BATCH = 4096
KEYS = ("ram_hit_rate", "tiered_over_ram")


def zipf_batches(n: int, batches: int, seed: int) -> np.ndarray:
    """(batches, BATCH) ranks in [0, n) with p(k) proportional to 1/(k+1)."""
    cdf = np.cumsum(1.0 / np.arange(1, n + 1))
    cdf /= cdf[-1]
    rng = np.random.default_rng(seed)
    out = np.empty((batches, BATCH), np.int64)
    for lo in range(0, batches, 256):  # bounded temporaries
        hi = min(lo + 256, batches)
        out[lo:hi] = np.minimum(np.searchsorted(cdf, rng.random((hi - lo, BATCH))), n - 1)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = bench_args(__doc__.splitlines()[0], argv)
    rounds = args.rounds or size(args, 5, 3, 1)
    n = size(args, 4_000_000, 1_000_000, 40_000)
    min_seconds = size(args, 0.4, 0.4, 0.02)
    keys = unique_keys(n, seed=21)
    ranking = np.random.default_rng(4).permutation(n)  # rank -> key index
    warm = zipf_batches(n, size(args, 200, 200, 20), seed=1)
    # Enough fresh batches that the timed phase never repeats one (a repeated
    # batch would find its keys already promoted and flatter the hit rate).
    timed_batches = zipf_batches(n, size(args, 6000, 3000, 400), seed=2).astype(np.int32)
    disk = Path(tempfile.mkdtemp(prefix="streamrec-tier-"))
    try:
        tiered = TieredTable(DIM, n // 2, disk / "disk-tier", capacity=n // 2)
        with progress() as bar:
            task = bar.add_task(f"load {n:,} keys into the tiered table", total=n)
            for lo in range(0, n, BATCH):
                part = keys[lo:lo + BATCH]
                tiered.insert_or_assign(part, key_values(part, DIM))
                if (lo // BATCH) % 32 == 0:
                    bar.update(task, completed=lo + part.size)
        ram = EmbeddingTable(dim=DIM, capacity=n)
        fill(ram, keys, f"load {n:,} keys into the all-RAM table")
        out = np.empty((BATCH, DIM), np.float32)
        with progress() as bar:
            task = bar.add_task("warm-up (hot rows move to RAM), every batch verified", total=len(warm))
            for i, b in enumerate(warm):
                wk = keys[ranking[b]]
                tiered.find(wk, out)
                check_rows(f"tiered find, warm-up batch {i}", wk, out)
                bar.advance(task)
        before = tiered.stats()
        cyc = {"t": -1, "r": -1}
        last: dict[str, np.ndarray] = {}

        def run(name: str, table: Any) -> int:
            cyc[name] += 1
            if cyc[name] >= len(timed_batches):
                raise SystemExit("store_tiers: ran out of fresh batches; raise their number")
            last[name] = keys[ranking[timed_batches[cyc[name]]]]
            table.find(last[name], out)
            return BATCH

        rates = paired_rates({"tiered": lambda: run("t", tiered), "ram": lambda: run("r", ram)}, rounds,
                             min_seconds,
                             verify={"tiered": lambda: check_rows("tiered find", last["t"], out),
                                     "ram": lambda: check_rows("all-RAM find", last["r"], out)})
        after = tiered.stats()
        for lo in range(0, n, BATCH):  # untimed: every key of both tables, rows compared in full
            part = keys[lo:lo + BATCH]
            for name, table in (("tiered", tiered), ("all-RAM", ram)):
                got = np.empty((part.size, DIM), np.float32)
                table.find(part, got)
                check_rows(f"{name} find after timing", part, got)
        console.print(f"[dim]verified every key of both tables after timing ({n:,} each)[/dim]")
        tiered.close()
    finally:
        shutil.rmtree(disk, ignore_errors=True)
    ram_hits = after.ram_hits - before.ram_hits
    disk_hits = after.disk_hits - before.disk_hits
    hit_rate = ram_hits / max(1, ram_hits + disk_hits)
    fig = {"ram_hit_rate": hit_rate, "tiered_over_ram": ratio(rates["tiered"], rates["ram"])}
    rep = Report(f"streamrec bench store_tiers: {n:,} keys, RAM tier {n // 2:,} rows (LRU), Zipf(1.0)")
    rep.add("RAM hit rate (timed phase)", f"{hit_rate:.3f}",
            f"{ram_hits:,} RAM / {disk_hits:,} disk hits; {after.promoted - before.promoted:,} promoted")
    rep.add("tiered find / all-RAM find", f"{fig['tiered_over_ram']:.2f}",
            f"{median(rates['tiered']) / 1e6:.2f} vs {median(rates['ram']) / 1e6:.2f} M keys/s")
    rep.note(f"{rounds} rounds, medians; disk tier in {disk.parent}")
    rep.note("answers verified: every warm-up batch, every 8th timed call and each round's last, and every "
             "key of both tables after timing, all compared in full with the rows inserted")
    return finish(rep, fig, args.json)


if __name__ == "__main__":
    main()
