"""The sequence store: per-user behaviour sequences, appended in batches, read as arrays.

Owns: ``SequenceStore``, the public API over the sequence kernels
(``_sequence_kernels``) and the user index (the cuckoo primitives of
``_index``): input checks, index growth, retries of torn reads, expiry, and
turning kernel status codes into exceptions. It must not do per-event or
per-user work in Python.

Storage design (memory follows the events held, not users x max_len):

- **User rows.** One 32-byte record per user (id, last-append clock, a
  version, slot, ring head, size class and length) in a user arena; the cuckoo
  index maps a user id to its row exactly as the embedding table maps keys
  ("key in row": 12-slot buckets of a tag and a uint32 row number), and grows
  by doubling, rebuilt from the user rows. Freed rows go on a free list. User
  ids are hashed with the store's own SipHash key, drawn at creation and kept
  in snapshots (``_index`` says why: crafted ids cannot flood it). The index
  never doubles below a load of 0.05 (the tables' growth floor): an append
  that finds no slot there raises ``IndexGrowthRefused``, the events before
  it in the batch appended (its ``position``), as ``TableFull`` does.
- **Size classes.** A user's events are one ring buffer, contiguous per field
  (SoA: item uint64, action uint8/uint16, timestamp int64, one float32 array per
  extra field). Ring capacities come in classes 4, 8, 16, ... doubling up to
  ``max_len`` (the top class is exactly ``max_len``). A new user gets a ring of 4;
  a full ring moves to the next class (amortised, each event is copied about
  once by growth); in the top class a new event overwrites the oldest, so
  capping at ``max_len`` costs nothing. Each class is a run of equal slots in
  flat per-field arrays; freeing a slot moves the class's last slot into it, so
  every class stays dense. A user holding ``len`` events uses
  ``max(4, < 2 len)`` event slots (at most ``max_len``) plus 36 bytes (row and
  slot owner): with 17 bytes per event and no extras, a user with 10,000 events
  takes 170 kB, one with 3 events 104 bytes; the index adds about 7 bytes a user.
- **Why rings in size classes, not linked fixed-size blocks.** A read of a long
  history (the model's input) is then at most two straight copies per field,
  and a one-event user costs 4 event slots, not a block; blocks would need a
  per-user block list (itself variable-size) or a pointer chase per block.
- **Address space, not reallocation.** The per-field arrays, the user arena and
  the free lists are ``Region`` reservations (``MAP_NORESERVE``, pages backed on
  first touch, huge pages by default), so nothing is ever moved or unmapped:
  growth is "use more of the region", and a reader holding a view never sees it
  go. Each class reserves room for 2**31 events (more than this machine's
  memory; running out raises ``TableFull``). Pages a class no longer uses (after
  mass erasure) stay with the process and are reused by that class.
- **TTL.** Every append stamps the user with ``clock()``. A user whose last
  append is more than ``ttl_s`` ago reads as empty at once; its memory is
  reclaimed by an expiry sweep (a clock hand advancing over the user rows by
  twice the events of every append batch, at least 1024 rows, and ``expire()``
  for all now), or when it is appended to again (it restarts empty).
- **Snapshots.** ``snapshot``/``open`` write and load the user rows, the index
  and each class's slots in use through ``_files`` (atomic generations,
  checksummed chunks), straight from and into the store's memory.

Thread safety, for the whole class: one writer, any number of lock-free
readers. Every write method (``append``, ``erase``, ``expire``, ``snapshot``)
takes the store's writer lock, so writes from several threads are serialised.
The read methods (``read``, ``read_last``, ``length``) take no lock: a reader
finds the user's row under the seqlock of the index buckets (as the embedding
table's readers do), then reads the record and copies the ring between two
equal, even reads of the record's own version, which the writer makes odd
while it changes that user's record or events (appending, growing, moving it
into a freed slot, erasing it). So a reader gets, for each user, the whole
sequence as it was at one moment, never a mix; users of one batch are read at
different moments (no cross-user snapshot). ``read`` sizes its output first; if
the writer changes a user's length between the sizing and the copy it sizes
again, and after three such collisions it takes the writer lock for one last
pass, so it always finishes. ``len``, ``events_held`` and ``memory_bytes`` read
counters without synchronisation (exact when no write is running). Why not
take the writer lock for reads: the model reads histories of up to 10,000
events while the pipeline appends, and a 100-user read (17 MB) would stall the
writer for milliseconds; the record's version costs the writer nothing (the
record's line is already in cache) and readers a second load.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.errors import CorruptFile, IndexGrowthRefused, SnapshotError, TableFull
from streamrec.store._checks import as_keys
from streamrec.store._files import read_snapshot, snapshot_info
from streamrec.store._index import (
    BUCKET_BYTES,
    MAX_BFS_NODES,
    ROW0,
    SLOTS,
    VER,
    IndexGeneration,
    new_hash_key,
    rebuild_from,
)
from streamrec.store._memory import Region
from streamrec.store._ops import retry_reader
from streamrec.store._persist import SnapshotJob, run_snapshot
from streamrec.store._sequence_kernels import (
    C_BASE,
    C_CAP,
    C_MAXSLOTS,
    C_NSLOTS,
    C_OBASE,
    CNT_EVENTS,
    CNT_FREE,
    CNT_HIGH,
    CNT_LIVE,
    LEN_BITS,
    U_HEAD,
    U_LC,
    U_SLOT,
    U_VER,
    USER_BYTES,
    Status,
    append_batch,
    count_live,
    erase_batch,
    lengths_batch,
    read_last_batch,
    read_ragged,
    sweep,
)

__all__ = ["SequenceStore"]

BASE_FIELDS = ("item", "action", "timestamp")
_MIN_CAP = 4  # the smallest ring: a user with one event holds 4 slots (68 bytes without extras)
_MAX_LEN_LIMIT = (1 << LEN_BITS) - 1  # the record packs len in 24 bits; far beyond any model's history
_CLASS_EVENTS = 1 << 31  # events reserved (address space only) per size class
_MIN_CLASS_EVENTS = 1 << 20  # the least per class if the reservation is refused
_DEFAULT_MAX_USERS = 1 << 30  # user rows reserved (address space only: 32 GiB)
_MAX_USERS_LIMIT = (1 << 32) - 1  # row numbers are uint32 in the bucket
_RESERVE_LOAD = 0.9  # capacity_users sizes the index for this load
_MIN_LOAD_FACTOR = 0.05  # the growth floor, libcuckoo's default (as TableConfig.min_load_factor)
_LOCK_FREE_TRIES = 3  # ragged reads re-sized this often before taking the writer lock
_SWEEP_ROWS_PER_EVENT = 2  # expiry sweep: rows visited per appended event...
_SWEEP_MIN_ROWS = 1024  # ...and at least this many per append call
_SNAPSHOT_FORMAT = "streamrec.SequenceStore/2"  # meta["format"] this build reads; 2: keyed index hash


class _Index(IndexGeneration):
    """One generation of the user index, with its views grouped as the kernels take them."""

    def __init__(self, buckets: int, huge_pages: bool, hash_key: np.ndarray) -> None:
        super().__init__(buckets, huge_pages)
        # as the writer and the reader kernels take it; hash_key: uint64 (2,), the store's (``_index``)
        self.writer = (self.idx64, self.idx32, self.idx8, hash_key)
        self.readers = (self.idx64, self.idx32, self.retired, hash_key)


class SequenceStore:
    """Per-user event sequences (item, action, timestamp, extras), capped at ``max_len``.

    Shape contract: B users per call (repeats allowed), N events per append.
    ``append`` takes (N,) arrays; ``read`` returns ragged columns (offsets (B+1,)
    int64 and one flat (sum of lengths,) array per field, each user's events
    oldest first); ``read_last`` returns (B, n) columns, newest last, left-padded
    with zeros. Fields: ``item`` uint64, ``action`` uint8 or uint16,
    ``timestamp`` int64, and each extra field float32.

    Args:
        max_len: events kept per user; an append past it drops the oldest.
        extra_fields: names of extra float32 fields of every event.
        capacity_users: users to size the index for at first; it grows beyond.
        ttl_s: seconds after a user's last append at which its sequence
            expires (reads as empty, is reclaimed); ``None`` keeps users forever.
        clock: ``() -> seconds`` for TTL stamps (default ``time.time``); tests
            pass a fake.
        action_dtype: ``"uint8"`` (default) or ``"uint16"``.
        huge_pages: back the arenas and the index with transparent huge pages
            (each size class in use then holds at least 2 MiB per field).
        max_users: user rows to reserve address space for (0: 2**30).

    Raises:
        TypeError, ValueError: a bad argument, naming it.

    Thread safety: one writer and any number of lock-free readers (module doc).

    Example::

        s = SequenceStore(max_len=3, extra_fields=("dwell",))
        s.append([7, 7, 9, 7, 7], items=[1, 2, 3, 4, 5], actions=[0, 1, 0, 0, 2],
                 timestamps=[10, 11, 12, 13, 14], extras={"dwell": [0.5, 1, 2, 3, 4]})
        offsets, cols = s.read([7, 8, 9])   # offsets [0, 3, 3, 4]; cols["item"] [2, 4, 5, 3]
        lengths, last = s.read_last([7], 2) # lengths [2]; last["item"] [[4, 5]]
    """

    def __init__(
        self,
        max_len: int = 10_000,
        extra_fields: Iterable[str] = (),
        capacity_users: int = 1024,
        ttl_s: float | None = None,
        clock: Callable[[], float] | None = None,
        *,
        action_dtype: str | np.dtype | type = "uint8",
        huge_pages: bool = True,
        max_users: int = 0,
    ) -> None:
        _check_int("max_len", max_len, 1, _MAX_LEN_LIMIT)
        _check_int("capacity_users", capacity_users, 0, _MAX_USERS_LIMIT)
        _check_int("max_users", max_users, 0, _MAX_USERS_LIMIT)
        self._extra = _check_extra_fields(extra_fields)
        if ttl_s is not None and not (
            isinstance(ttl_s, (int, float, np.integer, np.floating)) and not isinstance(ttl_s, bool)
            and math.isfinite(ttl_s) and ttl_s > 0
        ):
            raise ValueError(f"ttl_s: expected None or a finite number of seconds > 0, got {ttl_s!r}")
        if clock is not None and not callable(clock):
            raise TypeError(f"clock: expected a callable returning seconds, got {type(clock).__name__}")
        try:
            adt = np.dtype(action_dtype)
        except TypeError:
            adt = None
        if adt not in (np.dtype(np.uint8), np.dtype(np.uint16)):
            raise ValueError(f"action_dtype: expected 'uint8' or 'uint16', got {action_dtype!r}")
        if not isinstance(huge_pages, bool):
            raise TypeError(f"huge_pages: expected a bool, got {huge_pages!r}")
        self._max_len = max_len
        self._ttl = float(ttl_s) if ttl_s is not None else 0.0
        self._clock: Callable[[], float] = clock if clock is not None else time.time
        self._adt = adt
        self._huge = huge_pages
        self._build(max_users or _DEFAULT_MAX_USERS, capacity_users)

    def _build(self, max_users: int, capacity_users: int) -> None:
        caps = _class_caps(self._max_len)
        ncls = len(caps)
        n_ext = len(self._extra)
        self._items_region = Region(ncls * _CLASS_EVENTS * 8, huge_pages=self._huge,
                                    min_nbytes=ncls * _MIN_CLASS_EVENTS * 8)
        per_class = 1 << ((self._items_region.nbytes // (ncls * 8)).bit_length() - 1)
        total = ncls * per_class
        self._tss_region = Region(total * 8, huge_pages=self._huge, min_nbytes=total * 8)
        self._acts_region = Region(total * self._adt.itemsize, huge_pages=self._huge,
                                   min_nbytes=total * self._adt.itemsize)
        self._items = self._items_region.array(np.uint64, (total,))
        self._tss = self._tss_region.array(np.int64, (total,))
        self._acts = self._acts_region.array(self._adt, (total,))
        if n_ext:
            self._ext_region: Region | None = Region(n_ext * total * 4, huge_pages=self._huge,
                                                     min_nbytes=n_ext * total * 4)
            self._ext = self._ext_region.array(np.float32, (n_ext, total))
        else:
            self._ext_region = None
            self._ext = np.zeros((0, 1), dtype=np.float32)
        self._cls = np.zeros((ncls, 5), dtype=np.int64)
        obase = 0
        for c, cap in enumerate(caps):
            maxslots = per_class // cap
            self._cls[c, C_CAP] = cap
            self._cls[c, C_BASE] = c * per_class
            self._cls[c, C_MAXSLOTS] = maxslots
            self._cls[c, C_OBASE] = obase
            obase += maxslots
        self._owner_region = Region(obase * 4, huge_pages=False, min_nbytes=obase * 4)
        self._owner = self._owner_region.array(np.uint32, (obase,))
        self._users_region = Region(max_users * USER_BYTES, huge_pages=self._huge,
                                    min_nbytes=max(capacity_users, 1) * USER_BYTES)
        self._max_users = min(self._users_region.nbytes // USER_BYTES, max_users)
        self._users64 = self._users_region.array(np.uint64, (self._max_users, USER_BYTES // 8))
        self._users32 = self._users_region.array(np.int32, (self._max_users, USER_BYTES // 4))
        self._usersf = self._users_region.array(np.float64, (self._max_users, USER_BYTES // 8))
        self._free_region = Region(self._max_users * 4, huge_pages=False)
        self._free = self._free_region.array(np.uint32, (self._max_users,))
        self._cnt = np.zeros(8, dtype=np.int64)
        self._hash_key = np.array(new_hash_key(), dtype=np.uint64)  # recorded in snapshots
        self._index = _Index(_buckets_for(capacity_users), self._huge, self._hash_key)
        self._nodes = np.empty((MAX_BFS_NODES, 3), dtype=np.int64)
        self._lock = threading.Lock()
        self._event_bytes = 8 + self._adt.itemsize + 8 + 4 * n_ext
        self._users = (self._users64, self._users32, self._usersf)
        self._ev = (self._items, self._acts, self._tss, self._ext)
        self._no_out = (np.empty(0, np.uint64), np.empty(0, self._adt), np.empty(0, np.int64),
                        np.empty((n_ext, 0), np.float32))

    # -- properties: any thread ---------------------------------------------------------

    @property
    def max_len(self) -> int:
        return self._max_len

    @property
    def fields(self) -> tuple[str, ...]:
        """Column names, in order: ``item``, ``action``, ``timestamp``, then the extra fields."""
        return (*BASE_FIELDS, *self._extra)

    @property
    def dtypes(self) -> dict[str, np.dtype]:
        """Each column's dtype."""
        out = {"item": np.dtype(np.uint64), "action": self._adt, "timestamp": np.dtype(np.int64)}
        out.update({name: np.dtype(np.float32) for name in self._extra})
        return out

    @property
    def ttl_s(self) -> float | None:
        return self._ttl or None

    @property
    def class_capacities(self) -> tuple[int, ...]:
        """Ring capacities of the size classes, smallest first (the last is ``max_len``)."""
        return tuple(int(c) for c in self._cls[:, C_CAP])

    def __len__(self) -> int:
        """Users holding an unexpired sequence (with a TTL: one scan of the user rows)."""
        if not self._ttl:
            return int(self._cnt[CNT_LIVE])
        return int(count_live(self._users32, self._usersf, int(self._cnt[CNT_HIGH]),
                              float(self._clock()), self._ttl))

    @property
    def events_held(self) -> int:
        """Events in memory (those of expired users count until the sweep reclaims them)."""
        return int(self._cnt[CNT_EVENTS])

    @property
    def memory_bytes(self) -> int:
        """Bytes in use: index, user rows, free list, and the event slots of every class in use."""
        slots = self._cls[:, C_NSLOTS]
        return (
            self._index.buckets * BUCKET_BYTES
            + int(self._cnt[CNT_HIGH]) * USER_BYTES
            + int(self._cnt[CNT_FREE]) * 4
            + int((slots * self._cls[:, C_CAP]).sum()) * self._event_bytes
            + int(slots.sum()) * 4
        )

    @property
    def load_factor(self) -> float:
        """Users in the index over its slots (buckets x 12)."""
        return int(self._cnt[CNT_LIVE]) / (self._index.buckets * SLOTS)

    def __repr__(self) -> str:
        return (
            f"SequenceStore(max_len={self._max_len}, fields={self.fields}, users={int(self._cnt[CNT_LIVE])}, "
            f"events={self.events_held}, ttl_s={self.ttl_s})"
        )

    # -- reads: lock-free, any thread -------------------------------------------------------

    def length(self, users: Any) -> np.ndarray:
        """(B,) int64: events held per user (0 for unknown or expired users)."""
        k = as_keys(users, "users")
        out = np.empty(k.shape[0], dtype=np.int64)
        self._lengths(k, self._read_now(), out)
        return out

    def read(self, users: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Every user's whole sequence, oldest first, as ragged columns.

        Args:
            users: (B,) user ids; repeats and unknown users allowed.

        Returns:
            ``(offsets, columns)``: offsets int64 (B+1,), user i's events at
            ``offsets[i]:offsets[i+1]`` of each column; columns maps each name of
            ``fields`` to a flat array of its dtype. Unknown and expired users
            get empty runs.
        """
        k = as_keys(users, "users")
        now = self._read_now()
        for _ in range(_LOCK_FREE_TRIES):
            got = self._read_ragged(k, now)
            if got is not None:
                return got
        with self._lock:  # the writer cannot move a length now: this pass succeeds
            got = self._read_ragged(k, now)
        if got is None:  # pragma: no cover - impossible with the writer lock held
            raise RuntimeError("sequence lengths changed under the writer lock")
        return got

    def read_last(self, users: Any, n: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The newest ``n`` events of every user, newest last, left-padded with zeros.

        Args:
            users: (B,) user ids; repeats and unknown users allowed.
            n: events per row (>= 0; may exceed ``max_len``).

        Returns:
            ``(lengths, columns)``: lengths int64 (B,) = min(n, events held); each
            column (B, n) of its dtype, user i's events in ``[i, n - lengths[i]:]``
            and zeros before them.
        """
        k = as_keys(users, "users")
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
            raise TypeError(f"n: expected an int >= 0, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"n: expected an int >= 0, got {n}")
        n = int(n)
        b = k.shape[0]
        lengths = np.empty(b, dtype=np.int64)
        o_items = np.empty((b, n), dtype=np.uint64)
        o_acts = np.empty((b, n), dtype=self._adt)
        o_tss = np.empty((b, n), dtype=np.int64)
        o_ext = np.empty((len(self._extra), b, n), dtype=np.float32)
        now = self._read_now()
        flat = b * n
        out = (o_items.reshape(flat), o_acts.reshape(flat), o_tss.reshape(flat),
               o_ext.reshape(len(self._extra), flat))
        self._reader(lambda ix: read_last_batch(
            ix.readers, self._users, self._cls, self._ev, k, now, self._ttl, n, lengths, out))
        return lengths, self._columns(o_items, o_acts, o_tss, o_ext)

    def _read_now(self) -> float:
        return float(self._clock()) if self._ttl else 0.0

    def _lengths(self, k: np.ndarray, now: float, out: np.ndarray) -> None:
        self._reader(lambda ix: lengths_batch(
            ix.readers, self._users, self._cls, self._ev, k, now, self._ttl, out, self._no_out))

    def _read_ragged(self, k: np.ndarray, now: float) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
        """One sizing and one copy; ``None`` if the writer changed a length in between."""
        lens = np.empty(k.shape[0], dtype=np.int64)
        self._lengths(k, now, lens)
        offsets = np.zeros(k.shape[0] + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        total = int(offsets[-1])
        o_items = np.empty(total, dtype=np.uint64)
        o_acts = np.empty(total, dtype=self._adt)
        o_tss = np.empty(total, dtype=np.int64)
        o_ext = np.empty((len(self._extra), total), dtype=np.float32)
        mismatched = np.zeros(1, dtype=np.int64)
        out = (o_items, o_acts, o_tss, o_ext)

        def run(ix: _Index) -> int:
            mismatched[0] = 0
            return read_ragged(ix.readers, self._users, self._cls, self._ev, k, now, self._ttl,
                               offsets, out, mismatched)

        self._reader(run)
        if mismatched[0]:
            return None
        return offsets, self._columns(o_items, o_acts, o_tss, o_ext)

    def _columns(self, items: np.ndarray, acts: np.ndarray, tss: np.ndarray,
                 ext: np.ndarray) -> dict[str, np.ndarray]:
        cols = {"item": items, "action": acts, "timestamp": tss}
        for e, name in enumerate(self._extra):
            cols[name] = ext[e]
        return cols

    def _reader(self, call: Callable[[_Index], int]) -> None:
        """Run a reader kernel on the current index, again on STALE, with patience on BUSY."""
        retry_reader(lambda: int(call(self._index)), Status.BUSY)

    # -- writes: serialised by the writer lock ------------------------------------------------

    def append(self, users: Any, items: Any, actions: Any, timestamps: Any,
               extras: Mapping[str, Any] | None = None) -> None:
        """Append one event per position, in batch order, to each user's sequence.

        Args:
            users: (N,) user ids; a user may appear many times, its events are
                appended in the order given.
            items: (N,) item ids (uint64).
            actions: (N,) action types (non-negative integers that fit ``action_dtype``).
            timestamps: (N,) int64 timestamps (any unit; stored, not interpreted).
            extras: ``{name: (N,) real numbers}`` for exactly the declared extra
                fields (stored as float32); may be omitted when none are declared.

        Raises:
            TypeError, ValueError: an argument of the wrong type, shape or range.
            TableFull: the user rows or a size class ran out of reserved space;
                events before ``position`` were appended.
        """
        k = as_keys(users, "users")
        n = k.shape[0]
        it = as_keys(items, "items")
        if it.shape[0] != n:
            raise ValueError(f"items: expected {n} values (one per event, as users), got {it.shape[0]}")
        ac = _as_ints(actions, "actions", self._adt, n)
        ts = _as_ints(timestamps, "timestamps", np.dtype(np.int64), n)
        ex = self._check_extras(extras, n)
        if n == 0:
            return
        with self._lock:
            now = float(self._clock())
            pos = 0
            while True:
                ix = self._index
                status, pos = append_batch(ix.writer, self._users, self._free, self._cnt, self._cls,
                                           self._owner, self._ev, k, (it, ac, ts, ex), pos, now,
                                           self._ttl, self._nodes)
                if status == Status.OK:
                    break
                if status == Status.INDEX_FULL:
                    if self.load_factor < _MIN_LOAD_FACTOR:  # crafted ids: never double for them
                        raise IndexGrowthRefused(table="sequence store", load_factor=self.load_factor,
                                                 buckets=ix.buckets, limit="floor", floor=_MIN_LOAD_FACTOR,
                                                 position=int(pos))
                    self._rebuild(ix.buckets * 2)
                    continue
                raise self._full(Status(status), int(pos))
            if self._ttl:
                self._sweep(max(_SWEEP_MIN_ROWS, _SWEEP_ROWS_PER_EVENT * n), now)

    def erase(self, users: Any) -> np.ndarray:
        """Remove users and their events.

        Returns: (B,) bool, True where the user held an unexpired sequence (a
        user repeated in the batch is found once).
        """
        k = as_keys(users, "users")
        found = np.empty(k.shape[0], dtype=np.bool_)
        if k.shape[0] == 0:
            return found
        with self._lock:
            ix = self._index
            erase_batch(ix.writer, self._users, self._free, self._cnt, self._cls, self._owner,
                        self._ev, k, float(self._clock()) if self._ttl else 0.0, self._ttl, found)
        return found

    def expire(self) -> int:
        """Reclaim every expired user now (the append-driven sweep does it gradually).

        Returns: the users reclaimed (0 without a TTL).
        """
        if not self._ttl:
            return 0
        with self._lock:
            return self._sweep(int(self._cnt[CNT_HIGH]), float(self._clock()))

    def _sweep(self, rows: int, now: float) -> int:
        """Writer only. Advance the expiry sweep over ``rows`` user rows."""
        ix = self._index
        return int(sweep(ix.writer, self._users, self._free, self._cnt, self._cls, self._owner,
                         self._ev, rows, now, self._ttl))

    def _rebuild(self, buckets: int) -> None:
        """Writer only. Build a larger index from the user rows, then swap it in."""
        while True:
            new = _Index(buckets, self._huge, self._hash_key)
            high = int(self._cnt[CNT_HIGH])
            if rebuild_from(new.idx64, new.idx32, new.idx8, self._users64[:high, 0],
                            self._users32[:high, U_LC] >= 0, self._nodes, *self._hash_key):
                break
            buckets *= 2
        old, self._index = self._index, new
        old.retired[0] = 1

    def _full(self, status: Status, pos: int) -> TableFull:
        exc = TableFull(rows=int(self._cnt[CNT_LIVE]), max_rows=self._max_users,
                        load_factor=self.load_factor, position=pos)
        if status == Status.CLASS_FULL:
            exc.add_note("a size class of the sequence store used up its reserved events "
                         f"({int(self._cls[0, C_MAXSLOTS] * self._cls[0, C_CAP]):,} per class)")
        else:
            exc.add_note(f"the sequence store's user rows are used up (max_users={self._max_users:,})")
        return exc

    # -- persistence ---------------------------------------------------------------------------

    def snapshot(self, root: str | os.PathLike[str], *, wait: bool = True) -> Path | SnapshotJob:
        """Write the store as a new generation of the snapshot directory ``root``.

        Atomic and checksummed (``_files.write_snapshot``): a crash leaves the
        previous generation current. As tables do, the store forks under its
        writer lock (milliseconds) and the child writes its copy-on-write image,
        so appends and reads go on meanwhile. What is written: the user rows, the
        free list, the index as it is (no rehash on open), and each size class's
        slots in use, per field.

        Returns: ``root``, or with ``wait=False`` a ``SnapshotJob`` to ``wait()`` on.
        Raises: SnapshotError if it cannot be written.
        """
        with self._lock:
            ix = self._index
            high, nfree = int(self._cnt[CNT_HIGH]), int(self._cnt[CNT_FREE])
            arrays: dict[str, np.ndarray] = {
                "counters": self._cnt, "classes": self._cls, "index": ix.idx64,
                "users": self._users64[:high], "free": self._free[:nfree],
            }
            for c, (cap, base, _, obase, used) in enumerate(self._cls.tolist()):
                if used:
                    lo, hi = base, base + used * cap
                    arrays[f"c{c}_owner"] = self._owner[obase:obase + used]
                    arrays[f"c{c}_item"] = self._items[lo:hi]
                    arrays[f"c{c}_action"] = self._acts[lo:hi]
                    arrays[f"c{c}_timestamp"] = self._tss[lo:hi]
                    for e in range(len(self._extra)):
                        arrays[f"c{c}_x{e}"] = self._ext[e, lo:hi]
            meta = {
                "format": _SNAPSHOT_FORMAT, "max_len": self._max_len, "extra_fields": list(self._extra),
                "action_dtype": self._adt.name, "ttl_s": self.ttl_s, "max_users": self._max_users,
                "buckets": ix.buckets,
                "hash_key": f"{int(self._hash_key[0]):016x}{int(self._hash_key[1]):016x}",
            }
            # The views above are taken under the lock; the forked child writes
            # the memory they show as it was at the fork.
            job = run_snapshot(root, lambda: arrays, meta, fork=True)
        if isinstance(job, Path) or not wait:
            return job
        return job.wait()

    @classmethod
    def open(cls, root: str | os.PathLike[str], *, clock: Callable[[], float] | None = None,
             huge_pages: bool = True) -> SequenceStore:
        """A store loaded from the current snapshot in ``root`` (see ``snapshot``).

        Every chunk's checksum is verified, each array is read once straight into
        the new store's memory, and the index is used as written (no rehash).
        The store's structure is then checked (counts, rows, slots, index entries)
        before it serves, so a file that passes its checksums but does not hold
        a consistent store is refused too.

        Args:
            root: the snapshot directory.
            clock: as for the constructor (TTL stamps are kept as written).
            huge_pages: as for the constructor.

        Raises:
            SnapshotError: no snapshot, or it cannot be read.
            CorruptFile: a file is damaged, or the snapshot is not a consistent store.
        """
        info = snapshot_info(root)
        meta = info.meta
        where = str(info.path / "MANIFEST.json")
        if meta.get("format") != _SNAPSHOT_FORMAT:
            problem = f"not a sequence store snapshot (format {meta.get('format')!r})"
            raise CorruptFile(path=where, problem=problem)
        try:
            store = cls(max_len=meta["max_len"], extra_fields=meta["extra_fields"], capacity_users=0,
                        ttl_s=meta["ttl_s"], clock=clock, action_dtype=meta["action_dtype"],
                        huge_pages=huge_pages, max_users=meta["max_users"])
            _check_int("buckets", meta["buckets"], 2, 1 << 40)
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFile(path=where, problem=f"bad store parameters: {exc!r}") from exc
        if meta["buckets"] & (meta["buckets"] - 1):
            raise CorruptFile(path=where, problem=f"bucket count {meta['buckets']} is not a power of two")
        text = meta.get("hash_key")
        try:
            if not (isinstance(text, str) and len(text) == 32):
                raise ValueError(text)
            store._hash_key = np.array([int(text[:16], 16), int(text[16:], 16)], dtype=np.uint64)
        except ValueError:
            raise CorruptFile(path=where, problem=f"index hash key missing or malformed: {text!r}") from None
        store._index = _Index(meta["buckets"], huge_pages, store._hash_key)

        def allocate(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
            view = store._destination(name, shape)
            if view is None or view.dtype != dtype:
                raise CorruptFile(path=str(info.path / f"{name}.arr"),
                                  problem=f"unexpected array {name!r} {dtype.str} {shape} for this store")
            return view

        got, arrays = read_snapshot(root, allocate=allocate)
        if got != meta:
            raise SnapshotError("the snapshot changed while it was opened; open it again", path=str(root))
        problem = store._adopt(arrays)
        if problem:
            raise CorruptFile(path=str(info.path), problem=f"inconsistent store: {problem}")
        return store

    def _destination(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """Where array ``name`` of a snapshot is read to: a view of this store's memory, or None."""
        if name in ("counters", "classes"):
            return np.empty(shape, dtype=np.int64)
        if name == "index":
            return self._index.idx64 if shape == self._index.idx64.shape else None
        if name in ("users", "free"):
            if len(shape) != (2 if name == "users" else 1) or shape[0] > self._max_users:
                return None
            return self._users64[: shape[0]] if name == "users" else self._free[: shape[0]]
        head, _, field = name.partition("_")
        if len(shape) != 1 or not head[1:].isdigit() or int(head[1:]) >= self._cls.shape[0]:
            return None
        cap, base, maxslots, obase, _ = self._cls[int(head[1:])].tolist()
        n = shape[0]
        if field == "owner":
            return self._owner[obase:obase + n] if n <= maxslots else None
        if n % cap or n // cap > maxslots:
            return None
        if field in ("item", "action", "timestamp"):
            return {"item": self._items, "action": self._acts, "timestamp": self._tss}[field][base:base + n]
        e = int(field[1:]) if field[:1] == "x" and field[1:].isdigit() else -1
        return self._ext[e, base:base + n] if 0 <= e < len(self._extra) else None

    def _adopt(self, arrays: dict[str, np.ndarray]) -> str:
        """Take over a snapshot's counters and check the structure read; returns a problem or ''."""
        cnt, cls = arrays["counters"], arrays["classes"]
        if cnt.shape != self._cnt.shape or cls.shape != self._cls.shape:
            return f"counters {cnt.shape}, classes {cls.shape}; expected {self._cnt.shape}, {self._cls.shape}"
        if not (cls[:, C_CAP] == self._cls[:, C_CAP]).all():
            return f"class capacities {cls[:, C_CAP].tolist()} differ from {self.class_capacities}"
        high, nfree, live = (int(x) for x in cnt[[CNT_HIGH, CNT_FREE, CNT_LIVE]])
        used = cls[:, C_NSLOTS]
        fields = ("owner", "item", "action", "timestamp", *(f"x{e}" for e in range(len(self._extra))))
        for k, (cap, n_used) in enumerate(zip(self.class_capacities, used.tolist(), strict=True)):
            for f in fields:
                got = arrays[f"c{k}_{f}"].shape[0] if f"c{k}_{f}" in arrays else 0
                if got != n_used * (1 if f == "owner" else cap):
                    return f"class {k}: {n_used} slots in use, but c{k}_{f} holds {got} values"
        if arrays["users"].shape[0] != high or arrays["free"].shape[0] != nfree or live != high - nfree:
            return f"{high} rows, {nfree} free, {live} live do not match the arrays"
        u32 = self._users32[:high]
        lc = u32[:, U_LC].astype(np.int64)
        ok = lc >= 0
        rows = np.flatnonzero(ok)
        c, n = lc[ok] >> LEN_BITS, lc[ok] & ((1 << LEN_BITS) - 1)
        if rows.size != live or (c >= self._cls.shape[0]).any():
            return "user records disagree with the live count or name no size class"
        caps = self._cls[c, C_CAP]
        slot, head = u32[ok, U_SLOT].astype(np.int64), u32[ok, U_HEAD].astype(np.int64)
        if ((n < 1) | (n > caps) | (head < 0) | (head >= caps) | (slot < 0) | (slot >= used[c])).any():
            return "a user record's length, head or slot is out of range"
        if (u32[:, U_VER] & 1).any() or int(n.sum()) != int(cnt[CNT_EVENTS]):
            return "a record was written mid-change, or the event count differs"
        if not (self._owner[self._cls[c, C_OBASE] + slot] == rows).all():
            return "slot owners do not point back to their users"
        if not (lc[self._free[:nfree].astype(np.int64)] == -1).all():
            return "the free list names a live row"
        idx32 = self._index.idx32
        occupied = self._index.idx8[:, :SLOTS] != 0
        in_index = np.sort(idx32[:, ROW0:ROW0 + SLOTS][occupied].astype(np.int64))
        if (idx32[:, VER] & 1).any() or not np.array_equal(in_index, rows):
            return "the index does not hold exactly the live users"
        self._cnt[:] = cnt
        self._cls[:, C_NSLOTS] = used
        return ""

    def _check_extras(self, extras: Mapping[str, Any] | None, n: int) -> np.ndarray:
        """(E, N) float32 from the caller's mapping, in declared order."""
        if extras is None:
            extras = {}
        if not isinstance(extras, Mapping):
            raise TypeError(f"extras: expected a mapping of field name to (N,) values, "
                            f"got {type(extras).__name__}")
        names = set(extras)
        if names != set(self._extra):
            missing = sorted(set(self._extra) - names)
            unknown = sorted(str(x) for x in names - set(self._extra))
            raise ValueError(f"extras: expected exactly the declared fields {list(self._extra)}; "
                             f"missing {missing}, unknown {unknown}")
        out = np.empty((len(self._extra), n), dtype=np.float32)
        for e, name in enumerate(self._extra):
            a = np.asarray(extras[name])
            if a.dtype.kind not in "fiu":
                raise TypeError(f"extras[{name!r}]: expected real numbers, got dtype {a.dtype}")
            if a.shape != (n,):
                raise ValueError(f"extras[{name!r}]: expected shape ({n},) (one per event, as users), "
                                 f"got {a.shape}")
            out[e] = a
        return out


def _class_caps(max_len: int) -> list[int]:
    caps = []
    c = min(_MIN_CAP, max_len)
    while c < max_len:
        caps.append(c)
        c *= 2
    caps.append(max_len)
    return caps


def _buckets_for(n: int) -> int:
    need = max(2, -(-max(n, 1) // int(SLOTS * _RESERVE_LOAD)))
    return 1 << (need - 1).bit_length()


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an int in [{lo}, {hi}], got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}: expected an int in [{lo}, {hi}], got {value}")


def _check_extra_fields(fields: Iterable[str]) -> tuple[str, ...]:
    if isinstance(fields, (str, bytes)):
        raise TypeError(f"extra_fields: expected an iterable of names, got the single string {fields!r}")
    try:
        names = tuple(fields)
    except TypeError:
        raise TypeError(f"extra_fields: expected an iterable of names, got {type(fields).__name__}") from None
    for name in names:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"extra_fields: expected identifiers, got {name!r}")
        if name in BASE_FIELDS:
            raise ValueError(f"extra_fields: {name!r} is a built-in field ({', '.join(BASE_FIELDS)})")
    if len(set(names)) != len(names):
        raise ValueError(f"extra_fields: names repeat in {list(names)}")
    return names


def _as_ints(x: Any, name: str, dtype: np.dtype, n: int) -> np.ndarray:
    """A C-contiguous (n,) vector of ``dtype`` from integers that fit it exactly."""
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of shape ({n},), got shape {a.shape}")
    if a.shape[0] != n:
        raise ValueError(f"{name}: expected {n} values (one per event, as users), got {a.shape[0]}")
    if a.size == 0:
        return np.empty(0, dtype=dtype)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integers that fit {dtype}, got dtype {a.dtype}")
    if a.dtype != dtype:
        info = np.iinfo(dtype)
        lo, hi = int(a.min()), int(a.max())
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise ValueError(f"{name}: expected integers in [{info.min}, {info.max}] ({dtype}), got {bad}")
    return np.ascontiguousarray(a, dtype=dtype)
