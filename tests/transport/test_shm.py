"""The shared-memory transport against real endpoints: a server thread here, or a server process."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import select
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.errors import DeadlineExceeded, FrameError, PeerUnavailable
from streamrec.transport import frames, shm
from streamrec.transport.frames import Frame, Kind, Status
from streamrec.transport.shm import ShmConnection, ShmEndpoint

pytestmark = pytest.mark.skipif(not os.path.isdir(shm.SEGMENT_DIR), reason="no /dev/shm")

Handler = Callable[[ShmEndpoint, Any, "Frame | FrameError"], None]


def echo(ep: ShmEndpoint, token: Any, req: Frame | FrameError) -> None:
    if isinstance(req, FrameError):
        ep.reply(token, frames.error_reply(None, req.status, str(req)))
    else:
        ep.reply(token, frames.reply_to(req, list(req.buffers), aux=req.aux))


def serve(ep: ShmEndpoint, stop: threading.Event | None, handler: Handler) -> None:
    """The master loop a server runs: poll every pollable, drain, answer."""
    poller = select.poll()
    registered: set[int] = set()
    while stop is None or not stop.is_set():
        fds = set(ep.pollables())
        for fd in registered - fds:
            poller.unregister(fd)
        for fd in fds - registered:
            poller.register(fd, select.POLLIN)
        registered = fds
        for fd, _ in poller.poll(20):
            for token, req in ep.handle(fd):
                handler(ep, token, req)


@contextlib.contextmanager
def server(handler: Handler = echo, **kwargs: Any) -> Iterator[ShmEndpoint]:
    ep = ShmEndpoint(**kwargs)
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(ep, stop, handler), daemon=True)
    thread.start()
    try:
        yield ep
    finally:
        stop.set()
        thread.join(5)
        ep.close()


def _segments() -> set[str]:
    return {n for n in os.listdir(shm.SEGMENT_DIR) if n.startswith("streamrec-")}


def _assert_echo(sent: Frame, got: Frame) -> None:
    assert got.is_reply and got.status == Status.OK
    assert (got.request_id, got.kind, got.table, got.shard, got.aux) == (
        sent.request_id, sent.kind, sent.table, sent.shard, sent.aux)
    assert len(got.buffers) == len(sent.buffers)
    for a, b in zip(sent.buffers, got.buffers, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


_DTYPES = [np.uint8, np.bool_, np.int32, np.uint32, np.int64, np.uint64, np.float16, np.float32, np.float64]


def _array(rng: np.random.Generator, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    out = raw.view(dtype).reshape(shape)
    return out if dtype is not np.bool_ else out.astype(bool)


# --- round trips with a server thread ----------------------------------------------------------


@pytest.fixture(scope="module")
def echo_server() -> Iterator[ShmEndpoint]:
    with server() as ep:
        yield ep


@pytest.fixture(scope="module")
def small_conn(echo_server: ShmEndpoint) -> Iterator[ShmConnection]:
    with ShmConnection.connect(echo_server.offer(), ring_bytes=256 << 10) as conn:
        yield conn


_buffer = st.tuples(st.sampled_from(_DTYPES), st.integers(0, 2), st.integers(0, 3000), st.integers(1, 33))


@settings(max_examples=60)
@given(specs=st.lists(_buffer, max_size=frames.MAX_BUFFERS), seed=st.integers(0, 2**32 - 1),
       kind=st.sampled_from(list(Kind)), rid=st.integers(0, 2**64 - 1), aux=st.integers(0, 2**32 - 1))
def test_round_trips_of_many_shapes(small_conn: ShmConnection, specs: list[tuple[Any, int, int, int]],
                                    seed: int, kind: Kind, rid: int, aux: int) -> None:
    rng = np.random.default_rng(seed)
    bufs = [_array(rng, dt, (rows,) if ndim < 2 else (rows, cols)) for dt, ndim, rows, cols in specs]
    sent = Frame(kind, bufs, request_id=rid, table=seed % 65536, shard=seed % 7, aux=aux)
    if frames.packed_size(sent) + 64 > 256 << 10:
        with pytest.raises(ValueError, match="does not fit"):
            small_conn.send(sent)
    else:
        _assert_echo(sent, small_conn.request(sent, timeout_s=5))


def test_frames_up_to_the_ring_size_and_one_over(small_conn: ShmConnection) -> None:
    ring = 256 << 10
    head = frames.packed_size(Frame(Kind.ASSIGN, [np.zeros(0, np.uint8)]))
    biggest = Frame(Kind.ASSIGN, [(np.arange(ring - 64 - head) % 251).astype(np.uint8)], request_id=1)
    assert frames.packed_size(biggest) == ring - 64
    for i in range(5):  # at every start position the ring passes through, it must still fit
        small = Frame(Kind.PING, [np.full(64 * 37 * (i + 1), i, np.uint8)], request_id=100 + i)
        _assert_echo(small, small_conn.request(small, timeout_s=5))
        _assert_echo(biggest, small_conn.request(biggest, timeout_s=5))
    too_big = Frame(Kind.ASSIGN, [np.zeros(ring - 64 - head + 64, np.uint8)], request_id=2)
    with pytest.raises(ValueError, match="does not fit"):
        small_conn.send(too_big)
    _assert_echo(small, small_conn.request(small, timeout_s=5))  # still usable


def test_pipelined_random_sizes_wrap_many_times(echo_server: ShmEndpoint) -> None:
    rng = np.random.default_rng(7)
    with ShmConnection.connect(echo_server.offer(), ring_bytes=64 << 10) as conn:
        outstanding: dict[int, Frame] = {}
        for rid in range(1500):
            n = int(rng.integers(0, 12000))
            frame = Frame(Kind.FIND, [rng.integers(0, 2**63, n // 8 + 1, dtype=np.uint64)], request_id=rid)
            conn.send(frame)
            outstanding[rid] = frame
            while len(outstanding) > 3 or (rid == 1499 and outstanding):
                got = conn.recv(5)
                assert got is not None
                _assert_echo(outstanding.pop(got.request_id), got)


def test_many_in_flight_answered_out_of_order() -> None:
    held: list[tuple[Any, Frame]] = []

    def collect(ep: ShmEndpoint, token: Any, req: Frame | FrameError) -> None:
        assert isinstance(req, Frame)
        held.append((token, req))
        if len(held) == 40:
            random.Random(3).shuffle(held)
            for tok, r in held:
                ep.reply(tok, frames.reply_to(r, [r.buffers[0] * 2]))

    with server(collect) as ep, ShmConnection.connect(ep.offer()) as conn:
        for rid in range(40):
            conn.send(Frame(Kind.FIND, [np.full((rid + 1, 64), rid, np.float32)], request_id=rid))
        seen = []
        for _ in range(40):
            got = conn.recv(5)
            assert got is not None
            assert got.buffers[0].shape == (got.request_id + 1, 64)
            assert np.all(got.buffers[0] == 2 * got.request_id)
            seen.append(got.request_id)
        assert sorted(seen) == list(range(40)) and seen != sorted(seen)


def test_full_reply_ring_and_unread_cap_make_the_server_wait_not_fail() -> None:
    big = np.ones((1024, 16), np.float32)  # 64 KiB replies through a 64 KiB... no: 128 KiB ring

    def grow(ep: ShmEndpoint, token: Any, req: Frame | FrameError) -> None:
        assert isinstance(req, Frame)
        ep.reply(token, frames.reply_to(req, [big * req.request_id] if req.aux else []))

    with server(grow) as ep, ShmConnection.connect(ep.offer(), ring_bytes=128 << 10) as conn:
        for rid in range(12):  # twelve 64 KiB replies into a ring holding one at a time
            conn.send(Frame(Kind.FIND, [], request_id=rid, aux=1))
        for _ in range(12):
            got = conn.recv(5)
            assert got is not None and np.all(got.buffers[0] == got.request_id)
        for rid in range(300):  # more unread replies than the server may publish
            conn.send(Frame(Kind.PING, [], request_id=rid))
        time.sleep(0.05)
        ids = []
        for _ in range(300):
            got = conn.recv(5)
            assert got is not None
            ids.append(got.request_id)
        assert sorted(ids) == list(range(300))


def test_stress_random_pipelining_through_tiny_rings() -> None:
    def sized(ep: ShmEndpoint, token: Any, req: Frame | FrameError) -> None:
        assert isinstance(req, Frame)
        ep.reply(token, frames.reply_to(req, [np.full(req.aux, req.request_id % 251, np.uint8)], aux=req.aux))

    rng = random.Random(11)
    with server(sized) as ep, ShmConnection.connect(ep.offer(), ring_bytes=64 << 10, spin_s=0) as conn:
        inflight: set[int] = set()
        deadline = time.monotonic() + 2.0
        rid = 0
        while time.monotonic() < deadline:
            for _ in range(rng.randint(1, 8)):
                conn.send(Frame(Kind.FIND, [], request_id=rid, aux=rng.choice([0, 100, 5000, 30000, 60000])))
                inflight.add(rid)
                rid += 1
            for _ in range(rng.randint(0, len(inflight))):
                got = conn.recv(5)
                assert got is not None, f"lost reply with {len(inflight)} in flight"
                assert np.all(got.buffers[0] == got.request_id % 251) and got.buffers[0].size == got.aux
                inflight.remove(got.request_id)
        while inflight:
            got = conn.recv(5)
            assert got is not None
            inflight.remove(got.request_id)
        assert rid > 200


def test_pollable_is_level_triggered(echo_server: ShmEndpoint) -> None:
    with ShmConnection.connect(echo_server.offer()) as conn:
        for rid in range(3):
            conn.send(Frame(Kind.PING, [], request_id=rid))
        time.sleep(0.1)
        got = []
        while True:
            ready, _, _ = select.select([conn.pollable], [], [], 1.0)
            if not ready:
                break
            reply = conn.recv(0)
            if reply is not None:
                got.append(reply.request_id)
        assert sorted(got) == [0, 1, 2]
        assert conn.recv(0) is None


# --- failures ------------------------------------------------------------------------------------


def test_garbage_request_is_a_frame_error_and_the_link_keeps_working() -> None:
    got: list[Frame | FrameError] = []

    def record(ep: ShmEndpoint, token: Any, req: Frame | FrameError) -> None:
        got.append(req)
        echo(ep, token, req)

    with server(record) as ep, ShmConnection.connect(ep.offer()) as conn:
        ring = conn._seg.req
        at = ring.reserve(128)
        ring.out(at, 128)[:] = b"\xab" * 128
        ring.commit(at, 128)
        conn._ring(b"D")
        bad = conn.recv(5)
        assert bad is not None and bad.status == Status.BAD_FRAME
        assert isinstance(got[0], FrameError) and got[0].status == Status.BAD_FRAME
        good = Frame(Kind.FIND, [np.arange(10, dtype=np.uint64)], request_id=5)
        _assert_echo(good, conn.request(good, timeout_s=5))


def test_corrupt_ring_counters_drop_the_link() -> None:
    with server() as ep, ShmConnection.connect(ep.offer()) as conn:
        conn._seg.ctl[shm._W_REQ_HEAD] = 12345  # not a record boundary
        conn._ring(b"D")
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable):
            conn.recv(5)
        assert time.monotonic() - t0 < 1
        time.sleep(0.05)
        assert ep.pollables() == [ep.pollables()[0]]  # only the listener is left


def test_oversize_frame_is_a_value_error(small_conn: ShmConnection) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        small_conn.send(Frame(Kind.ASSIGN, [np.zeros(256 << 10, np.uint8)]))


def test_segment_unlinked_before_the_server_maps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = shm._create_segment

    def vanishing(path: str, ring_bytes: int) -> Any:
        mm = real(path, ring_bytes)
        os.unlink(path)
        return mm

    monkeypatch.setattr(shm, "_create_segment", vanishing)
    with server() as ep:
        before = _segments()
        with pytest.raises(PeerUnavailable, match="refused"):
            ShmConnection.connect(ep.offer())
        assert _segments() <= before


@pytest.mark.parametrize("name", [b"streamrec-shm-1-0000000000000000\n", b"../../etc/passwd\n", b"x" * 300,
                                  b""])
def test_bad_segment_name_is_dropped_quietly(name: bytes) -> None:
    with server() as ep:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(2)
            raw.connect(ep.offer()["path"])
            if name:
                raw.sendall(name)
            else:
                raw.shutdown(socket.SHUT_WR)
            with contextlib.suppress(ConnectionResetError):  # reset: it closed with our bytes unread
                assert raw.recv(1) == b""  # closed without an ack
        with ShmConnection.connect(ep.offer()) as conn:  # and the endpoint still serves
            _assert_echo(Frame(Kind.PING, request_id=9), conn.request(Frame(Kind.PING, request_id=9), 5))


def test_no_server_and_other_host() -> None:
    with pytest.raises(PeerUnavailable):
        ShmConnection.connect(os.path.join(shm.SEGMENT_DIR, "streamrec-nobody.sock"))
    with pytest.raises(PeerUnavailable, match="another host"):
        ShmConnection.connect({"path": "/nowhere", "host": "elsewhere/0", "ring_bytes": 1 << 20})
    assert shm.host_id() == shm.host_id() and "/" in shm.host_id()


def test_close_releases_segments_and_socket() -> None:
    before = _segments()
    with server() as ep:
        conns = [ShmConnection.connect(ep.offer()) for _ in range(3)]
        reply = conns[0].request(Frame(Kind.PING, request_id=1), 5)
        assert _segments() - before == {os.path.basename(ep.offer()["path"])}
        for c in conns:
            c.close()
            c.close()
        with pytest.raises(PeerUnavailable):
            conns[0].send(Frame(Kind.PING))
        del reply
    assert _segments() == before


def test_send_waits_then_raises_deadline_when_the_server_never_answers() -> None:
    with server(lambda ep, token, req: None) as ep, \
            ShmConnection.connect(ep.offer(), ring_bytes=64 << 10, timeout_s=0.2) as conn, \
            pytest.raises(DeadlineExceeded):
        for rid in range(100):
            conn.send(Frame(Kind.FIND, [np.zeros(4000, np.uint8)], request_id=rid))


# --- a server in another process -----------------------------------------------------------------


def _process_server(pipe: Any, mode: str) -> None:
    ep = ShmEndpoint()
    big = Frame(Kind.FIND, [np.ones((4096, 64), np.float32)])

    def handler(ep: ShmEndpoint, token: Any, req: Frame | FrameError) -> None:
        if mode == "bench" and isinstance(req, Frame):
            big.request_id = req.request_id
            big.flags = frames.Flag.REPLY
            ep.reply(token, big)
        elif mode == "echo" or isinstance(req, FrameError) or req.aux == 0:
            echo(ep, token, req)
        # mode "hang" with aux != 0: never answer

    pipe.send(ep.offer())
    serve(ep, None, handler)


@contextlib.contextmanager
def process_server(mode: str) -> Iterator[tuple[dict[str, Any], Any]]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_process_server, args=(child, mode), daemon=True)
    proc.start()
    offer: dict[str, Any] = {}
    try:
        assert parent.poll(30), "server process did not start"
        offer = parent.recv()
        yield offer, proc
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        if offer:  # a killed server cannot remove its socket file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(offer["path"])


def test_server_process_round_trips_then_sigkill_mid_call() -> None:
    with process_server("hang") as (offer, proc):
        before = _segments()
        with ShmConnection.connect(offer, timeout_s=5) as conn:
            rng = np.random.default_rng(1)
            for rid in range(200):
                rows = rng.standard_normal((rid % 50, 64)).astype(np.float32)
                sent = Frame(Kind.FIND, [rows], request_id=rid)
                _assert_echo(sent, conn.request(sent, timeout_s=5))
            conn.send(Frame(Kind.FIND, [], request_id=999, aux=1))  # the server sits on it
            assert conn.recv(0.1) is None
            threading.Timer(0.2, os.kill, (proc.pid, signal.SIGKILL)).start()
            t0 = time.monotonic()
            with pytest.raises(PeerUnavailable):
                conn.recv(10)
            assert time.monotonic() - t0 < 1.0
            with pytest.raises(PeerUnavailable):
                conn.send(Frame(Kind.PING))
        assert _segments() <= before | {os.path.basename(offer["path"])}


# --- where we stand against zmq TCP (run with -m slow -s) ----------------------------------------


def _zmq_rep_server(port_pipe: Any) -> None:
    import zmq

    sock: Any = zmq.Context.instance().socket(zmq.REP)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    port_pipe.send(port)
    payload = np.ones((4096, 64), np.float32)
    while True:
        msg = sock.recv(copy=False)
        if bytes(msg.buffer[:4]) == b"stop":
            break
        sock.send(payload, copy=False)


def _rate(call: Callable[[], None], seconds: float) -> tuple[float, float]:
    for _ in range(50):
        call()
    lat = []
    end = time.perf_counter() + seconds
    while (t := time.perf_counter()) < end:
        call()
        lat.append(time.perf_counter() - t)
    return len(lat) / sum(lat), statistics.median(lat) * 1e6


def bench_shm_vs_tcp(seconds: float = 2.0,
                     spins: tuple[float, ...] = (0.0, 100e-6)) -> dict[str, tuple[float, float]]:
    """Round trips/s and median µs of a small request with a 1 MiB reply (4096 x 64 f32)."""
    import zmq

    out = {}
    with process_server("bench") as (offer, _):
        for spin in spins:
            with ShmConnection.connect(offer, spin_s=spin) as conn:
                req = Frame(Kind.FIND, [np.arange(4096, dtype=np.uint64)], request_id=1)

                def shm_call(c: ShmConnection = conn, r: Frame = req) -> None:
                    c.request(r, 5)

                out[f"shm spin {spin * 1e6:.0f} us"] = _rate(shm_call, seconds)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_zmq_rep_server, args=(child,), daemon=True)
    proc.start()
    try:
        port = parent.recv()
        sock: Any = zmq.Context.instance().socket(zmq.REQ)
        sock.connect(f"tcp://127.0.0.1:{port}")
        keys = np.arange(4096, dtype=np.uint64)

        def tcp_call() -> None:
            sock.send(keys, copy=False)
            sock.recv(copy=False)

        out["zmq tcp REQ/REP"] = _rate(tcp_call, seconds)
        sock.send(b"stop")
        sock.close(0)
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    for name, (rate, median) in out.items():
        print(f"{name:>22}: {rate:9.0f} round trips/s, median {median:7.1f} us (1 MiB replies)")
    return out


@pytest.mark.slow
def test_throughput_against_zmq_tcp() -> None:
    results = bench_shm_vs_tcp()
    shm_best = max(rate for name, (rate, _) in results.items() if name.startswith("shm"))
    assert shm_best > results["zmq tcp REQ/REP"][0]


if __name__ == "__main__":
    bench_shm_vs_tcp()
