"""Shared-memory transport: request and reply rings in one segment, a Unix socket for wake-ups.

Owns: ``ShmEndpoint`` (server side), ``ShmConnection`` (client side), the
segment layout, the ring protocol, and ``host_id`` (whether an offer is usable
here). It must not choose between transports: a failure surfaces as
``PeerUnavailable`` (or ``ValueError`` for a frame too big for the ring) and
the caller's channel falls back to TCP.

Who owns what. The client creates the segment (``/dev/shm/streamrec-shm-*``,
mode 0600, so both ends run as one user), connects to the endpoint's Unix
socket, sends the segment's name and waits for a one-byte ack; it then unlinks
the name, so a crash of either side leaks nothing. The socket stays open as
the doorbell: its EOF is how each side learns the other died (the kernel
closes it even on SIGKILL), so a failure is reported at once, never as a hang.

The segment::

    offset 0     control page, 4096 bytes; u64 words, grouped in 64-byte lines
                 by their single writer so neither side's stores bounce the
                 other's lines:
                   line 0  magic, version, request ring bytes, reply ring bytes, client pid
                   line 1  server state (1 alive, 2 closed), server pid, blocked tail   (server)
                   line 2  request head                                            (client)
                   line 3  request tail                                            (server)
                   line 4  reply head                                              (server)
                   line 5  reply tail, replies taken                               (client)
                   line 6  client state                                            (client)
    4096         request ring (client -> server), ``ring_bytes``
    4096 + R     reply ring (server -> client), ``ring_bytes``

Rings are page-aligned so a record's buffers start on cache lines (``pack``
aligns buffers to 64 bytes of the frame). Each ring is single-producer
single-consumer; head and tail are byte counters that only grow (position =
counter mod size). A record is a 64-byte header (record bytes, kind, frame
bytes: 64 so the frame after it stays cache-line aligned) and the frame as
``frames.pack`` lays it out, written in place. A frame never wraps: when it
does not fit before the end (or the ring is empty and it fits before where
the last one started), a padding record fills the end and the frame starts at
offset 0 (published with the frame, or alone when the ring is too
full, so the consumer frees the end). A frame of up to ``ring_bytes - 64``
therefore always fits once the consumer catches up; a bigger one is refused.

Ordering: the producer writes the record, then publishes the head with one
aligned 8-byte store; the consumer loads the head, then reads the record.
Each is a separate C call (numpy copy, numpy store), so no compiler reorders
them, and x86-64's total store order keeps them in order between cores. The
module therefore requires x86-64: elsewhere ``connect`` raises
``PeerUnavailable`` and ``ShmEndpoint`` raises ``RuntimeError`` (aarch64 would
need a release store and acquire load, e.g. ``store._jit.load_acquire``).

Lifetimes. A request's bytes stay in the ring until the server's ``reply``
for its token is written, so handed-out request buffers stay valid until then
(the tail moves over finished records in order). A reply's bytes stay until
the client's next ``recv``. Nothing half-written is ever seen: the head moves
only after a whole record is in place.

Wake-ups (bytes on the socket). ``D``: a record was published (one per request
or reply). The server drains every byte and scans the whole ring each wake.
The client keeps its socket level-triggered, so a poller wakes exactly while
``recv(0)`` may return a reply: it reads one ``D`` per reply it takes, never
one ahead. ``F``: the server has a reply that does not fit; it stored the
reply tail it saw as the blocked tail first. The client answers ``R`` as soon
as its tail has passed that value. No lost wake-up: ``F`` is read after the
blocked tail was stored (the socket orders them), the tail only grows, so
either it already passed (``R`` now) or the next move passes it (``R`` then).
The server holds at most ``_MAX_UNREAD`` replies the client has not taken, so
its ``D`` bytes never fill the socket. A flag "peer sleeping" in shared memory
would save the ``D`` syscall, but needs a store-load fence Python cannot issue.

Thread safety: a ``ShmConnection`` is used by one thread at a time; an
``ShmEndpoint`` only by the server's master thread. Neither is shared.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import platform
import re
import secrets
import select
import socket
import stat
import time
from collections import deque
from functools import cache
from typing import Any

import numpy as np

from streamrec.errors import DeadlineExceeded, FrameError, PeerUnavailable
from streamrec.transport import frames
from streamrec.transport.base import Connection, Endpoint, Token
from streamrec.transport.frames import Frame

__all__ = ["DEFAULT_RING_BYTES", "DEFAULT_SPIN_S", "SEGMENT_DIR", "ShmConnection", "ShmEndpoint", "host_id"]

SEGMENT_DIR = "/dev/shm"
DEFAULT_RING_BYTES = 8 << 20  # per direction: seven 1 MiB replies (4096 x 64 f32) in flight
MIN_RING_BYTES = 64 << 10
MAX_RING_BYTES = 1 << 30
DEFAULT_SPIN_S = 0.0  # recv sleeps on the socket at once. Spinning 20-200 us first won nothing
# measurable for 1 MiB replies on the 2-core host (the server's copy takes longer than a useful spin,
# and a spinning client steals the core the server needs); callers with spare cores may set it.

_SUPPORTED = platform.machine().lower() in ("x86_64", "amd64")
_PAGE = 4096
_REC = 64  # record header: one cache line, so the frame behind it stays aligned
_MAX_UNREAD = 64  # replies published but not taken; bounds unread D bytes far below a socket buffer
_MAGIC = 0x0031_4D48_5352_5453  # "STRSHM1\0"
_VERSION = 1
_NAME = re.compile(r"streamrec-shm-[0-9]+-[0-9a-f]{16}")
_SOCK_NAME = re.compile(r"streamrec-([0-9]+)-[0-9a-f]{12}\.sock")

# control-page word indices (u64)
_W_MAGIC, _W_VERSION, _W_REQ_BYTES, _W_REP_BYTES, _W_CLIENT_PID = 0, 1, 2, 3, 4
_W_SERVER_STATE, _W_SERVER_PID, _W_BLOCKED_TAIL = 8, 9, 10
_W_REQ_HEAD = 16
_W_REQ_TAIL = 24
_W_REP_HEAD = 32
_W_REP_TAIL, _W_REP_TAKEN = 40, 41
_W_CLIENT_STATE = 48

_PAD, _FRAME = 1, 2
_ALIVE, _CLOSED = 1, 2
_NO_ROOM, _PADDED = -1, -2
_DOORBELL, _FULL, _ROOM, _ACK = b"D", b"F", b"R", b"A"
_NOWAIT = socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT


@cache
def host_id() -> str:
    """This kernel instance: ``hostname/boot_id``. An shm offer is usable only where it matches."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


