"""Benchmark: the embedding table against memory speed, a Python dict, and Redis.

What it measures (one thread, dim 64 float32, batches of 4096 random keys):
- ``find_keys_per_s``: ``EmbeddingTable.find`` with every key present.
- ``gather_ceiling_keys_per_s``: a numba kernel (with the same prefetching)
  gathering as many random rows of the same size from the table's own row
  arena, without the index: the memory-speed limit of this machine, same run,
  same pages.
- ``find_over_dict``: against a dict of key -> row number plus numpy fancy
  indexing into a (N, 64) array (what a team writes first).
- ``find_over_redis``: against ``MGET`` of 4096 keys through redis-py with
  hiredis, on a local redis-server, values parsed into a (4096, 64) array.
  Key names are encoded before the clock starts, which favours Redis.
- ``insert_keys_per_s``: filling the table from empty in batches of 4096,
  index growth included, into memory the machine already backs (a second fill
  after dropping a first table). Printed beside it: the first fill of cold
  memory (in this VM huge-page first touch costs about 2 s/GiB) and the steady
  state (re-inserting 10 % erased keys: no growth, no page faults).
- ``max_load_factor``: the lowest load factor at which a full index forced a
  growth, over growths of tables with at least 2**14 buckets.
- ``overhead_fraction``: index and row bytes beyond key + value, over key + value.
- ``compile_s``: first calls of every kernel used (numba compile, or loading the
  on-disk cache when it is warm; the report says which).

- ``gather_huge_over_4k``: the ceiling's gather over the table's arena (2 MiB
  pages asked for with ``MADV_HUGEPAGE``) over the same gather from a copy of
  the same rows in a plain numpy array (4 KiB pages where transparent huge
  pages are in ``madvise`` mode; ``thp_mode`` says which mode the run had), at
  the first size only.

How answers are verified (a wrong row fails the run with ``Wrong``): every row
inserted is ``key_values(key)`` (``_common``: a pure function of the key whose
first four elements hold all 64 bits of it). Before timing and again after it,
every pre-drawn batch of every path is run once more, untimed, and its whole
output compared with ``key_values`` of its keys (zeros for absent keys; the
ceiling gathers against the arena's own rows). During timing, every 8th call of
each path and the last call of each round are checked the same way, with the
clock stopped (``_common.paired_rates``). Fill and steady-state inserts time
only ``insert_or_assign``; computing the rows is outside the clock.

Ratios are medians of per-round ratios between paths timed back to back.
Run: ``python benchmarks/store.py [--smoke | --quick] [--json]`` or ``streamrec bench store``.
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
    ratio,
    redis_server,
    size,
)

from streamrec import EmbeddingTable
from streamrec.store import _ops, _write
from streamrec.store._jit import kernel, prefetch2_nta

DIM = 64
BATCH = 4096
N_BATCHES = 64  # distinct pre-drawn batches, cycled
CEILING_AHEAD = 16
KEYS = ("find_keys_per_s", "gather_ceiling_keys_per_s", "find_over_ceiling", "find_over_dict",
        "find_over_redis", "insert_keys_per_s", "max_load_factor", "overhead_fraction",
        "gather_huge_over_4k", "thp_mode", "compile_s")


@kernel
def gather_rows(src: np.ndarray, rows: np.ndarray, out: np.ndarray, ahead: int, voff: int) -> int:
    """out[i] = src[rows[i], voff:voff+D], prefetching the row ``ahead`` places on.

    The memory-speed ceiling: the same non-temporal prefetch as the table's own
    lookups, at the distance that measured fastest for a plain gather (16).
    """
    n = rows.shape[0]
    dim = out.shape[1]
    lines = (src.shape[1] * src.itemsize + 63) // 64
    step = 64 // src.itemsize
    for i in range(n):
        if i + ahead < n:
            r = rows[i + ahead]
            for ln in range(lines):
                prefetch2_nta(src, r, ln * step)
        s = src[rows[i], voff:]
        for d in range(dim):
            out[i, d] = s[d]
    return n


def unique_keys(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, 2**64 - 1, int(n * 1.02) + 16, dtype=np.uint64, endpoint=True))
    while keys.size < n:
        more = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
        keys = np.unique(np.concatenate([keys, more]))
    keys = keys[:n]
    rng.shuffle(keys)
    return keys


def compile_first_calls() -> tuple[float, str]:
    """Time the first call of every kernel this benchmark uses, on a tiny table."""
    t0 = time.perf_counter()
    t = EmbeddingTable(dim=DIM, capacity=16, huge_pages=False)
    k = np.arange(64, dtype=np.uint64)
    t.insert_or_assign(k, np.zeros((64, DIM), np.float32))
    t.find(k)
    t.contains(k)
    t.find_or_insert(k + 1000)
    t.erase(k[:8])
    gather_rows(t._arenav, np.arange(8, dtype=np.int64), np.empty((8, DIM), np.float32), 8, 4)
    elapsed = time.perf_counter() - t0
    hits = sum(sum(f.stats.cache_hits.values()) for f in (_ops.find_batch, _write.write_batch))
    return elapsed, "loaded from numba's on-disk cache" if hits else "compiled (cold cache)"


def fill(table: Any, keys: np.ndarray, label: str) -> float:
    """Insert ``keys`` with their ``key_values`` rows in batches of BATCH; returns keys/s.

    Only ``insert_or_assign`` is timed (growth included); the rows are computed outside the clock.
    """
    n = keys.size
    spent = 0.0
    with progress() as bar:
        task = bar.add_task(label, total=n)
        for lo in range(0, n, BATCH):
            part = keys[lo:lo + BATCH]
            vals = key_values(part, table.dim, table.dtype)
            t0 = time.perf_counter()
            table.insert_or_assign(part, vals)
            spent += time.perf_counter() - t0
            if (lo // BATCH) % 64 == 0:
                bar.update(task, completed=lo + part.size)
    return n / spent


def thp_mode() -> str:
    """The transparent-huge-page mode in force (``madvise``, ``always``, ``never``), or ``unknown``."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    start = text.find("[")
    return text[start + 1:text.find("]")] if start >= 0 else "unknown"


def run_size(n: int, quick: bool, rounds: int, with_redis: bool, report: Report,
             min_seconds: float = 0.4) -> dict[str, Any]:
    keys = unique_keys(n + n // 10, seed=n)
    absent = keys[n:]
    keys = keys[:n]
    rng = np.random.default_rng(7)
    present_idx = [rng.integers(0, n, BATCH) for _ in range(N_BATCHES)]
    batches = [keys[ix] for ix in present_idx]
    mixed, mixed_present = [], []
    for ix in present_idx:
        b = keys[ix].copy()
        b[: BATCH // 10] = absent[rng.integers(0, absent.size, BATCH // 10)]
        rng.shuffle(b)
        mixed.append(b)
        mixed_present.append(~np.isin(b, absent))

    # The first fill of fresh memory in this VM pays the host for every page it
    # backs (about 2 s/GiB with huge pages); a table refilled after a restart on a
    # warm machine does not. Fill once cold, drop it, and time a second fill.
    cold = EmbeddingTable(dim=DIM, capacity=1024)
    cold_rate = fill(cold, keys, f"fill {n:,} keys (cold memory)")
    del cold
    table = EmbeddingTable(dim=DIM, capacity=1024)
    fill_rate = fill(table, keys, f"fill {n:,} keys (warm memory)")
    st = table.stats()
    big = [lf for lf, b in zip(st.grow_load_factors, _grow_buckets(1024, st.index_grows), strict=True)
           if b >= 2**14]
    max_lf = min(big) if big else None  # None: no growth of a table that big (--smoke)
    overhead = table.memory_bytes / (n * (8 + DIM * 4)) - 1

    # steady-state insert: erase 10 % and put them back (no growth, same table)
    redo = keys[: max(1, n // 10)]
    table.erase(redo)
    redo_vals = key_values(redo, DIM)
    t0 = time.perf_counter()
    for lo in range(0, redo.size, BATCH):
        table.insert_or_assign(redo[lo:lo + BATCH], redo_vals[lo:lo + BATCH])
    steady_insert = redo.size / (time.perf_counter() - t0)
    del redo_vals

    # dict + numpy baseline over the same rows
    console.print(f"[dim]building the dict baseline over {n:,} keys…[/dim]")
    d = dict(zip(keys.tolist(), range(n), strict=True))
    values = key_values(keys, DIM)

    out = np.empty((BATCH, DIM), np.float32)
    arena = table._arenav
    voff = table._layout.voff
    # The ceiling gathers random rows of the arena itself; the 4 KiB-page ceiling the
    # same rows from a plain numpy copy (no MADV_HUGEPAGE), at the first size only
    # (a second copy of 20 M rows would not fit beside the rest in 24 GiB).
    row_of = [rng.integers(0, n, BATCH) for _ in range(N_BATCHES)]
    plain = np.empty((n if with_redis else 0, arena.shape[1]), arena.dtype)
    plain[:] = arena[:plain.shape[0]]
    cyc = {"f": 0, "m": 0, "c": 0, "c4": 0, "d": 0, "dm": 0, "r": 0}

    def nxt(name: str) -> int:
        cyc[name] = (cyc[name] + 1) % N_BATCHES
        return cyc[name]

    def find_present() -> int:
        table.find(batches[nxt("f")], out)
        return BATCH

    def find_mixed() -> int:
        table.find(mixed[nxt("m")], out)
        return BATCH

    def ceiling() -> int:
        return int(gather_rows(arena, row_of[nxt("c")], out, CEILING_AHEAD, voff))

    def ceiling_4k() -> int:
        return int(gather_rows(plain, row_of[nxt("c4")], out, CEILING_AHEAD, voff))

    def dict_present() -> int:
        b = batches[nxt("d")]
        rows = np.fromiter(map(d.__getitem__, b.tolist()), dtype=np.int64, count=b.size)
        out[:] = values[rows]
        return BATCH

    def dict_mixed() -> int:
        b = mixed[nxt("dm")]
        rows = np.fromiter(map(d.get, b.tolist(), [-1] * b.size), dtype=np.int64, count=b.size)
        hit = rows >= 0
        out[hit] = values[rows[hit]]
        out[~hit] = 0
        return BATCH

    def gathered(name: str, src: np.ndarray) -> None:
        want = src[row_of[cyc[name]], voff:voff + DIM]
        if not np.array_equal(out, want):
            raise Wrong(f"{name}: batch {cyc[name]}: the gather returned other rows than the arena's")

    verify: dict[str, Any] = {
        "find": lambda: check_rows(f"find, batch {cyc['f']}", batches[cyc["f"]], out),
        "find_mixed": lambda: check_rows(f"find 10% absent, batch {cyc['m']}", mixed[cyc["m"]], out,
                                         mixed_present[cyc["m"]]),
        "dict": lambda: check_rows(f"dict, batch {cyc['d']}", batches[cyc["d"]], out),
        "dict_mixed": lambda: check_rows(f"dict 10% absent, batch {cyc['dm']}", mixed[cyc["dm"]], out,
                                         mixed_present[cyc["dm"]]),
        "ceiling": lambda: gathered("c", arena),
        "ceiling_4k": lambda: gathered("c4", plain),
    }
    paths = {"find": find_present, "ceiling": ceiling, "dict": dict_present,
             "find_mixed": find_mixed, "dict_mixed": dict_mixed}
    if plain.shape[0]:
        paths["ceiling_4k"] = ceiling_4k

    def verify_all(when: str) -> None:
        """Every pre-drawn batch of every path, run and checked in full, untimed."""
        for name, fn in paths.items():
            for _ in range(N_BATCHES):
                fn()
                verify[name]()
        console.print(f"[dim]verified every batch of every path {when} timing[/dim]")

    redis_note = ""
    with redis_server() as srv:
        client = None
        if isinstance(srv, str) or not with_redis:
            redis_note = srv if isinstance(srv, str) else "Redis measured at the first size only"
        else:
            import redis as redis_py

            client = redis_py.Redis(host=srv[0], port=srv[1])
            n_redis = min(n, 1_000_000 if quick else n)
            names = [f"k{k}".encode() for k in keys[:n_redis].tolist()]
            raw = values[:n_redis]
            with progress() as bar:
                task = bar.add_task(f"load {n_redis:,} rows into redis", total=n_redis)
                for lo in range(0, n_redis, 5000):
                    hi = min(lo + 5000, n_redis)
                    pipe = client.pipeline(transaction=False)
                    pipe.mset({names[j]: raw[j].tobytes() for j in range(lo, hi)})
                    pipe.execute()
                    bar.update(task, completed=hi)
            ridx = [np.random.default_rng(i).integers(0, n_redis, BATCH) for i in range(N_BATCHES)]
            rnames = [[names[j] for j in ix.tolist()] for ix in ridx]
            rkeys = [keys[ix] for ix in ridx]

            def redis_mget() -> int:
                got: list[bytes] = client.mget(rnames[nxt("r")])  # type: ignore[assignment]
                out[:] = np.frombuffer(b"".join(got), dtype=np.float32).reshape(BATCH, DIM)
                return BATCH

            paths["redis"] = redis_mget
            verify["redis"] = lambda: check_rows(f"redis MGET, batch {cyc['r']}", rkeys[cyc["r"]], out)
            redis_note = f"Redis holds {n_redis:,} of the rows (MGET speed does not depend on the total)"
        verify_all("before")
        rates = paired_rates(paths, rounds, min_seconds, verify=verify)
        verify_all("after")
        if client is not None:
            client.close()

    f = median(rates["find"])
    fig: dict[str, Any] = {
        "find_keys_per_s": f,
        "gather_ceiling_keys_per_s": median(rates["ceiling"]),
        "find_over_ceiling": ratio(rates["find"], rates["ceiling"]),
        "find_over_dict": ratio(rates["find"], rates["dict"]),
        "find_over_redis": ratio(rates["find"], rates["redis"]) if "redis" in rates else None,
        "insert_keys_per_s": fill_rate,
        "max_load_factor": max_lf,
        "overhead_fraction": overhead,
        "gather_huge_over_4k": (ratio(rates["ceiling"], rates["ceiling_4k"]) if "ceiling_4k" in rates
                                else None),
    }
    m = f"{n / 1e6:g}M"
    report.add(f"find / memory ceiling ({m})", f"{fig['find_over_ceiling']:.2f}",
               f"{f / 1e6:.2f} vs {fig['gather_ceiling_keys_per_s'] / 1e6:.2f} M keys/s", ">= 0.5")
    report.add(f"find / dict+numpy ({m})", f"{fig['find_over_dict']:.1f}x",
               f"{f / 1e6:.2f} vs {median(rates['dict']) / 1e6:.2f} M keys/s", ">= 10x")
    report.add(f"find / dict+numpy, 10% absent ({m})",
               f"{ratio(rates['find_mixed'], rates['dict_mixed']):.1f}x",
               f"{median(rates['find_mixed']) / 1e6:.2f} vs {median(rates['dict_mixed']) / 1e6:.2f} M keys/s")
    if "redis" in rates:
        report.add(f"find / Redis MGET ({m})", f"{fig['find_over_redis']:.1f}x",
                   f"{f / 1e6:.2f} vs {median(rates['redis']) / 1e6:.3f} M keys/s", ">= 20x")
    if "ceiling_4k" in rates:
        report.add(f"gather: huge pages / 4 KiB pages ({m})", f"{fig['gather_huge_over_4k']:.2f}x",
                   f"{fig['gather_ceiling_keys_per_s'] / 1e6:.2f} vs {median(rates['ceiling_4k']) / 1e6:.2f} "
                   f"M rows/s (THP mode {thp_mode()})")
    report.add(f"insert from empty, growth included ({m})",
               f"{fill_rate / steady_insert:.2f} of steady",
               f"{fill_rate / 1e6:.2f} M keys/s (steady state {steady_insert / 1e6:.2f}, "
               f"cold memory {cold_rate / 1e6:.2f})")
    report.add(f"load factor at growth ({m})", "",
               f"{max_lf:.3f} (min over {len(big)} growths)" if max_lf is not None else "no growth measured",
               ">= 0.95")
    report.add(f"memory overhead ({m})", f"{overhead:.3f}",
               f"{table.memory_bytes / 2**20:,.0f} MiB for {n:,} keys", "<= 0.10")
    if redis_note:
        report.note(redis_note)
    return fig


def _grow_buckets(start_capacity: int, grows: int) -> list[int]:
    """Bucket counts before each growth of a table built with ``start_capacity``."""
    from streamrec.store.table import _buckets_for

    b = _buckets_for(start_capacity)
    out = []
    for _ in range(grows):
        out.append(b)
        b *= 2
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = bench_args(__doc__.splitlines()[0], argv)
    rounds = args.rounds or size(args, 5, 3, 1)
    sizes = size(args, [5_000_000, 20_000_000], [5_000_000], [60_000])
    min_seconds = size(args, 0.4, 0.4, 0.02)
    compile_s, how = compile_first_calls()
    report = Report("streamrec bench store: EmbeddingTable, dim 64 float32, batches of 4096, 1 thread")
    first: dict[str, Any] = {}
    for i, n in enumerate(sizes):
        fig = run_size(n, args.quick or args.smoke, rounds, with_redis=(i == 0), report=report,
                       min_seconds=min_seconds)
        if i == 0:
            first = fig
    report.add("first calls of the kernels", "", f"{compile_s:.2f} s ({how})")
    report.note(f"{rounds} rounds per figure, medians; ratios are medians of per-round ratios")
    report.note("answers verified: every batch of every path before and after timing, every 8th timed "
                "call and each round's last, all compared in full with the rows inserted")
    return finish(report, {**first, "thp_mode": thp_mode(), "compile_s": compile_s}, args.json)


if __name__ == "__main__":
    main()
