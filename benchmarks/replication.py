"""Benchmark: what strong-mode replication costs one shard's gradient updates.

Paths (apply_gradients of 64 KiB batches: 248 rows of dim 64 float32 plus keys,
Adagrad, into a table of 20,000 rows):
- ``none``: ``EmbeddingTable.apply_gradients`` in this process, batch after
  batch: the unreplicated store.
- ``strong``: the same batches through ``streamrec.ps.raftlog.BatchLog``, a
  group of 3 members, this process (the leader, so the writer is co-located
  with it as a PS server's handler would be) and 2 follower processes on
  loopback. A batch counts once a majority committed it and the leader applied
  it. Submissions are pipelined (``--window`` in flight, default 64).
- ``fanout``: the same batches through the parameter server, one writable
  replica process (``streamrec ps serve``) holding two tables, ``plain`` (no
  fan-out: its writes log nothing) and ``fan`` (``--fanout-replicas`` read-only
  serving replicas, default 4, pulling every committed batch from it, k = 4).
  One client (shared memory) alternates between the tables in 3 rounds each,
  so both figures come from the same processes and the same load; the ratio is
  what the fan-out source costs the write path (logging resulting rows, serving
  PULLs). Checked after the run: every serving replica reaches the writable
  replica's seq and holds every row with the writable replica's values.
- ``strong_ps``: the same batches through the parameter server into a strong
  table (``mode = "strong"``): three ``streamrec ps serve`` processes, one
  shard, each a Raft member; one client (shared memory) sends each batch to
  the leader and waits for its acknowledgement (majority commit), batch after
  batch. Checked after the run: a linearizable read, then every member read
  alone holds the same rows as the leader.
Figures: ``none_rows_per_s``, ``strong_rows_per_s``, ``strong_over_none``
(target >= 0.33: strong costs < 3x), ``strong_batches_per_s`` (committed 64 KiB
batches/s at saturation), and commit latency (submit to acknowledgement)
``p50_ms``/``p99_ms`` measured open-loop at half the saturated rate (target
p99 <= 20 ms), with ``sync_p50_ms``/``sync_p99_ms`` for one batch in flight.
Fan-out figures: ``fanout_replicas``, ``ps_rows_per_s`` (through the server,
no fan-out), ``fanout_rows_per_s`` (with the serving replicas pulling),
``fanout_over_ps``, and ``log_only_over_ps``: the same ratio measured first,
before the serving replicas start (the ring logs every write, nobody pulls).
``strong_ps_rows_per_s`` and ``strong_ps_over_ps`` (over ``ps_rows_per_s``:
what strong mode costs a client's writes through the storage process).

Caveats printed with the figures: all three members share this machine's two
cores with the writer, so the strong path also pays the followers' CPU, which
separate hosts would not. pysyncobj may log "truncating already-applied log
entries": a follower that receives a stale append-entries message deletes the
entries after it and re-appends them (0.3.17 does not check terms first); with
one leader they are the same entries, and nothing is applied twice.

JSON keys (``--json``, last line of stdout): ``batch_bytes``, ``rows_per_batch``,
``none_rows_per_s``, ``strong_rows_per_s``, ``strong_over_none``,
``strong_batches_per_s``, ``half_rate_batches_per_s``, ``p50_ms``, ``p99_ms``,
``sync_p50_ms``, ``sync_p99_ms``, ``fanout_replicas``, ``ps_rows_per_s``, ``fanout_rows_per_s``,
``fanout_over_ps``, ``log_only_over_ps``, ``strong_ps_rows_per_s``, ``strong_ps_over_ps``.

Run: ``python benchmarks/replication.py [--smoke|--quick] [--json]`` or
``streamrec bench replication``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.ps.raftlog import Ack, BatchLog, Op, RaftLogConfig
from streamrec.store import EmbeddingTable

KEYS = ("batch_bytes", "rows_per_batch", "none_rows_per_s", "strong_rows_per_s", "strong_over_none",
        "strong_batches_per_s", "half_rate_batches_per_s", "p50_ms", "p99_ms", "sync_p50_ms", "sync_p99_ms",
        "fanout_replicas", "ps_rows_per_s", "fanout_rows_per_s", "fanout_over_ps", "log_only_over_ps",
        "strong_ps_rows_per_s", "strong_ps_over_ps")
DIM = 64
BATCH_BYTES = 64 * 1024
ROWS = BATCH_BYTES // (8 + 4 * DIM)  # 248
TABLE_ROWS = 20_000
INSERT_ROWS = 2_000  # rows per entry of the initial fill (0.5 MB entries)
# the local member times out first, so it wins the first election and leads
LEADER_ELECTION_S = (0.3, 0.6)
FOLLOWER_ELECTION_S = (3.0, 6.0)
FOLLOWER_HEARTBEAT_S = 0.05

_FOLLOWER = r"""
import sys, time
from streamrec.store import EmbeddingTable
from streamrec.ps.raftlog import BatchLog, RaftLogConfig
me, peers, data_dir = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
lo, hi, hb = map(float, sys.argv[4:7])
cfg = RaftLogConfig(election_timeout_s=(lo, hi), heartbeat_s=hb, send_each_entry=sys.argv[7] == "1")
dim, rows = int(sys.argv[8]), int(sys.argv[9])
log = BatchLog(me, peers, lambda: EmbeddingTable(dim=dim, capacity=rows, optimizer="adagrad"), data_dir, cfg)
print("up", flush=True)
sys.stdin.read()
"""


def make_table() -> EmbeddingTable:
    return EmbeddingTable(dim=DIM, capacity=TABLE_ROWS, optimizer="adagrad")


def batches(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, TABLE_ROWS, ROWS).astype(np.uint64),
             rng.standard_normal((ROWS, DIM)).astype(np.float32)) for _ in range(n)]


def measure_none(data: list[tuple[np.ndarray, np.ndarray]], seconds: float) -> float:
    table = make_table()
    table.insert_or_assign(np.arange(TABLE_ROWS, dtype=np.uint64), np.zeros((TABLE_ROWS, DIM), np.float32))
    table.apply_gradients(*data[0], 0.01)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        k, g = data[done % len(data)]
        table.apply_gradients(k, g, 0.01)
        done += 1
    return done * ROWS / (time.perf_counter() - t0)


class Writer:
    """Pipelined submissions with one writer id; latencies recorded per acknowledged batch."""

    def __init__(self, log: BatchLog, data: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.log, self.data = log, data
        self.seq = 0
        self.cv = threading.Condition()
        self.in_flight = 0
        self.acked = 0
        self.failed = 0
        self.lat: list[float] = []

    def _submit(self) -> None:
        self.seq += 1
        k, g = self.data[self.seq % len(self.data)]
        t0 = time.perf_counter()

        def done(r: Ack | Exception) -> None:
            with self.cv:
                self.in_flight -= 1
                if isinstance(r, Ack):
                    self.acked += 1
                    self.lat.append(time.perf_counter() - t0)
                else:
                    self.failed += 1
                self.cv.notify()

        with self.cv:
            self.in_flight += 1
        self.log.submit_async(Op.APPLY_GRADIENTS, k, g, writer=1, seq=self.seq, lr=0.01, on_done=done)

    def saturate(self, window: int, seconds: float) -> float:
        start = self.acked
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            with self.cv:
                while self.in_flight >= window:
                    self.cv.wait(1.0)
            self._submit()
        self.drain()
        return (self.acked - start) / (time.perf_counter() - t0)

    def paced(self, rate: float, seconds: float) -> list[float]:
        self.lat = []
        period = 1.0 / rate
        t0 = time.perf_counter()
        n = 0
        while (now := time.perf_counter()) - t0 < seconds:
            due = t0 + n * period
            if now < due:
                time.sleep(due - now)
            self._submit()
            n += 1
        self.drain()
        return self.lat

    def drain(self) -> None:
        with self.cv:
            while self.in_flight:
                self.cv.wait(1.0)


def measure_fanout(serving: int, data: list[tuple[np.ndarray, np.ndarray]],
                   seconds: float) -> tuple[float, float, float]:
    """(rows/s into ``plain``, into ``fan``, and ``fan`` over ``plain`` before any serving
    replica ran) through one server process (module doc), after checking that every
    serving replica holds the writable replica's rows."""
    from streamrec.cluster.spec import ClusterSpec, NodeSpec, TableSpec
    from streamrec.config import table_config_from_dict
    from streamrec.ps.client import PSClient
    from streamrec.ps.local import LocalCluster, free_port

    name = f"replication-fanout-{os.getpid()}"
    root = Path("/dev/shm/streamrec") / name
    fan = tuple(f"f{i:02d}" for i in range(1, serving + 1))
    # one zone: "plain" then goes to w alone (the zone's first node), "fan" to w and its serving nodes
    nodes = [NodeSpec(n, port=free_port(), zone="z", data_dir=str(root / n)) for n in ("w", *fan)]
    cfg = table_config_from_dict({"dim": DIM, "optimizer": "adagrad", "capacity": 2 * TABLE_ROWS})
    spec = ClusterSpec(name, tuple(nodes), (TableSpec("plain", cfg), TableSpec("fan", cfg, serving=fan)))
    assert spec.replicas("plain", 0) == spec.replicas("fan", 0) == ["w"]
    keys = np.arange(TABLE_ROWS, dtype=np.uint64)
    rates: dict[str, list[float]] = {"plain": [], "fan": []}
    alone: dict[str, list[float]] = {"plain": [], "fan": []}  # before any serving replica runs

    def measure(ps: PSClient, into: dict[str, list[float]]) -> None:
        for _ in range(3):
            for table, out in into.items():
                done, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds / 3:
                    k, g = data[done % len(data)]
                    ps.apply_gradients(table, k, g, 0.01)
                    done += 1
                out.append(done * ROWS / (time.perf_counter() - t0))

    with LocalCluster(spec) as cluster:
        cluster.start(["w"], timeout_s=300)
        with PSClient(spec, timeout_s=30.0) as ps:
            for table in rates:
                ps.assign(table, keys, np.zeros((TABLE_ROWS, DIM), np.float32))
                ps.apply_gradients(table, *data[0], 0.01)
            measure(ps, alone)  # "fan" logs every write in its ring; nobody pulls
            cluster.start(list(fan), timeout_s=300)
            measure(ps, rates)
            want_seq = _fan_seq(cluster, "w")
            deadline = time.monotonic() + 60
            for n in fan:
                while _fan_seq(cluster, n) < want_seq:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"serving replica {n} did not reach seq {want_seq}")
                    time.sleep(0.05)
            want, found = ps.find("fan", keys, node="w")
            assert found.all(), "the writable replica lost rows"
            for n in fan:
                got, found = ps.find("fan", keys, node=n)
                if not (found.all() and np.array_equal(got, want)):
                    raise AssertionError(f"serving replica {n} differs from the writable replica")
    return (float(np.median(rates["plain"])), float(np.median(rates["fan"])),
            float(np.median(alone["fan"]) / np.median(alone["plain"])))


