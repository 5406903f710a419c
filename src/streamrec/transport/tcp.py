"""TCP transport on pyzmq: DEALER clients, a ROUTER endpoint, packed frames.

Owns: ``TcpConnection`` and ``TcpEndpoint``, the transport every peer can use
and the one every channel falls back to. It must not interpret frames beyond
decoding them.

Why pyzmq: measured on these machines it moves 1 MiB replies at about 2.9k
round trips/s over loopback, as fast as hand-written length-prefixed sockets
(about 2.5k/s) and 3.5x grpcio, and it gives message framing, reconnection and
many requests in flight on one socket for free.

Framing: a frame travels as one message part in ``frames.pack``'s layout when
it is small (up to ``_PACK_BYTES``) or was written in place (a lookup reply:
the table's kernel writes the rows into the block that goes to the socket); a
large frame built from separate arrays (a bulk write) travels as a multipart
message, the header block then one part per buffer. Receivers take either: one
part is a packed frame, several are header and buffers. One part rather than
three or four matters: pyzmq spends about 3 µs of Python per part on each
side, and at saturation on two cores every such microsecond is taken from the
lookups. Messages up to ``_COPY_BYTES`` are copied into zmq, larger ones lent
without a copy (see there for why).

Failure detection: a zmq socket reconnects silently, so a dead peer shows as
silence. The connection therefore watches its socket's monitor for
``DISCONNECTED`` and raises ``PeerUnavailable`` for calls in flight within
``_WATCH_MS`` instead of waiting out their deadline, and for
``CONNECT_RETRIED`` (the connect was refused), so a send to a node that is down
fails at once instead of waiting out ``connect_timeout_s``; ``IMMEDIATE`` keeps
zmq from queueing requests for a peer that is not connected (they would
otherwise reach a restarted server long after the caller gave up).

Waiting: ``recv`` blocks in the socket's own receive (``RCVTIMEO``) in slices
of ``_WATCH_MS``, reading the monitor between slices, rather than polling the
socket and the monitor together: a poll then a receive wakes more threads per
reply, and at saturation on two cores every wake-up is taken from the
lookups. Outside waits the monitor is read at most every ``_WATCH_MS``: one
getsockopt on it costs as much as the rest of a send.

Size caps: both ends set ``MAXMSGSIZE`` (the cap plus a packed frame's
padding) so libzmq drops a peer that sends a part over it before buffering it,
and every frame is validated with ``frames.decode_message`` against the cap.

Thread safety: zmq sockets are single-threaded: a connection belongs to its
caller's thread, an endpoint to the server's master thread.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, ClassVar

import zmq
from zmq.utils.monitor import parse_monitor_message

from streamrec.errors import FrameError, PeerUnavailable
from streamrec.transport.base import Connection, Endpoint, Token
from streamrec.transport.frames import (
    ALIGN,
    DEFAULT_MAX_FRAME_BYTES,
    MAX_BUFFERS,
    Frame,
    decode_message,
    encode,
    pack,
)

__all__ = ["TcpConnection", "TcpEndpoint", "context"]

_HWM = 10_000  # messages queued per peer before sends block: far above any fan-out we issue
# A packed frame pads each buffer to ALIGN: its one part may exceed the frame cap by this much.
_PACK_SLACK = ALIGN * (MAX_BUFFERS + 1)
# Messages up to this are copied into zmq rather than lent: a lent buffer is released by
# pyzmq's garbage-collector thread, one more thread wake-up and GIL hand-off per message,
# which at saturation cost more than copying a 1 MiB reply (+9-11 % keys/s, two A/B runs
# of ten rounds). The copy grows with size and the hand-off does not, so bulk frames are lent.
_COPY_BYTES = 4 << 20
_PACK_BYTES = 256 << 10  # frames up to this go as one packed part: copying them is cheaper than parts
# Kernel socket buffers: room for a few 1 MiB replies, so one goes out in one write instead of
# stalling on the window; +9 % keys/s at saturation over autotuned buffers (A/B on the load driver).
# The kernel caps them at net.core.{w,r}mem_max.
_SOCKET_BUFFER = 4 << 20
_WATCH_MS = 20  # longest blocking receive between two reads of the monitor (disconnect detection)


def context() -> zmq.Context:
    """The process's zmq context (one I/O thread serves every socket)."""
    return zmq.Context.instance()


