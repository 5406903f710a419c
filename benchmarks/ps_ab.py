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
(1 M with ``--quick``) on a huge-page tmpfs when root, two client processes of
``PSClient`` restricted to TCP, batches of 4096 uniform keys, every reply
checked. Each side's clients import that side's code, so the comparison covers
client and server together.

Run: ``python benchmarks/ps_ab.py --base REV [--rounds N] [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
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
from ps import _huge_tmpfs

from streamrec.ps.local import LocalCluster, loopback_spec

REPO = Path(__file__).resolve().parent.parent
DIM = 64


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
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object last")
    args = ap.parse_args(argv)
    if args.rounds < 1 or not args.seconds > 0:
        ap.error("--rounds must be >= 1 and --seconds > 0")
    rows = 1_000_000 if args.quick else 5_000_000
    rounds, seconds = (4, 1.0) if args.quick else (args.rounds, args.seconds)
    rates: dict[str, list[float]] = {"base": [], "this": []}
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(_worktree(args.base)) / "src"
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
                    res = run_clients(make, clients=2, seconds=seconds, keys=rows,
                                      server_pids=(cluster.pid(node),))
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
