"""A shard's replicated log of update batches (strong mode), on pysyncobj's Raft.

Owns: one writable replica's side of a shard's replica group: the log entry
format (one whole update batch per entry, checksummed), applying committed
entries to this replica's ``EmbeddingTable`` in log order, idempotence by
(writer id, sequence number), acknowledgement after commit, snapshots that
truncate the log, and the read rules. The consensus itself (elections, log
matching, commit by majority, snapshot transfer to lagging followers, the
mmapped journal) is pysyncobj 0.3.17's; this module writes none of it.

Entries. A batch record is one whole update batch: op, writer id, seq,
learning rate, the keys (B,) uint64 and values or gradients (B, D) as raw
bytes, and a CRC32 of the whole record. A log entry carries one or more
records: batches submitted while earlier entries are committing travel
together (group commit, bounded by ``group_bytes``), so pysyncobj's per-entry
cost is paid once per group. Every replica applies the same entries in the same order, so
tables stay identical; a replica whose copy of an entry fails its CRC stops
applying (``corrupt`` is set and ``on_corrupt`` called) rather than diverge; its
owner wipes it (:func:`wipe`) and restarts it, and it re-syncs from the
leader's snapshot and log.

Idempotence. The replicated state holds, per writer, the highest seq applied
(a bounded map: past ``max_writers`` the writer least recently seen, by log
order, is forgotten, identically on every replica). An entry whose seq is not
above its writer's mark is a duplicate: it is committed but not applied, and
its acknowledgement says so. Contract for writers: seqs increase, and after a
failure a writer resubmits its unacknowledged batches in seq order.

Acknowledgement. ``submit`` returns only once the entry is committed (on a
majority) and applied on this replica, which must be the leader; on a follower
it raises :class:`NotLeader` naming the leader, the redirect a client follows.

Reads. The leader serves linearizable reads by committing a no-op barrier and
reading after it applies (``read(..., linearizable=True)``); any replica
serves reads whose staleness is bounded by ``max_staleness_s``: it answers only
if it had applied everything the leader had committed at a moment at most that
long ago (checked on every Raft tick, against the commit index of the last
append-entries it received, dated no later than the tick before it was read:
so a follower resumed from a pause is stale until the leader's next message),
else raises :class:`TooStale`.

Snapshots. When the log passes ``snapshot_min_entries`` (or on
``force_snapshot``), pysyncobj calls our serializer: one file holding the
table's own checksummed snapshot (``EmbeddingTable.snapshot``) and a
checksummed record of the idempotence map and the applied log index, in a tar;
the log is then truncated behind it. A restarted replica loads it (each chunk's
checksum verified) and replays the journal from its index; a replica too far
behind is sent the file by the leader. Durability rests on the quorum: the
journal is mmapped and not fsynced per write.

Must not: implement consensus; import ``transport`` (pysyncobj brings its own
TCP between the group's members).

Thread safety: pysyncobj's tick thread applies entries and is the table's one
writer; ``submit`` and ``read`` may be called from any threads (``submit``
blocks its caller until the entry is acknowledged). Readers read the table
lock-free, as ``EmbeddingTable`` allows.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import pickle
import struct
import tarfile
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pysyncobj.tcp_connection as _pysyncobj_tcp
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj import pickle as _pysyncobj_pickle

from streamrec.errors import ConfigError, CorruptFile, NotLeader, ReplicationError, StoreError, TooStale
from streamrec.store import EmbeddingTable

__all__ = [
    "Ack",
    "BatchLog",
    "Op",
    "RaftLogConfig",
    "decode_entry",
    "encode_entry",
    "wipe",
]

# op u8, pad, dim u32, writer u64, seq u64, lr f64, n u64, crc u32 (of the header with crc 0 + payload)
_HEAD = struct.Struct("<B3xIQQdQI")
_STATE_FILE = "state.json"
_REGULAR = 0  # pysyncobj's _COMMAND_TYPE.REGULAR: an entry for a @replicated method
_TABLE_DIR = "table"


# pysyncobj 0.3.17 sends every message as zlib.compress(pickle.dumps(msg, protocol=2), 3):
# protocol 2 stores bytes as latin-1 text (about 1.5x for float data) and level-3 zlib of
# incompressible gradients cost about 14 ms per 64 KiB batch here, 7x the rest of the
# commit. Its TCP connection module gets stand-ins for those two modules: protocol 5 and
# zlib level 0 (stored blocks, still valid zlib), which any 0.3.17 peer reads. Wire
# format only; the consensus is untouched.
_pysyncobj_tcp.zlib = SimpleNamespace(compress=lambda data, level=-1: zlib.compress(data, 0),
                                      decompress=zlib.decompress)
_pysyncobj_tcp.pickle = SimpleNamespace(dumps=lambda obj, protocol=None: pickle.dumps(obj, protocol=5),
                                        loads=_pysyncobj_pickle.loads)


class Op(enum.IntEnum):
    """What an entry does to the table (``BARRIER``: nothing; it orders a linearizable read)."""

    BARRIER = 0
    INSERT_OR_ASSIGN = 1
    ASSIGN = 2
    APPLY_GRADIENTS = 3
    ERASE = 4
    FIND_OR_INSERT = 5  # insert absent keys with their initial values (a pure function of the key)


@dataclass(frozen=True)
class Ack:
    """The acknowledgement of one committed batch.

    Attributes:
        index: its log index.
        applied: False for a duplicate (its seq was not above the writer's mark)
            or a batch the table refused.
        refused: why the table refused it (the same on every replica, which all
            skip it alike), else None.
    """

    index: int
    applied: bool
    refused: str | None = None


@dataclass(frozen=True)
class RaftLogConfig:
    """Tunables of one replica group's log (every member must use the same values).

    Attributes:
        election_timeout_s: (min, max) of the randomised election timeout;
            default (0.4, 1.4), pysyncobj's, several heartbeats on a loaded host.
        heartbeat_s: the leader's append-entries period when idle; default 0.1 (pysyncobj's).
        send_each_entry: send append-entries as each entry is queued instead of on
            the next tick; default True, for commit latency (batching comes from
            our entries being whole batches).
        append_batch_bytes: bytes per append-entries message; default 1 MiB, so a
            64 KiB batch never waits for a second message.
        queue_size: submitted entries waiting for the tick thread; default 10,000.
        snapshot_min_entries: log length that triggers a snapshot; default 5,000 (pysyncobj's).
        snapshot_min_time_s: at most this long between snapshots when entries
            arrive; default 300 (pysyncobj's).
        max_writers: writers remembered for idempotence; default 65,536 (a few MB).
        group_bytes: group commit: batches waiting while ``group_in_flight``
            log entries are uncommitted travel together in the next entry, up
            to this many bytes; default 1 MiB (16 batches of 64 KiB).
        group_in_flight: log entries of grouped batches in flight at once;
            default 1: pysyncobj re-sends every unacknowledged entry on each append, so one
            entry in flight keeps that re-sending at one entry.
        journal: keep the log in an mmapped journal file in ``data_dir``; default
            True (False: memory only, for tests of a single process).
    """

    election_timeout_s: tuple[float, float] = (0.4, 1.4)
    heartbeat_s: float = 0.1
    send_each_entry: bool = True
    append_batch_bytes: int = 1 << 20
    queue_size: int = 10_000
    snapshot_min_entries: int = 5_000
    snapshot_min_time_s: float = 300.0
    max_writers: int = 65_536
    group_bytes: int = 1 << 20
    group_in_flight: int = 1
    journal: bool = True

    def __post_init__(self) -> None:
        lo, hi = self.election_timeout_s
        if not 0 < lo < hi:
            raise ConfigError(f"expected 0 < min < max, got {self.election_timeout_s}",
                              field="election_timeout_s")
        if not 0 < 3 * self.heartbeat_s < lo:  # pysyncobj: an election timeout spans 3 heartbeats
            raise ConfigError(f"expected 0 < heartbeat_s < {lo / 3:.3f} (min election timeout / 3), "
                              f"got {self.heartbeat_s}", field="heartbeat_s")
        if self.snapshot_min_entries < 2:
            raise ConfigError(f"expected >= 2, got {self.snapshot_min_entries}", field="snapshot_min_entries")
        for name in ("append_batch_bytes", "queue_size", "max_writers", "group_bytes", "group_in_flight"):
            if getattr(self, name) < 1:
                raise ConfigError(f"expected >= 1, got {getattr(self, name)}", field=name)


def encode_entry(op: Op, keys: np.ndarray, values: np.ndarray | None, *, writer: int, seq: int,
                 lr: float = 0.0) -> bytes:
    """One log entry: header, keys (B,) uint64, then values (B, D) float32 when the op has them.

    Raises:
        ValueError: keys not (B,) integers, or values not (B, D).
    """
    k = np.ascontiguousarray(keys, dtype=np.uint64)
    if k.ndim != 1:
        raise ValueError(f"keys: expected shape (B,), got {k.shape}")
    if values is None:
        v, dim = b"", 0
    else:
        va = np.ascontiguousarray(values, dtype=np.float32)
        if va.ndim != 2 or va.shape[0] != k.shape[0]:
            raise ValueError(f"values: expected shape ({k.shape[0]}, D), got {va.shape}")
        v, dim = va.tobytes(), va.shape[1]
    head = _HEAD.pack(int(op), dim, writer, seq, float(lr), k.shape[0], 0)
    body = k.tobytes() + v
    crc = zlib.crc32(body, zlib.crc32(head))
    return _HEAD.pack(int(op), dim, writer, seq, float(lr), k.shape[0], crc) + body


def decode_entry(entry: bytes) -> tuple[Op, np.ndarray, np.ndarray | None, int, int, float]:
    """(op, keys, values or None, writer, seq, lr) of an entry; the arrays are read-only views.

    Raises:
        CorruptFile: the entry is truncated or fails its CRC.
    """
    if len(entry) < _HEAD.size:
        raise CorruptFile(path="<log entry>", problem=f"{len(entry)} bytes, shorter than the entry header")
    op, dim, writer, seq, lr, n, crc = _HEAD.unpack_from(entry)
    head0 = _HEAD.pack(op, dim, writer, seq, lr, n, 0)
    want = _HEAD.size + 8 * n + 4 * n * dim
    if len(entry) != want or zlib.crc32(memoryview(entry)[_HEAD.size:], zlib.crc32(head0)) != crc:
        raise CorruptFile(path="<log entry>",
                          problem=f"entry (writer {writer}, seq {seq}) fails its length or CRC")
    keys = np.frombuffer(entry, dtype=np.uint64, count=n, offset=_HEAD.size)
    values = (np.frombuffer(entry, dtype=np.float32, count=n * dim, offset=_HEAD.size + 8 * n)
              .reshape(n, dim) if dim else None)
    return Op(op), keys, values, writer, seq, lr


def _warm_kernels(table: EmbeddingTable) -> None:
    """Run every write kernel once on a scratch table, before joining the group.

    The first call of a numba kernel in a process compiles it or loads it from
    the cache (seconds on a busy host). In the tick thread that would stall
    heartbeats past the election timeout and cost the group its leader. The
    arrays come through ``decode_entry``, read-only views as in ``_apply_entries``,
    since numba specialises on that.
    """
    rows = np.zeros((4, table.dim), dtype=np.float32)
    keys = np.arange(1, 5, dtype=np.uint64)
    for op in (Op.INSERT_OR_ASSIGN, Op.ASSIGN, Op.APPLY_GRADIENTS, Op.FIND_OR_INSERT, Op.ERASE):
        no_rows = op in (Op.ERASE, Op.FIND_OR_INSERT)
        entry = encode_entry(op, keys, None if no_rows else rows, writer=0, seq=0, lr=0.01)
        _, k, v, *_ = decode_entry(entry)
        if op == Op.INSERT_OR_ASSIGN:
            table.insert_or_assign(k, v)
        elif op == Op.ASSIGN:
            table.assign(k, v)
        elif op == Op.APPLY_GRADIENTS:
            table.apply_gradients(k, v, 0.01)
        elif op == Op.FIND_OR_INSERT:
            table.find_or_insert(k)
        else:
            table.find(k)
            table.erase(k)


def wipe(data_dir: str | os.PathLike[str]) -> None:
    """Delete a replica's journal and snapshot, so that it re-syncs from the group when restarted."""
    for name in ("raft.journal", "raft.journal.meta", "raft.dump", "raft.dump.tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(Path(data_dir) / name)


class BatchLog(SyncObj):
    """One writable replica of a shard: a Raft member that applies committed batches to its table.

    Args:
        self_addr: this member's Raft address, ``"host:port"``.
        peers: the other members' addresses (the group, 3 by default).
        make_table: builds this replica's empty table (every member the same
            config); the log replays into it, or a snapshot replaces it.
        data_dir: where the journal and snapshot live (created).
        config: the group's :class:`RaftLogConfig`.
        on_corrupt: called (from the tick thread) with the error when an entry
            or snapshot fails its checksum here.

    Raises:
        ConfigError: a bad config value.

    Thread safety: module doc.

    Example::

        log = BatchLog("127.0.0.1:7001", ["127.0.0.1:7002", "127.0.0.1:7003"],
                       lambda: EmbeddingTable(dim=64), "/var/lib/streamrec/shard0")
        log.wait_leader(10)
        ack = log.submit(Op.APPLY_GRADIENTS, keys, grads, writer=7, seq=1, lr=0.05)
        values, found = log.read(keys, linearizable=True)
    """

    def __init__(self, self_addr: str, peers: list[str], make_table: Callable[[], EmbeddingTable],
                 data_dir: str | os.PathLike[str], config: RaftLogConfig | None = None, *,
                 on_corrupt: Callable[[Exception], None] | None = None) -> None:
        cfg = config or RaftLogConfig()
        self._cfg = cfg
        self._dir = Path(data_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._make_table = make_table
        _warm_kernels(make_table())
        self.table: EmbeddingTable = make_table()
        self._high: OrderedDict[int, int] = OrderedDict()   # writer -> highest seq applied (replicated)
        self._applied_index = 0
        self._on_corrupt = on_corrupt
        self._group_lock = threading.Lock()
        self._waiting: list[tuple[bytes, Callable[[Ack | Exception], None]]] = []
        self._entries_in_flight = 0
        self.corrupt: Exception | None = None
        self._fresh_at = 0.0   # monotonic time at which this replica last held all the leader had committed
        self._tick_at = 0.0    # when the previous tick's callback ran (before that tick read messages)
        self._deadline_seen = 0.0
        self._heard_at = 0.0   # a lower bound on when the leader's commit index known here was received
        conf = SyncObjConf(
            raftMinTimeout=cfg.election_timeout_s[0], raftMaxTimeout=cfg.election_timeout_s[1],
            appendEntriesPeriod=cfg.heartbeat_s, appendEntriesUseBatch=not cfg.send_each_entry,
            appendEntriesBatchSizeBytes=cfg.append_batch_bytes, commandsQueueSize=cfg.queue_size,
            logCompactionMinEntries=cfg.snapshot_min_entries, logCompactionMinTime=cfg.snapshot_min_time_s,
            journalFile=str(self._dir / "raft.journal") if cfg.journal else None,
            fullDumpFile=str(self._dir / "raft.dump"),
            serializer=self._write_snapshot, deserializer=self._read_snapshot,
            autoTickPeriod=0.01, connectionRetryTime=0.5, connectionTimeout=cfg.election_timeout_s[1],
            sendBufferSize=1 << 21, recvBufferSize=1 << 21,
        )
        super().__init__(self_addr, peers, conf)
        self.addOnTickCallback(self._on_tick)

    # -- writing ------------------------------------------------------------

    def submit(self, op: Op, keys: Any, values: Any = None, *, writer: int, seq: int, lr: float = 0.0,
               timeout: float = 5.0) -> Ack:
        """Append one batch and return once a majority committed it and this leader applied it.

        REQUIRES: this replica is the leader (else ``NotLeader``), ``seq`` above
        this writer's earlier seqs (a lower one is acknowledged as a duplicate).

        Raises:
            NotLeader: this replica is not the leader (``leader`` says who is).
            ReplicationError: not acknowledged in ``timeout`` or the leader
                changed first; the batch may have committed: resubmit it.
            ValueError: bad keys or values.
        """
        done = threading.Event()
        box: list[Ack | Exception] = []

        def on_done(result: Ack | Exception) -> None:
            box.append(result)
            done.set()

        self.submit_async(op, keys, values, writer=writer, seq=seq, lr=lr, on_done=on_done)
        if not done.wait(timeout):
            raise ReplicationError(f"batch (writer {writer}, seq {seq}) not acknowledged within {timeout} s",
                                   reason="TIMEOUT")
        if isinstance(box[0], Exception):
            raise box[0]
        return box[0]

    def submit_async(self, op: Op, keys: Any, values: Any = None, *, writer: int, seq: int, lr: float = 0.0,
                     on_done: Callable[[Ack | Exception], None]) -> None:
        """Append one batch without waiting; ``on_done`` gets its :class:`Ack` or the exception.

        ``on_done`` runs in pysyncobj's tick thread: it must be quick and must
        not call ``submit``. Errors found before queueing (``NotLeader``, bad
        input) are raised here instead. Many batches may be in flight: the
        log keeps their order, so a writer pipelines at the cost of one
        round of resubmission (in seq order) after a leader change.
        """
        if self.corrupt is not None:
            raise ReplicationError("this replica found a corrupt entry and must re-sync", reason="CORRUPT")
        if not self._isLeader():
            leader = self._getLeader()
            raise NotLeader(None if leader is None else str(leader.id))
        if op == Op.APPLY_GRADIENTS and not (np.isfinite(lr) and lr > 0):
            raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")
        entry = encode_entry(op, np.asarray(keys), None if values is None else np.asarray(values),
                             writer=writer, seq=seq, lr=lr)
        with self._group_lock:
            self._waiting.append((entry, on_done))
            if self._entries_in_flight < self._cfg.group_in_flight:
                self._send_group_locked()

    def _send_group_locked(self) -> None:
        # Group commit: the batches that queued up while earlier entries were committing
        # share one log entry, so per-entry costs (pysyncobj's pure-Python append,
        # messages, journal) are paid once per group, and an idle log adds no wait.
        # REQUIRES: self._group_lock held, self._waiting not empty.
        size, n = 0, 0
        while n < len(self._waiting) and (n == 0 or size + len(self._waiting[n][0]) <= self._cfg.group_bytes):
            size += len(self._waiting[n][0])
            n += 1
        group, self._waiting = self._waiting[:n], self._waiting[n:]
        self._entries_in_flight += 1

        def on_result(result: Any, error: int) -> None:
            # pysyncobj's tick thread: answer every batch of the group, then send the next group
            if error == FAIL_REASON.SUCCESS:
                outcomes: list[Ack | Exception] = [Ack(index=i, applied=a, refused=r) for i, a, r in result]
            else:
                exc: Exception
                if error in (FAIL_REASON.NOT_LEADER, FAIL_REASON.MISSING_LEADER):
                    leader = self._getLeader()
                    exc = NotLeader(None if leader is None else str(leader.id))
                else:
                    name = next((k for k, v in vars(FAIL_REASON).items() if v == error), str(error))
                    exc = ReplicationError(f"{len(group)} batches not acknowledged: {name}", reason=name)
                outcomes = [exc] * len(group)
            for (_, done), outcome in zip(group, outcomes, strict=True):
                done(outcome)
            with self._group_lock:
                self._entries_in_flight -= 1
                if self._waiting:
                    self._send_group_locked()

        self._applyCommand(self._command([e for e, _ in group]), on_result, _REGULAR)

    def _command(self, entries: list[bytes]) -> bytes:
        # What @replicated would queue, but pickled with protocol 5: pysyncobj pickles
        # with protocol 2, which stores bytes as latin-1 text (about 1.5x the size of
        # float data, and slow); its apply side unpickles any protocol.
        func_id = self._methodToID[self._getFuncName("_apply_entries")]
        return pickle.dumps((func_id, (entries,)), protocol=5)

    @replicated
    def _apply_entries(self, entries: list[bytes]) -> list[tuple[int, bool, str | None]]:
        # runs on every replica, in log order, in the tick thread: it must not raise
        index = self.raftLastApplied + 1
        return [self._apply_entry(index, e) for e in entries]

    def _apply_entry(self, index: int, entry: bytes) -> tuple[int, bool, str | None]:
        if self.corrupt is not None:
            return index, False, None
        try:
            op, keys, values, writer, seq, lr = decode_entry(entry)
        except CorruptFile as exc:
            self._mark_corrupt(exc)
            return index, False, None
        self._applied_index = index
        if op == Op.BARRIER:
            return index, False, None
        high = self._high.get(writer)
        if high is not None and seq <= high:
            self._high.move_to_end(writer)
            return index, False, None
        t = self.table
        refused = None
        try:
            if op == Op.INSERT_OR_ASSIGN:
                t.insert_or_assign(keys, values)
            elif op == Op.ASSIGN:
                t.assign(keys, values)
            elif op == Op.APPLY_GRADIENTS:
                t.apply_gradients(keys, values, lr)
            elif op == Op.FIND_OR_INSERT:
                t.find_or_insert(keys)
            else:
                t.erase(keys)
        except (ValueError, StoreError) as exc:
            # same table, same entry: every replica refuses it alike, so they stay identical
            refused = f"{type(exc).__name__}: {exc}"
        self._high[writer] = seq
        self._high.move_to_end(writer)
        if len(self._high) > self._cfg.max_writers:
            self._high.popitem(last=False)
        return index, refused is None, refused

    def _mark_corrupt(self, exc: Exception) -> None:
        self.corrupt = exc
        if self._on_corrupt is not None:
            self._on_corrupt(exc)

    # -- reading ------------------------------------------------------------

    def read(self, keys: Any, *, linearizable: bool = False, max_staleness_s: float = 1.0,
             timeout: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
        """Values (B, D) and found mask (B,) of ``keys`` on this replica.

        ``linearizable`` (leader only): the read sees every batch acknowledged
        before it was called. Otherwise it is at most ``max_staleness_s`` stale.

        Raises:
            NotLeader: a linearizable read on a follower.
            TooStale: this replica is staler than ``max_staleness_s``.
            ReplicationError: the barrier was not committed in ``timeout``.
        """
        if linearizable:
            self.submit(Op.BARRIER, np.empty(0, dtype=np.uint64), writer=0, seq=0, timeout=timeout)
        else:
            stale = self.staleness_s()
            if stale > max_staleness_s:
                raise TooStale(stale, max_staleness_s)
        values, found = self.table.find(keys)
        return values, found

    def staleness_s(self) -> float:
        """Seconds since this replica last held everything the leader had committed (0 on the leader)."""
        if self._isLeader():
            return 0.0
        return time.monotonic() - self._fresh_at if self._fresh_at else float("inf")

    def _on_tick(self) -> None:
        now, before = time.monotonic(), self._tick_at
        self._tick_at = now
        if self._isLeader():
            self._fresh_at = now
            return
        # The leader's commit index known here is only as fresh as the message that brought it:
        # after a pause (SIGSTOP) it is old, and holding it proves nothing. pysyncobj pushes the
        # election deadline back on every append-entries from the leader, and reads messages
        # after the tick callbacks, so a changed deadline means news that arrived after the
        # previous callback ran.
        deadline = self._SyncObj__raftElectionDeadline
        if deadline != self._deadline_seen:
            self._deadline_seen, self._heard_at = deadline, before
        status_leader = self._getLeader()
        if status_leader is None or not self.isNodeConnected(status_leader):
            return
        leader_commit = self.getStatus().get("leader_commit_idx")
        if leader_commit is not None and self.raftLastApplied >= leader_commit:
            self._fresh_at = max(self._fresh_at, self._heard_at)

    # -- state --------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return bool(self._isLeader())

    @property
    def leader(self) -> str | None:
        node = self._getLeader()
        return None if node is None else str(node.id)

    @property
    def applied_index(self) -> int:
        """The last log index applied here."""
        return int(self.raftLastApplied)

    def high_water(self) -> dict[int, int]:
        """A copy of the replicated idempotence map: writer -> highest seq applied."""
        return dict(self._high)

    def wait_leader(self, timeout: float) -> str:
        """Block until the group has a leader this replica knows; return its address."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.leader
            if leader is not None and self.isReady():
                return leader
            time.sleep(0.02)
        raise ReplicationError(f"no leader within {timeout} s", reason="MISSING_LEADER")

    def force_snapshot(self) -> None:
        """Write a snapshot and truncate the log behind it at the next tick."""
        self.forceLogCompaction()

    def close(self) -> None:
        """Leave the group (stops the tick thread); the journal and snapshot stay for a restart."""
        self.destroy()

    # -- snapshots (pysyncobj calls these from the tick thread) -------------

    def _write_snapshot(self, file_name: str, raft_data: Any) -> None:
        with tempfile.TemporaryDirectory(dir=self._dir) as tmp:
            table_dir = Path(tmp) / _TABLE_DIR
            self.table.snapshot(table_dir)
            raft_blob = pickle.dumps(raft_data)
            state = {"applied_index": self._applied_index, "high": [[w, s] for w, s in self._high.items()],
                     "raft": raft_blob.hex(), "crc": zlib.crc32(raft_blob)}
            body = json.dumps(state, sort_keys=True).encode()
            head = json.dumps({"crc": zlib.crc32(body)}).encode() + b"\n"
            (Path(tmp) / _STATE_FILE).write_bytes(head + body)
            with tarfile.open(file_name, "w") as tar:
                tar.add(str(Path(tmp) / _STATE_FILE), arcname=_STATE_FILE)
                tar.add(str(table_dir), arcname=_TABLE_DIR)

    def _read_snapshot(self, file_name: str) -> Any:
        try:
            return self._load_snapshot(file_name)
        except Exception as exc:
            # pysyncobj would log and carry on with the wrong state: stop applying instead
            self._mark_corrupt(exc)
            raise

    def _load_snapshot(self, file_name: str) -> Any:
        with tempfile.TemporaryDirectory(dir=self._dir) as tmp:
            try:
                with tarfile.open(file_name, "r") as tar:
                    tar.extractall(tmp, filter="data")
                head, body = (Path(tmp) / _STATE_FILE).read_bytes().split(b"\n", 1)
            except (tarfile.TarError, OSError, ValueError) as exc:
                raise CorruptFile(path=file_name, problem=f"replication snapshot unreadable: {exc}") from exc
            if json.loads(head)["crc"] != zlib.crc32(body):
                raise CorruptFile(path=file_name, problem="replication state record fails its CRC")
            state = json.loads(body)
            raft_blob = bytes.fromhex(state["raft"])
            if zlib.crc32(raft_blob) != state["crc"]:
                raise CorruptFile(path=file_name, problem="raft record fails its CRC")
            table = EmbeddingTable.open(Path(tmp) / _TABLE_DIR)  # verifies every chunk's checksum
        self.table = table
        self._high = OrderedDict((int(w), int(s)) for w, s in state["high"])
        self._applied_index = int(state["applied_index"])
        return pickle.loads(raft_blob)