def measure_strong_ps(data: list[tuple[np.ndarray, np.ndarray]], seconds: float) -> float:
    """Rows/s of acknowledged ``apply_gradients`` into a strong table of three server
    processes (module doc), after checking that every member holds the leader's rows."""
    from streamrec.errors import TransportError
    from streamrec.ps.client import PSClient
    from streamrec.ps.local import LocalCluster, loopback_spec

    spec = loopback_spec(f"replication-strong-{os.getpid()}", zones=3, nodes_per_zone=1, shards=1, dim=DIM,
                         metrics=False, mode="strong", election_timeout_s=(1.5, 4.0), max_staleness_s=5.0)
    keys = np.arange(TABLE_ROWS, dtype=np.uint64)
    with LocalCluster(spec) as cluster:
        cluster.start(timeout_s=300)
        with PSClient(spec, timeout_s=30.0) as ps:
            for lo in range(0, TABLE_ROWS, INSERT_ROWS):
                ps.assign("emb", keys[lo:lo + INSERT_ROWS], np.zeros((INSERT_ROWS, DIM), np.float32))
            for k, g in data[:8]:  # warm-up
                ps.apply_gradients("emb", k, g, 0.01)
            done, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                k, g = data[done % len(data)]
                ps.apply_gradients("emb", k, g, 0.01)
                done += 1
            rate = done * ROWS / (time.perf_counter() - t0)
            want, found = ps.find("emb", keys, consistency="linearizable")
            assert found.all(), "the leader lost rows"
            deadline = time.monotonic() + 60
            for n in spec.nodes:
                while True:  # a follower may trail the leader by its last few entries
                    try:
                        got, found = ps.find("emb", keys, node=n.name)
                    except TransportError:  # not ready (behind its staleness bound) yet
                        got, found = want, np.zeros_like(found)
                    if found.all() and np.array_equal(got, want):
                        break
                    if time.monotonic() > deadline:
                        raise AssertionError(f"strong member {n.name} differs from the leader")
                    time.sleep(0.1)
    return rate


