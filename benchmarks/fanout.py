"""Benchmark: the real fan-out tree on loopback, against what the simulation predicts for it.

The tree: one shard of ``emb`` (dim 64 float32, 264 bytes a row with its key)
held by ``--writable`` writable replicas (default 3, one per zone,
client-replicated: the writer sends every batch to each) and ``--serving``
read-only serving replicas (default 20), each a ``streamrec ps serve``
process on loopback, in the k-ary tree of ``cluster.tree`` (``--k``, default
4: 4 replicas pull from the root, 16 from them). The writer assigns batches of
``--batch-kib`` (default 1 MiB: 3,971 new rows each) at ``--rate`` batches/s
(default 5) for ``--seconds`` (default 10).

What is measured: for each batch the root logged, its commit time (the root's
wall clock when it logged the applied write, carried with the batch) and the
time every serving replica applied it (each replica's wall clock, the same
host clock; ``STATS`` with ``STATS_APPLIED``). Commit to applied *everywhere*
is the latest of the 20 minus the commit time: ``everywhere_p50_ms``,
``everywhere_p99_ms``, ``everywhere_max_ms`` over the batches; and per level
of the tree the median over its replicas and batches (``by_level_p50_ms``).

The simulation's parameters, measured on the same processes before the run
(``params``): ``latency_s`` = half the median round trip of a PULL that
returns no batch (our frames over our TCP transport to a serving replica's
master); ``bandwidth_bytes_per_s`` and ``per_message_s`` = the line through
the median times of PULLs returning one 64 KiB and one 1 MiB batch;
``apply_rows_per_s`` = ``_follow.apply_batches`` of 1 MiB batches (insert or
assign, and the re-log in the replica's ring) in this process. The tree
forwards whole batches (a child pulls a batch once its parent applied it), so
the simulation is run store-and-forward (one chunk = the batch) with the same
n and k: ``predicted_everywhere_ms`` is its max, and ``p50_over_predicted``
the measured p50 over it. The simulation lets a replica forward while it
applies; the real one applies first, so the model is short by about one apply
per level (``predicted_plus_apply_ms`` adds it).

How the answer is checked: every serving replica ends at the root's epoch and
seq and holds every row written, equal to the root's (read back per replica);
a batch some replica never applied through the tree (it re-synced instead) is
counted in ``resynced_batches`` and left out of the percentiles.

Caveat printed with the figures: all 23 processes and the writer share this
host's cores (2 on the development machine), so the figures carry CPU
contention that separate hosts would not.

JSON keys (``--json``, last line of stdout): ``writable``, ``serving``, ``k``,
``batch_bytes``, ``batches``, ``resynced_batches``, ``params``,
``everywhere_p50_ms``, ``everywhere_p99_ms``, ``everywhere_max_ms``,
``by_level_p50_ms``, ``predicted_everywhere_ms``, ``predicted_plus_apply_ms``,
``p50_over_predicted``.

Run: ``python benchmarks/fanout.py [--smoke] [--json]`` or ``streamrec bench
fanout``. ``--smoke``: 1 writable + 2 serving, k = 1, 64 KiB batches, 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
from propagation import ROW_BYTES, Params, simulate

from streamrec.cluster import fanout_tree
from streamrec.cluster.spec import ClusterSpec, NodeSpec, TableSpec
from streamrec.config import table_config_from_dict
from streamrec.ps._follow import apply_batches
from streamrec.ps._ring import Batch, decode_pull, pull_request
from streamrec.ps.client import PSClient
from streamrec.ps.local import LocalCluster, free_port
from streamrec.ps.service import STATS_APPLIED, Service
from streamrec.transport.base import Connection
from streamrec.transport.frames import Frame, Kind
from streamrec.transport.tcp import TcpConnection

KEYS = ("writable", "serving", "k", "batch_bytes", "batches", "resynced_batches", "params",
        "everywhere_p50_ms", "everywhere_p99_ms", "everywhere_max_ms", "by_level_p50_ms",
        "predicted_everywhere_ms", "predicted_plus_apply_ms", "p50_over_predicted")
DIM = 64
KIB = 1024


def make_spec(writable: int, serving: int, k: int) -> ClusterSpec:
    name = f"bench-fanout-{os.getpid()}"
    root = f"/dev/shm/streamrec/{name}"
    fan = tuple(f"f{i:02d}" for i in range(1, serving + 1))
    nodes = [NodeSpec(f"w{i}", port=free_port(), zone=f"z{i}", data_dir=f"{root}/w{i}")
             for i in range(1, writable + 1)]
    nodes += [NodeSpec(n, port=free_port(), zone="fan", data_dir=f"{root}/{n}") for n in fan]
    cfg = table_config_from_dict({"dim": DIM, "optimizer": "none", "capacity": 1 << 18})
    return ClusterSpec(name, tuple(nodes), (TableSpec("emb", cfg, serving=fan, fanout=k),))


def rows_for(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    keys = np.arange(start, start + n, dtype=np.uint64)
    values = np.tile(keys[:, None].astype(np.float32), (1, DIM))
    values[:, 1] = 0.5
    return keys, values


def root_state(cluster: LocalCluster, name: str) -> tuple[int, int]:
    info = cluster.hello(name)
    assert info is not None, f"{name} does not answer"
    s = info["shards"][0]
    return int(s["epoch"]), int(s["seq"])


def wait_caught_up(cluster: LocalCluster, root: str, fan: tuple[str, ...], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        want = root_state(cluster, root)
        states = [cluster.hello(n) for n in fan]
        if all(s is not None and s["shards"][0]["ready"]
               and (s["shards"][0]["epoch"], s["shards"][0]["seq"]) == want for s in states):
            return
        time.sleep(0.1)
    raise AssertionError(f"serving replicas did not reach {root}'s epoch and seq in {timeout_s} s")


def measure_params(spec: ClusterSpec, node: str, epoch: int, small_seq: int, big_seq: int, big_bytes: int,
                   k: int, chunk_bytes: int, rounds: int) -> Params:
    """Per-hop latency, link rate and apply rate of the real implementation (module doc)."""
    def timed(conn: Connection, frame: Frame, n: int) -> float:
        times = []
        for i in range(n):
            frame.request_id = i + 1
            t0 = time.perf_counter()
            reply = conn.request(frame, 5.0)
            times.append(time.perf_counter() - t0)
            assert reply.status == 0, reply.text()
        return float(np.median(times))

    with TcpConnection(spec.node(node).address, max_frame_bytes=spec.max_frame_bytes) as conn:
        rtt = timed(conn, pull_request(0, 0, 0, 0, 1, 0), 50 * rounds)
        small = timed(conn, pull_request(0, 0, epoch, small_seq - 1, 1, 0), 20 * rounds)
        big = timed(conn, pull_request(0, 0, epoch, big_seq - 1, 1, 0), 5 * rounds)
        one = conn.request(pull_request(0, 0, epoch, big_seq - 1, 1, 0, request_id=999), 5.0)
        _, got = decode_pull(one, DIM)
        assert [b.seq for b in got] == [big_seq] and got[0].values is not None
        assert got[0].keys.nbytes + got[0].values.nbytes == big_bytes
    small_bytes = (64 * KIB // ROW_BYTES) * ROW_BYTES
    bw = (big_bytes - small_bytes) / max(big - small, 1e-9)
    per_msg = max(0.0, big - rtt - big_bytes / bw)
    # apply: 1 MiB batches into a serving replica in this process, as a follower applies them
    svc = Service(spec, spec.table("emb")[1].serving[0])
    rep = svc.replicas[(0, 0)]
    assert rep.ring is not None
    rep.ring.reset(1, 0)
    n = (1 << 20) // ROW_BYTES
    batches = [Batch(i + 1, 0, *rows_for(i * n, n)) for i in range(8 * rounds)]
    apply_batches(rep, batches[:1])
    t0 = time.perf_counter()
    apply_batches(rep, batches[1:])
    apply_rate = (len(batches) - 1) * n / (time.perf_counter() - t0)
    svc.close()
    return Params(latency_s=rtt / 2, bandwidth_bytes_per_s=bw, per_message_s=per_msg,
                  apply_rows_per_s=apply_rate, row_bytes=ROW_BYTES, k=k, chunk_bytes=chunk_bytes,
                  detect_s=1.0)


def applied_logs(spec: ClusterSpec, fan: tuple[str, ...]) -> dict[str, dict[int, tuple[int, int]]]:
    """Per serving replica: seq -> (commit ns, applied ns)."""
    out = {}
    for n in fan:
        with TcpConnection(spec.node(n).address) as conn:
            reply = conn.request(Frame(Kind.STATS, request_id=1, aux=STATS_APPLIED), 5.0)
        shard = json.loads(reply.text())["shards"][0]
        out[n] = {int(s): (int(c), int(a)) for s, c, a in shard["applied_log"]}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="1 writable + 2 serving, k = 1, 1 s")
    ap.add_argument("--quick", action="store_true", help="5 s of batches")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--rounds", type=int, default=0, help="parameter measurement rounds (default 3; smoke 1)")
    ap.add_argument("--writable", type=int, default=3, help="writable replicas (default 3)")
    ap.add_argument("--serving", type=int, default=20, help="serving replicas (default 20)")
    ap.add_argument("--k", type=int, default=4, help="fan-out (default 4)")
    ap.add_argument("--batch-kib", type=int, default=1024, help="batch size (default 1024 KiB)")
    ap.add_argument("--rate", type=float, default=5.0, help="batches per second (default 5)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds of batches (default 10)")
    ap.add_argument("--log-dir", help="keep each node's log here (default: a temporary directory, removed)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.writable, args.serving, args.k, args.batch_kib, args.seconds = 1, 2, 1, 64, 1.0
    elif args.quick:
        args.seconds = 5.0
    rounds = args.rounds or (1 if args.smoke else 3)
    log = sys.stderr
    spec = make_spec(args.writable, args.serving, args.k)
    fan = spec.serving("emb")
    root = spec.replicas("emb", 0)[0]
    rows = args.batch_kib * KIB // ROW_BYTES
    batch_bytes = rows * ROW_BYTES
    tree = fanout_tree(root, fan, args.k)
    t_start = time.monotonic()
    with LocalCluster(spec, log_dir=args.log_dir) as cluster:
        cluster.start(timeout_s=600)
        print(f"{args.writable} writable + {args.serving} serving processes up in "
              f"{time.monotonic() - t_start:.1f} s; tree k={args.k}, depth {tree.depth}", file=log)
        with PSClient(spec, transports=("tcp",), timeout_s=30.0) as ps:
            # one 64 KiB and one full batch in the rings, for the link measurement
            small_rows = 64 * KIB // ROW_BYTES
            ps.assign("emb", *rows_for(0, small_rows))
            small_seq = root_state(cluster, root)[1]
            link_rows = 1024 * KIB // ROW_BYTES  # the link is measured on 64 KiB and 1 MiB batches
            ps.assign("emb", *rows_for(small_rows, link_rows))
            epoch, big_seq = root_state(cluster, root)
            wait_caught_up(cluster, root, fan, 120)
            params = measure_params(spec, fan[0], epoch, small_seq, big_seq, link_rows * ROW_BYTES, args.k,
                                    batch_bytes, rounds)
            print(f"measured (real implementation): PULL one-way latency {params.latency_s * 1e6:.0f} us, "
                  f"{params.bandwidth_bytes_per_s / 1e9:.2f} GB/s + {params.per_message_s * 1e6:.0f} us per "
                  f"reply, apply {params.apply_rows_per_s / 1e6:.2f} M rows/s", file=log)
            first = big_seq + 1
            start = small_rows + link_rows
            n_batches = max(1, int(args.seconds * args.rate))
            t0 = time.perf_counter()
            for i in range(n_batches):
                due = t0 + i / args.rate
                if (now := time.perf_counter()) < due:
                    time.sleep(due - now)
                ps.assign("emb", *rows_for(start + i * rows, rows))
            epoch2, last = root_state(cluster, root)
            assert epoch2 == epoch, "the root restarted during the run"
            wait_caught_up(cluster, root, fan, 120)
            keys = np.arange(0, start + n_batches * rows, dtype=np.uint64)
            want, found = ps.find("emb", keys, node=root)
            assert found.all(), "the root lost rows"
            for n in fan:
                for lo in range(0, keys.size, 65_536):
                    got, f = ps.find("emb", keys[lo:lo + 65_536], node=n)
                    if not (f.all() and np.array_equal(got, want[lo:lo + 65_536])):
                        raise AssertionError(f"serving replica {n} differs from the root")
        logs = applied_logs(spec, fan)
    seqs = range(first, last + 1)
    everywhere: list[float] = []
    by_level: dict[int, list[float]] = {lv: [] for lv in range(1, tree.depth + 1)}
    resynced = 0
    for s in seqs:
        if not all(s in logs[n] for n in fan):
            resynced += 1
            continue
        commit = logs[fan[0]][s][0]
        everywhere.append((max(logs[n][s][1] for n in fan) - commit) / 1e6)
        for n in fan:
            by_level[tree.level(n)].append((logs[n][s][1] - commit) / 1e6)
    if not everywhere:
        raise AssertionError("no batch reached every serving replica through the tree")
    sim = simulate(len(fan), batch_bytes, params)
    predicted = float(np.nanmax(sim.done)) * 1e3
    plus_apply = predicted + (tree.depth - 1) * params.apply_s(batch_bytes) * 1e3
    ev = np.array(everywhere)
    figures: dict[str, Any] = {
        "writable": args.writable, "serving": args.serving, "k": args.k, "batch_bytes": batch_bytes,
        "batches": len(everywhere), "resynced_batches": resynced, "params": params.__dict__,
        "everywhere_p50_ms": float(np.percentile(ev, 50)), "everywhere_p99_ms": float(np.percentile(ev, 99)),
        "everywhere_max_ms": float(ev.max()),
        "by_level_p50_ms": [float(np.median(by_level[lv])) for lv in sorted(by_level)],
        "predicted_everywhere_ms": predicted, "predicted_plus_apply_ms": plus_apply,
        "p50_over_predicted": float(np.percentile(ev, 50)) / predicted,
    }
    levels = ", ".join(f"{x:.1f}" for x in figures["by_level_p50_ms"])
    print(f"commit -> applied on all {args.serving}: p50 {figures['everywhere_p50_ms']:.1f} ms, p99 "
          f"{figures['everywhere_p99_ms']:.1f} ms, max {figures['everywhere_max_ms']:.1f} ms over "
          f"{len(everywhere)} batches of {batch_bytes // KIB} KiB ({resynced} re-synced instead); "
          f"per level p50 {levels} ms | simulation, same tree, store-and-forward: {predicted:.1f} ms "
          f"({plus_apply:.1f} ms with the apply before forwarding) -> measured p50 is "
          f"{figures['p50_over_predicted']:.1f}x the prediction | every replica checked row by row | all "
          f"{args.writable + args.serving} processes and the writer share {os.cpu_count()} cores", file=log)
    assert tuple(figures) == KEYS
    if args.json:
        sys.stdout.write(json.dumps(figures) + "\n")
    return figures


if __name__ == "__main__":
    main()
