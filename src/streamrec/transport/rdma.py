"""RDMA transport through UCX (``ucxx``): tag messages, progressed by the caller's thread.

Owns: ``RdmaConnection`` and ``RdmaEndpoint``, the optional transport of the
``rdma`` extra (``ucxx-cu12``). It must not interpret frames beyond decoding
them, must not start threads (UCX is progressed by whoever calls
``recv``/``handle``), and must not be imported for its side effects: when ucxx
is missing or broken, importing this module still works and the constructors
raise ``PeerUnavailable("rdma unavailable: <reason>")`` so a channel falls back.

How a link is made: UCX's own listener binds every interface and needs a
socket-capable transport, so the endpoint instead listens on a plain TCP socket
(127.0.0.1 by default) that only swaps UCX worker addresses: the client sends
``"SRUX", length, address``; the server answers ``"SRUX", conn id, length,
address``. Both sides then open UCX endpoints from the worker addresses, which
works for shared-memory-only transports too. The bootstrap socket stays open
for the link's life: it is the failure detector (UCX's shared-memory
transports have no peer-failure handling), so a dead server is seen as EOF and
raised as ``PeerUnavailable`` at once.

On the wire (UCX tag messages, tag = conn id, both directions; UCX keeps
order per endpoint and tag) a frame is a fixed 160-byte preamble (the header
block of ``frames.encode`` zero-padded to ``MAX_BUFFERS`` descriptors), then
each non-empty buffer as its own message, sent zero-copy from the array. The
receiver posts the preamble receive, validates it with ``frames.parse_head``
against its cap, and only then allocates each buffer and posts its receive, so
a hostile header cannot make it allocate. A malformed preamble comes out as a
``FrameError``; when its descriptors can still be read the announced buffers
are drained into 1-byte sinks (UCX drops a truncated message) and the link
keeps going, otherwise the link is closed after the error reply is sent.

Progress model: each connection and endpoint owns one UCX worker in blocking
mode. ``pollable`` is an epoll fd holding the worker's event fd, the bootstrap
socket(s) and an eventfd that stays set while decoded frames wait (or the
worker could not be armed), so a ``zmq.Poller`` wakes exactly when ``recv(0)``
or ``handle`` has work. Waits inside ``recv`` re-check at least every 50 ms,
as ucxx's own blocking mode does, in case UCX misses an event.

Transport choice (``UCX_TLS``; pass ``tls=`` or set the environment variable,
default ``sm,self``): ``sm`` (posix/sysv shared memory, CMA for rendezvous) is
the fastest path on one host and needs no listener; ``tcp`` works but is
slower than pyzmq over loopback; on InfiniBand/RoCE hosts use
``rc,ud,sm,self`` (UCX warns where rc/ud are missing and carries on) or
``all``. Both peers must share a transport, and shared memory has no
peer-failure handling, so endpoints are opened without it (see above).
``RNDV_FRAG_MEM_TYPE=host`` overrides ucxx's CUDA default so no GPU is needed.

Measured here (2-core VM, no GPU, server in another process, one request in
flight, 4096-key request, 1 MiB reply of 4096 x 64 float32, 3000 calls):
``sm,self`` 2.4-2.6k round trips/s, median 380-415 µs; ``all`` (picks sm)
2.7k/s, 360 µs; ``tcp,self`` 0.68k/s, 1390 µs; pyzmq DEALER/ROUTER on
loopback 1.8-2.3k/s, 430-535 µs.

Thread safety: a connection belongs to its caller's thread and an endpoint to
the server's master thread, as in ``base``; the shared UCX context is created
under a lock.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from streamrec.errors import FrameError, PeerUnavailable
from streamrec.transport.base import Connection, Endpoint, Token
from streamrec.transport.frames import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_BYTES,
    MAGIC,
    MAX_BUFFERS,
    Frame,
    Status,
    encode,
    packed_size,
    parse_head,
)

__all__ = ["DEFAULT_TLS", "RdmaConnection", "RdmaEndpoint", "available"]

try:  # ucxx is an optional extra; keep this module importable without it
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")  # ucxx sets UCX_MEMTYPE_CACHE, unknown to UCX 1.21
    import ucxx as _ucxx_pkg  # noqa: F401  (loads libucx and sets ucxx's environment defaults)
    from ucxx._lib import libucxx as _ucx
    from ucxx._lib.arr import Array as _Array
    _IMPORT_ERROR: BaseException | None = None
except Exception as _exc:  # ImportError, or a broken native library
    _ucx = _Array = None
    _IMPORT_ERROR = _exc

DEFAULT_TLS = "sm,self"  # see the module docstring
_PREAMBLE = HEADER_BYTES + 16 * MAX_BUFFERS  # 160: header + the most descriptors a frame may have
_HELLO = struct.Struct("<4sI")  # magic, address length (client -> server)
_WELCOME = struct.Struct("<4sII")  # magic, conn id, address length (server -> client)
_BOOT_MAGIC = b"SRUX"
_MAX_ADDRESS = 4096  # UCX worker addresses are ~100-1000 bytes (more with many IB ports)
_WAIT_SLICE_S = 0.05  # longest epoll wait inside recv before progressing anyway
_POISON_GRACE_S = 5.0  # how long a link with an unreadable frame waits for its error reply to go out
_DRAIN_S = 0.05  # after the endpoint's EOF, how long a half-received frame may take to finish
_ARM_TRIES = 64  # progress/arm rounds before giving up and leaving the kick set

_context_lock = threading.Lock()
_contexts: dict[str, Any] = {}


def available() -> bool:
    """Whether ucxx imported here (the transport may still fail to reach a peer)."""
    return _IMPORT_ERROR is None


def _require() -> None:
    if _IMPORT_ERROR is not None:
        raise PeerUnavailable(f"rdma unavailable: ucxx failed to import ({_IMPORT_ERROR!r}); "
                              "install the 'rdma' extra", transport="rdma") from _IMPORT_ERROR


def _context(tls: str) -> Any:
    """The process's UCX context for ``tls`` (created once; contexts are thread-safe)."""
    with _context_lock:
        ctx = _contexts.get(tls)
        if ctx is None:
            config = {"TLS": tls, "RNDV_FRAG_MEM_TYPE": "host"}
            ctx = _ucx.UCXContext(config, (_ucx.Feature.TAG, _ucx.Feature.WAKEUP))
            _contexts[tls] = ctx
        return ctx


