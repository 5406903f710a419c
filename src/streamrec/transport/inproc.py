"""In-process transport: a connection whose peer is a handler function.

Owns: ``InProcConnection``, used by the embedded default (a client hosting its
shards in its own process, no servers) and by tests that want the client's
routing and fan-out without sockets. It must not copy payloads: the handler
sees the caller's arrays and returns its own.

Thread safety: one thread per connection, like every ``Connection``.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Callable
from typing import Any, ClassVar

from streamrec.errors import PeerUnavailable
from streamrec.transport.base import Connection
from streamrec.transport.frames import Frame

__all__ = ["InProcConnection"]


class InProcConnection(Connection):
    """Runs ``handler(request) -> reply`` at ``send``; ``recv`` returns the replies in order.

    ``pollable`` is an eventfd that is readable while replies wait, so an
    in-process peer sits in the same poll loop as remote ones.
    """

    name: ClassVar[str] = "inproc"

    def __init__(self, handler: Callable[[Frame], Frame], peer: str = "local") -> None:
        self.peer = peer
        self._handler: Callable[[Frame], Frame] | None = handler
        self._replies: collections.deque[Frame] = collections.deque()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @property
    def pollable(self) -> Any:
        return self._efd

    def send(self, frame: Frame) -> None:
        if self._handler is None:
            raise PeerUnavailable("connection closed", peer=self.peer, transport=self.name)
        self._replies.append(self._handler(frame))
        os.eventfd_write(self._efd, 1)

    def recv(self, timeout_s: float) -> Frame | None:
        if self._handler is None:
            raise PeerUnavailable("connection closed", peer=self.peer, transport=self.name)
        if not self._replies:
            return None  # send is synchronous: nothing can arrive later
        reply = self._replies.popleft()
        if not self._replies:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._efd)
        return reply

    def close(self) -> None:
        if self._handler is not None:
            self._handler = None
            os.close(self._efd)
