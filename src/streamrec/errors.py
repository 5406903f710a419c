"""Every exception streamrec raises on purpose, in one tree.

Owns: the exception hierarchy and the data each exception carries. It must not
import anything else of ours (every package may import it).

The tree::

    StreamrecError                  base of everything below
    ├── ConfigError(ValueError)     a config value or file is wrong; names the field
    └── StoreError                  a table or store cannot do what was asked
        ├── TableFull               no row or index room left; carries the counts
        ├── TableBusy               a bucket stayed locked past the reader's patience
    │   └── SnapshotError           a table's files cannot be written or trusted
    │       └── CorruptFile         a file is torn, truncated or fails its checksum;
    │                               names the file and the problem
    └── TransportError              moving a frame to or from a peer failed
        ├── FrameError              a frame is malformed, truncated or oversized;
        │                           carries the status code to answer with
        ├── PeerUnavailable         the peer cannot be reached on this transport
        │                           (connect refused, connection lost, segment gone)
        ├── DeadlineExceeded        no reply within the call's deadline
        └── RemoteError             the peer answered with an error frame; carries
                                    its status code and message

Input checks at public entry points raise the builtin ``TypeError`` or
``ValueError`` (what callers expect from a numpy-style API); the message says
what was expected and what came. The classes here are for conditions of the
system, not of the argument.

Thread safety: exceptions are plain values; nothing here holds state.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CorruptFile",
    "DeadlineExceeded",
    "FrameError",
    "PeerUnavailable",
    "RemoteError",
    "SnapshotError",
    "StoreError",
    "StreamrecError",
    "TableBusy",
    "TableFull",
    "TransportError",
]


class StreamrecError(Exception):
    """Base class of every error streamrec raises on purpose."""


class ConfigError(StreamrecError, ValueError):
    """A configuration value or file is invalid.

    Attributes:
        field: dotted name of the offending field (``"table.dim"``), or ``""``.
    """

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class StoreError(StreamrecError):
    """A store operation could not be carried out."""


class TableFull(StoreError):
    """The table has no room for more rows.

    Raised when the row arena reached its reservation (``max_rows``) or the index
    cannot grow further. Rows already written by the failing batch stay written;
    the batch stopped at ``position``.

    Attributes:
        rows: live rows when the error was raised.
        max_rows: the arena's reservation.
        load_factor: index load factor at the time.
        position: index in the caller's batch of the first key not stored.
    """

    def __init__(self, *, rows: int, max_rows: int, load_factor: float, position: int) -> None:
        super().__init__(
            f"table full: {rows} rows of max_rows={max_rows} (index load {load_factor:.3f}); "
            f"batch stopped at position {position}; raise max_rows or add an eviction policy"
        )
        self.rows = rows
        self.max_rows = max_rows
        self.load_factor = load_factor
        self.position = position


class TableBusy(StoreError):
    """A reader found a bucket locked for longer than it is willing to wait.

    Within one process this cannot happen while the writer is alive; for a reader
    of another process's table it means the writer died mid-update.

    Attributes:
        waited_s: how long the reader retried.
    """

    def __init__(self, *, waited_s: float) -> None:
        super().__init__(
            f"a bucket stayed locked for {waited_s:.3f} s: the table's writer is stuck or died "
            "mid-update"
        )
        self.waited_s = waited_s


class SnapshotError(StoreError):
    """A table's files or snapshot cannot be written, found or trusted.

    Attributes:
        path: the file or directory concerned.
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class CorruptFile(SnapshotError):
    """A file is torn, truncated, of an unknown format, or fails a checksum.

    Nothing of it was loaded: callers refuse the whole snapshot.

    Attributes:
        path: the file.
        problem: what is wrong, in words ("chunk 3 checksum mismatch", ...).
    """

    def __init__(self, *, path: str, problem: str) -> None:
        super().__init__(f"corrupt file: {problem}", path=path)
        self.problem = problem


class TransportError(StreamrecError):
    """A frame could not be moved to or from a peer.

    Attributes:
        peer: the peer's address or name, or ``""``.
        transport: the transport's name (``"tcp"``, ``"shm"``, ...), or ``""``.
    """

    def __init__(self, message: str, *, peer: str = "", transport: str = "") -> None:
        where = "/".join(x for x in (transport, peer) if x)
        super().__init__(f"{where}: {message}" if where else message)
        self.peer = peer
        self.transport = transport


class FrameError(TransportError):
    """A frame is malformed, truncated, oversized or of an unknown kind.

    Attributes:
        status: the error status a server answers such a frame with
            (a ``streamrec.transport.Status`` value).
        request_id: the frame's request id when its header could be read, else 0.
    """

    def __init__(self, message: str, *, status: int, request_id: int = 0, peer: str = "",
                 transport: str = "") -> None:
        super().__init__(message, peer=peer, transport=transport)
        self.status = status
        self.request_id = request_id


class PeerUnavailable(TransportError):
    """The peer cannot be reached on this transport: connect refused, connection
    lost, shared-memory segment gone, peer process dead. A channel falls back to
    its next transport or replica on this error."""


class DeadlineExceeded(TransportError):
    """No reply arrived within the call's deadline.

    Attributes:
        deadline_s: the budget the call had.
    """

    def __init__(self, message: str, *, deadline_s: float, peer: str = "", transport: str = "") -> None:
        super().__init__(message, peer=peer, transport=transport)
        self.deadline_s = deadline_s


class RemoteError(TransportError):
    """The peer answered with an error frame.

    Attributes:
        status: the reply's status code (a ``streamrec.transport.Status`` value).
        remote_message: the peer's message, in words.
    """

    def __init__(self, message: str, *, status: int, peer: str = "", transport: str = "") -> None:
        super().__init__(message, peer=peer, transport=transport)
        self.status = status
        self.remote_message = message
