"""Strong mode (Raft-ordered writes) through real storage processes and the client.

One group of three (three zones of one node, one shard of ``emb``, dim 8,
optimizer "none" so a gradient step of -1 at lr 1 adds exactly 1) serves the
module. Each test leaves every node up and ready. A batch is told applied once
from twice by a counter: eight keys that every batch's gradient step raises by
one, so on every replica they must equal the number of batches applied; the
batch's own keys carry its number, so a missing or stale row is seen too.
Raft timeouts are generous: five agents share two cores here.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from streamrec.errors import DeadlineExceeded, RemoteError
from streamrec.ps._status import cluster_status
from streamrec.ps.client import PSClient, WriteAck
from streamrec.ps.local import LocalCluster, loopback_spec

_DIM = 8
_B = 64  # keys per batch
_COUNTER = np.arange(1 << 40, (1 << 40) + 8, dtype=np.uint64)
_ELECTION_S = (1.5, 4.0)
_STALENESS_S = 3.0


def _rows(keys: np.ndarray, version: int) -> np.ndarray:
    v = np.full((keys.size, _DIM), 0.5, dtype=np.float32)
    v[:, 0] = keys % 1_000_003
    v[:, 1] = version
    return v


def _batch_keys(i: int) -> np.ndarray:
    return np.arange(i * _B, (i + 1) * _B, dtype=np.uint64)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    spec = loopback_spec(f"strong-{os.getpid()}", zones=3, nodes_per_zone=1, shards=1, dim=_DIM,
                         optimizer="none", mode="strong", election_timeout_s=_ELECTION_S,
                         max_staleness_s=_STALENESS_S)
    assert spec.mode("emb") == "strong"
    with LocalCluster(spec) as c:
        c.start(timeout_s=300)
        yield c


class _Writer:
    """Streams batches: batch i assigns its keys (version i) and raises the counter by one."""

    def __init__(self, ps: PSClient) -> None:
        self.ps = ps
        self.next = 0
        self.acked: list[int] = []  # batches whose two calls were both acknowledged
        self.failed = 0  # gradient steps not acknowledged (each may or may not have applied)
        self.acked_at: list[float] = []

    def reset_counter(self) -> None:
        self.ps.assign("emb", _COUNTER, np.zeros((_COUNTER.size, _DIM), np.float32))

    def write(self) -> None:
        i = self.next
        self.next += 1
        keys = _batch_keys(i)
        ack = self.ps.assign("emb", keys, _rows(keys, i))
        assert isinstance(ack, WriteAck) and ack.ready_replicas == 2 and ack.missed == ()
        try:
            self.ps.apply_gradients("emb", _COUNTER, -np.ones((_COUNTER.size, _DIM), np.float32), 1.0)
        except DeadlineExceeded:
            self.failed += 1
            raise
        self.acked.append(i)
        self.acked_at.append(time.monotonic())


def _live(cluster: LocalCluster) -> list[str]:
    return [n.name for n in cluster.spec.nodes if cluster.pid(n.name) is not None]


def _leader(cluster: LocalCluster) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for name in _live(cluster):
            info = cluster.hello(name)
            if info is not None and info["shards"][0].get("is_leader"):
                return name
        time.sleep(0.1)
    raise AssertionError("no leader within 60 s")


def _check_replicas(ps: PSClient, nodes: list[str], w: _Writer, wait_s: float = 30.0) -> None:
    """Every acknowledged batch is on every node once: its rows are there, and the counter
    counts each acknowledged step once (plus, at most, the steps whose calls failed).

    A member read alone is within its staleness bound, not necessarily current, so it
    is read again until it shows every acknowledged batch (at most ``wait_s``); at no
    read may it show a wrong row or a step applied twice.
    """
    keys = np.concatenate([_batch_keys(i) for i in w.acked])
    want = np.concatenate([_rows(_batch_keys(i), i) for i in w.acked])
    for name in nodes:
        deadline = time.monotonic() + wait_s
        while True:
            values, found = ps.find("emb", keys, node=name)
            assert_array_equal(values[found], want[found], err_msg=name)
            counter, c_found = ps.find("emb", _COUNTER, node=name)
            assert c_found.all()
            applied = counter[:, 0]
            assert (applied == applied[0]).all()
            assert applied[0] <= len(w.acked) + w.failed, (name, applied[0], len(w.acked), w.failed)
            if found.all() and applied[0] >= len(w.acked):
                break
            assert time.monotonic() < deadline, (f"{name}: {np.count_nonzero(~found)} acknowledged rows "
                                                 f"missing, counter {applied[0]} of {len(w.acked)}")
            time.sleep(0.2)


def _all_ready(cluster: LocalCluster, timeout_s: float = 120) -> None:
    for name in [n.name for n in cluster.spec.nodes]:
        if cluster.pid(name) is None:
            cluster.start([name], timeout_s=timeout_s)
        else:
            cluster.wait_ready(name, timeout_s)


def _settled(ps: PSClient, cluster: LocalCluster, w: _Writer) -> None:
    """Wait until every live replica has applied what the leader has (a linearizable read
    first), so that one-node reads see the whole log."""
    ps.find("emb", _COUNTER, consistency="linearizable")
    for name in _live(cluster):
        cluster.wait_ready(name, 60)
    time.sleep(0.5)


def test_leader_killed_mid_stream_loses_nothing_and_the_writer_resumes(cluster: LocalCluster) -> None:
    with PSClient(cluster.spec, transports=("tcp",), timeout_s=30.0) as ps:
        w = _Writer(ps)
        w.reset_counter()
        old = _leader(cluster)
        killed_at: list[float] = []

        def kill() -> None:
            killed_at.append(time.monotonic())
            cluster.kill(old)

        killer = threading.Timer(1.0, kill)
        killer.start()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30 and (not killed_at or len([t for t in w.acked_at
                                                                    if t > killed_at[0]]) < 10):
            w.write()
        killer.join()
        after = [t for t in w.acked_at if t > killed_at[0]]
        assert len(after) >= 10, "the writer did not resume against a new leader"
        new = _leader(cluster)
        assert new != old and ps.leaders[(0, 0)] == new
        _settled(ps, cluster, w)
        _check_replicas(ps, _live(cluster), w)
        rows = [r for r in cluster_status(cluster.spec) if r["up"]]  # `streamrec ps status`
        assert {r["node"] for r in rows} == set(_live(cluster)) and {r["root"] for r in rows} == {new}
        # the killed member rejoins from its journal and the log, and reports ready only once caught up
        cluster.start([old], timeout_s=120)
        _check_replicas(ps, [old], w)


def test_paused_follower_catches_up(cluster: LocalCluster) -> None:
    _all_ready(cluster)
    with PSClient(cluster.spec, transports=("tcp",), timeout_s=30.0) as ps:
        w = _Writer(ps)
        w.reset_counter()
        leader = _leader(cluster)
        follower = next(n for n in _live(cluster) if n != leader)
        pid = cluster.pid(follower)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:  # paused past its election timeout and staleness bound (resumed, it may stand for election)
            t0 = time.monotonic()
            while time.monotonic() - t0 < _STALENESS_S + 1.5 or len(w.acked) < 30:
                w.write()
        finally:
            os.kill(pid, signal.SIGCONT)
        # Resumed, it knows an old commit index of the leader: until it caught up it must not
        # serve, and whatever it serves holds every batch acknowledged more than the bound ago.
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:
            due = time.monotonic() - _STALENESS_S
            old = [i for i, at in zip(w.acked, w.acked_at, strict=True) if at < due]
            keys = np.concatenate([_batch_keys(i) for i in old])
            try:
                _, found = ps.find("emb", keys, node=follower)
            except RemoteError:  # not ready: behind its bound
                continue
            assert found.all(), f"{follower} served reads {np.count_nonzero(~found)} rows behind its bound"
        for _ in range(30):  # the group keeps taking writes while it catches up
            w.write()
        _settled(ps, cluster, w)
        _check_replicas(ps, [n.name for n in cluster.spec.nodes], w)


def test_a_minority_cannot_acknowledge(cluster: LocalCluster) -> None:
    _all_ready(cluster)
    deadline_s = 5.0
    with PSClient(cluster.spec, transports=("tcp",), timeout_s=deadline_s) as ps:
        w = _Writer(ps)
        w.reset_counter()
        for _ in range(3):
            w.write()
        leader = _leader(cluster)
        paused = [n for n in _live(cluster) if n != leader]
        pids = [cluster.pid(n) for n in paused]
        for pid in pids:
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="no leader acknowledged it"):
                w.write()
            took = time.monotonic() - t0
            assert took < 2 * deadline_s + 2, took  # the assign's deadline, with slack for a loaded host
        finally:
            for pid in pids:
                assert pid is not None
                os.kill(pid, signal.SIGCONT)
        # Nothing partial was acknowledged: the unacknowledged batch applies once or never
        # (it may commit once the majority is back), the same on every replica.
        _settled(ps, cluster, w)
        w.failed += 1  # the failed batch's step, if its assign failed first, never was sent: at most one
        _check_replicas(ps, [n.name for n in cluster.spec.nodes], w)
        w.write()  # and the group takes writes again


def test_all_members_restarted_at_once(cluster: LocalCluster) -> None:
    _all_ready(cluster)
    with PSClient(cluster.spec, transports=("tcp",), timeout_s=30.0) as ps:
        w = _Writer(ps)
        w.reset_counter()
        for _ in range(30):
            w.write()
        names = [n.name for n in cluster.spec.nodes]
        for name in names:  # SIGKILL all three before any restarts
            pid = cluster.pid(name)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
        for name in names:
            cluster.kill(name)  # reaps
        cluster.start(names, timeout_s=180)
        _settled(ps, cluster, w)
        _check_replicas(ps, names, w)
        w.write()


def test_member_restarted_from_its_snapshot_serves_the_logs_table(cluster: LocalCluster) -> None:
    _all_ready(cluster)
    with PSClient(cluster.spec, transports=("tcp",), timeout_s=30.0) as ps:
        w = _Writer(ps)
        w.reset_counter()
        for _ in range(10):
            w.write()
        follower = next(n for n in _live(cluster) if n != _leader(cluster))
        dump = ps.snapshot()[follower]["snapshots"]["emb/0"]  # the log's snapshot, which truncates it
        deadline = time.monotonic() + 30
        while not os.path.exists(dump):  # written at the member's next tick
            assert time.monotonic() < deadline, f"no snapshot at {dump}"
            time.sleep(0.05)
        time.sleep(0.5)
        cluster.kill(follower)
        for _ in range(10):  # entries it must replay from the leader on top of its snapshot
            w.write()
        cluster.start([follower], timeout_s=120)
        _settled(ps, cluster, w)
        _check_replicas(ps, [follower], w)
