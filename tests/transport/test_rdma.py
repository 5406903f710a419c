"""RdmaConnection / RdmaEndpoint over UCX (shared memory), against a server thread and a server process.

Skipped where the ``rdma`` extra (ucxx) is not installed, except under CI (``CI=true``),
where ``scripts/bootstrap`` installs it: there a missing ucxx fails the run instead
of skipping the only tests of the RDMA path.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

if os.environ.get("CI") == "true":
    import ucxx  # noqa: F401  (CI installs the rdma extra: fail loudly if it is missing)
else:
    pytest.importorskip("ucxx")

import zmq

from streamrec.errors import FrameError, PeerUnavailable
from streamrec.transport import rdma
from streamrec.transport.frames import Frame, Kind, Status, error_reply, reply_to
from streamrec.transport.rdma import RdmaConnection, RdmaEndpoint

TIMEOUT_S = 5.0


def _answer(ep: RdmaEndpoint, token: object, req: Frame | FrameError) -> None:
    """Echo the buffers (FIND: a 4096 x 64 float32 block); answer FrameErrors with an error frame."""
    if isinstance(req, FrameError):
        reply = error_reply(None, req.status, str(req))
        reply.request_id = req.request_id
        ep.reply(token, reply)
    elif req.kind == Kind.FIND:
        ep.reply(token, reply_to(req, [np.full((4096, 64), req.request_id, np.float32)]))
    else:
        ep.reply(token, reply_to(req, [b.copy() for b in req.buffers]))


def _serve(ep: RdmaEndpoint, stop: threading.Event, seen: list[object]) -> None:
    poller = zmq.Poller()
    for p in ep.pollables():
        poller.register(p, zmq.POLLIN)
    while not stop.is_set():
        for p, _ in poller.poll(50):
            for token, req in ep.handle(p):
                seen.append(req)
                _answer(ep, token, req)


def _serve_process(port_q: mp.Queue, max_frame_bytes: int) -> None:
    ep = RdmaEndpoint(max_frame_bytes=max_frame_bytes)
    port_q.put(ep.port)
    _serve(ep, threading.Event(), [])


class _Server:
    def __init__(self, max_frame_bytes: int = 64 << 20) -> None:
        self.ep = RdmaEndpoint(max_frame_bytes=max_frame_bytes)
        self.stop = threading.Event()
        self.seen: list[object] = []
        self.thread = threading.Thread(target=_serve, args=(self.ep, self.stop, self.seen), daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return str(self.ep.offer()["address"])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.ep.close()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.close()


@pytest.fixture
def process_server() -> Iterator[tuple[mp.process.BaseProcess, str]]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_serve_process, args=(q, 64 << 20), daemon=True)
    proc.start()
    port = q.get(timeout=30)
    yield proc, f"127.0.0.1:{port}"
    if proc.is_alive():
        proc.kill()
    proc.join(5)


FRAMES = [
    [np.arange(10, dtype=np.uint64)],
    [np.arange(7, dtype=np.uint64), np.random.default_rng(0).random((7, 16)).astype(np.float32)],
    [np.ones((3, 5), np.float64), np.array([True, False]), np.zeros(0, np.int32)],
    [np.arange(300_000, dtype=np.int64)],  # 2.4 MB: UCX's rendezvous path
    [],
]


def _check_echo(conn: RdmaConnection, rid: int, bufs: list[np.ndarray]) -> None:
    reply = conn.request(Frame(Kind.ASSIGN, bufs, request_id=rid, table=3, shard=2), TIMEOUT_S)
    assert reply.is_reply and reply.status == Status.OK and (reply.table, reply.shard) == (3, 2)
    assert len(reply.buffers) == len(bufs)
    for got, want in zip(reply.buffers, bufs, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_offer_and_import_guard(server: _Server) -> None:
    offer = server.ep.offer()
    assert offer["address"].startswith("127.0.0.1:") and "host" in offer
    assert rdma.available()
    with pytest.raises(ValueError, match="host:port"):
        RdmaConnection("nonsense")


@pytest.mark.parametrize("bufs", FRAMES, ids=lambda b: "+".join(str(x.dtype) for x in b) or "empty")
def test_round_trip_thread_server(server: _Server, bufs: list[np.ndarray]) -> None:
    with RdmaConnection(server.address) as conn:
        for rid in (1, 2):
            _check_echo(conn, rid, bufs)


def test_many_in_flight_polled(server: _Server) -> None:
    keys = np.arange(4096, dtype=np.uint64)
    with RdmaConnection(server.address) as conn:
        for rid in range(1, 17):
            conn.send(Frame(Kind.FIND, [keys], request_id=rid))
        got: dict[int, Frame] = {}
        poller = zmq.Poller()
        poller.register(conn.pollable, zmq.POLLIN)
        deadline = time.monotonic() + TIMEOUT_S
        while len(got) < 16 and time.monotonic() < deadline:
            if poller.poll(100):
                while (reply := conn.recv(0)) is not None:
                    got[reply.request_id] = reply
        assert sorted(got) == list(range(1, 17))
        for rid, reply in got.items():
            assert reply.buffers[0].shape == (4096, 64) and (reply.buffers[0] == rid).all()


def test_two_clients(server: _Server) -> None:
    with RdmaConnection(server.address) as a, RdmaConnection(server.address) as b:
        for rid in range(1, 5):
            _check_echo(a, rid, FRAMES[1])
            _check_echo(b, rid + 100, FRAMES[0])


def test_round_trip_process_server(process_server: tuple[mp.process.BaseProcess, str]) -> None:
    _, address = process_server
    with RdmaConnection(address) as conn:
        for rid, bufs in enumerate(FRAMES, start=1):
            _check_echo(conn, rid, bufs)
        reply = conn.request(Frame(Kind.FIND, [np.arange(4096, dtype=np.uint64)], request_id=99), TIMEOUT_S)
        assert reply.buffers[0].shape == (4096, 64) and (reply.buffers[0] == 99).all()


def test_bad_magic_is_a_frame_error_and_endpoint_keeps_serving(server: _Server) -> None:
    conn = RdmaConnection(server.address)
    pre = np.zeros(160, np.uint8)
    pre[:4] = np.frombuffer(b"EVIL", np.uint8)
    conn._link.sends.append((conn._link.ep.tag_send(rdma._Array(pre), conn._link.tag), pre))
    reply = conn.recv(TIMEOUT_S)  # the error reply arrives before the endpoint drops the link
    assert reply is not None and reply.status == Status.BAD_FRAME and "magic" in reply.text()
    assert any(isinstance(x, FrameError) for x in server.seen)
    conn.close()
    with RdmaConnection(server.address) as fresh:
        _check_echo(fresh, 7, FRAMES[1])


def test_oversized_frame_is_refused_before_allocation_and_link_survives() -> None:
    s = _Server(max_frame_bytes=1 << 20)
    try:
        with RdmaConnection(s.address) as conn:
            big = Frame(Kind.ASSIGN, [np.zeros(1 << 19, np.float32)], request_id=5)  # 2 MiB > 1 MiB cap
            reply = conn.request(big, TIMEOUT_S)
            assert reply.status == Status.TOO_LARGE
            err = next(x for x in s.seen if isinstance(x, FrameError))
            assert err.status == Status.TOO_LARGE and err.request_id == 5
            _check_echo(conn, 6, FRAMES[1])  # the announced buffer was drained: the stream is in step
    finally:
        s.close()


def test_send_over_own_cap_is_value_error(server: _Server) -> None:
    with RdmaConnection(server.address, max_frame_bytes=1024) as conn, pytest.raises(ValueError, match="cap"):
        conn.send(Frame(Kind.ASSIGN, [np.zeros(1024, np.uint8)], request_id=1))


def test_server_closed_raises_peer_unavailable() -> None:
    s = _Server()
    conn = RdmaConnection(s.address)
    _check_echo(conn, 1, FRAMES[0])
    s.close()
    t0 = time.monotonic()
    with pytest.raises(PeerUnavailable):
        conn.send(Frame(Kind.PING, request_id=2))
        conn.recv(TIMEOUT_S)
    assert time.monotonic() - t0 < 1.0
    conn.close()
    with pytest.raises(PeerUnavailable):
        RdmaConnection(s.address, connect_timeout_s=0.5)


def test_server_killed_raises_peer_unavailable(process_server: tuple[mp.process.BaseProcess, str]) -> None:
    proc, address = process_server
    conn = RdmaConnection(address)
    _check_echo(conn, 1, FRAMES[1])
    conn.send(Frame(Kind.FIND, [np.arange(8, dtype=np.uint64)], request_id=2))
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGSTOP)  # frozen mid-request: silence, then death
    try:
        time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.join(5)
    t0 = time.monotonic()
    with pytest.raises(PeerUnavailable):
        while conn.recv(TIMEOUT_S) is not None:  # the reply to 2 may or may not have made it
            pass
    assert time.monotonic() - t0 < 1.0
    conn.close()
