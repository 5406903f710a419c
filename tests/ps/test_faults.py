"""Faults against real server processes: a replica killed and restarted under
load, shared memory failing under a client, a write retried after a lost
reply, and the health and metrics endpoints.

One cluster serves the whole module: two zones of one node each, one shard of
table ``emb`` (dim 8, Adagrad), so each node holds a full replica and either
can serve every call. Rows ``0 .. _ROWS`` hold their key in element 0 and
0.01 elsewhere, so a wrong or missing row is seen in every reply. A test that
kills a node restarts it before it ends (the node refills from its peer), so
the tests do not depend on each other's order. Writes made here use keys
outside the loaded range.

The whole module runs in about 30 s on two cores; nothing in it is marked slow.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from streamrec.cluster.router import RouterConfig
from streamrec.errors import PeerUnavailable, TransportError
from streamrec.ps.client import PSClient
from streamrec.ps.local import LocalCluster, loopback_spec
from streamrec.transport import shm
from streamrec.transport.frames import Flag, Frame, Kind, Status
from streamrec.transport.tcp import TcpConnection

_ROWS = 20_000
_DIM = 8
_BATCH = 512
_LOCAL = "z1n1"  # the client sits beside this node: it is every read's first choice
_PEER = "z2n1"
# Short ejections so a restarted node is probed, and closes, within seconds.
_ROUTER = RouterConfig(backoff_base_s=0.5, backoff_max_s=2.0)
_FULL = ("one_sided", "shm", "tcp")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    spec = loopback_spec(f"faults-{os.getpid()}", zones=2, nodes_per_zone=1, shards=1, dim=_DIM)
    with LocalCluster(spec) as c:
        c.start()
        with PSClient(spec, local=_LOCAL, transports=("tcp",)) as loader:
            keys = np.arange(_ROWS, dtype=np.uint64)
            loader.assign("emb", keys, _rows(keys))
        yield c


def _rows(keys: np.ndarray) -> np.ndarray:
    values = np.full((keys.size, _DIM), 0.01, dtype=np.float32)
    values[:, 0] = keys
    return values


def _check_rows(keys: np.ndarray, values: np.ndarray, found: np.ndarray) -> bool:
    return bool(found.all()) and np.array_equal(values, _rows(keys))


def _read(cluster: LocalCluster, node: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FIND straight at one node over TCP (no client, no failover)."""
    with TcpConnection(cluster.spec.node(node).address) as conn:
        reply = conn.request(Frame(Kind.FIND, [keys], request_id=7), 2.0)
    assert reply.status == Status.OK, reply.text()
    return reply.buffers[0].copy(), reply.buffers[1].copy()


def _ensure_up(cluster: LocalCluster) -> None:
    for n in cluster.spec.nodes:
        if cluster.pid(n.name) is None:
            cluster.restart(n.name)


# ---- a replica killed and restarted under load -------------------------------------------------