def _new_worker(tls: str | None) -> Any:
    tls = tls or os.environ.get("UCX_TLS") or DEFAULT_TLS
    try:
        worker = _ucx.UCXWorker(_context(tls))
        worker.init_blocking_progress_mode()
    except Exception as exc:  # UCX config or device errors
        raise PeerUnavailable(f"rdma unavailable: UCX worker for UCX_TLS={tls!r} failed: {exc}",
                              transport="rdma") from exc
    return worker


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed during handshake")
        out += chunk
    return bytes(out)


class _Link:
    """One UCX endpoint with its receive state machine and the sends still in flight.

    Receives: ``pump`` advances the posted preamble/buffer receives and appends
    each finished frame (or ``FrameError``) to ``out``. ``broken`` is set when
    the stream can no longer be trusted or UCX reported an error.
    """

    def __init__(self, ep: Any, tag: int, max_bytes: int, peer: str) -> None:
        self.ep = ep
        self.tag = _ucx.UCXXTag(tag)
        self.max = max_bytes
        self.peer = peer
        self.broken: str = ""
        self.poisoned = 0.0  # when the stream went bad: closed once its error reply is out
        self.replied = False
        self.sends: list[tuple[Any, Any]] = []  # (request, keep-alive object)
        self._pre = np.zeros(_PREAMBLE, np.uint8)
        self._frame: Frame | None = None
        self._error: FrameError | None = None
        self._reqs: list[Any] = []
        self._post_preamble()

    def _post_preamble(self) -> None:
        self._frame, self._error = None, None
        self._reqs = [self.ep.tag_recv(_Array(self._pre), self.tag)]

    def send(self, frame: Frame) -> None:
        parts = encode(frame)
        pre = np.zeros(_PREAMBLE, np.uint8)
        pre[:len(parts[0])] = np.frombuffer(parts[0], np.uint8)
        self.sends.append((self.ep.tag_send(_Array(pre), self.tag), pre))
        for b in frame.buffers:
            if b.nbytes:
                self.sends.append((self.ep.tag_send(_Array(b), self.tag), b))

    def pump(self, out: collections.deque[Frame | FrameError]) -> None:
        """Advance receives and sends after a worker progress; never blocks."""
        if self.sends and self.sends[-1][0].completed:
            self._reap_sends()
        while not self.broken and all(r.completed for r in self._reqs):
            try:
                for r in self._reqs:
                    r.check_error()
            except Exception as exc:
                truncated = "Truncated" in type(exc).__name__
                if not (truncated and self._error is not None):  # a drained buffer truncates by design
                    if truncated and self._frame is None:  # the preamble was oversized: not our peer
                        out.append(FrameError(f"preamble over {_PREAMBLE} bytes", status=Status.BAD_FRAME,
                                              peer=self.peer, transport="rdma"))
                        self.poisoned = time.monotonic()
                    self.broken = f"UCX receive failed: {exc}"
                    return
            if self._frame is None and self._error is None:
                self._start_frame(out)
            else:
                if self._error is not None:
                    out.append(self._error)
                else:
                    assert self._frame is not None
                    out.append(self._frame)
                self._post_preamble()

    def _start_frame(self, out: collections.deque[Frame | FrameError]) -> None:
        try:
            frame, descs = parse_head(self._pre, self.max)
        except FrameError as exc:
            exc.peer, exc.transport = self.peer, "rdma"
            sinks = self._drainable()
            if sinks is None:
                out.append(exc)
                self.poisoned = time.monotonic()
                self.broken = f"unreadable preamble: {exc}"
                return
            self._error = exc
            self._reqs = [self.ep.tag_recv(_Array(np.empty(1, np.uint8)), self.tag) for _ in range(sinks)]
            return
        self._frame = frame
        self._reqs = []
        for dt, shape, nbytes in descs:
            buf = np.empty(shape, dt)
            frame.buffers.append(buf)
            if nbytes:
                self._reqs.append(self.ep.tag_recv(_Array(buf), self.tag))

    def _drainable(self) -> int | None:
        """How many buffer messages follow a refused preamble, if its layout can be trusted."""
        mv = self._pre.data
        magic, nbufs = struct.unpack_from("<I", mv, 0)[0], struct.unpack_from("<H", mv, 24)[0]
        if magic != MAGIC or nbufs > MAX_BUFFERS:
            return None
        sinks = 0
        for i in range(nbufs):
            if struct.unpack_from("<Q", mv, HEADER_BYTES + 16 * i + 8)[0]:  # descriptor's nbytes
                sinks += 1
        return sinks

    @property
    def idle(self) -> bool:
        """No frame is half received (only the next preamble is posted)."""
        return self._frame is None and self._error is None

    def _reap_sends(self) -> None:
        keep = []
        for req, obj in self.sends:
            if not req.completed:
                keep.append((req, obj))
                continue
            try:
                req.check_error()
            except Exception as exc:
                self.broken = f"UCX send failed: {exc}"
        self.sends = keep

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ep.close()
        self.sends, self._reqs = [], []


