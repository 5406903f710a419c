"""TCP transport in one process: an endpoint polled by a thread, connections to it, and failures."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import zmq
from numpy.testing import assert_array_equal

from streamrec.errors import FrameError, PeerUnavailable
from streamrec.transport.frames import Frame, Kind, Status, decode_message, encode, error_reply, reply_to
from streamrec.transport.tcp import TcpConnection, TcpEndpoint, context

Handler = Callable[[list[tuple[object, Frame | FrameError]]], list[tuple[object, Frame]]]


def echo(batch: list[tuple[object, Frame | FrameError]]) -> list[tuple[object, Frame]]:
    """Answer each request with its own buffers; a bad frame with its error."""
    out = []
    for token, req in batch:
        if isinstance(req, FrameError):
            bad = Frame(Kind.PING, request_id=req.request_id)
            out.append((token, error_reply(bad, req.status, str(req))))
        else:
            out.append((token, reply_to(req, [b.copy() for b in req.buffers], aux=req.aux)))
    return out


class Server:
    """A ``TcpEndpoint`` polled by a thread; ``seen`` records what ``handle`` returned."""

    def __init__(self, handler: Handler = echo, **kwargs: object) -> None:
        self.ep = TcpEndpoint(**kwargs)
        self.handler = handler
        self.seen: list[Frame | FrameError] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        for p in self.ep.pollables():
            poller.register(p, zmq.POLLIN)
        while not self._stop.is_set():
            for p, _ in poller.poll(20):
                batch = self.ep.handle(p)
                self.seen.extend(req for _, req in batch)
                for token, rep in self.handler(batch):
                    self.ep.reply(token, rep)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.ep.close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


@contextlib.contextmanager
def connect(address: str, **kwargs: float) -> Iterator[TcpConnection]:
    conn = TcpConnection(address, **kwargs)
    try:
        yield conn
    finally:
        conn.close()


def test_round_trip(server: Server) -> None:
    keys = np.arange(100, dtype=np.uint64)
    rows = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
    big = np.arange(300_000, dtype=np.float64)  # over pyzmq's copy threshold: sent zero-copy
    with connect(server.ep.address) as conn:
        for rid in range(1, 6):
            rep = conn.request(Frame(Kind.ASSIGN, [keys, rows, big], request_id=rid, table=1, shard=2,
                                     aux=rid), 5.0)
            assert rep.is_reply and rep.status == Status.OK
            assert (rep.request_id, rep.table, rep.shard, rep.aux) == (rid, 1, 2, rid)
            assert_array_equal(rep.buffers[0], keys)
            assert_array_equal(rep.buffers[1], rows)
            assert_array_equal(rep.buffers[2], big)
        assert conn.request(Frame(Kind.PING, request_id=9), 5.0).buffers == []
    assert server.ep.offer() == {"address": server.ep.address}


def test_recv_without_anything_in_flight_returns_none(server: Server) -> None:
    with connect(server.ep.address) as conn:
        assert conn.recv(0) is None
        t0 = time.monotonic()
        assert conn.recv(0.05) is None
        assert time.monotonic() - t0 < 1.0


def test_many_in_flight_with_out_of_order_replies() -> None:
    n = 64
    held: list[tuple[object, Frame]] = []

    def reverse(batch: list[tuple[object, Frame | FrameError]]) -> list[tuple[object, Frame]]:
        held.extend(echo(batch))
        if len(held) < n:
            return []
        out = held[::-1]
        held.clear()
        return out

    server = Server(reverse)
    try:
        with connect(server.ep.address) as conn:
            for rid in range(1, n + 1):
                conn.send(Frame(Kind.FIND, [np.full(rid, rid, dtype=np.uint64)], request_id=rid))
            got: list[int] = []
            deadline = time.monotonic() + 10
            while len(got) < n and time.monotonic() < deadline:
                rep = conn.recv(1.0)
                if rep is not None:
                    assert_array_equal(rep.buffers[0], np.full(rep.request_id, rep.request_id, np.uint64))
                    got.append(rep.request_id)
            assert got == list(range(n, 0, -1))
    finally:
        server.stop()


def test_two_connections_are_answered_separately(server: Server) -> None:
    with connect(server.ep.address) as a, connect(server.ep.address) as b:
        a.send(Frame(Kind.FIND, [np.array([1], np.uint64)], request_id=1))
        b.send(Frame(Kind.FIND, [np.array([2], np.uint64)], request_id=1))
        for conn in (a, b):
            assert conn.request(Frame(Kind.PING, request_id=2), 5.0).request_id == 2


def raw_dealer(address: str) -> zmq.Socket:
    sock = context().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(f"tcp://{address}")
    return sock


def test_malformed_message_is_a_frame_error_and_the_endpoint_keeps_serving(server: Server) -> None:
    good = encode(Frame(Kind.FIND, [np.zeros(4, np.uint64)], request_id=31))
    sock = raw_dealer(server.ep.address)
    try:
        for parts, status in [
            ([b"not a frame"], Status.BAD_FRAME),
            ([bytes(good[0])], Status.BAD_FRAME),  # buffer part missing
            ([bytes(good[0]), b"short"], Status.BAD_FRAME),
            ([bytes(good[0]), bytes(good[1]), b"extra"], Status.BAD_FRAME),
        ]:
            sock.send_multipart(parts)
            rep = decode_message(sock.recv_multipart())
            assert rep.status == status and rep.is_reply
        errors = [r for r in server.seen if isinstance(r, FrameError)]
        assert len(errors) == 4
        assert [e.request_id for e in errors] == [0, 31, 31, 31]
    finally:
        sock.close(0)
    with connect(server.ep.address) as conn:
        assert conn.request(Frame(Kind.PING, request_id=5), 5.0).status == Status.OK


def test_part_over_maxmsgsize_drops_that_peer_only() -> None:
    server = Server(max_frame_bytes=4096)
    try:
        with connect(server.ep.address) as ok:
            assert ok.request(Frame(Kind.PING, request_id=1), 5.0).status == Status.OK
            bad = raw_dealer(server.ep.address)
            try:
                head = encode(Frame(Kind.FIND, [np.zeros(1024, np.uint64)], request_id=2))[0]
                bad.send_multipart([bytes(head), b"\0" * 8192])  # one part over the cap
                bad.setsockopt(zmq.RCVTIMEO, 300)
                with pytest.raises(zmq.Again):
                    bad.recv_multipart()  # libzmq dropped it: no answer
            finally:
                bad.close(0)
            assert not [r for r in server.seen if isinstance(r, Frame) and r.request_id == 2]
            assert ok.request(Frame(Kind.PING, request_id=3), 5.0).status == Status.OK
        with connect(server.ep.address) as again:
            assert again.request(Frame(Kind.PING, request_id=4), 5.0).status == Status.OK
    finally:
        server.stop()


def test_connection_refuses_to_send_over_its_cap(server: Server) -> None:
    with connect(server.ep.address, max_frame_bytes=1024) as conn:
        with pytest.raises(ValueError, match="over this connection's 1024-byte cap"):
            conn.send(Frame(Kind.FIND, [np.zeros(1024, np.uint64)], request_id=1))
        assert conn.request(Frame(Kind.PING, request_id=2), 5.0).status == Status.OK


def big_replies(batch: list[tuple[object, Frame | FrameError]]) -> list[tuple[object, Frame]]:
    """Answer request id r with r buffers of 200 kB each (PING: an empty reply).

    Two or more are over the transport's packing threshold, so they travel as separate parts.
    """
    return [(token, reply_to(req, [np.zeros(200_000, np.uint8)] * (req.request_id % 8)))
            for token, req in batch if isinstance(req, Frame)]


def test_reply_over_the_connections_cap_is_refused() -> None:
    server = Server(big_replies)
    try:
        with connect(server.ep.address, max_frame_bytes=300_000) as conn:
            assert len(conn.request(Frame(Kind.FIND, request_id=1), 5.0).buffers) == 1
            conn.send(Frame(Kind.FIND, request_id=2))  # every part under the cap, the frame over it
            with pytest.raises(FrameError, match="over the 300000-byte cap") as info:
                conn.recv(5.0)
            assert info.value.status == Status.TOO_LARGE and info.value.request_id == 2
            assert info.value.transport == "tcp" and info.value.peer == conn.peer
            assert conn.request(Frame(Kind.PING, request_id=8), 5.0).status == Status.OK  # still usable
    finally:
        server.stop()


def test_reply_part_over_the_connections_maxmsgsize_is_never_delivered() -> None:
    def one_big_part(batch: list[tuple[object, Frame | FrameError]]) -> list[tuple[object, Frame]]:
        return [(token, reply_to(req, [np.zeros(8192, np.uint8)])) for token, req in batch
                if isinstance(req, Frame)]

    server = Server(one_big_part)
    try:
        with connect(server.ep.address, max_frame_bytes=4096) as conn:
            conn.send(Frame(Kind.FIND, request_id=1))
            # libzmq drops the link on the oversized part: silence, then the disconnect
            with contextlib.suppress(PeerUnavailable):
                for _ in range(10):
                    assert conn.recv(0.05) is None
    finally:
        server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_send_to_a_port_with_no_server_raises_within_connect_timeout() -> None:
    with connect(f"127.0.0.1:{free_port()}", connect_timeout_s=0.2) as conn:
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable, match="not connected within") as info:
            conn.send(Frame(Kind.PING, request_id=1))
        assert time.monotonic() - t0 < 1.0
        assert info.value.transport == "tcp" and info.value.peer == conn.peer


def test_server_closing_fails_recv_promptly() -> None:
    server = Server(lambda batch: [])  # never answers
    try:
        with connect(server.ep.address) as conn:
            assert conn.pollable is not None
            conn.send(Frame(Kind.FIND, [np.zeros(1, np.uint64)], request_id=1))
            time.sleep(0.05)
            server.stop()
            t0 = time.monotonic()
            with pytest.raises(PeerUnavailable, match="peer disconnected"):
                while time.monotonic() - t0 < 5:
                    assert conn.recv(5.0) is None
            assert time.monotonic() - t0 < 2.0  # the monitor's DISCONNECTED, not the 5 s timeout
            with pytest.raises(PeerUnavailable):
                conn.send(Frame(Kind.PING, request_id=2))
    finally:
        server.stop()


def test_closed_connection() -> None:
    conn = TcpConnection(f"127.0.0.1:{free_port()}")
    conn.close()
    conn.close()  # idempotent
    for call in (lambda: conn.send(Frame(Kind.PING)), lambda: conn.recv(0), lambda: conn.pollable):
        with pytest.raises(PeerUnavailable, match="connection closed"):
            call()


def test_closed_endpoint() -> None:
    ep = TcpEndpoint()
    p = ep.pollables()[0]
    ep.close()
    ep.close()
    assert ep.pollables() == [] and ep.handle(p) == []
    ep.reply(b"nobody", Frame(Kind.PING))  # ignored


def test_reply_to_a_peer_gone_is_ignored(server: Server) -> None:
    server.ep.reply(b"\0\x80\0\0\x29", Frame(Kind.PING))


@pytest.mark.parametrize("address", ["", "localhost", ":80", "host:", "host:http", "host:0", "host:65536",
                                     "host:-1"])
def test_bad_address(address: str) -> None:
    with pytest.raises(ValueError, match="expected 'host:port'"):
        TcpConnection(address)


@pytest.mark.parametrize("port", [-1, 65536, "80", 1.5])
def test_bad_port(port: object) -> None:
    with pytest.raises(ValueError, match=r"port: expected 0\.\.65535"):
        TcpEndpoint(port=port)


def test_binding_a_port_in_use_raises_oserror() -> None:
    ep = TcpEndpoint()
    try:
        with pytest.raises(OSError, match=f"cannot bind tcp://127.0.0.1:{ep.port}"):
            TcpEndpoint(port=ep.port)
    finally:
        ep.close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError, match="cannot bind"):
            TcpEndpoint(port=s.getsockname()[1])
