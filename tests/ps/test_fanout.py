"""Fan-out to read-only serving replicas, against real server processes.

One cluster serves the module: two writable replicas (``z1n1``, ``z2n1``, one
shard of ``emb``, dim 8) and five serving replicas in a tree of fan-out 2,
rooted at ``z1n1``::

    z1n1 -> f01 -> f03, f04
         -> f02 -> f05

Rings hold 256 KiB, so a replica left behind by a few dozen batches is told
TRUNCATED. Every test ends with every node up and every serving replica caught
up, and checks rows by reading every key back from each replica (``node=``),
against what the root holds and, for assigned rows, against the values written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from streamrec.ps._follow import PARENT_DEAD_S
from streamrec.ps._status import cluster_status, format_status
from streamrec.ps.client import PSClient
from streamrec.ps.local import LocalCluster, loopback_spec
from streamrec.transport.frames import Frame, Kind, Status
from streamrec.transport.tcp import TcpConnection

_DIM = 8
_ROOT, _OTHER = "z1n1", "z2n1"
_FAN = ("f01", "f02", "f03", "f04", "f05")
# A dead interior node's children must pull from a new parent within this: PARENT_DEAD_S of
# failures, one request's patience (0.5 s), and slack for a loaded 2-core host.
_REATTACH_BOUND_S = PARENT_DEAD_S + 0.5 + 2.0


def _rows(keys: np.ndarray, version: int) -> np.ndarray:
    v = np.full((keys.size, _DIM), 0.25, dtype=np.float32)
    v[:, 0] = keys
    v[:, 1] = version
    return v


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    spec = loopback_spec(f"fan-{os.getpid()}", zones=2, nodes_per_zone=1, shards=1, dim=_DIM, serving=5,
                         fanout=2, ring_bytes=256 << 10, metrics=False)
    with LocalCluster(spec) as c:
        c.start(timeout_s=300)
        yield c


@pytest.fixture
def ps(cluster: LocalCluster) -> Iterator[PSClient]:
    with PSClient(cluster.spec, transports=("tcp",), timeout_s=10.0) as client:
        yield client


def _shard(cluster: LocalCluster, name: str) -> dict | None:
    info = cluster.hello(name)
    return info["shards"][0] if info is not None else None


def _caught_up(cluster: LocalCluster, timeout_s: float = 20.0, root: str = _ROOT) -> dict[str, dict]:
    """Wait until every serving replica is ready at the root's (epoch, seq); their HELLO shards."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, dict | None] = {}
    while time.monotonic() < deadline:
        want = _shard(cluster, root)
        last = {n: _shard(cluster, n) for n in _FAN}
        if want is not None and want["ready"] and all(
                s is not None and s["ready"] and (s["epoch"], s["seq"]) == (want["epoch"], want["seq"])
                for s in last.values()):
            return last  # type: ignore[return-value]
        time.sleep(0.1)
    raise AssertionError(f"serving replicas not caught up with {root} ({_shard(cluster, root)}): {last}")


def _check_everywhere(ps: PSClient, keys: np.ndarray, erased: np.ndarray | None = None) -> None:
    """Every serving replica holds exactly the root's rows for ``keys``, and none of ``erased``."""
    want, found = ps.find("emb", keys, node=_ROOT)
    assert found.all()
    other, ofound = ps.find("emb", keys, node=_OTHER)
    assert ofound.all()
    assert_array_equal(other, want)
    for n in _FAN:
        got, gfound = ps.find("emb", keys, node=n)
        assert gfound.all(), f"{n} lacks {int((~gfound).sum())} of {keys.size} rows"
        assert_array_equal(got, want, err_msg=n)
        if erased is not None and erased.size:
            _, efound = ps.find("emb", erased, node=n)
            assert not efound.any(), f"{n} still holds {int(efound.sum())} erased rows"


def _writer(ps: PSClient, lo: int, stop: threading.Event, written: list[int]) -> None:
    """Assign batches of 200 new keys from ``lo`` until ``stop``; the batch starts it wrote."""
    k = lo
    while not stop.is_set():
        keys = np.arange(k, k + 200, dtype=np.uint64)
        ps.assign("emb", keys, _rows(keys, 1))
        written.append(k)
        k += 200
        time.sleep(0.01)