class _Waker:
    """An epoll fd over the worker's event fd, sockets, and a 'work is waiting' eventfd."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.epoll = select.epoll()
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.kicked = False
        self.epoll.register(worker.epoll_file_descriptor, select.EPOLLIN)
        self.epoll.register(self.kick, select.EPOLLIN)

    def settle(self, step: Callable[[], bool]) -> None:
        """Run ``step`` (progress the worker, collect what finished; True: work waits for the
        caller) until the worker arms, so the poller wakes on the next event; else set the kick."""
        pending = True
        for _ in range(_ARM_TRIES):
            pending = step()
            if pending:
                break
            if self.worker.arm():
                break
        else:
            pending = True
        if pending and not self.kicked:
            os.eventfd_write(self.kick, 1)
        elif not pending and self.kicked:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.kick)
        self.kicked = pending

    def close(self) -> None:
        self.epoll.close()
        os.close(self.kick)


class RdmaConnection(Connection):
    """A UCX link to one ``RdmaEndpoint``; many requests may be in flight.

    Args:
        address: ``host:port`` of the endpoint's bootstrap socket (``offer()["address"]``).
        max_frame_bytes: replies over this are refused (``FrameError``, TOO_LARGE).
        connect_timeout_s: how long the handshake may take.
        tls: UCX transports (``UCX_TLS`` syntax); None: ``$UCX_TLS`` or ``DEFAULT_TLS``.

    Raises:
        ValueError: a malformed address.
        PeerUnavailable: ucxx missing, or the endpoint cannot be reached.

    Example::

        with RdmaConnection(endpoint.offer()["address"]) as conn:
            reply = conn.request(Frame(Kind.PING, request_id=1), timeout_s=1.0)
    """

    name: ClassVar[str] = "rdma"

    def __init__(self, address: str, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 connect_timeout_s: float = 2.0, tls: str | None = None) -> None:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"address: expected 'host:port', got {address!r}")
        _require()
        self.peer = address
        self._max = max_frame_bytes
        self._ready: collections.deque[Frame | FrameError] = collections.deque()
        self._closed = False
        self._dead = ""
        self._worker = _new_worker(tls)
        own = self._worker.address.tobytes()
        try:
            sock = socket.create_connection((host, int(port)), timeout=connect_timeout_s)
        except OSError as exc:
            raise PeerUnavailable(f"cannot connect: {exc}", peer=address, transport="rdma") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(_HELLO.pack(_BOOT_MAGIC, len(own)) + own)
            magic, conn_id, n = _WELCOME.unpack(_recv_exact(sock, _WELCOME.size))
            if magic != _BOOT_MAGIC or not 0 < n <= _MAX_ADDRESS:
                raise ConnectionError(f"not an rdma endpoint (magic {magic!r}, address length {n})")
            theirs = _recv_exact(sock, n)
            ep = self._worker.create_endpoint_from_worker_address(
                _ucx.UCXAddress.create_from_buffer(np.frombuffer(theirs, np.uint8)), False)
        except Exception as exc:
            sock.close()
            raise PeerUnavailable(f"handshake failed: {exc}", peer=address, transport="rdma") from exc
        sock.setblocking(False)
        self._sock = sock
        self._link = _Link(ep, conn_id, max_frame_bytes, address)
        self._waker = _Waker(self._worker)
        self._waker.epoll.register(sock.fileno(), select.EPOLLIN)
        self._pump()

    @classmethod
    def connect(cls, offer: dict[str, Any], *, timeout_s: float = 2.0,
                max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> RdmaConnection:
        """A connection to the endpoint that made ``offer`` (its ``offer()``, as HELLO carries it).

        Raises:
            ValueError: the offer has no usable ``address``.
            PeerUnavailable: as the constructor.
        """
        address = offer.get("address")
        if not isinstance(address, str):
            raise ValueError(f"offer: expected an 'address' string, got {offer!r}")
        return cls(address, max_frame_bytes=max_frame_bytes, connect_timeout_s=timeout_s)

    # -- Connection -------------------------------------------------------------------------

    def send(self, frame: Frame) -> None:
        if self._closed:
            raise PeerUnavailable("connection closed", peer=self.peer, transport=self.name)
        size = packed_size(frame)
        if size > self._max:
            raise ValueError(f"frame of {size} bytes is over this connection's {self._max}-byte cap")
        self._pump()
        if self._dead:
            raise PeerUnavailable(self._dead, peer=self.peer, transport=self.name)
        self._link.send(frame)
        self._pump()

    def recv(self, timeout_s: float) -> Frame | None:
        if self._closed:
            raise PeerUnavailable("connection closed", peer=self.peer, transport=self.name)
        deadline = time.monotonic() + timeout_s
        while True:
            self._pump()
            if self._ready:
                item = self._ready.popleft()
                if not self._ready:
                    self._pump()  # re-arm, or keep the kick set if more arrived
                if isinstance(item, FrameError):
                    raise item
                return item
            if self._dead:
                raise PeerUnavailable(self._dead, peer=self.peer, transport=self.name)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._waker.epoll.poll(min(left, _WAIT_SLICE_S))

    @property
    def pollable(self) -> Any:
        return self._waker.epoll.fileno()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._link.close()
        self._waker.close()
        self._sock.close()
        self._worker = None

    # -- internals ---------------------------------------------------------------------------

    def _pump(self) -> None:
        self._waker.settle(self._step)

    def _step(self) -> bool:
        self._worker.progress()
        self._link.pump(self._ready)
        if not self._dead:
            try:
                if self._sock.recv(1, socket.MSG_PEEK) == b"":
                    self._drain()  # what the endpoint sent before closing still counts
                    self._dead = "endpoint closed the link"
            except BlockingIOError:
                pass
            except OSError as exc:
                self._dead = f"link lost: {exc}"
            if self._link.broken and not self._dead:
                self._dead = self._link.broken
        return bool(self._ready) or bool(self._dead)


    def _drain(self) -> None:
        """Progress a little longer so frames already on their way are not lost to an EOF."""
        end = time.monotonic() + _DRAIN_S
        while True:
            self._worker.progress()
            self._link.pump(self._ready)
            if (self._link.idle and not self._worker.progress_once()) or time.monotonic() > end:
                return


class _Peer:
    """Server-side state of one client: its bootstrap socket and, after the handshake, its link."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.hello = bytearray()
        self.link: _Link | None = None