class TcpConnection(Connection):
    """A DEALER socket to one server; many requests may be in flight.

    Args:
        address: ``host:port`` of the server's TCP endpoint.
        max_frame_bytes: replies over this are refused.
        connect_timeout_s: how long the first call waits for the connection.

    Raises:
        ValueError: a malformed address.
    """

    name: ClassVar[str] = "tcp"

    def __init__(self, address: str, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 connect_timeout_s: float = 1.0) -> None:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"address: expected 'host:port', got {address!r}")
        self.peer = address
        self._max = max_frame_bytes
        self._connect_timeout = connect_timeout_s
        sock = context().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, _HWM)
        sock.setsockopt(zmq.RCVHWM, _HWM)
        sock.setsockopt(zmq.SNDBUF, _SOCKET_BUFFER)
        sock.setsockopt(zmq.RCVBUF, _SOCKET_BUFFER)
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes + _PACK_SLACK)
        # HANDSHAKE_SUCCEEDED, not CONNECTED: with IMMEDIATE, zmq routes to a peer only after the handshake.
        # CONNECT_RETRIED: the connect was refused (nobody listens), so the first send fails at once
        # instead of waiting out connect_timeout_s, which stalled every call probing a dead node.
        self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                                                | zmq.EVENT_CONNECT_RETRIED)
        sock.connect(f"tcp://{host}:{port}")
        self._sock: zmq.Socket | None = sock
        self._rcvtimeo = -1  # the socket's RCVTIMEO, cached: set only when a wait needs another
        self._watch_at = 0.0  # when _check next reads the monitor
        self._connected = False
        self._lost = False
        self._refused = False
        self._parts: list[Any] = []

    @property
    def pollable(self) -> Any:
        if self._sock is None:
            raise PeerUnavailable("connection closed", peer=self.peer, transport=self.name)
        return self._sock

    def _events(self) -> None:
        """Apply pending monitor events: a disconnect marks the link lost."""
        while self._monitor.get(zmq.EVENTS) & zmq.POLLIN:
            try:
                msg = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(msg)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected = True
            elif event == zmq.EVENT_DISCONNECTED and self._connected:
                self._lost = True
            elif event == zmq.EVENT_CONNECT_RETRIED and not self._connected:
                self._refused = True

    def _check(self) -> zmq.Socket:
        sock = self._sock
        if sock is None:
            raise PeerUnavailable("connection closed", peer=self.peer, transport=self.name)
        now = time.monotonic()
        if now >= self._watch_at:  # one getsockopt on the monitor costs as much as the rest of a send
            self._watch_at = now + _WATCH_MS / 1000
            self._events()
        if self._lost:
            raise PeerUnavailable("peer disconnected", peer=self.peer, transport=self.name)
        return sock

    def send(self, frame: Frame) -> None:
        sock = self._check()
        if not self._connected:
            self._events()
            if not self._connected and not self._refused:  # refused: do not wait for zmq's next retry
                self._monitor.poll(int(self._connect_timeout * 1000))  # wakes on the first event
                self._events()
            if not self._connected:
                why = " (connection refused)" if self._refused else ""
                raise PeerUnavailable(f"not connected within {self._connect_timeout} s{why}", peer=self.peer,
                                      transport=self.name)
        parts, size = _parts(frame)
        if size > self._max:
            raise ValueError(f"frame of {size} bytes is over this connection's {self._max}-byte cap")
        try:
            if len(parts) == 1:
                sock.send(parts[0], zmq.NOBLOCK, copy=size <= _COPY_BYTES)
            else:
                sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=size <= _COPY_BYTES)
        except zmq.Again:
            raise PeerUnavailable("send queue full or peer not connected", peer=self.peer,
                                  transport=self.name) from None

    def recv(self, timeout_s: float) -> Frame | None:
        sock = self._check()
        if timeout_s > 0:
            first = self._wait(sock, timeout_s)
            if first is None:
                return None
        elif int(sock.get(zmq.EVENTS)) & zmq.POLLIN:
            first = sock.recv(zmq.NOBLOCK, copy=False)
        else:
            return None
        parts = _rest(sock, first)
        self._parts = parts
        try:
            return decode_message(parts, self._max)
        except FrameError as exc:
            exc.peer, exc.transport = self.peer, self.name
            raise

    def _wait(self, sock: zmq.Socket, timeout_s: float) -> Any:
        """The next message's first part, blocking at most ``timeout_s`` (None: nothing came).

        Raises PeerUnavailable once the monitor reports a disconnect (read between slices).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ms = min(_WATCH_MS, max(1, math.ceil(left * 1000)))
            if ms != self._rcvtimeo:
                sock.setsockopt(zmq.RCVTIMEO, ms)
                self._rcvtimeo = ms
            try:
                return sock.recv(copy=False)
            except zmq.Again:
                self._events()
                if self._lost:
                    raise PeerUnavailable("peer disconnected", peer=self.peer, transport=self.name) from None

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._sock.disable_monitor()
            self._monitor.close(0)
            self._sock.close(0)
            self._sock = None


class TcpEndpoint(Endpoint):
    """A ROUTER socket bound to ``host:port`` (port 0: any free port).

    Args:
        host: interface to bind; 127.0.0.1 unless the caller means otherwise.
        port: TCP port, 0 to pick a free one (see ``port``).
        max_frame_bytes: requests over this are dropped by libzmq or refused.
    """

    name: ClassVar[str] = "tcp"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"port: expected 0..65535, got {port!r}")
        self._max = max_frame_bytes
        sock = context().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, _HWM)
        sock.setsockopt(zmq.RCVHWM, _HWM)
        sock.setsockopt(zmq.SNDBUF, _SOCKET_BUFFER)
        sock.setsockopt(zmq.RCVBUF, _SOCKET_BUFFER)
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes + _PACK_SLACK)
        try:
            if port:
                sock.bind(f"tcp://{host}:{port}")
            else:
                port = sock.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as exc:
            sock.close(0)
            raise OSError(f"cannot bind tcp://{host}:{port}: {exc}") from exc
        self.host, self.port = host, port
        self._sock: zmq.Socket | None = sock

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def pollables(self) -> list[Any]:
        return [self._sock] if self._sock is not None else []

    def handle(self, pollable: Any) -> list[tuple[Token, Frame | FrameError]]:
        sock = self._sock
        out: list[tuple[Token, Frame | FrameError]] = []
        if sock is None:
            return out
        # Bounded, so one busy peer cannot starve the other endpoints. One getsockopt per
        # message instead of a receive that ends each wake-up by raising Again.
        while len(out) < 256 and int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            ident = sock.recv(zmq.NOBLOCK)  # the ROUTER's peer id, a few bytes: copied
            parts = _rest(sock, sock.recv(zmq.NOBLOCK, copy=False))
            try:
                out.append((ident, decode_message(parts, self._max)))
            except FrameError as exc:
                out.append((ident, exc))
        return out

    def reply(self, token: Token, frame: Frame) -> None:
        if self._sock is None:
            return
        parts, size = _parts(frame)
        copy = size <= _COPY_BYTES
        with contextlib.suppress(zmq.ZMQError):  # a peer gone since: ROUTER drops it, or the queue is full
            self._sock.send_multipart([token, *parts], flags=zmq.NOBLOCK, copy=copy)

    def offer(self) -> dict[str, Any]:
        return {"address": self.address}

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None


def _parts(frame: Frame) -> tuple[list[Any], int]:
    """The message parts of ``frame`` (one packed part, or the header block and a part per
    buffer) and their total bytes."""
    if frame.block is not None or sum(b.nbytes for b in frame.buffers) <= _PACK_BYTES:
        block = pack(frame)
        return [block], len(block)
    parts = encode(frame)
    return parts, sum(len(p) for p in parts)


def _rest(sock: zmq.Socket, first: Any) -> list[Any]:
    """A message's parts from its first one: the rest is already here once the first is."""
    parts = [first]
    while parts[-1].more:
        parts.append(sock.recv(zmq.NOBLOCK, copy=False))
    return parts