def test_committed_writes_reach_every_serving_replica(cluster: LocalCluster, ps: PSClient) -> None:
    keys = np.arange(1, 5_001, dtype=np.uint64)
    for lo in range(0, keys.size, 1000):
        ps.assign("emb", keys[lo:lo + 1000], _rows(keys[lo:lo + 1000], 0))
    for step in range(3):  # gradients ship as the rows they produce, not as gradients
        ps.apply_gradients("emb", keys[:500], np.full((500, _DIM), 0.1 * (step + 1), np.float32), lr=0.05)
    erased = keys[-100:]
    ps.erase("emb", erased)
    shards = _caught_up(cluster)
    tree = {n: s["parent"] for n, s in shards.items()}
    assert tree == {"f01": _ROOT, "f02": _ROOT, "f03": "f01", "f04": "f01", "f05": "f02"}
    _check_everywhere(ps, keys[:-100], erased)
    assigned, _ = ps.find("emb", keys[500:-100], node="f05")
    assert_array_equal(assigned, _rows(keys[500:-100], 0))
    with PSClient(cluster.spec) as near:  # every transport: one-sided reads of the replica's files here
        got, found = near.find("emb", keys[:-100], node="f05")
        want, _ = ps.find("emb", keys[:-100], node=_ROOT)
        assert found.all() and np.array_equal(got, want)
        assert near.stats.by_transport.get("one_sided", 0) > 0, near.stats.by_transport


def test_writes_to_a_serving_replica_are_refused(cluster: LocalCluster, ps: PSClient) -> None:
    keys = np.array([7, 8], dtype=np.uint64)
    before, _ = ps.find("emb", keys, node="f03")
    with TcpConnection(cluster.spec.node("f03").address) as conn:
        for kind, bufs in [(Kind.ASSIGN, [keys, _rows(keys, 9)]), (Kind.ERASE, [keys]),
                           (Kind.APPLY_GRADIENTS, [keys, _rows(keys, 9), np.array([0.1])])]:
            reply = conn.request(Frame(kind, bufs, request_id=int(kind)), 5.0)
            assert reply.status == Status.READ_ONLY, (kind, reply.text())
            assert "read-only" in reply.text() and _ROOT in reply.text()
    after, _ = ps.find("emb", keys, node="f03")
    assert_array_equal(after, before)


def test_serving_replica_killed_and_restarted_catches_up(cluster: LocalCluster, ps: PSClient) -> None:
    cluster.kill("f04")
    keys = np.arange(20_001, 22_001, dtype=np.uint64)
    ps.assign("emb", keys, _rows(keys, 2))
    cluster.restart("f04", timeout_s=120)
    more = np.arange(22_001, 22_501, dtype=np.uint64)
    ps.assign("emb", more, _rows(more, 2))
    _caught_up(cluster)
    _check_everywhere(ps, np.concatenate([keys, more]))


def test_interior_node_killed_mid_stream_children_reattach(cluster: LocalCluster, ps: PSClient) -> None:
    stop, written = threading.Event(), list[int]()
    with PSClient(cluster.spec, transports=("tcp",), timeout_s=10.0) as wps:
        t = threading.Thread(target=_writer, args=(wps, 100_000, stop, written))
        t.start()
        try:
            time.sleep(0.5)
            cluster.kill("f01")  # the parent of f03 and f04
            killed = time.monotonic()
            moved: dict[str, float] = {}
            while len(moved) < 2 and time.monotonic() - killed < 10:
                for n in ("f03", "f04"):
                    s = _shard(cluster, n)
                    if n not in moved and s is not None and s["parent"] not in ("f01", ""):
                        moved[n] = time.monotonic() - killed
                time.sleep(0.05)
            time.sleep(0.5)
        finally:
            stop.set()
            t.join()
    assert len(moved) == 2 and max(moved.values()) <= _REATTACH_BOUND_S, moved
    # while f01 is down, its children hold every row written, mid-stream included
    keys = np.concatenate([np.arange(k, k + 200, dtype=np.uint64) for k in written])
    deadline = time.monotonic() + 20
    while True:
        root = _shard(cluster, _ROOT)
        kids = [_shard(cluster, n) for n in ("f03", "f04")]
        if all(k is not None and root is not None and (k["epoch"], k["seq"]) == (root["epoch"], root["seq"])
               for k in kids):
            break
        assert time.monotonic() < deadline, (root, kids)
        time.sleep(0.1)
    want, _ = ps.find("emb", keys, node=_ROOT)
    for n in ("f03", "f04"):
        got, found = ps.find("emb", keys, node=n)
        assert found.all() and np.array_equal(got, want), n
    cluster.restart("f01", timeout_s=120)
    _caught_up(cluster)
    _check_everywhere(ps, keys)


