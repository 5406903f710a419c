"""Benchmark: the TCP lookup path of this tree against another revision's, A/B on one machine.

What it is for: a change to the request path moves saturated keys/s by a few
per cent, and on these shared machines two runs minutes apart differ by more.
So both versions run at once: the base revision is checked out into a
temporary git worktree, each version gets its own storage process (the
base's imports the worktree's sources), both are loaded with the same rows,
and saturated runs of each alternate, back to back, for ``--rounds`` rounds.
The figure is the median of the per-round ratios (this tree ÷ base), so drift
moves both sides of each ratio alike.

Setup as ``benchmarks/ps.py``'s ``tcp`` path: one shard of 5 M rows of dim 64
(1 M with ``--quick``, 20 k with ``--smoke``) on a huge-page tmpfs when root,
two client processes of ``PSClient`` restricted to TCP (one with ``--smoke``),
batches of 4096 uniform keys. Each side's clients import that side's code, so
the comparison covers client and server together.

How answers and labels are verified: as in ``benchmarks/ps.py`` (every reply's
shapes, found mask and the first and last element of every row; every element
of every warm-up call and of every 64th timed call); and where a side's client
counts requests per transport (``stats.by_transport``), every timed call must
have been answered over TCP, or the run fails.

To keep ``--smoke`` to seconds, the base worktree reuses this tree's compiled
numba kernels for every source file identical in both (``_share_kernel_cache``);
files that differ compile as usual.

JSON keys: ``KEYS`` below.

Run: ``python benchmarks/ps_ab.py --base REV [--rounds N] [--smoke | --quick] [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Report, console, finish
from _ps_baselines import run_clients
from _ps_ours import load_rows, make_ps_client
from ps import _assert_path, _huge_tmpfs

from streamrec.ps.local import LocalCluster, loopback_spec

REPO = Path(__file__).resolve().parent.parent
DIM = 64
KEYS = ("this_over_base", "ratios", "keys_per_s")


def _share_kernel_cache(this_src: Path, base_src: Path) -> int:
    """Copy this tree's numba cache files into ``base_src`` for every identical source file.

    Numba keys a cached kernel on its source file's mtime and size, so an
    identical file gets this tree's mtime too; ``store/_jit.py``'s stamp of the
    store sources then decides, as always, whether the store's cache stands.
    Returns the number of cache files copied.
    """
    copied = 0
    for src in this_src.rglob("*.py"):
        other = base_src / src.relative_to(this_src)
        cache = src.parent / "__pycache__"
        if not other.is_file() or other.read_bytes() != src.read_bytes() or not cache.is_dir():
            continue
        st = src.stat()
        os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
        dest = other.parent / "__pycache__"
        dest.mkdir(exist_ok=True)
        for f in [*cache.glob(f"{src.stem}.*.nbi"), *cache.glob(f"{src.stem}.*.nbc")]:
            shutil.copy2(f, dest / f.name)
            copied += 1
        stamp = cache / "streamrec-kernels.stamp"
        if stamp.is_file() and not (dest / stamp.name).exists():
            shutil.copy2(stamp, dest / stamp.name)
    return copied


@contextlib.contextmanager
def _worktree(rev: str) -> Iterator[Path]:
    """``rev`` checked out (detached) in a temporary worktree; removed on exit."""
    where = Path(tempfile.mkdtemp(prefix="streamrec-ab-"))
    done = subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), rev],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"--base {rev!r}: git worktree add failed: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)],
                       capture_output=True)


@contextlib.contextmanager
def _imports_from(src: Path | None) -> Iterator[None]:
    """Spawned processes (servers via PYTHONPATH, load clients via sys.path) import ``src``."""
    saved_env, saved_path = os.environ.get("PYTHONPATH"), list(sys.path)
    if src is not None:
        os.environ["PYTHONPATH"] = str(src)
        sys.path.insert(0, str(src))
    try:
        yield
    finally:
        sys.path[:] = saved_path
        if saved_env is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_env


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare this tree against")
    ap.add_argument("--rounds", type=int, default=8, help="alternating rounds (default 8)")
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds per saturated run (default 2)")
    ap.add_argument("--quick", action="store_true", help="1 M rows, 4 rounds of 1 s")
    ap.add_argument("--smoke", action="store_true",
                    help="20 k rows, 1 round of 0.3 s, one client: checks that it runs, figures mean nothing")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object last")
    args = ap.parse_args(argv)
    if args.rounds < 1 or not args.seconds > 0:
        ap.error("--rounds must be >= 1 and --seconds > 0")
    rows = 20_000 if args.smoke else 1_000_000 if args.quick else 5_000_000
    rounds, seconds = (1, 0.3) if args.smoke else (4, 1.0) if args.quick else (args.rounds, args.seconds)
    clients = 1 if args.smoke else 2
    rates: dict[str, list[float]] = {"base": [], "this": []}
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(_worktree(args.base)) / "src"
        shared = _share_kernel_cache(REPO / "src", src)
        console.print(f"[dim]{shared} compiled kernels shared with the base worktree[/dim]")
        root, how = stack.enter_context(_huge_tmpfs(max(3, 2 * rows * 400 // (1 << 30) + 1)))
        console.print(f"[bold]ps A/B[/]: {args.base} vs this tree, {rows:,} rows, {rounds} rounds; {how}")
        sides: dict[str, tuple[Any, str, Path | None]] = {}
        for label, imports in (("base", src), ("this", None)):
            with _imports_from(imports):
                spec = loopback_spec(f"ab-{label}-{os.getpid()}", zones=1, nodes_per_zone=1, shards=1,
                                     optimizer="none", metrics=False,
                                     data_root=None if root is None else Path(root) / label)
                node = spec.nodes[0].name
                cluster = stack.enter_context(LocalCluster(spec))
                cluster.start()
            # This tree's client loads both: it reads either wire layout, and bulk writes go as parts.
            load_rows(spec, node, rows, DIM, label=label, transports=("tcp",))
            sides[label] = (cluster, node, imports)
        for r in range(rounds):
            for label, (cluster, node, imports) in sides.items():
                with _imports_from(imports):
                    make = functools.partial(make_ps_client, str(cluster.spec_path), "tcp", node)
                    res = run_clients(make, clients=clients, seconds=seconds, keys=rows,
                                      server_pids=(cluster.pid(node),))
                if res.by_transport is not None:  # a base older than the per-transport counts has none
                    _assert_path("tcp", res)
                rates[label].append(res.keys_per_s)
            console.print(f"  round {r + 1}/{rounds}: base {rates['base'][-1] / 1e6:.2f} M, "
                          f"this {rates['this'][-1] / 1e6:.2f} M keys/s")
    ratios = [t / b for t, b in zip(rates["this"], rates["base"], strict=True)]
    median = {k: float(np.median(v)) for k, v in rates.items()}
    figures: dict[str, Any] = {"this_over_base": float(np.median(ratios)), "ratios": ratios,
                               "keys_per_s": median}
    rep = Report(f"tcp keys/s at saturation, this tree vs {args.base}, {rounds} alternating rounds")
    rep.add("this_over_base", f"{figures['this_over_base']:.3f}x",
            f"{median['this'] / 1e6:.2f} vs {median['base'] / 1e6:.2f} M (median rounds)")
    rep.note("per-round ratios: " + ", ".join(f"{x:.3f}" for x in ratios))
    return finish(rep, figures, args.json)


if __name__ == "__main__":
    main()