def _check_ring_bytes(n: int) -> int:
    if not isinstance(n, int) or n % _PAGE or not MIN_RING_BYTES <= n <= MAX_RING_BYTES:
        raise ValueError(f"ring_bytes must be a multiple of {_PAGE} in [{MIN_RING_BYTES}, "
                         f"{MAX_RING_BYTES}], got {n!r}")
    return n


class _Corrupt(Exception):
    """A ring's counters or record headers are inconsistent (internal; becomes a dropped link)."""


class _Ring:
    """One single-producer single-consumer byte ring of a segment.

    ``pos`` is the producer's head or the consumer's scan position, whichever
    side this process is; only that side writes it to the control page.
    """

    __slots__ = ("ctl", "data", "hdr", "head_w", "pos", "seen_tail", "size", "tail_w")

    def __init__(self, mm: mmap.mmap, ctl: np.ndarray, offset: int, size: int, head_w: int,
                 tail_w: int) -> None:
        self.ctl, self.size, self.head_w, self.tail_w = ctl, size, head_w, tail_w
        self.data = memoryview(mm)[offset:offset + size]
        self.hdr = np.frombuffer(mm, np.uint64, count=size // 8, offset=offset)
        self.pos = 0
        self.seen_tail = 0

    # --- producer -----------------------------------------------------------------------------

    def reserve(self, nbytes: int) -> int:
        """Where a record of ``nbytes`` frame bytes starts (a counter), ``_NO_ROOM``, or ``_PADDED``.

        ``_PADDED``: the end of the ring was filled with a published padding
        record and the frame fits nowhere yet; the consumer must take the pad.
        Requires: ``nbytes + _REC <= size`` and ``nbytes % 64 == 0``.
        """
        need = _REC + nbytes
        head = self.pos
        tail = self.seen_tail = int(self.ctl[self.tail_w])
        if not head - self.size <= tail <= head:
            raise _Corrupt(f"tail {tail} outside [{head - self.size}, {head}]")
        at = head % self.size
        # An empty ring restarts at offset 0 when the frame fits there: back-to-back calls then
        # reuse the same cache-hot lines instead of streaming through the whole ring (a 1 MiB
        # copy into lines not in cache cost 3-4x one into lines that are).
        if at + need <= self.size and not (tail == head and need <= at):
            return head if head + need - tail <= self.size else _NO_ROOM
        pad = self.size - at
        if head + pad - tail > self.size:
            return _NO_ROOM
        self.hdr[at // 8:at // 8 + 3] = (pad, _PAD, 0)
        if head + pad + need - tail <= self.size:
            return head + pad  # the pad is published with the frame
        self.pos = head + pad
        self.ctl[self.head_w] = self.pos
        return _PADDED

    def out(self, start: int, nbytes: int) -> memoryview:
        at = start % self.size + _REC
        return self.data[at:at + nbytes]

    def commit(self, start: int, nbytes: int) -> None:
        """Publish the record at ``start``: header first, then the head (the one ordering point)."""
        at = start % self.size
        self.hdr[at // 8:at // 8 + 3] = (_REC + nbytes, _FRAME, nbytes)
        self.pos = start + _REC + nbytes
        self.ctl[self.head_w] = self.pos

    # --- consumer -----------------------------------------------------------------------------

    def ready(self) -> bool:
        return int(self.ctl[self.head_w]) != self.pos

    def next(self) -> tuple[int, int, int] | None:
        """(kind, start, frame bytes) of the next published record, advancing the scan; None if none."""
        head, scan = int(self.ctl[self.head_w]), self.pos
        if head == scan:
            return None
        if not scan < head <= scan + self.size or head % _REC:
            raise _Corrupt(f"head {head} with scan position {scan}")
        at = scan % self.size
        length, kind, nbytes = self.hdr[at // 8:at // 8 + 3].tolist()
        if length < _REC or length % _REC or at + length > self.size or scan + length > head:
            raise _Corrupt(f"record at {scan} claims {length} bytes")
        if kind == _PAD:
            if at + length != self.size:
                raise _Corrupt(f"padding record at {scan} does not reach the ring's end")
        elif kind != _FRAME or nbytes > length - _REC:
            raise _Corrupt(f"record at {scan}: kind {kind}, {nbytes} frame bytes in {length}")
        self.pos = scan + length
        return kind, scan, nbytes


_DEAD = np.zeros(_PAGE // 8, np.uint64)  # what a closed side's control words read as
_DEAD[_W_SERVER_STATE] = _DEAD[_W_CLIENT_STATE] = _CLOSED


class _Segment:
    """One mapped segment: its control words and both rings."""

    __slots__ = ("ctl", "mm", "rep", "req")

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.ctl = ctl = np.frombuffer(mm, np.uint64, count=_PAGE // 8)
        req_bytes, rep_bytes = int(ctl[_W_REQ_BYTES]), int(ctl[_W_REP_BYTES])
        self.req = _Ring(mm, ctl, _PAGE, req_bytes, _W_REQ_HEAD, _W_REQ_TAIL)
        self.rep = _Ring(mm, ctl, _PAGE + req_bytes, rep_bytes, _W_REP_HEAD, _W_REP_TAIL)

    def unmap(self) -> None:
        """Drop our views; the mapping goes when the last frame viewing it does (never under a reader)."""
        self.ctl = _DEAD
        for ring in (self.req, self.rep):
            ring.ctl, ring.hdr, ring.size = _DEAD, _DEAD[:0], 0
            ring.data.release()
            ring.data = memoryview(b"")
        with contextlib.suppress(BufferError):
            self.mm.close()


def _create_segment(path: str, ring_bytes: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, _PAGE + 2 * ring_bytes)
        mm = mmap.mmap(fd, _PAGE + 2 * ring_bytes)
    finally:
        os.close(fd)
    ctl = np.frombuffer(mm, np.uint64, count=_PAGE // 8)
    ctl[[_W_MAGIC, _W_VERSION, _W_REQ_BYTES, _W_REP_BYTES, _W_CLIENT_PID, _W_CLIENT_STATE]] = (
        _MAGIC, _VERSION, ring_bytes, ring_bytes, os.getpid(), _ALIVE)
    del ctl
    return mm


def _open_segment(name: str) -> mmap.mmap | None:
    """Map a client's segment by name, or None when the name, file or layout is not one of ours."""
    if not _NAME.fullmatch(name):
        return None
    try:
        fd = os.open(os.path.join(SEGMENT_DIR, name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not 2 * MIN_RING_BYTES < st.st_size <= _PAGE + 2 * MAX_RING_BYTES:
            return None
        mm = mmap.mmap(fd, st.st_size)
    except OSError:
        return None
    finally:
        os.close(fd)
    ctl = np.frombuffer(mm, np.uint64, count=_PAGE // 8)
    words = ctl[:_W_CLIENT_STATE + 1].tolist()
    del ctl
    try:
        ok = (words[_W_MAGIC] == _MAGIC and words[_W_VERSION] == _VERSION
              and _check_ring_bytes(words[_W_REQ_BYTES]) + _check_ring_bytes(words[_W_REP_BYTES]) + _PAGE
              == st.st_size and not any(words[w] for w in (_W_REQ_HEAD, _W_REP_HEAD, _W_REP_TAIL)))
    except ValueError:
        ok = False
    if not ok:
        mm.close()
        return None
    return mm


class _Peer(_Segment):
    """The server's state for one client: its segment, socket, and requests not yet answered."""

    def __init__(self, ident: int, sock: socket.socket, mm: mmap.mmap) -> None:
        super().__init__(mm)
        self.ident, self.sock, self.fd = ident, sock, sock.fileno()
        self.open: deque[int] = deque()  # starts of request records the tail has not passed, in order
        self.ends: dict[int, int] = {}  # start -> end of each such record
        self.done: set[int] = set()  # starts among them already answered
        self.pending: deque[tuple[int, Frame]] = deque()  # (request start, reply) awaiting ring room
        self.full_sent = False  # an F is out and no R came back yet
        self.published = 0

    def track(self, start: int, end: int) -> None:
        self.open.append(start)
        self.ends[start] = end

    def finish(self, start: int) -> None:
        """The request at ``start`` needs its bytes no more; move the tail over finished records."""
        if start not in self.ends or start in self.done:
            return
        self.done.add(start)
        tail = -1
        while self.open and self.open[0] in self.done:
            first = self.open.popleft()
            self.done.discard(first)
            tail = self.ends.pop(first)
        if tail >= 0:
            self.ctl[_W_REQ_TAIL] = tail


def _sweep_sockets(directory: str) -> None:
    """Unlink the listening sockets of endpoints whose process is gone (a killed server
    cannot unlink its own); a new endpoint does this before it binds its own."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = _SOCK_NAME.fullmatch(name)
        if m is None:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
        except (PermissionError, OverflowError):
            pass


class ShmEndpoint(Endpoint):
    """Server side: a Unix socket where clients hand over their segments, and one ring pair per client.

    Args:
        directory: where the listening socket lives (a unique name, removed on ``close``).
        max_frame_bytes: largest request accepted (bigger ones come out of ``handle`` as
            ``FrameError`` with ``Status.TOO_LARGE``).
        ring_bytes: ring size advertised in ``offer`` (each client chooses its own).

    Raises:
        ValueError: ``ring_bytes`` is not a page multiple in range, or the socket path is too long.
        RuntimeError: this machine is not x86-64 (see the module docstring).
        OSError: the socket cannot be created.

    Thread safety: the server's master thread only.

    Example::

        ep = ShmEndpoint()
        hello_fields["shm"] = ep.offer()
        for token, req in ep.handle(fd):  # fd one of ep.pollables() that polled readable
            ep.reply(token, frames.reply_to(req) if isinstance(req, Frame) else
                     frames.error_reply(None, req.status, str(req)))
    """

    name = "shm"

    def __init__(self, directory: str = SEGMENT_DIR, *, max_frame_bytes: int = frames.DEFAULT_MAX_FRAME_BYTES,
                 ring_bytes: int = DEFAULT_RING_BYTES) -> None:
        if not _SUPPORTED:
            raise RuntimeError(f"the shm transport needs x86-64 ordering, this is {platform.machine()}")
        self._ring_bytes = _check_ring_bytes(ring_bytes)
        self._max_frame = max_frame_bytes
        _sweep_sockets(directory)
        self._path = os.path.join(directory, f"streamrec-{os.getpid()}-{secrets.token_hex(6)}.sock")
        if len(self._path.encode()) > 107:
            raise ValueError(f"socket path {self._path!r} is over 107 bytes: use a shorter directory")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self._path)
            self._listener.listen(128)
        except OSError:
            self._listener.close()
            raise
        self._listener.setblocking(False)
        self._greeting: dict[int, tuple[socket.socket, bytearray]] = {}  # fd -> socket, name so far
        self._peers: dict[int, _Peer] = {}  # by socket fd
        self._by_id: dict[int, _Peer] = {}  # by ident (tokens outlive fds, which get reused)
        self._next_id = 0
        self._closed = False

    # --- Endpoint -----------------------------------------------------------------------------

    def offer(self) -> dict[str, Any]:
        return {"path": self._path, "host": host_id(), "ring_bytes": self._ring_bytes}

    def pollables(self) -> list[Any]:
        if self._closed:
            return []
        return [self._listener.fileno(), *self._greeting, *self._peers]

    def handle(self, pollable: Any) -> list[tuple[Token, Frame | FrameError]]:
        if self._closed:
            return []
        fd = pollable if isinstance(pollable, int) else pollable.fileno()
        if fd == self._listener.fileno():
            self._accept()
            return []
        if fd in self._greeting:
            self._greet(fd)
            return []
        peer = self._peers.get(fd)
        if peer is None:
            return []
        eof = room = False
        while True:
            try:
                data = peer.sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                eof = True
                break
            room = room or _ROOM in data
        if eof:
            self._drop(peer)
            return []
        if room:
            peer.full_sent = False
        try:
            self._flush(peer)
            return self._requests(peer) if peer.ident in self._by_id else []
        except _Corrupt:
            self._drop(peer)
            return []

    def reply(self, token: Token, frame: Frame) -> None:
        ident, start = token
        peer = self._by_id.get(ident)
        if peer is None:
            return
        peer.pending.append((start, frame))
        try:
            self._flush(peer)
        except _Corrupt:
            self._drop(peer)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for peer in list(self._peers.values()):
            self._drop(peer)
        for sock, _ in self._greeting.values():
            sock.close()
        self._greeting.clear()
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)

    # --- internals ----------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of fds, or the client already gave up: keep serving the others
                return
            sock.setblocking(False)
            self._greeting[sock.fileno()] = (sock, bytearray())

    def _greet(self, fd: int) -> None:
        sock, buf = self._greeting[fd]
        try:
            data = sock.recv(256, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buf += data
        if data and b"\n" not in buf and len(buf) < 256:
            return
        del self._greeting[fd]
        name = bytes(buf).partition(b"\n")[0].decode("ascii", errors="replace")
        mm = _open_segment(name) if data and b"\n" in buf else None
        if mm is None:
            sock.close()
            return
        peer = _Peer(self._next_id, sock, mm)
        peer.ctl[[_W_SERVER_PID, _W_SERVER_STATE]] = (os.getpid(), _ALIVE)
        try:
            sock.send(_ACK, socket.MSG_NOSIGNAL)
        except OSError:
            self._drop(peer)
            return
        self._next_id += 1
        self._peers[fd] = self._by_id[peer.ident] = peer

    def _requests(self, peer: _Peer) -> list[tuple[Token, Frame | FrameError]]:
        out: list[tuple[Token, Frame | FrameError]] = []
        while (rec := peer.req.next()) is not None:
            kind, start, nbytes = rec
            peer.track(start, peer.req.pos)
            if kind == _PAD:
                peer.finish(start)
                continue
            try:
                frame: Frame | FrameError = frames.unpack(peer.req.out(start, nbytes), self._max_frame)
            except FrameError as exc:
                frame = exc
            out.append(((peer.ident, start), frame))
        return out

    def _flush(self, peer: _Peer) -> None:
        """Write waiting replies into the reply ring in order; on no room, ask the client for an R."""
        rep = peer.rep
        while peer.pending:
            start, frame = peer.pending[0]
            nbytes = frames.packed_size(frame)
            if nbytes + _REC > rep.size:
                frame = frames.error_reply(frame, frames.Status.TOO_LARGE,
                                           f"reply of {nbytes} bytes is over the {rep.size}-byte shm ring")
                peer.pending[0] = (start, frame)
                continue
            if peer.published - int(peer.ctl[_W_REP_TAKEN]) >= _MAX_UNREAD:
                rep.seen_tail, at = int(peer.ctl[_W_REP_TAIL]), _NO_ROOM
            else:
                at = rep.reserve(nbytes)
            if at == _PADDED:
                continue
            if at == _NO_ROOM:
                if not peer.full_sent:
                    peer.ctl[_W_BLOCKED_TAIL] = rep.seen_tail
                    peer.full_sent = True
                    self._ring(peer, _FULL)
                return
            peer.pending.popleft()
            try:
                frames.pack(frame, out=rep.out(at, nbytes))
            finally:
                peer.finish(start)  # a reply that cannot be packed is the caller's bug: free its request
            rep.commit(at, nbytes)
            peer.published += 1
            if not self._ring(peer, _DOORBELL):
                return

    def _ring(self, peer: _Peer, byte: bytes) -> bool:
        try:
            peer.sock.send(byte, _NOWAIT)
            return True
        except OSError:  # gone, or a socket full despite _MAX_UNREAD: either way the link is unusable
            self._drop(peer)
            return False

    def _drop(self, peer: _Peer) -> None:
        self._by_id.pop(peer.ident, None)
        if self._peers.get(peer.fd) is peer:
            del self._peers[peer.fd]
        peer.pending.clear()
        peer.ctl[_W_SERVER_STATE] = _CLOSED
        peer.sock.close()
        peer.unmap()


class ShmConnection(Connection):
    """Client side: one segment shared with one server on this host. Create with ``connect``.

    ``send`` writes the frame straight into the request ring; ``recv`` returns
    replies as read-only views into the reply ring, valid until the next
    ``recv`` (or ``close``).

    Thread safety: one thread at a time.

    Example::

        conn = ShmConnection.connect(hello["shm"])
        reply = conn.request(frame, timeout_s=0.05)
    """

    name = "shm"

    def __init__(self, peer: str, sock: socket.socket, mm: mmap.mmap, *, timeout_s: float,
                 max_frame_bytes: int, spin_s: float) -> None:
        self.peer = peer
        self._sock = sock
        self._seg = _Segment(mm)
        self._timeout_s, self._max_frame, self._spin_s = timeout_s, max_frame_bytes, spin_s
        self._held = -1  # end of the reply record handed out by the last recv
        self._taken = 0  # replies taken (mirrored to the control page for the server's _MAX_UNREAD)
        self._owed = 0  # D bytes still to read for replies taken (negative: read ahead)
        self._want_room = False  # the server waits for an R once our tail moves
        self._eof = False
        self._closed = False
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)

    @classmethod
    def connect(cls, offer_or_path: dict[str, Any] | str, *, timeout_s: float = 1.0,
                ring_bytes: int | None = None, max_frame_bytes: int = frames.DEFAULT_MAX_FRAME_BYTES,
                spin_s: float = DEFAULT_SPIN_S) -> ShmConnection:
        """Create a segment, hand it to the endpoint, and wait for its ack.

        Args:
            offer_or_path: an ``ShmEndpoint.offer()`` or its socket path.
            timeout_s: for the handshake, and how long ``send`` waits for ring room.
            ring_bytes: each ring's size; default the offer's, else ``DEFAULT_RING_BYTES``.
            max_frame_bytes: largest reply accepted.
            spin_s: how long ``recv`` watches the ring before sleeping on the socket.

        Raises:
            PeerUnavailable: another host's offer, no server at the path, the server
                refused the segment, no ack in time, or no shared memory here.
            ValueError: ``ring_bytes`` not a multiple of 4096 in range.
        """
        if isinstance(offer_or_path, dict):
            path = str(offer_or_path.get("path", ""))
            if offer_or_path.get("host") != host_id():
                raise PeerUnavailable("the offer is from another host", peer=path, transport=cls.name)
            ring_bytes = ring_bytes or offer_or_path.get("ring_bytes")
        else:
            path = str(offer_or_path)
        size = _check_ring_bytes(ring_bytes or DEFAULT_RING_BYTES)
        if not _SUPPORTED:
            raise PeerUnavailable(f"no shm transport on {platform.machine()}", peer=path, transport=cls.name)
        name = f"streamrec-shm-{os.getpid()}-{secrets.token_hex(8)}"
        seg = os.path.join(SEGMENT_DIR, name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mm = None
        try:
            mm = _create_segment(seg, size)
            sock.settimeout(timeout_s)
            sock.connect(path)
            sock.sendall(name.encode() + b"\n")
            if sock.recv(1) != _ACK:
                raise PeerUnavailable("the server refused the segment", peer=path, transport=cls.name)
            sock.setblocking(False)
            return cls(path, sock, mm, timeout_s=timeout_s, max_frame_bytes=max_frame_bytes, spin_s=spin_s)
        except BaseException as exc:
            sock.close()
            if mm is not None:
                mm.close()
            if isinstance(exc, OSError):
                raise PeerUnavailable(f"cannot connect: {exc}", peer=path, transport=cls.name) from exc
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(seg)  # mapped on both sides by now, or abandoned

    # --- Connection ---------------------------------------------------------------------------

    def send(self, frame: Frame) -> None:
        """Write ``frame`` into the request ring and ring the server.

        Waits up to the connect ``timeout_s`` for room when the ring is full.

        Raises:
            ValueError: the frame can never fit the ring (or is over ``max_frame_bytes``): use TCP.
            DeadlineExceeded: no room within ``timeout_s`` (the server is not answering).
            PeerUnavailable: the server is gone or the link is closed.
        """
        self._check_open()
        nbytes = frames.packed_size(frame)
        if nbytes + _REC > self._seg.req.size:
            raise ValueError(f"frame of {nbytes} bytes does not fit the {self._seg.req.size}-byte shm ring")
        deadline = time.monotonic() + self._timeout_s
        pause = 20e-6
        while True:
            try:
                at = self._seg.req.reserve(nbytes)
            except _Corrupt as exc:
                raise self._lost(f"request ring corrupt: {exc}") from exc
            if at >= 0:
                break
            if at == _PADDED:
                self._ring(_DOORBELL)
                continue
            if self._server_gone():
                raise self._lost("the server went away")
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"no room in the request ring for {self._timeout_s:.3f} s",
                                       deadline_s=self._timeout_s, peer=self.peer, transport=self.name)
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        frames.pack(frame, out=self._seg.req.out(at, nbytes))
        self._seg.req.commit(at, nbytes)
        self._ring(_DOORBELL)

    def recv(self, timeout_s: float) -> Frame | None:
        self._check_open()
        if self._held >= 0:
            self._set_tail(self._held)
            self._held = -1
        deadline = time.monotonic() + max(timeout_s, 0.0)
        spun = self._spin_s <= 0
        while True:
            frame = self._take()
            if frame is not None:
                return frame
            if self._read_one():
                continue  # a D just read means a reply just landed; an F was answered
            if self._eof or int(self._seg.ctl[_W_SERVER_STATE]) == _CLOSED:
                raise self._lost("the server went away")
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not spun:
                spun = True
                until = time.monotonic() + min(self._spin_s, left)
                while not self._seg.rep.ready() and time.monotonic() < until:
                    pass
                continue
            self._poll.poll(math.ceil(left * 1000))

    @property
    def pollable(self) -> Any:
        return self._sock.fileno()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._seg.ctl[_W_CLIENT_STATE] = _CLOSED
        self._sock.close()
        self._seg.unmap()

    # --- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PeerUnavailable("the connection is closed", peer=self.peer, transport=self.name)

    def _lost(self, why: str) -> PeerUnavailable:
        self.close()
        return PeerUnavailable(why, peer=self.peer, transport=self.name)

    def _server_gone(self) -> bool:
        if int(self._seg.ctl[_W_SERVER_STATE]) == _CLOSED:
            return True
        events = self._poll.poll(0)
        return bool(events and events[0][1] & (select.POLLHUP | select.POLLERR))

    def _take(self) -> Frame | None:
        """The next reply in the ring (held until the next recv), skipping pads; None if none yet."""
        rep = self._seg.rep
        while True:
            try:
                rec = rep.next()
            except _Corrupt as exc:
                raise self._lost(f"reply ring corrupt: {exc}") from exc
            if rec is None:
                return None
            kind, start, nbytes = rec
            if kind == _PAD:
                self._set_tail(rep.pos)
                continue
            self._held = rep.pos
            self._taken += 1
            self._seg.ctl[_W_REP_TAKEN] = self._taken
            self._owed += 1
            self._drain_owed()
            frame = frames.unpack(rep.out(start, nbytes), self._max_frame)  # FrameError: record still held
            frame.borrowed = True  # views of the ring, reused after the next recv
            return frame

    def _set_tail(self, tail: int) -> None:
        self._seg.ctl[_W_REP_TAIL] = tail
        if self._want_room:
            self._want_room = False
            self._ring(_ROOM, must=True)

    def _on_full(self) -> None:
        if int(self._seg.ctl[_W_REP_TAIL]) > int(self._seg.ctl[_W_BLOCKED_TAIL]):
            self._ring(_ROOM, must=True)
        else:
            self._want_room = True

    def _drain_owed(self) -> None:
        """Read the D bytes of replies already taken (and any F among them), never one more."""
        while self._owed > 0 and not self._eof:
            try:
                data = self._sock.recv(self._owed, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._eof = True
                return
            full = data.count(_FULL)
            self._owed -= len(data) - full
            if full:
                self._on_full()

    def _read_one(self) -> bool:
        """With the ring seen empty: read one byte (a D of a reply just published, or an F)."""
        if self._eof:
            return False
        try:
            data = self._sock.recv(1, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._eof = True
            return False
        if data == _FULL:
            self._on_full()
        else:
            self._owed -= 1
        return True

    def _ring(self, byte: bytes, must: bool = False) -> None:
        """Send a wake-up byte. A D may be dropped when the socket is full (the server has bytes
        to read, so it wakes anyway); an R may not (the server waits for exactly that)."""
        try:
            self._sock.send(byte, _NOWAIT)
        except BlockingIOError:
            if must:
                try:
                    self._sock.settimeout(self._timeout_s)
                    self._sock.send(byte, socket.MSG_NOSIGNAL)
                    self._sock.setblocking(False)
                except OSError as exc:
                    raise self._lost(f"cannot wake the server: {exc}") from exc
        except OSError as exc:
            raise self._lost(f"the server went away: {exc}") from exc
