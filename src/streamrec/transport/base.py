"""The transport interface: a client ``Connection`` and a server ``Endpoint``.

Owns: the two small abstract classes every transport implements, and the one
request/reply loop built on them. It must not know frames' meanings (that is
``ps``) or how to choose between transports (that is ``ps.channel``).

A ``Connection`` is one link from a client to one peer over one transport. It
sends request frames and receives reply frames, in any order: several requests
may be in flight and replies are matched by request id. ``pollable`` is what a
``zmq.Poller`` can wait on (a zmq socket or a file descriptor), so one thread
can wait on many connections at once: that is how a client sends every shard's
request before waiting for any.

An ``Endpoint`` is the server side of one transport. The server's master
thread polls every endpoint's ``pollables()``, drains what arrived with
``handle()``, hands requests to workers, and sends their replies with
``reply()``. Malformed input comes out of ``handle()`` as a ``FrameError`` in
place of a frame, so the master answers it with an error frame; an endpoint
never raises for what a peer sent.

Thread safety: a Connection or Endpoint is used by one thread at a time (the
client's calling thread; the server's master thread). Neither is shared.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from streamrec.errors import DeadlineExceeded, FrameError
from streamrec.transport.frames import Frame

__all__ = ["Connection", "Endpoint", "Token"]

Token = Any  # where a reply goes: opaque to everyone but the endpoint that made it


class Connection(ABC):
    """Client side of one transport to one peer.

    Attributes:
        name: the transport (``"tcp"``, ``"shm"``, ``"rdma"``).
        peer: the peer's address, for messages.
    """

    name: ClassVar[str]
    peer: str

    @abstractmethod
    def send(self, frame: Frame) -> None:
        """Queue ``frame`` to the peer.

        Raises:
            PeerUnavailable: the link is down.
            ValueError: the frame is over this connection's size cap.
        """

    @abstractmethod
    def recv(self, timeout_s: float) -> Frame | None:
        """The next reply to arrive, waiting at most ``timeout_s`` (0: do not wait).

        The reply's buffers stay valid until the next ``recv`` on this connection.

        Returns None when nothing arrived in time.

        Raises:
            PeerUnavailable: the link died (peer gone, segment removed).
            FrameError: the peer sent bytes that are not a frame.
        """

    @property
    @abstractmethod
    def pollable(self) -> Any:
        """A zmq socket or file descriptor that polls readable when ``recv(0)`` may return a reply."""

    @abstractmethod
    def close(self) -> None:
        """Release the link; idempotent."""

    def request(self, frame: Frame, timeout_s: float) -> Frame:
        """Send ``frame`` and wait for its reply (replies to other ids are dropped).

        Raises:
            DeadlineExceeded: no reply within ``timeout_s``.
            PeerUnavailable, FrameError: as ``send`` and ``recv``.
        """
        deadline = time.monotonic() + timeout_s
        self.send(frame)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"no reply to request {frame.request_id} in {timeout_s:.3f} s",
                                       deadline_s=timeout_s, peer=self.peer, transport=self.name)
            reply = self.recv(left)
            if reply is not None and reply.request_id == frame.request_id:
                return reply

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Endpoint(ABC):
    """Server side of one transport.

    Attributes:
        name: the transport (``"tcp"``, ``"shm"``, ``"rdma"``).
    """

    name: ClassVar[str]

    @abstractmethod
    def pollables(self) -> list[Any]:
        """What the master polls for this endpoint (it may change after ``handle``)."""

    @abstractmethod
    def handle(self, pollable: Any) -> list[tuple[Token, Frame | FrameError]]:
        """Drain what arrived on ``pollable`` (one of ``pollables()``), without blocking.

        Returns (token, request) pairs; a request that could not be decoded is a
        ``FrameError`` (carrying the status to answer with) in place of a frame.
        Connections that closed are dropped quietly.
        """

    @abstractmethod
    def reply(self, token: Token, frame: Frame) -> None:
        """Send ``frame`` to where ``token`` came from; a peer gone since is ignored."""

    @abstractmethod
    def offer(self) -> dict[str, Any]:
        """What a client needs to connect to this endpoint (JSON-able), advertised by HELLO."""

    @abstractmethod
    def close(self) -> None:
        """Stop accepting and release everything; idempotent."""