def _fan_seq(cluster: Any, node: str) -> int:
    """The seq of ``node``'s replica of table ``fan`` (index 1), -1 if it does not answer."""
    info = cluster.hello(node)
    return -1 if info is None else int(next(s["seq"] for s in info["shards"] if s["table"] == 1))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a few seconds")
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--rounds", type=int, default=0, help="unused; accepted for `streamrec bench`")
    ap.add_argument("--window", type=int, default=64, help="batches in flight at saturation (default 64)")
    ap.add_argument("--fanout-replicas", type=int, default=0,
                    help="serving replicas for the fan-out figures (default 4; --smoke 2)")
    ap.add_argument("--batched-sends", dest="send_each", action="store_false",
                    help="RaftLogConfig(send_each_entry=False): append-entries once per tick")
    args = ap.parse_args(argv)
    secs = 0.3 if args.smoke else 3.0 if args.quick else 8.0
    log_out = sys.stderr
    data = batches(64)
    none = measure_none(data, secs)
    print(f"none: {none / 1e6:.2f} M rows/s ({none / ROWS:,.0f} batches/s)", file=log_out)
    n_fan = args.fanout_replicas or (2 if args.smoke else 4)
    ps_rate, fan_rate, log_only = measure_fanout(n_fan, data, secs)
    print(f"fan-out: through the server {ps_rate / 1e6:.3f} M rows/s without fan-out, {fan_rate / 1e6:.3f} M "
          f"rows/s with {n_fan} serving replicas pulling ({fan_rate / ps_rate:.2f}x; logging alone, before "
          f"they ran: {log_only:.2f}x); every serving replica checked against the writable one", file=log_out)
    strong_ps = measure_strong_ps(data, secs)
    print(f"strong through the server: {strong_ps / 1e6:.3f} M rows/s ({strong_ps / ROWS:,.0f} acknowledged "
          f"batches/s, one in flight; {strong_ps / ps_rate:.3f}x the unreplicated server); every member "
          "checked against the leader", file=log_out)

    root = Path(tempfile.mkdtemp(prefix="streamrec-replication-"))
    addrs = [f"127.0.0.1:{p}" for p in _free_ports(3)]
    followers = []
    log: BatchLog | None = None
    try:
        # the local member starts first and times out first, so it wins the first election and leads
        cfg = RaftLogConfig(election_timeout_s=LEADER_ELECTION_S, heartbeat_s=FOLLOWER_HEARTBEAT_S,
                            send_each_entry=args.send_each)
        log = BatchLog(addrs[0], addrs[1:], make_table, root / "m0", cfg)
        for i in (1, 2):
            peers = ",".join(a for j, a in enumerate(addrs) if j != i)
            lo, hi = FOLLOWER_ELECTION_S
            followers.append(subprocess.Popen(
                [sys.executable, "-c", _FOLLOWER, addrs[i], peers, str(root / f"m{i}"), str(lo), str(hi),
                 str(FOLLOWER_HEARTBEAT_S), str(int(args.send_each)), str(DIM), str(TABLE_ROWS)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for f in followers:
            assert f.stdout is not None
            f.stdout.readline()
        deadline = time.monotonic() + 120
        while not log.is_leader:
            if time.monotonic() > deadline:
                raise RuntimeError(f"this process did not become the leader (leader: {log.leader})")
            time.sleep(0.05)
        for lo_row in range(0, TABLE_ROWS, INSERT_ROWS):
            log.submit(Op.INSERT_OR_ASSIGN, np.arange(lo_row, lo_row + INSERT_ROWS, dtype=np.uint64),
                       np.zeros((INSERT_ROWS, DIM), np.float32), writer=2, seq=lo_row + 1, timeout=60)
        w = Writer(log, data)
        w.saturate(args.window, min(secs, 1.0))  # warm-up
        strong_bps = w.saturate(args.window, secs)
        strong = strong_bps * ROWS
        print(f"strong: {strong / 1e6:.2f} M rows/s ({strong_bps:,.0f} committed 64 KiB batches/s, "
              f"{w.failed} failed)", file=log_out)
        sync = []
        for _ in range(min(200, int(50 * secs))):
            t0 = time.perf_counter()
            w._submit()
            w.drain()
            sync.append(time.perf_counter() - t0)
        half = strong_bps / 2
        lat = np.array(w.paced(half, secs)) * 1e3
    finally:
        if log is not None:
            log.close()
        for f in followers:
            f.kill()
            f.wait()
        shutil.rmtree(root, ignore_errors=True)
    figures = {
        "batch_bytes": BATCH_BYTES, "rows_per_batch": ROWS,
        "none_rows_per_s": none, "strong_rows_per_s": strong, "strong_over_none": strong / none,
        "strong_batches_per_s": strong_bps, "half_rate_batches_per_s": half,
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "sync_p50_ms": float(np.percentile(sync, 50) * 1e3),
        "sync_p99_ms": float(np.percentile(sync, 99) * 1e3),
        "fanout_replicas": n_fan, "ps_rows_per_s": ps_rate, "fanout_rows_per_s": fan_rate,
        "fanout_over_ps": fan_rate / ps_rate, "log_only_over_ps": log_only,
        "strong_ps_rows_per_s": strong_ps, "strong_ps_over_ps": strong_ps / ps_rate,
    }
    print(f"strong_over_none {figures['strong_over_none']:.3f} (target >= 0.33) | commit latency at "
          f"{half:,.0f} batches/s: p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms "
          f"(target <= 20) | one in flight: p50 {figures['sync_p50_ms']:.1f} ms, "
          f"p99 {figures['sync_p99_ms']:.1f} ms | 3 members and the writer share this host's cores",
          file=log_out)
    assert tuple(figures) == KEYS
    if args.json:
        sys.stdout.write(json.dumps(figures) + "\n")
    return figures


if __name__ == "__main__":
    main()