@dataclass
class _Load:
    """One client's lookup loop at a bounded rate, with what it saw."""

    name: str
    client: PSClient
    rate_hz: float
    calls: int = 0
    failed: list[str] = field(default_factory=list)
    wrong: int = 0
    states: set[str] = field(default_factory=set)  # the victim's breaker states seen
    open_seen_at: float | None = None
    closed_after_restart: bool = False
    served_after_restart: int = 0  # calls the victim answered after it was back
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds) per call
    error: BaseException | None = None

    def run(self, victim: str, stop: threading.Event, restarted: threading.Event, seed: int) -> None:
        rng = np.random.default_rng(seed)
        period = 1.0 / self.rate_hz
        next_at = time.monotonic()
        base = 0
        try:
            while not stop.is_set():
                keys = rng.integers(0, _ROWS, _BATCH, dtype=np.uint64)
                t0 = time.monotonic()
                try:
                    values, found = self.client.find("emb", keys)
                except TransportError as exc:
                    self.failed.append(repr(exc))
                else:
                    self.latencies.append((t0, time.monotonic() - t0))
                    self.calls += 1
                    self.wrong += not _check_rows(keys, values, found)
                state = self.client.router.snapshot()[victim]["state"]
                self.states.add(state)
                if state == "open" and self.open_seen_at is None:
                    self.open_seen_at = time.monotonic()
                served = self.client.stats.by_node.get(victim, 0)
                if not restarted.is_set():
                    base = served
                else:
                    self.served_after_restart = served - base
                    self.closed_after_restart = state == "closed"
                next_at += period
                time.sleep(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc

    @property
    def back(self) -> bool:
        return self.closed_after_restart and self.served_after_restart > 20

    def slowest(self, start: float, end: float) -> float:
        return max((dt for t, dt in self.latencies if start <= t < end), default=0.0)


def test_replica_killed_and_restarted_under_load(cluster: LocalCluster,
                                                 record_property: Any) -> None:
    """SIGKILL the replica every read prefers, restart it 5 s later: two clients (TCP
    only, and every transport) see no failed call and no wrong row; each saw the
    victim's breaker open, and closed with its traffic back after the restart."""
    _ensure_up(cluster)
    spec = cluster.spec
    loads = [_Load(name, PSClient(spec, local=_LOCAL, transports=transports, router=_ROUTER, seed=i), 250.0)
             for i, (name, transports) in enumerate((("tcp", ("tcp",)), ("all", _FULL)))]
    stop, restarted = threading.Event(), threading.Event()
    threads = [threading.Thread(target=ld.run, args=(_LOCAL, stop, restarted, i), daemon=True)
               for i, ld in enumerate(loads)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    restart_error: list[BaseException] = []

    def restart() -> None:
        try:
            cluster.restart(_LOCAL)
        except BaseException as exc:
            restart_error.append(exc)
        restarted.set()

    try:
        time.sleep(5.0)
        cluster.kill(_LOCAL)
        killed_at = time.monotonic()
        time.sleep(5.0)
        restart_at = time.monotonic()
        threading.Thread(target=restart, daemon=True).start()
        # Run 20 s in all, longer (up to 30 s) until both clients have the victim back.
        while time.monotonic() - t0 < 30.0 and not (
                time.monotonic() - t0 >= 20.0 and restarted.is_set() and all(ld.back for ld in loads)):
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    elapsed = time.monotonic() - t0
    assert not restart_error, restart_error
    for ld in loads:
        st = ld.client.stats
        down_max = ld.slowest(killed_at, restart_at)
        report = (f"{ld.name}: {ld.calls} calls in {elapsed:.1f} s (kill at {killed_at - t0:.1f} s), "
                  f"{st.retried_calls} needed a retry ({st.retries} retries), failed {len(ld.failed)}, "
                  f"slowest call while the victim was down {down_max * 1e3:.0f} ms, "
                  f"wrong {ld.wrong}, by transport {st.by_transport}, by node {st.by_node}, "
                  f"breaker states seen {sorted(ld.states)}")
        print(report)
        record_property(f"retried_calls_{ld.name}", st.retried_calls)
        record_property(f"report_{ld.name}", report)
        ld.client.close()
        assert ld.error is None, f"{ld.name}: the load loop raised {ld.error!r}"
        assert ld.failed == [] and st.failed_calls == 0, f"{ld.name}: failed calls {ld.failed[:3]}"
        assert ld.wrong == 0, report
        assert ld.calls > 1000, report
        assert st.retried_calls > 0, f"{ld.name}: the kill cost no retry, so it was not exercised"
        assert ld.open_seen_at is not None, f"{ld.name}: the victim's breaker never opened: {report}"
        assert ld.back, f"{ld.name}: the victim did not come back (closed, serving): {report}"
        # A probe of the dead node fails at once (connection refused), not after the 1 s
        # connect timeout, which exceeded the client's 0.5 s patience per attempt.
        assert down_max < 0.5, report


# ---- shared memory failing: fall back to TCP ----------------------------------------------------


def _calls(client: PSClient, n: int, rng: np.random.Generator) -> None:
    for _ in range(n):
        keys = rng.integers(0, _ROWS, _BATCH, dtype=np.uint64)
        values, found = client.find("emb", keys)
        assert _check_rows(keys, values, found)


def _shm_conn(client: PSClient, node: str) -> shm.ShmConnection:
    conn = client.links[node]._conns.get("shm")
    assert isinstance(conn, shm.ShmConnection), f"no shm connection to {node}: {client.links[node]._conns}"
    return conn


def _corrupt_request_ring(conn: shm.ShmConnection) -> None:
    """Publish a request record whose header lies about its length (not a multiple of 64):
    the server finds the ring corrupt and drops the link."""
    ring = conn._seg.req
    at = ring.reserve(64)
    assert at >= 0
    ring.commit(at, 64)
    ring.hdr[(at % ring.size) // 8] = 100  # record length: not a multiple of the 64-byte record unit
    conn._ring(b"D")


def test_shm_failures_fall_back_to_tcp(cluster: LocalCluster) -> None:
    """The client's shm link breaks three ways (its doorbell socket closed under it;
    the server dropping it for a corrupt ring; the server's socket file removed so it
    cannot reopen): every call still succeeds, over TCP. Then the server itself
    is SIGKILLed while calls run over shm: no failed call either."""
    _ensure_up(cluster)
    rng = np.random.default_rng(5)
    client = PSClient(cluster.spec, local=_LOCAL, transports=("shm", "tcp"), router=_ROUTER, seed=3)
    try:
        _calls(client, 20, rng)
        assert client.stats.by_transport.get("shm", 0) >= 20, client.stats
        tcp_before = client.stats.by_transport.get("tcp", 0)

        # (1) the doorbell socket closed under the connection: the next send fails
        _shm_conn(client, _LOCAL)._sock.close()
        _calls(client, 10, rng)
        assert client.stats.by_transport.get("tcp", 0) > tcp_before, client.stats
        time.sleep(1.1)  # past the link's reopen delay and the router's transport backoff
        shm_before = client.stats.by_transport["shm"]
        _calls(client, 10, rng)
        assert client.stats.by_transport["shm"] > shm_before, f"shm did not come back: {client.stats}"

        # (2) the server drops the link (a corrupt ring): the client sees EOF
        conn = _shm_conn(client, _LOCAL)
        _corrupt_request_ring(conn)
        deadline = time.monotonic() + 2.0
        while not conn._server_gone() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert conn._server_gone(), "the server kept a link with a corrupt ring"
        tcp_before = client.stats.by_transport.get("tcp", 0)
        _calls(client, 10, rng)
        assert client.stats.by_transport.get("tcp", 0) > tcp_before, client.stats

        # (3) the endpoint's socket file removed, and the link broken: shm cannot reopen.
        # The file is moved aside, not deleted, so it can be put back (connect() finds the
        # listening socket by its inode) and the server keeps offering shm to later tests.
        time.sleep(1.1)
        _calls(client, 5, rng)
        path = client.links[_LOCAL]._hello["offers"]["shm"]["path"]
        os.rename(path, path + ".away")
        try:
            _shm_conn(client, _LOCAL)._sock.close()
            shm_before, retried_before = client.stats.by_transport["shm"], client.stats.retried_calls
            # Past the router's first transport backoff (1 s), so shm is tried again and
            # its reopen fails at least once: a second retried call.
            t_end = time.monotonic() + 2.5
            while time.monotonic() < t_end:
                _calls(client, 1, rng)
            assert client.stats.by_transport["shm"] == shm_before, client.stats
            assert client.stats.retried_calls >= retried_before + 2, client.stats
        finally:
            os.rename(path + ".away", path)
        assert client.stats.failed_calls == 0
        print(f"shm faults: {client.stats}")

        # (4) the peer gone: SIGKILL the server while calls run over shm
        client.close()
        client = PSClient(cluster.spec, local=_LOCAL, transports=("shm", "tcp"), router=_ROUTER, seed=4)
        _calls(client, 10, rng)
        assert client.stats.by_node.get(_LOCAL, 0) == 10 and client.stats.by_transport["shm"] == 10
        killer = threading.Timer(0.3, cluster.kill, args=(_LOCAL,))
        killer.start()
        t_end = time.monotonic() + 1.5
        while time.monotonic() < t_end:
            _calls(client, 1, rng)
        killer.join()
        st = client.stats
        print(f"shm peer killed: {st}")
        assert st.failed_calls == 0
        assert st.by_node.get(_PEER, 0) > 0 and st.retried_calls > 0, st
    finally:
        client.close()
        _ensure_up(cluster)  # the killed node, and a fresh shm socket file for the next tests


# ---- a write retried after a lost reply applies once ------------------------------------------


_WKEY = np.array([10_000_000 + os.getpid() % 1000], dtype=np.uint64)  # outside the loaded rows


def _apply_frame(request_id: int) -> Frame:
    grads = np.full((1, _DIM), 0.5, dtype=np.float32)
    return Frame(Kind.APPLY_GRADIENTS, [_WKEY, grads, np.array([0.1])], request_id=request_id)


def test_same_write_twice_applies_once(cluster: LocalCluster) -> None:
    """The same APPLY_GRADIENTS frame (same request id) sent twice to a replica moves
    the row once; a new id moves it again (so the check can see a double apply)."""
    _ensure_up(cluster)
    with PSClient(cluster.spec, local=_LOCAL, transports=("tcp",)) as client:
        client.assign("emb", _WKEY, np.ones((1, _DIM), np.float32))
    rows = []
    for node in (_LOCAL, _PEER):
        with TcpConnection(cluster.spec.node(node).address) as conn:
            before = _read(cluster, node, _WKEY)[0]
            first = conn.request(_apply_frame(0xABC0001), 2.0)
            retry = _apply_frame(0xABC0001)
            retry.flags |= Flag.RETRY
            again = conn.request(retry, 2.0)
            assert first.status == again.status == Status.OK, (first.text(), again.text())
            assert first.buffers[0].tolist() == again.buffers[0].tolist() == [True]
            once = _read(cluster, node, _WKEY)[0]
            assert not np.array_equal(once, before)
            twice = conn.request(_apply_frame(0xABC0002), 2.0)
            assert twice.status == Status.OK
            moved = _read(cluster, node, _WKEY)[0]
            assert not np.array_equal(moved, once), "a new id did not apply: the test cannot see repeats"
            rows.append((once, moved))
    np.testing.assert_array_equal(rows[0][0], rows[1][0])
    np.testing.assert_array_equal(rows[0][1], rows[1][1])


def test_client_retry_after_lost_reply_applies_once(cluster: LocalCluster) -> None:
    """Through the client: the first attempt (shm) reaches the server and is applied,
    then its reply is lost (the link fails as the reply is read); the client resends
    the same request id over TCP and the replica does not apply it a second time."""
    _ensure_up(cluster)
    key = _WKEY + 1
    client = PSClient(cluster.spec, local=_LOCAL, transports=("shm", "tcp"), router=_ROUTER, seed=7)
    try:
        client.assign("emb", key, np.ones((1, _DIM), np.float32))
        assert client.stats.by_transport.get("shm", 0) == 2, client.stats  # both replicas, over shm
        conn = _shm_conn(client, _LOCAL)
        real_recv = conn.recv
        lost: list[int] = []

        def recv_then_lose(timeout_s: float) -> Frame | None:
            reply = real_recv(timeout_s)
            if reply is not None and reply.kind == Kind.APPLY_GRADIENTS and not lost:
                lost.append(reply.request_id)  # the server applied it and answered: drop the answer
                raise PeerUnavailable("injected: reply lost", peer=conn.peer, transport="shm")
            return reply

        conn.recv = recv_then_lose
        grads = np.full((1, _DIM), 0.5, dtype=np.float32)
        found = client.apply_gradients("emb", key, grads, 0.1)
        assert found.tolist() == [True]
        st = client.stats
        assert lost, "the injected fault never fired"
        assert st.failed_calls == 0 and st.failed_replica_writes == 0, st
        assert st.retried_calls == 1 and st.by_transport.get("tcp", 0) == 1, st
        local, peer = _read(cluster, _LOCAL, key)[0], _read(cluster, _PEER, key)[0]
        np.testing.assert_array_equal(local, peer)  # the peer applied it once, with no fault
        assert not np.array_equal(local, np.ones((1, _DIM), np.float32))
    finally:
        client.close()


# ---- health and metrics ------------------------------------------------------------------------


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def _listening_addresses(port: int) -> list[str]:
    """Local addresses of TCP sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    out = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(path).read().splitlines()[1:]  # noqa: SIM115 (read whole, closed by GC)
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, _, p = local.rpartition(":")
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                out.append(addr)
    return out


def test_metrics_health_and_readiness(cluster: LocalCluster) -> None:
    """/metrics is Prometheus text with the request counters, /healthz and /readyz
    answer 200 with JSON, anything else 404; the HTTP server listens on 127.0.0.1 only."""
    _ensure_up(cluster)
    _read(cluster, _LOCAL, np.arange(4, dtype=np.uint64))  # at least one request counted
    node = cluster.spec.node(_LOCAL)
    assert node.host == "127.0.0.1" and node.metrics_port
    base = f"http://127.0.0.1:{node.metrics_port}"
    code, ctype, body = _get(f"{base}/metrics")
    assert code == 200 and ctype.startswith("text/plain"), (code, ctype)
    assert "streamrec_ps_requests_total" in body
    assert 'streamrec_ps_requests_total{kind="FIND",status="OK"}' in body
    assert "streamrec_ps_up" in body and "streamrec_ps_shard_ready" in body
    code, ctype, body = _get(f"{base}/healthz")
    assert code == 200 and ctype == "application/json"
    assert json.loads(body) == {"node": _LOCAL, "alive": True}
    code, ctype, body = _get(f"{base}/readyz")
    assert code == 200 and ctype == "application/json"
    ready = json.loads(body)
    assert ready["ready"] is True and ready["shards"] == {"emb/0": True}
    assert _get(f"{base}/nope")[0] == 404
    assert _listening_addresses(node.metrics_port) == ["0100007F"]  # 127.0.0.1, little-endian hex
