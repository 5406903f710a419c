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

Run: ``python benchmarks/store_tiers.py [--quick] [--json]`` or ``streamrec bench store_tiers``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Report, bench_args, finish, median, paired_rates, progress, ratio
from store import fill, unique_keys

from streamrec import EmbeddingTable
from streamrec.store.tiers import TieredTable

DIM = 64
BATCH = 4096


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
    rounds = args.rounds or (3 if args.quick else 5)
    n = 1_000_000 if args.quick else 4_000_000
    keys = unique_keys(n, seed=21)
    ranking = np.random.default_rng(4).permutation(n)  # rank -> key index
    warm = zipf_batches(n, 200, seed=1)
    # Enough fresh batches that the timed phase never repeats one (a repeated
    # batch would find its keys already promoted and flatter the hit rate).
    timed_batches = zipf_batches(n, 3000 if args.quick else 6000, seed=2).astype(np.int32)
    disk = Path(tempfile.mkdtemp(prefix="streamrec-tier-"))
    try:
        tiered = TieredTable(DIM, n // 2, disk / "disk-tier", capacity=n // 2)
        zeros = np.zeros((BATCH, DIM), np.float32)
        with progress() as bar:
            task = bar.add_task(f"load {n:,} keys into the tiered table", total=n)
            for lo in range(0, n, BATCH):
                part = keys[lo:lo + BATCH]
                tiered.insert_or_assign(part, zeros[: part.size])
                if (lo // BATCH) % 32 == 0:
                    bar.update(task, completed=lo + part.size)
        ram = EmbeddingTable(dim=DIM, capacity=n)
        fill(ram, keys, f"load {n:,} keys into the all-RAM table")
        with progress() as bar:
            task = bar.add_task("warm-up (hot rows move to RAM)", total=len(warm))
            for b in warm:
                tiered.find(keys[ranking[b]])
                bar.advance(task)
        before = tiered.stats()
        out = np.empty((BATCH, DIM), np.float32)
        cyc = {"t": -1, "r": -1}

        def run(name: str, table: Any) -> int:
            cyc[name] += 1
            if cyc[name] >= len(timed_batches):
                raise SystemExit("store_tiers: ran out of fresh batches; raise their number")
            table.find(keys[ranking[timed_batches[cyc[name]]]], out)
            return BATCH

        rates = paired_rates({"tiered": lambda: run("t", tiered), "ram": lambda: run("r", ram)}, rounds)
        after = tiered.stats()
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
    return finish(rep, fig, args.json)


if __name__ == "__main__":
    main()