class RdmaEndpoint(Endpoint):
    """Serves ``RdmaConnection``s: a bootstrap TCP socket on ``host:port`` plus one UCX worker.

    Args:
        host: interface of the bootstrap socket; 127.0.0.1 unless the caller means otherwise.
        port: TCP port, 0 to pick a free one (see ``port``).
        max_frame_bytes: requests over this are refused with a TOO_LARGE ``FrameError``.
        tls: UCX transports (``UCX_TLS`` syntax); None: ``$UCX_TLS`` or ``DEFAULT_TLS``.

    Raises:
        ValueError: a bad port.
        PeerUnavailable: ucxx missing or UCX cannot start with ``tls``.
        OSError: the port cannot be bound.
    """

    name: ClassVar[str] = "rdma"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, tls: str | None = None) -> None:
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"port: expected 0..65535, got {port!r}")
        _require()
        self._max = max_frame_bytes
        self._worker = _new_worker(tls)
        self._address = self._worker.address.tobytes()
        self._listen = socket.create_server((host, port), backlog=128)
        self._listen.setblocking(False)
        self.host = host
        self.port: int = self._listen.getsockname()[1]
        self._waker = _Waker(self._worker)
        self._waker.epoll.register(self._listen.fileno(), select.EPOLLIN)
        self._peers: dict[int, _Peer] = {}  # by bootstrap socket fd
        self._links: dict[int, _Peer] = {}  # by conn id (the token)
        self._next_id = 1
        self._ready: collections.deque[tuple[Token, Frame | FrameError]] = collections.deque()
        self._closed = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def pollables(self) -> list[Any]:
        return [] if self._closed else [self._waker.epoll.fileno()]

    def handle(self, pollable: Any) -> list[tuple[Token, Frame | FrameError]]:
        if self._closed:
            return []
        for fd, _ in self._waker.epoll.poll(0):
            if fd == self._listen.fileno():
                self._accept()
            elif fd in self._peers:
                self._on_socket(self._peers[fd])
        self._waker.settle(self._step)
        out = list(self._ready)
        self._ready.clear()
        return out

    def reply(self, token: Token, frame: Frame) -> None:
        peer = self._links.get(token)
        if peer is None or peer.link is None or (peer.link.broken and not peer.link.poisoned):
            return
        peer.link.send(frame)
        peer.link.replied = True
        self._waker.settle(lambda: self._step() or bool(self._ready))

    def offer(self) -> dict[str, Any]:
        return {"address": self.address, "host": socket.gethostname()}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for peer in list(self._peers.values()):
            self._drop(peer)
        self._listen.close()
        self._waker.close()
        self._worker = None

    # -- internals ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self._listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            peer = _Peer(sock, f"{addr[0]}:{addr[1]}")
            self._peers[sock.fileno()] = peer
            self._waker.epoll.register(sock.fileno(), select.EPOLLIN)

    def _on_socket(self, peer: _Peer) -> None:
        try:
            data = peer.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data or peer.link is not None:  # EOF, or bytes after the handshake: a broken client
            self._drop(peer)
            return
        peer.hello += data
        if len(peer.hello) < _HELLO.size:
            return
        magic, n = _HELLO.unpack_from(peer.hello)
        if magic != _BOOT_MAGIC or not 0 < n <= _MAX_ADDRESS or len(peer.hello) > _HELLO.size + n:
            self._drop(peer)
            return
        if len(peer.hello) < _HELLO.size + n:
            return
        conn_id = self._next_id
        self._next_id += 1
        try:
            their = np.frombuffer(bytes(peer.hello[_HELLO.size:]), np.uint8)
            addr = _ucx.UCXAddress.create_from_buffer(their)
            ep = self._worker.create_endpoint_from_worker_address(addr, False)
            peer.sock.send(_WELCOME.pack(_BOOT_MAGIC, conn_id, len(self._address)) + self._address)
        except Exception:  # unreachable address, or the client vanished
            self._drop(peer)
            return
        peer.link = _Link(ep, conn_id, self._max, peer.name)
        self._links[conn_id] = peer

    def _step(self) -> bool:
        self._worker.progress()
        self._pump_links()
        return False  # handle returns what arrived; reply() asks for a kick when frames wait

    def _pump_links(self) -> None:
        for conn_id, peer in list(self._links.items()):
            link = peer.link
            assert link is not None
            got: collections.deque[Frame | FrameError] = collections.deque()
            link.pump(got)
            self._ready.extend((conn_id, item) for item in got)
            if link.broken and not (link.poisoned and (link.sends or not link.replied)
                                    and time.monotonic() - link.poisoned < _POISON_GRACE_S):
                self._drop(peer)

    def _drop(self, peer: _Peer) -> None:
        fd = peer.sock.fileno()
        self._peers.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._waker.epoll.unregister(fd)
        peer.sock.close()
        if peer.link is not None:
            self._links.pop(int(peer.link.tag.value), None)
            peer.link.close()
            peer.link = None
