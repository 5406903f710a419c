"""Benchmark: parameter-server lookups by transport, against grpcio, a conventional PS and Redis.

A storage process (``streamrec ps serve``) holds N rows of dim 64 float32
(N = 5 M, 500 k with ``--quick``, 20 k with ``--smoke``) in one shard, in a
live directory in /dev/shm; client processes look up batches of 4096 uniform
random keys. Each path is measured with one client (latency: p50/p99) and at
saturation (two client processes on the two cores: keys/s, in rounds). Paths:

- ``one_sided``: the client maps the table's files read-only and runs the
  lookup itself; the storage process spends no CPU.
- ``shm``: request and reply rings in shared memory, wake-ups over a socket.
- ``rdma``: UCX through ``ucxx`` (skipped with the reason when not installed).
- ``tcp``: pyzmq, zero-copy parts.

Baselines in the same run, over the same rows (``_ps_baselines``):

- ``grpc``: grpcio unary with the same payload in front of the same table.
- ``conventional``: a Python dict of key -> row over a numpy array behind
  grpcio: what a team writes first (the seed's old engine behind TCP).
- ``redis``: MGET of the same rows via redis-py + hiredis (skipped with the
  reason when there is no redis-server).

"Best" is fixed once per run, not per round: of a set of paths, the one with
the highest median saturated keys/s over the rounds (``_best``); every
per-round ratio then uses that path. ``best_path`` is the best of all our
paths; ``local_best_path`` of one_sided and shm (same host only: one-sided
reads map the server's files); ``remote_best_path`` of tcp and rdma (the paths
a client on another host has).

Figures: ``best_over_conventional`` (target >= 3.7, the seed's +270 %) and
``remote_best_over_conventional`` beside it; ``best_over_redis`` (target >= 10)
and ``remote_best_over_redis``; ``best_over_tcp`` (local best over our TCP,
target >= 2); ``tcp_over_grpc`` (target >= 1.5); also CPU-seconds per million
keys on each side, and how much of each path's median latency is the table's
own lookup (timed in this process on the same files).

How answers and labels are verified (``_ps_baselines.run_clients``; a failure
stops the run): every reply of every call, warm-up and timed, is checked for
shapes, dtype, an all-true found mask, and the first and last element of every
row (which name the row's key); every warm-up call and every 64th timed call
has every element of every row compared with the rows loaded. The checks run
inside the throughput window but outside the latency clock; their cost is
reported per path (``check_share``: the fraction of the window spent checking).
Labels: each of our paths' clients may use only that transport, and the
client counts the requests answered per transport (``stats.by_transport``);
the counts over every timed window (single-client and saturated) must show that
transport only, once per timed call, or the run fails (a client that fell back
to TCP would otherwise measure TCP under the wrong name).

JSON keys: ``KEYS`` below; ``keys_per_s``, ``p99_ms``, ``check_share`` and
``by_transport`` map each path to its figure (null where skipped).

Noise: these machines are shared, and a path measured a minute after another
can see a different machine. Every server therefore stays up for the whole
run, saturated runs go in rounds (every path once per round, back to back),
keys/s is each path's median round, and each ratio is the median over rounds
of that round's ratio.

Run: ``python benchmarks/ps.py [--smoke | --quick] [--json]`` or ``streamrec bench ps``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Report, bench_args, console, finish, redis_server, size
from _ps_baselines import (
    GrpcFindClient,
    LoadResult,
    RedisFindClient,
    load_redis,
    redis_pid,
    run_clients,
    serve_conventional,
    serve_grpc_table,
    served,
)
from _ps_ours import load_rows, make_ps_client

from streamrec.ps.local import LocalCluster, loopback_spec
from streamrec.ps.onesided import OneSidedReader

DIM = 64
BATCH = 4096
OURS = ("one_sided", "shm", "rdma", "tcp")
LOCAL = ("one_sided", "shm")  # same host only
REMOTE = ("tcp", "rdma")  # what a client on another host has
PATHS = (*OURS, "grpc", "conventional", "redis")
KEYS = ("keys_per_s", "p99_ms", "check_share", "by_transport", "best_path", "local_best_path",
        "remote_best_path", "best_over_conventional", "remote_best_over_conventional", "best_over_tcp",
        "tcp_over_grpc", "best_over_redis", "remote_best_over_redis")


class WrongPath(AssertionError):
    """A timed call of one of our paths went over another transport than its label."""


def _assert_path(path: str, res: LoadResult) -> None:
    """Every timed call of ``res`` was answered over ``path`` (our paths only), once."""
    if path not in OURS:
        return
    if res.by_transport != {path: res.calls}:
        raise WrongPath(f"{path}: {res.calls} timed calls, but requests answered per transport were "
                        f"{res.by_transport}: the figure would not be {path}'s")


def _has_ucxx() -> str | None:
    try:
        import ucxx  # noqa: F401
    except ImportError as exc:
        return f"ucxx is not installed (pip install 'streamrec[rdma]'): {exc}"
    return None


def _lookup_ms(live_dir: Path, rows: int, calls: int = 230) -> float:
    """Median ms of the table's own lookup of one batch, in this process, on the server's files."""
    rng = np.random.default_rng(9)
    with OneSidedReader(live_dir) as reader:
        times = []
        for i in range(calls):
            keys = rng.integers(0, rows, BATCH, dtype=np.uint64)
            t0 = time.perf_counter()
            reader.find(keys)
            if i >= calls // 8:
                times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


@contextlib.contextmanager
def _huge_tmpfs(size_gb: int) -> Iterator[tuple[str | None, str]]:
    """A tmpfs mounted with ``huge=always`` for the storage process's live files, when root.

    This kernel gives /dev/shm no huge pages (shmem THP ``never``), and a table
    of 1.4 GB without them runs lookups at a third of the speed (TLB misses).
    A tmpfs mount asks for them itself. Yields (path or None, what was done).
    """
    where = tempfile.mkdtemp(prefix="streamrec-huge-")
    if os.geteuid() != 0:
        os.rmdir(where)
        yield None, "not root: live files in /dev/shm, without huge pages"
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"huge=always,size={size_gb}G", "tmpfs", where],
                          capture_output=True, text=True)
    if done.returncode != 0:
        os.rmdir(where)
        yield None, f"mount failed ({done.stderr.strip()}): live files in /dev/shm, without huge pages"
        return
    try:
        yield where, f"live files on a tmpfs mounted huge=always at {where}"
    finally:
        subprocess.run(["umount", where], capture_output=True)
        os.rmdir(where)


@contextlib.contextmanager
def _ours(rows: int, notes: list[str], lookup_calls: int) -> Iterator[tuple[dict[str, Any], float]]:
    """Our storage process, loaded; yields (path -> client factory or skip reason, lookup ms)."""
    with _huge_tmpfs(max(2, rows * 400 // (1 << 30) + 1)) as (root, how):
        notes.append(how)
        spec = loopback_spec(f"bench-{os.getpid()}", zones=1, nodes_per_zone=1, shards=1, optimizer="none",
                             metrics=False, data_root=None if root is None else Path(root) / "ps")
        node = spec.nodes[0].name
        no_rdma = _has_ucxx()
        with LocalCluster(spec, args=() if no_rdma else ("--rdma",)) as cluster:
            cluster.start()
            pid = cluster.pid(node)
            assert pid is not None
            load_rows(spec, node, rows, DIM)
            lookup = _lookup_ms(spec.data_dir(node) / "emb-0", rows, lookup_calls)
            paths: dict[str, Any] = {}
            for path in OURS:
                if path == "rdma" and no_rdma:
                    paths[path] = no_rdma
                else:
                    make = functools.partial(make_ps_client, str(cluster.spec_path), path, node)
                    paths[path] = (make, (pid,))
            yield paths, lookup


@contextlib.contextmanager
def _baselines(rows: int) -> Iterator[dict[str, Any]]:
    """The baseline servers, filled; yields path -> (client factory, server pids) or skip reason."""
    with contextlib.ExitStack() as stack:
        paths: dict[str, Any] = {}
        for name, target in (("grpc", serve_grpc_table), ("conventional", serve_conventional)):
            console.print(f"  {name}: filling its server ...")
            srv = stack.enter_context(served(target, rows, DIM))
            paths[name] = (functools.partial(GrpcFindClient, srv.address), (srv.pid,))
        where = stack.enter_context(redis_server())
        if isinstance(where, str):
            paths["redis"] = where
        else:
            import redis

            host, port = where
            console.print("  redis: loading ...")
            r = redis.Redis(host=host, port=port)
            load_redis(r, rows, DIM)
            pid = redis_pid(r)
            r.close()
            paths["redis"] = (functools.partial(RedisFindClient, port, DIM), (pid,))
        yield paths


def _rounds(paths: dict[str, Any], rows: int, seconds: float, clients: int, rounds: int, single_runs: bool,
            smoke: bool = False) -> dict[str, tuple[LoadResult | None, list[LoadResult]] | str]:
    """Each path's single-client run (not in quick mode), then ``rounds`` rounds of saturated
    runs, every path once per round, back to back: drift on a shared machine then moves
    every path of a round alike, and per-round ratios cancel it."""
    out: dict[str, tuple[LoadResult | None, list[LoadResult]] | str] = {}
    for path in PATHS:
        got = paths.get(path)
        if got is None or isinstance(got, str):
            out[path] = got if isinstance(got, str) else "not measured"
            continue
        make, pids = got
        single = None
        if single_runs:
            single = run_clients(make, clients=1, seconds=seconds, keys=rows, server_pids=pids)
            _assert_path(path, single)
        out[path] = (single, [])
    for r in range(rounds):
        console.print(f"  saturated round {r + 1}/{rounds} ...")
        for path in PATHS:
            res = out[path]
            if isinstance(res, str):
                continue
            make, pids = paths[path]
            # --smoke drives its one client from this process (no process start per path).
            sat = run_clients(make, clients=clients, seconds=seconds, keys=rows, server_pids=pids,
                              inline=smoke, warmup_s=0.05 if smoke else 0.3)
            _assert_path(path, sat)
            res[1].append(sat)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = bench_args(__doc__.splitlines()[0], argv)
    rows = size(args, 5_000_000, 500_000, 20_000)
    seconds = size(args, 3.0, 1.5, 0.3)
    rounds = args.rounds or size(args, 3, 2, 1)
    # Two client processes keep both cores busy (the server's threads compete for them too);
    # --smoke runs one, in this process: the fewest processes that still drive every path.
    clients = size(args, 2, 2, 1)
    console.print(f"[bold]ps[/]: {rows:,} rows, dim {DIM}, batches of {BATCH}, {seconds} s per run, "
                  f"{rounds} rounds")
    notes: list[str] = []
    with _ours(rows, notes, size(args, 230, 230, 40)) as (ours, lookup_ms), _baselines(rows) as theirs:
        results = _rounds({**ours, **theirs}, rows, seconds, clients, rounds,
                          single_runs=not (args.quick or args.smoke), smoke=args.smoke)

    keys_per_s: dict[str, float | None] = {}
    per_round: dict[str, list[float]] = {}
    p99: dict[str, float | None] = {}
    check_share: dict[str, float | None] = {}
    by_transport: dict[str, dict[str, int] | None] = {}
    rep = Report(f"ps lookups: {rows:,} rows, batches of {BATCH}, saturation = {clients} client processes, "
                 f"median of {rounds} rounds")
    for path in PATHS:
        res = results.get(path)
        if res is None or isinstance(res, str):
            keys_per_s[path] = p99[path] = check_share[path] = by_transport[path] = None
            rep.note(f"{path}: skipped: {res}")
            continue
        single, sats = res
        runs = [*sats, *([single] if single else [])]
        check_share[path] = sum(r.check_s for r in runs) / sum(r.seconds * r.clients for r in runs)
        counts: dict[str, int] | None = {} if path in OURS else None
        if counts is not None:
            for r in runs:
                for name, n in (r.by_transport or {}).items():
                    counts[name] = counts.get(name, 0) + n
        by_transport[path] = counts
        per_round[path] = [r.keys_per_s for r in sats]
        sat = sorted(sats, key=lambda r: r.keys_per_s)[len(sats) // 2]  # the median round
        lat = single or sat
        keys_per_s[path] = sat.keys_per_s
        p99[path] = lat.p99_ms
        srv = sat.server_cpu_s_per_million_keys
        share = max(0.0, 1 - lookup_ms / lat.p50_ms) if path in OURS or path == "grpc" else None
        rounds_text = ", ".join(f"{k / 1e6:.2f}" for k in per_round[path])
        rep.add(f"{path}: keys/s (saturated)", "",
                f"{sat.keys_per_s / 1e6:.2f} M ({sat.round_trips_per_s:,.0f} round trips/s; "
                f"rounds {rounds_text} M)")
        rep.add(f"{path}: latency ({'1 client' if single else 'saturated'})", "",
                f"p50 {lat.p50_ms:.2f} ms, p99 {lat.p99_ms:.2f} ms"
                + (f"; {100 * share:.0f} % transport" if share is not None else ""))
        rep.add(f"{path}: CPU s per M keys", "", f"client {sat.client_cpu_s_per_million_keys:.3f}, server "
                + (f"{srv:.3f}" if srv is not None else "-"))
        rep.add(f"{path}: reply checks", "", f"{100 * (check_share[path] or 0.0):.1f} % of the window; "
                f"{sum(r.full_checks for r in runs):,} of {sum(r.calls for r in runs):,} calls in full"
                + (f"; answered by {by_transport[path]}" if by_transport[path] is not None else ""))

    def _best(candidates: tuple[str, ...]) -> str | None:
        """The fixed rule for "best": of the measured ``candidates``, the highest median keys/s
        over the rounds, chosen once for the whole run (ties: the first in ``candidates``)."""
        measured = [p for p in candidates if p in per_round]
        return max(measured, key=lambda p: float(np.median(per_round[p]))) if measured else None

    def ratio(num: str | None, den: str) -> float | None:
        """Median over rounds of ``num`` / ``den`` in the same round."""
        if num is None or den not in per_round:
            return None
        return float(np.median([a / b for a, b in zip(per_round[num], per_round[den], strict=True)]))

    best_path, local_best, remote_best = _best(OURS), _best(LOCAL), _best(REMOTE)
    figures: dict[str, Any] = {
        "keys_per_s": keys_per_s,
        "p99_ms": p99,
        "check_share": check_share,
        "by_transport": by_transport,
        "best_path": best_path,
        "local_best_path": local_best,
        "remote_best_path": remote_best,
        "best_over_conventional": ratio(best_path, "conventional"),
        "remote_best_over_conventional": ratio(remote_best, "conventional"),
        "best_over_tcp": ratio(local_best, "tcp"),
        "tcp_over_grpc": ratio("tcp", "grpc"),
        "best_over_redis": ratio(best_path, "redis"),
        "remote_best_over_redis": ratio(remote_best, "redis"),
    }
    for key, target, text in (("best_over_conventional", ">= 3.7", f"{best_path} / conventional"),
                              ("remote_best_over_conventional", "", f"{remote_best} / conventional"),
                              ("best_over_tcp", ">= 2", f"{local_best} / tcp"),
                              ("tcp_over_grpc", ">= 1.5", "tcp / grpc"),
                              ("best_over_redis", ">= 10", f"{best_path} / redis MGET"),
                              ("remote_best_over_redis", "", f"{remote_best} / redis MGET")):
        v = figures[key]
        rep.add(key, f"{v:.2f}x" if v is not None else "skipped", f"{text}, median of per-round ratios",
                target)
    rep.note(f"the table's own lookup of one batch (one thread, same files, no transport): "
             f"{lookup_ms:.3f} ms; '% transport' is the rest of each path's median latency")
    rep.note(f"our storage process keeps its table in live files (mapped by one-sided readers): {notes[0]}; "
             "the grpc baseline's table is anonymous memory with huge pages")
    rep.note("every server is up for the whole run and each round measures every path back to back, so "
             "the ratios compare runs made within seconds of each other")
    return finish(rep, figures, args.json)


if __name__ == "__main__":
    main()