def test_replica_behind_a_truncated_ring_resyncs_from_an_export(cluster: LocalCluster, ps: PSClient) -> None:
    before = _shard(cluster, "f05")
    assert before is not None
    pid = cluster.pid("f05")
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        keys = np.arange(200_000, 230_000, dtype=np.uint64)  # 60 batches of 20 KB: past the 256 KiB rings
        for lo in range(0, keys.size, 500):
            ps.assign("emb", keys[lo:lo + 500], _rows(keys[lo:lo + 500], 3))
        parent = _shard(cluster, "f02")
        assert parent is not None and parent["ring_base"] > before["seq"]  # f05's next batch is gone
    finally:
        os.kill(pid, signal.SIGCONT)
    shards = _caught_up(cluster)
    assert shards["f05"]["resyncs"] > before["resyncs"]
    _check_everywhere(ps, keys)


def test_writable_root_restart_resyncs_the_tree(cluster: LocalCluster, ps: PSClient) -> None:
    first = _caught_up(cluster)
    epoch = first["f01"]["epoch"]
    cluster.kill(_ROOT)
    keys = np.arange(300_000, 302_000, dtype=np.uint64)
    ps.assign("emb", keys, _rows(keys, 4))  # acknowledged by z2n1 alone
    during = _caught_up(cluster, root=_OTHER)  # the tree re-rooted at the other writable replica
    # every replica now follows z2n1's epoch (checked above); the root's own children know it by name
    assert all(s["epoch"] != epoch for s in during.values())
    assert during["f01"]["root"] == during["f02"]["root"] == _OTHER
    for n in _FAN:
        got, found = ps.find("emb", keys, node=n)
        assert found.all() and np.array_equal(got, _rows(keys, 4)), n
    cluster.restart(_ROOT, timeout_s=120)  # it refills from z2n1 and starts a new epoch
    more = np.arange(302_000, 302_500, dtype=np.uint64)
    ps.assign("emb", more, _rows(more, 4))
    after = _caught_up(cluster)
    assert all(s["epoch"] not in (epoch, during["f01"]["epoch"]) for s in after.values())
    assert after["f01"]["root"] == after["f02"]["root"] == _ROOT
    _check_everywhere(ps, np.concatenate([keys, more]))


def test_ps_status_shows_roles_and_lag(cluster: LocalCluster, ps: PSClient) -> None:
    _caught_up(cluster)
    out = subprocess.run([sys.executable, "-m", "streamrec.cli", "ps", "status", "--config",
                          str(cluster.spec_path), "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {r["node"]: r for r in json.loads(out.stdout.splitlines()[-1])}
    assert {n: r["role"] for n, r in rows.items()} == {_ROOT: "writable", _OTHER: "writable",
                                                       **{n: "serving" for n in _FAN}}
    assert all(rows[n]["lag_batches"] == 0 and rows[n]["lag_s"] == 0 and rows[n]["root"] == _ROOT
               for n in _FAN)
    pid = cluster.pid("f02")
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # f05 gets nothing until it re-attaches (PARENT_DEAD_S)
    try:
        t0 = time.monotonic()
        for i in range(3):
            keys = np.arange(400_000 + 100 * i, 400_100 + 100 * i, dtype=np.uint64)
            ps.assign("emb", keys, _rows(keys, 5))
            time.sleep(0.05)
        status = cluster_status(cluster.spec, timeout_s=0.2)
        took = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    rows = {r["node"]: r for r in status}
    if took < PARENT_DEAD_S:  # else f05 may have re-attached: nothing to check
        assert rows["f05"]["lag_batches"] == 3 and rows["f05"]["lag_s"] > 0.09, rows["f05"]
    assert not rows["f02"]["up"] and rows["f02"]["lag_batches"] is None
    text = format_status(status).splitlines()
    assert text[0].split()[:4] == ["TABLE", "SHARD", "NODE", "ROLE"] and len(text) == 1 + len(rows)
    assert next(line for line in text if " f05 " in line).split()[-2] == ("3" if took < PARENT_DEAD_S else
                                                                       str(rows["f05"]["lag_batches"]))
    _caught_up(cluster)
