"""Every exception streamrec raises on purpose, in one tree.

Owns: the exception hierarchy and the data each exception carries. It must not
import anything else of ours (every package may import it).

The tree::

    StreamrecError                  base of everything below
    ├── ConfigError(ValueError)     a config value or file is wrong; names the field
    ├── CheckpointError             a model checkpoint cannot be published or trusted
    │                               (half-written, torn, checksum mismatch); names the
    │                               directory and the problem
    ├── FeatureError(ValueError)    a batch cannot be turned into features; names
    │   │                           the feature and the column
    │   ├── MissingColumns          input columns a feature needs are absent; lists them
    │   └── NonFiniteInput          NaN or infinity in a feature's input or output;
    │                               carries the row count and the first row
    ├── StoreError                  a table or store cannot do what was asked
    │   ├── TableFull               no row or index room left; carries the counts
    │   ├── TableBusy               a bucket stayed locked past the reader's patience
    │   ├── IndexGrowthRefused      an insert would grow the index below its load
    │   │                           floor or past its ceiling (hash flooding);
    │   │                           carries table, load factor, buckets
    │   ├── NonFiniteValues         a write carried NaN or infinity (or would store
    │   │                           one); carries the row count and the first key
    │   └── SnapshotError           a table's files cannot be written or trusted
    │       └── CorruptFile         a file is torn, truncated or fails its checksum;
    │                               names the file and the problem
    ├── ReplicationError            a replicated batch was not acknowledged; carries
    │   │                           the reason (resubmit with the same writer/seq)
    │   └── NotLeader               this replica does not lead its group; carries
    │                               the leader's address, or None during an election
    ├── ServingError                a ranking request cannot be answered; carries the
    │   │                           HTTP status to answer with
    │   ├── BadRequest              malformed, oversized or ill-typed input (4xx)
    │   ├── Overloaded              queue full or no model loaded (429/503); carries
    │   │                           retry_after_s
    │   └── DeadlineMissed          the request's deadline passed before it ran (504);
    │                               carries deadline_ms
    ├── TooStale                    a follower read would exceed its staleness bound
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
    "BadRequest",
    "CheckpointError",
    "ConfigError",
    "CorruptFile",
    "DeadlineExceeded",
    "DeadlineMissed",
    "FeatureError",
    "FrameError",
    "IndexGrowthRefused",
    "MissingColumns",
    "NonFiniteInput",
    "NonFiniteValues",
    "NotLeader",
    "Overloaded",
    "PeerUnavailable",
    "RemoteError",
    "ReplicationError",
    "ServingError",
    "SnapshotError",
    "StoreError",
    "StreamrecError",
    "TableBusy",
    "TableFull",
    "TooStale",
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


class CheckpointError(StreamrecError):
    """A model checkpoint (``model.checkpoint``) cannot be published, found or trusted.

    Loading refuses the whole version: nothing of it is returned.

    Attributes:
        path: the model directory or the version directory or file concerned.
        problem: what is wrong, in words ("dense.pt: crc32 mismatch", ...).
    """

    def __init__(self, *, path: str, problem: str) -> None:
        super().__init__(f"{path}: checkpoint refused: {problem}")
        self.path = path
        self.problem = problem


class FeatureError(StreamrecError, ValueError):
    """A batch (or a request) cannot be turned into features.

    Attributes:
        feature: the feature (or component) that refused it, or ``""``.
        column: the input column concerned, or ``""``.
    """

    def __init__(self, message: str, *, feature: str = "", column: str = "") -> None:
        where = ".".join(x for x in (feature, column) if x)
        super().__init__(f"{where}: {message}" if where else message)
        self.feature = feature
        self.column = column


class MissingColumns(FeatureError):
    """Input columns a feature needs are not in the batch.

    Attributes:
        columns: the missing column names, sorted.
    """

    def __init__(self, columns: list[str] | tuple[str, ...], *, feature: str = "") -> None:
        cols = sorted(columns)
        super().__init__(f"missing input column(s) {cols}", feature=feature)
        self.columns = cols


class NonFiniteInput(FeatureError):
    """NaN or infinity where a feature needs finite numbers (its input, or a function's output).

    Attributes:
        rows: how many rows were not finite.
        first_row: the index of the first of them in the batch.
    """

    def __init__(self, *, feature: str, column: str, rows: int, first_row: int) -> None:
        super().__init__(f"{rows} row(s) not finite (first at row {first_row})", feature=feature,
                         column=column)
        self.rows = rows
        self.first_row = first_row


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


class IndexGrowthRefused(StoreError):
    """A batch was refused because placing its keys would grow the index where it must not.

    Either an insert found no slot while the load factor was below the table's
    floor (``TableConfig.min_load_factor``: only keys crafted to collide do
    that, and doubling for them is what hash flooding wants), or the growth
    would pass the ceiling (``max_index_bytes``). The table checks a batch's
    new keys before it changes anything, so the refusal normally leaves the
    table as it was (``position`` 0); ``position`` > 0 says the first that many
    keys of the batch were written (a batch that grew the index twice on its
    way, or whose evictions or admission filter moved keys, see ``_place_or_refuse``).

    Attributes:
        table: the table's name (what its owner named it, else its live directory), or ``""``.
        load_factor: live keys over slots where the insert failed.
        buckets: the index's buckets (unchanged by the refusal).
        limit: ``"floor"`` or ``"ceiling"``.
        position: keys of the batch written before the refusal.
    """

    def __init__(self, *, table: str, load_factor: float, buckets: int, limit: str, floor: float = 0.0,
                 max_buckets: int = 0, position: int = 0) -> None:
        name = f"table {table!r}" if table else "table"
        if limit == "floor":
            why = (f"an insert found no slot at load factor {load_factor:.3g}, below the floor "
                   f"{floor:g} (min_load_factor): only crafted keys collide so (hash flooding)")
        else:
            why = (f"the index would grow past its ceiling of {max_buckets} buckets "
                   f"({max_buckets * 64} bytes, max_index_bytes) at load factor {load_factor:.3g}")
        done = (f"the first {position} keys of the batch were written" if position
                else "nothing of the batch was written")
        super().__init__(f"{name}: batch refused, {why}; the index stays at {buckets} buckets and {done}")
        self.table = table
        self.load_factor = load_factor
        self.buckets = buckets
        self.limit = limit
        self.position = position


class NonFiniteValues(StoreError):
    """A write was refused whole: some rows were NaN or infinite, or would be once stored.

    Raised by a table whose ``nonfinite`` policy is ``"raise"`` (the default):
    values (``assign``, ``insert_or_assign``, imports) that are not finite in the
    table's dtype (a float64 1e40 becomes inf in float32), or an optimizer step
    whose result is not (a NaN or inf gradient, or ``lr * g`` past the dtype's
    range). Nothing of the batch was written.

    Attributes:
        rows: how many rows of the batch were not finite.
        first_key: the key of the first of them, in batch order.
        what: ``"values"`` or ``"gradient steps"``.
    """

    def __init__(self, *, rows: int, first_key: int, what: str = "values") -> None:
        super().__init__(
            f"{what}: {rows} row(s) not finite in the table's dtype (first key {first_key}); "
            "nothing was written (nonfinite=\"skip\" drops such rows instead)"
        )
        self.rows = rows
        self.first_key = first_key
        self.what = what


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


class ReplicationError(StreamrecError):
    """A batch could not be acknowledged; ``reason`` is pysyncobj's FAIL_REASON name (or 'TIMEOUT').

    The batch may or may not have committed: resubmit it with the same (writer, seq).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotLeader(ReplicationError):
    """This replica is not the group's leader; ``leader`` is its address, or None during an election."""

    def __init__(self, leader: str | None) -> None:
        super().__init__(f"not the leader; the leader is {leader or 'unknown (election)'}",
                         reason="NOT_LEADER")
        self.leader = leader


class ServingError(StreamrecError):
    """A ranking request cannot be answered.

    Attributes:
        status: the HTTP status a server answers with.
        message: what went wrong, in words (the response body's ``error``).
    """

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BadRequest(ServingError):
    """The request is malformed, oversized or ill-typed (400, 413, 415); ``message`` says which input."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message, status=status)


class Overloaded(ServingError):
    """No room to take the request now: a full queue (429) or no model ready (503).

    Attributes:
        retry_after_s: the ``Retry-After`` a server answers with (whole seconds, >= 1).
    """

    def __init__(self, message: str, *, status: int = 429, retry_after_s: int = 1) -> None:
        super().__init__(message, status=status)
        self.retry_after_s = max(1, int(retry_after_s))


class DeadlineMissed(ServingError):
    """The request's deadline passed before it could run (504); ``deadline_ms`` was its budget."""

    def __init__(self, message: str, *, deadline_ms: float) -> None:
        super().__init__(message, status=504)
        self.deadline_ms = deadline_ms


class TooStale(StreamrecError):
    """A follower read would be staler than allowed; ``staleness_s`` is how stale this replica is."""

    def __init__(self, staleness_s: float, max_staleness_s: float) -> None:
        super().__init__(f"replica is {staleness_s:.3f} s stale, more than {max_staleness_s:.3f} s")
        self.staleness_s = staleness_s
        self.max_staleness_s = max_staleness_s


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
