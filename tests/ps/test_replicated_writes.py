"""Client-replicated writes (two replicas per shard) against real server processes.

Each test is one bug of issue 10's first section, seen by a new user's chaos
run: an acknowledged write must be on every replica once both are back, and a
replica must not serve before it holds its shard. One cluster serves most of the
module: two zones of one node each, one shard of ``emb`` (dim 8), so each node
holds a full replica. A test that kills or pauses a node leaves both up and
ready when it ends. Values encode their key (element 0) and a version (element
1), so a stale row is told from a current one.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from streamrec.cluster.router import RouterConfig
from streamrec.cluster.spec import ClusterSpec
from streamrec.errors import TransportError
from streamrec.ps.client import PSClient, WriteAck
from streamrec.ps.local import LocalCluster, loopback_spec
from streamrec.ps.service import FILLING
from streamrec.transport.frames import Frame, Kind, Status
from streamrec.transport.tcp import TcpConnection

_DIM = 8
_A, _B = "z1n1", "z2n1"
_BASE = 150_000  # rows loaded at the start: enough that a refill takes a while


def _rows(keys: np.ndarray, version: int = 0) -> np.ndarray:
    v = np.full((keys.size, _DIM), 0.5, dtype=np.float32)
    v[:, 0] = keys
    v[:, 1] = version
    return v


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    spec = loopback_spec(f"repl-{os.getpid()}", zones=2, nodes_per_zone=1, shards=1, dim=_DIM)
    with LocalCluster(spec) as c:
        c.start(timeout_s=300)  # a cold numba cache compiles in each server at first
        with PSClient(spec, transports=("tcp",), timeout_s=30.0) as loader:  # bulk: a patient deadline
            for lo in range(0, _BASE, 50_000):
                keys = np.arange(lo, lo + 50_000, dtype=np.uint64)
                loader.assign("emb", keys, _rows(keys))
        yield c


def _both_up(cluster: LocalCluster) -> None:
    for name in (_A, _B):
        if cluster.pid(name) is None:
            cluster.start([name])
    for name in (_A, _B):
        cluster.wait_ready(name, 60)


def _check_everywhere(cluster: LocalCluster, acked: dict[int, int]) -> dict[str, int]:
    """Rows of ``acked`` (key -> version) missing or stale on each replica, read once both are ready.

    A replica may be filling again when the writer stops, and rightly: on a loaded host a write
    may have given up on it (its siblings answered) and been acknowledged without it, and the
    replica saw the gap in the writer's sequence. What must hold is that it serves every
    acknowledged write once it says it is ready."""
    for name in (_A, _B):
        cluster.wait_ready(name, 60)
    keys = np.fromiter(acked, np.uint64, len(acked))
    want = np.fromiter(acked.values(), np.float32, len(acked))
    bad = {}
    with PSClient(cluster.spec, transports=("tcp",), timeout_s=30.0) as reader:
        for name in (_A, _B):
            n = 0
            for lo in range(0, keys.size, 50_000):
                k = keys[lo:lo + 50_000]
                values, found = reader.find("emb", k, node=name)
                n += int(np.count_nonzero(~found | (values[:, 1] != want[lo:lo + 50_000])))
            bad[name] = n
    return bad


class _Writer:
    """Writes batches until stopped: new keys (``fresh``) or new versions of loaded ones."""

    def __init__(self, spec: ClusterSpec, *, fresh: bool, start_key: int, period_s: float = 0.005,
                 **client: object) -> None:
        self.client = PSClient(spec, router=RouterConfig(backoff_base_s=0.5, backoff_max_s=2.0),
                               **client)  # type: ignore[arg-type]
        self.fresh, self.next_key, self.period_s = fresh, start_key, period_s
        self.acked: dict[int, int] = {}
        self.acks: list[tuple[float, WriteAck]] = []
        self.failed = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self._rng = np.random.default_rng(start_key)
        self._version = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self._version += 1
                if self.fresh:
                    keys = np.arange(self.next_key, self.next_key + 32, dtype=np.uint64)
                    self.next_key += 32
                else:
                    keys = np.unique(self._rng.integers(0, _BASE, 64, dtype=np.uint64))
                try:
                    ack = self.client.assign("emb", keys, _rows(keys, self._version))
                except TransportError:
                    self.failed += 1
                else:
                    self.acks.append((time.monotonic(), ack))
                    self.acked.update(dict.fromkeys(keys.tolist(), self._version))
                time.sleep(self.period_s)
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> _Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        self.client.close()
        assert self.error is None, repr(self.error)


def test_restarted_replica_gets_writes_while_writes_keep_coming(cluster: LocalCluster) -> None:
    """block: the client's "recently failed" block on the killed node's link must not renew
    itself on every write, or the restarted replica never sees a write again; then its peer's
    restart refills from the stale copy and acknowledged writes are gone everywhere."""
    _both_up(cluster)
    with _Writer(cluster.spec, fresh=True, start_key=10_000_000, transports=("tcp",)) as w:
        time.sleep(0.3)
        cluster.kill(_B)
        time.sleep(0.5)
        cluster.start([_B])
        back_at = time.monotonic()
        time.sleep(1.5)
    assert w.failed == 0
    down = [a for t, a in w.acks if t < back_at and a.missed]
    assert down and all(a.missed == (_B,) and a.ready_replicas == 1 for a in down)
    late = [a for t, a in w.acks if t > back_at + 1.0]
    assert late and not any(a.missed for a in late), "the restarted replica still gets no writes"
    cluster.kill(_A)
    cluster.start([_A])
    _both_up(cluster)
    assert _check_everywhere(cluster, w.acked) == {_A: 0, _B: 0}


def test_writes_during_a_refill_are_on_the_refilled_replica(cluster: LocalCluster) -> None:
    """refill (and issue 9 part 4): new versions of rows written while a restarted replica
    fills from its peer, after those rows were copied, must be on it once it is ready."""
    _both_up(cluster)
    cluster.kill(_B)
    with _Writer(cluster.spec, fresh=False, start_key=1, transports=("tcp",), period_s=0.002) as w:
        cluster.start([_B], wait=False)
        cluster.wait_ready(_B, 60)
        time.sleep(0.3)
    assert w.failed == 0 and len(w.acked) > 100
    assert _check_everywhere(cluster, w.acked) == {_A: 0, _B: 0}
    cluster.kill(_A)  # the refilled replica is now the only copy, then the source of A's
    cluster.start([_A])
    assert _check_everywhere(cluster, w.acked) == {_A: 0, _B: 0}


def test_reads_reach_an_ejected_replica_when_the_other_dies(cluster: LocalCluster) -> None:
    """breaker: B comes back ready but the client has ejected it; A then dies. Reads must
    go to B (the last resort) instead of failing while B holds every row."""
    _both_up(cluster)
    keys = np.arange(0, 256, dtype=np.uint64)
    with PSClient(cluster.spec, local=_B, transports=("tcp",),
                  router=RouterConfig(backoff_base_s=20.0, backoff_max_s=40.0)) as c:
        cluster.kill(_B)
        for _ in range(12):  # B fails every read until its breaker opens
            c.find("emb", keys)
        assert c.router.snapshot()[_B]["state"] == "open"
        cluster.start([_B])
        cluster.kill(_A)
        failed = 0
        for _ in range(20):
            try:
                _, found = c.find("emb", keys)
                assert found.all()
            except TransportError:
                failed += 1
        assert failed == 0
    _both_up(cluster)


def test_a_replica_never_reports_ready_before_it_holds_its_shard(cluster: LocalCluster) -> None:
    """emptyfill: B restarts while A is paused for 1.5 s; B must wait for A, not give up
    after 0.5 s and serve found=False for every row."""
    _both_up(cluster)
    cluster.kill(_B)
    pid = cluster.pid(_A)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        cluster.start([_B], wait=False)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            info = cluster.hello(_B)
            assert info is None or not any(s["ready"] for s in info["shards"]), "ready without its rows"
            time.sleep(0.1)
    finally:
        os.kill(pid, signal.SIGCONT)
    cluster.wait_ready(_B, 60)
    keys = np.arange(0, _BASE, 97, dtype=np.uint64)
    with PSClient(cluster.spec, transports=("tcp",)) as c:
        _, found = c.find("emb", keys, node=_B)
    assert found.all()


def test_a_paused_replica_that_missed_writes_refills(cluster: LocalCluster) -> None:
    """SIGSTOP: writes acknowledged by A alone while B was paused must reach B (it sees the
    gap in the client's sequence and refills), so that A's later loss loses nothing."""
    _both_up(cluster)
    pid = cluster.pid(_B)
    assert pid is not None
    with _Writer(cluster.spec, fresh=True, start_key=20_000_000, transports=("tcp",)) as w:
        time.sleep(0.2)
        os.kill(pid, signal.SIGSTOP)
        time.sleep(1.5)
        os.kill(pid, signal.SIGCONT)
        time.sleep(1.0)
    assert w.failed == 0
    cluster.wait_ready(_B, 60)
    cluster.kill(_A)
    cluster.start([_A])
    assert _check_everywhere(cluster, w.acked) == {_A: 0, _B: 0}


def _assign_at(cluster: LocalCluster, node: str, client: int, seq: int, keys: np.ndarray,
               version: int) -> int:
    """One client-replicated write sent to ``node`` alone, as a client whose copy to the other
    replica was lost would have sent it; the reply's aux (``FILLING`` from a filling replica)."""
    frame = Frame(Kind.ASSIGN, [keys, _rows(keys, version)], request_id=client << 32 | seq, table=0,
                  shard=0, aux=seq << 1)
    with TcpConnection(cluster.spec.node(node).address) as conn:
        reply = conn.request(frame, 10.0)
    assert reply.status == Status.OK, reply.text()
    return reply.aux


def test_a_replica_that_sees_a_gap_in_a_writers_sequence_refills(cluster: LocalCluster) -> None:
    """A write acknowledged by A alone (B's copy lost) must reach B: B sees the gap at the
    writer's next write and refills, so A's later loss loses nothing."""
    _both_up(cluster)
    keys = np.arange(40_000_000, 40_000_008, dtype=np.uint64)
    gone = np.arange(40_000_100, 40_000_104, dtype=np.uint64)
    client = 0x5EED
    assert [_assign_at(cluster, node, client, 1, keys[:4], 1) for node in (_A, _B)] == [0, 0]
    assert [_assign_at(cluster, node, client, 2, gone, 1) for node in (_A, _B)] == [0, 0]
    assert _assign_at(cluster, _A, client, 3, keys[4:], 2) == 0  # B never hears of writes 3 and 4
    erase = Frame(Kind.ERASE, [gone], request_id=client << 32 | 4, table=0, shard=0, aux=4 << 1)
    with TcpConnection(cluster.spec.node(_A).address) as conn:
        assert conn.request(erase, 10.0).status == Status.OK
    assert _assign_at(cluster, _A, client, 5, keys[:4], 3) == 0
    assert _assign_at(cluster, _B, client, 5, keys[:4], 3) == FILLING  # B saw the gap: filling again
    cluster.wait_ready(_B, 60)
    cluster.kill(_A)
    cluster.start([_A])
    want = dict.fromkeys(keys[:4].tolist(), 3) | dict.fromkeys(keys[4:].tolist(), 2)
    assert _check_everywhere(cluster, want) == {_A: 0, _B: 0}
    with PSClient(cluster.spec, transports=("tcp",)) as c:  # the erase reached B by the refill too
        assert not any(c.find("emb", gone, node=n)[1].any() for n in (_A, _B))


def test_a_replica_paused_past_a_writers_last_write_refills(cluster: LocalCluster) -> None:
    """B is paused for 1.5 s, and a write acknowledged by A alone meanwhile is that writer's
    last: no later write shows B the gap, so B must see that it was frozen and refill."""
    _both_up(cluster)
    keys = np.arange(50_000_000, 50_000_008, dtype=np.uint64)
    pid = cluster.pid(_B)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        _assign_at(cluster, _A, 0x5EEE, 1, keys, 1)
        time.sleep(1.5)
    finally:
        os.kill(pid, signal.SIGCONT)
    time.sleep(0.5)
    cluster.wait_ready(_B, 60)
    cluster.kill(_A)
    cluster.start([_A])
    assert _check_everywhere(cluster, dict.fromkeys(keys.tolist(), 1)) == {_A: 0, _B: 0}


def test_a_write_only_client_follows_a_restart_onto_shared_memory(cluster: LocalCluster) -> None:
    """A client that only writes must refresh its HELLO after a node restarts, instead of
    trying the dead process's shm socket and falling back to TCP after retries."""
    _both_up(cluster)
    keys = np.arange(30_000_000, 30_000_032, dtype=np.uint64)
    with PSClient(cluster.spec, transports=("shm", "tcp")) as c:
        c.assign("emb", keys, _rows(keys))
        cluster.kill(_B)
        cluster.start([_B])
        for _ in range(3):  # the first may find the old socket gone
            c.assign("emb", keys, _rows(keys))
        time.sleep(0.6)  # a transport that failed is not tried again for 0.5 s
        before = dict(c.stats.by_transport)
        for _ in range(10):
            c.assign("emb", keys, _rows(keys))
        tcp = c.stats.by_transport.get("tcp", 0) - before.get("tcp", 0)
        shm = c.stats.by_transport.get("shm", 0) - before.get("shm", 0)
    assert (shm, tcp) == (20, 0)


def test_a_killed_server_leaves_no_socket_and_stop_leaves_no_directory(tmp_path: Path) -> None:
    spec = loopback_spec(f"clean-{os.getpid()}", zones=1, nodes_per_zone=1, shards=1, dim=_DIM,
                         data_root=tmp_path / "root")
    with LocalCluster(spec) as c:
        c.start(timeout_s=300)
        old = c.pid("z1n1")
        assert glob.glob(f"/dev/shm/streamrec-{old}-*.sock")
        c.kill("z1n1")
        c.start()
        assert not glob.glob(f"/dev/shm/streamrec-{old}-*.sock")
    assert not (tmp_path / "root").exists()


def test_a_refilled_replica_keeps_each_rows_expiry() -> None:
    """ttl: export carries each row's expiry, so a refilled replica expires rows when its
    peer does instead of restarting every row's TTL."""
    base = loopback_spec(f"ttl-{os.getpid()}", zones=2, nodes_per_zone=1, shards=1, dim=_DIM)
    table = base.tables[0]
    cfg = dataclasses.replace(table.config, ttl_s=60, ttl_slice_s=5)
    spec = dataclasses.replace(base, tables=(dataclasses.replace(table, config=cfg),))
    keys = np.arange(1, 1001, dtype=np.uint64)
    with LocalCluster(spec) as c:
        c.start(timeout_s=300)
        with PSClient(spec, transports=("tcp",), timeout_s=10.0) as w:
            w.assign("emb", keys, _rows(keys))
            written = time.time()
            time.sleep(1.5)  # a fresh TTL on the refilled copy would end 1.5 s later than the original
            c.kill(_B)
            c.start([_B])
        with PSClient(spec, transports=("tcp",), timeout_s=10.0) as r:
            expiry = {}
            for name in (_A, _B):
                k = np.concatenate([k for _, k, _, _ in r.export("emb", name)])
                e = np.concatenate([e for _, _, _, e in r.export("emb", name)])
                assert_array_equal(np.sort(k), keys)
                expiry[name] = e[np.argsort(k)]
            # Both replicas expire each row at the second it was written plus the TTL (a fresh
            # TTL on the copy would be 1.5 s or more later).
            assert_array_equal(expiry[_B], expiry[_A])
            assert written - 1 <= expiry[_A].min() - 60 and expiry[_A].max() - 60 <= written + 1


def test_a_write_no_ready_replica_applied_fails() -> None:
    """A write that reached only a filling replica of some shard is not acknowledged:
    that replica's copy could still be overwritten, and no ready copy holds it."""
    with PSClient() as c:  # embedded: one node, two shards, one replica each
        keys = np.arange(1, 65, dtype=np.uint64)
        assert c.assign("emb", keys, np.ones((64, 64), np.float32)) == WriteAck(1, ())
        c._services[0].replicas[(0, 1)].ready = False  # shard 1's only replica: filling
        with pytest.raises(TransportError, match="no ready replica"):
            c.assign("emb", keys, np.ones((64, 64), np.float32))


def test_ps_dump_reads_one_replica(cluster: LocalCluster, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from streamrec.cli import main

    _both_up(cluster)
    out = tmp_path / "b.npz"
    assert main(["ps", "dump", "--config", str(cluster.spec_path), "--node", _B, "--table", "emb",
                 "--out", str(out)]) == 0
    assert f"emb[0] on {_B}:" in capsys.readouterr().out
    got = np.load(out)
    base = got["keys"] < _BASE
    assert base.sum() == _BASE and (got["shard"] == 0).all() and (got["expires_at"] == 0).all()
    assert_array_equal(got["values"][base, 0], got["keys"][base].astype(np.float32))


def test_a_replica_follows_each_clients_write_sequence() -> None:
    from streamrec.ps.service import IN_ORDER, LATE, SEQ_MOD, SKIPPED, ShardReplica
    from streamrec.store import EmbeddingTable

    rep = ShardReplica(0, 0, EmbeddingTable(dim=2, huge_pages=False))
    a, b = 5 << 32, 6 << 32
    assert rep.order(a | 1, 1) == IN_ORDER  # a new client's first write
    assert rep.order(b | 1, 7) == SKIPPED  # first seen while ready, past its first write
    assert [rep.order(a | 2, 2), rep.order(a | 3, 3), rep.order(a | 3, 3)] == [IN_ORDER] * 3
    assert rep.order(a | 5, 5) == SKIPPED  # 4 never came
    assert rep.order(a | 4, 4) == LATE  # came after 5: applying it could undo 5
    assert rep.order(a | 9, 0) == IN_ORDER  # no number: not followed
    rep.ready = False
    assert rep.order(7 << 32, 40) == IN_ORDER  # first seen while filling: the copy covers it
    rep.ready = True
    rep._seqs[a >> 32] = SEQ_MOD - 1  # client ids are the top half of request ids
    assert rep.order(a | 10, 1) == IN_ORDER  # wraps (the client never sends 0)
