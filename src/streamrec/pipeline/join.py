"""The sample join: impressions joined with user actions into labelled samples, its state in store tables.

Owns: ``JoinConfig`` and ``SampleJoin``, the operator that turns micro-batches of impressions and actions
(``IMPRESSION_SCHEMA``, ``ACTION_SCHEMA``) into samples (``SAMPLE_SCHEMA``) under an event-time watermark.
It must not keep join state in Python between micro-batches: pending impressions, closed impressions
(for late corrections) and the duplicate filter are rows in ``EmbeddingTable`` s and user sequences sit
in a ``SequenceStore``, so a snapshot of those stores plus the source offsets is the whole state. The only
Python attribute that changes across calls is ``counts`` (statistics, not state: no output depends on it).

Tables: ``pending`` (impressions in their window, TTL = the window), ``closed`` (impressions past it, for
late actions), ``parked`` (actions ahead of their impression), ``dedup`` (action keys, one column).

Semantics (``tests/pipeline/test_join.py`` checks them against a per-event model on random streams):

- **Window.** Impression i (request r, item it, time t_i) waits for its window ``[t_i, D)``, D = t_i + W.
  It *closes* at C(D), D rounded up to the close tick (``close_tick_ms``), once a call's watermark
  reaches C(D). An action on (r, it) is *on time* iff it is applied while i is pending and t_a < D; its
  code sets that label and its ``value`` adds to ``watch_time``. Labels are multi-task bits (click, like,
  follow, finish, skip, share), so an action repeated within the window sets its label once.
- **Order within a call.** Impressions first, then actions, then the close at the call's watermark: an
  action in the same micro-batch as its impression joins it, and a window that closes at this watermark
  still takes this batch's actions (they arrived before the watermark moved).
- **at_close.** One sample (kind 0) per impression, at its close.
- **eager.** After a call's actions are applied, a pending impression never emitted that now has a
  positive label (any but skip) emits kind 1; one already emitted whose labels or watch time changed
  emits kind 2 (all labels so far). At close an impression emitted eagerly emits nothing more (its last
  sample already holds every on-time label); one never emitted (no action, or only skips) emits kind 0.
- **Late actions** (t_a >= D while pending, or arriving after the close while the closed impression is
  still kept, ``late_horizon_s`` past D): ``late="drop"`` counts them; ``late="correct"`` emits kind 3
  with every label so far: at the close for those met while pending, at once for those after it.
- **Out-of-order arrival.** An action whose impression has not arrived is *parked* in a row of the parked
  table (up to ``_PARK_SLOTS`` actions a pair) until the watermark passes C(t_a + W); an impression that
  arrives meanwhile takes them as if they arrived with it. Parked actions never claimed are counted.
- **Late impressions.** An impression whose window has closed at its call's watermark is dropped, counted.
  Actions older than W + ``late_horizon_s`` at their call's watermark are dropped, counted.
- **Duplicates** apply once. An impression: the pending row of its pair exists (or the pair repeats in the
  batch: the first is kept). An action: its (request, item, action, ts_ms) key is in the dedup table,
  whose rows live until C(t_a + W + late_horizon), past which a copy would be dropped as too old anyway.
- **Sequences.** Every action that is neither a duplicate nor too old is appended at once to its user's
  sequence (item, action, timestamp, extra ``value``), whatever the join makes of it.

Keys and rows: a pair's key is a keyed 64-bit mix of (request_id, item_id) (``hash_seed``); rows are
float64, so ids below 2**53 and millisecond times are exact, and each row carries its own ids, so a key
collision is detected (and counted) instead of mixing two pairs. The tables' clock is the watermark in
ticks: during a call's updates it reads 0 (nothing expires) and for the close it reads the watermark, so
``expire()`` reports, through ``on_evict(keys, rows, "expired")``, exactly the windows that close, in bulk.
Behaviour is thus a function of the events and watermarks only: deterministic and replayable.

Thread safety: one thread calls ``process`` at a time (the tables are single-writer); ``snapshot`` must
not overlap ``process``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from streamrec.errors import ConfigError
from streamrec.pipeline.events import ACTIONS, SAMPLE_SCHEMA
from streamrec.store.sequence import SequenceStore
from streamrec.store.table import EmbeddingTable

__all__ = ["JoinConfig", "SampleJoin"]

# Row layout of a pending (or closed) impression, float64 columns.
_REQ, _USER, _ITEM, _TS, _POS, _CAT, _DEV, _HOUR, _GTC, _GTL, _GTF = range(11)
_LAB = 11  # on-time label bits (bit code-1)
_WATCH = 12  # on-time watch time
_ELAB = 13  # label bits at the last emission; -1: never emitted
_EWATCH = 14  # watch time at the last emission
_LLAB = 15  # label bits of late actions met while pending (late="correct")
_LWATCH = 16
_DIM = 17
# Row layout of a parked pair: its ids, then the actions waiting for its impression.
_NPARK = 2  # actions parked in the slots (after _REQ, _ITEM = columns 0 and 1 here too)
_PARK = 3  # _PARK_SLOTS x (code, ts_ms, value)
_PARK_SLOTS = 4  # an impression later than 4 of its own actions is rare; a 5th is dropped, counted
_PDIM = _PARK + 3 * _PARK_SLOTS
_PITEM = 1
_NO_GT = -1.0  # a null ground truth (NaN would be refused by the table's non-finite check)

_CODES = np.array(sorted(ACTIONS.values()), dtype=np.int64)
_LABEL_NAMES = tuple(sorted(ACTIONS, key=ACTIONS.__getitem__))
_POSITIVE = sum(1 << (c - 1) for n, c in ACTIONS.items() if n != "skip")
_SECOND_MS = 1000

# Emitted pieces: (rows (n, _DIM), label bits (n,), watch time (n,), kind (n,) int8).
_Out = list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
_Tables = tuple[EmbeddingTable, EmbeddingTable, EmbeddingTable, EmbeddingTable]  # pending closed dedup parked
Policy = Literal["at_close", "eager"]
Late = Literal["drop", "correct"]
_COUNTS = ("impressions", "actions", "samples", "duplicate_impressions", "duplicate_actions",
           "late_impressions", "late_actions_dropped", "late_corrections", "too_old_actions",
           "parked_actions", "parked_unmatched", "parked_overflow", "key_collisions")


@dataclass(frozen=True)
class JoinConfig:
    """How the sample join windows, emits and keeps its state.

    Attributes:
        window_s: label window W in seconds, 30 to 1800 (default 300: the seed's "within minutes" of
            delays, long enough for a finish on most short videos).
        policy: ``"at_close"`` (default: one final sample per impression) or ``"eager"`` (positives at
            once, corrections after, negatives at close).
        late: ``"drop"`` (default: count late actions) or ``"correct"`` (emit them as kind 3).
        late_horizon_s: how long after D a closed impression is kept to recognise late actions (default
            600: the generator's longest action delays are minutes).
        close_tick_ms: the tables' clock unit; windows close at D rounded up to it. 10 ms (default) keeps
            the close delay far under the 1 s target and lets a table live 2**31 ticks (248 days) from
            its creation; 1 ms is exact but lives 24 days.
        hash_seed: key of the (request, item) mix (default a fixed odd constant; set a secret for
            untrusted ids, and keep it across restarts: the snapshot's keys depend on it).
        capacity: pending impressions the tables are first sized for (default 65,536; they grow).
        sequence_max_len: events kept per user sequence (default 10,000, the issue's long history).
        huge_pages: back the tables with transparent huge pages (default True).
    """

    window_s: int = 300
    policy: Policy = "at_close"
    late: Late = "drop"
    late_horizon_s: int = 600
    close_tick_ms: int = 10
    hash_seed: int = 0x5851F42D4C957F2D
    capacity: int = 65_536
    sequence_max_len: int = 10_000
    huge_pages: bool = True

    def __post_init__(self) -> None:
        _check_int("join.window_s", self.window_s, 30, 1800)
        if self.policy not in ("at_close", "eager"):
            raise ConfigError(f"must be 'at_close' or 'eager', got {self.policy!r}", field="join.policy")
        if self.late not in ("drop", "correct"):
            raise ConfigError(f"must be 'drop' or 'correct', got {self.late!r}", field="join.late")
        _check_int("join.late_horizon_s", self.late_horizon_s, 1, 86_400)
        _check_int("join.close_tick_ms", self.close_tick_ms, 1, 1000)
        _check_int("join.hash_seed", self.hash_seed, 0, 2**64 - 1)
        _check_int("join.capacity", self.capacity, 1, 2**31)
        _check_int("join.sequence_max_len", self.sequence_max_len, 1, 1 << 20)

    @property
    def window_ms(self) -> int:
        return self.window_s * _SECOND_MS


class _Clock:
    """The tables' clock: watermark ticks, set by the join around each phase of a call."""

    def __init__(self) -> None:
        self.ticks = 0

    def __call__(self) -> float:
        return float(self.ticks)


class SampleJoin:
    """Joins impressions with actions into samples; every bit of join state lives in store tables.

    Shape contract: per call, I impressions and A actions in; S samples out (``SAMPLE_SCHEMA``), S >= 0.

    Args:
        config: a ``JoinConfig``.
        store_dir: a directory written by ``snapshot`` to resume from; ``None`` starts empty.

    Raises:
        ConfigError: ``store_dir`` holds a snapshot of another configuration's tables.

    Thread safety: one thread at a time (module doc).

    Example::

        join = SampleJoin(JoinConfig(window_s=60, policy="eager"))
        samples = join.process(impressions, actions, watermark_ms=1_767_225_605_000)
        join.snapshot("ckpt/join")                  # with the source offsets, a restart point
        join = SampleJoin(JoinConfig(window_s=60, policy="eager"), store_dir="ckpt/join")
    """

    def __init__(self, config: JoinConfig, store_dir: str | os.PathLike[str] | None = None) -> None:
        self.config = config
        self.counts: dict[str, int] = dict.fromkeys(_COUNTS, 0)
        self._clock = _Clock()
        self._closed_now: list[tuple[np.ndarray, np.ndarray]] = []
        self._tables: _Tables | None = None
        self._base = 0  # the tables' tick 0 is tick ``_base`` of the epoch (one before the first watermark)
        self.sequences: SequenceStore
        self._seed = np.uint64(config.hash_seed)
        self._W = config.window_ms
        self._H = config.late_horizon_s * _SECOND_MS
        root = Path(store_dir) if store_dir is not None else None
        if root is not None and (root / "pending").exists():
            self._open(root)
        else:
            if root is not None and (root / "join.json").exists():  # a snapshot taken before any event
                self.counts.update(json.loads((root / "join.json").read_text())["counts"])
            self.sequences = SequenceStore(max_len=config.sequence_max_len, extra_fields=("value",),
                                           huge_pages=config.huge_pages)

    # -- state: the store tables --------------------------------------------------

    def _table(self, path: Path | None, on_evict: Any = None, dim: int = _DIM) -> EmbeddingTable:
        if path is not None:
            t = EmbeddingTable.open(path, clock=self._clock, on_evict=on_evict)
            if t.dim != dim or t.dtype != np.float64:
                raise ConfigError(f"{path} holds rows of ({t.dim}, {t.dtype}), the join ({dim}, float64)",
                                  field="join.store_dir")
            return t
        cfg = self.config
        return EmbeddingTable(dim=dim, dtype="float64", capacity=cfg.capacity, huge_pages=cfg.huge_pages,
                              ttl_s=max(1, self._W // cfg.close_tick_ms), ttl_slice_s=1, clock=self._clock,
                              on_evict=on_evict, initializer=None)

    def _open(self, root: Path) -> None:
        self._tables = (self._table(root / "pending", self._on_close), self._table(root / "closed"),
                        self._table(root / "dedup", dim=1), self._table(root / "parked", self._on_unclaimed,
                                                                        dim=_PDIM))
        self.sequences = SequenceStore.open(root / "sequences")
        meta = json.loads((root / "join.json").read_text())
        self._base = int(meta["base"])
        if meta["close_tick_ms"] != self.config.close_tick_ms or meta["hash_seed"] != self.config.hash_seed:
            raise ConfigError(f"{root} was written with close_tick_ms {meta['close_tick_ms']} and "
                              f"hash_seed {meta['hash_seed']}: a join must resume with the same",
                              field="join.store_dir")
        self.counts.update(meta["counts"])

    def _ensure_tables(self, watermark_ms: int) -> _Tables:
        if self._tables is None:
            # Tick 0 of the tables (their epoch: the clock reads 0 at creation) is one tick before the
            # first watermark, so every row's expiry, past that watermark, is >= 1 and 0 still means never.
            self._base = watermark_ms // self.config.close_tick_ms - 1
            self._clock.ticks = 0
            self._tables = (self._table(None, self._on_close), self._table(None), self._table(None, dim=1),
                            self._table(None, self._on_unclaimed, dim=_PDIM))
        return self._tables

    def snapshot(self, root: str | os.PathLike[str]) -> None:
        """Write every table and the sequences under ``root`` (subdirectories), plus ``counts``.

        REQUIRES: no ``process`` call in progress. Each part is written atomically by the store; the
        caller makes the whole checkpoint atomic (``EmbeddedRunner`` writes a new directory, then
        switches a pointer to it).
        """
        r = Path(root)
        r.mkdir(parents=True, exist_ok=True)
        if self._tables is not None:  # else nothing seen yet: the state is "empty"
            for name, t in zip(("pending", "closed", "dedup", "parked"), self._tables, strict=True):
                t.snapshot(r / name)
            self.sequences.snapshot(r / "sequences")
        meta = {"base": self._base, "close_tick_ms": self.config.close_tick_ms,
                "hash_seed": self.config.hash_seed, "counts": self.counts}
        (r / "join.json").write_text(json.dumps(meta))

    @property
    def pending(self) -> int:
        """Impressions waiting for their window to close."""
        return len(self._tables[0]) if self._tables is not None else 0

    def pending_bytes(self) -> int:
        """Bytes held by the pending table (index and rows)."""
        return self._tables[0].memory_bytes if self._tables is not None else 0

    def memory_bytes(self) -> int:
        """Bytes held by the join's tables (not the sequences)."""
        return sum(t.memory_bytes for t in self._tables) if self._tables is not None else 0

    def _on_close(self, keys: np.ndarray, rows: np.ndarray, reason: str) -> None:
        if reason == "expired":
            self._closed_now.append((keys, rows))

    def _on_unclaimed(self, keys: np.ndarray, rows: np.ndarray, reason: str) -> None:
        if reason == "expired":
            self.counts["parked_unmatched"] += int(rows[:, _NPARK].sum())

    # -- keys ---------------------------------------------------------------------

    def _pair_keys(self, req: np.ndarray, item: np.ndarray) -> np.ndarray:
        return _mix(_mix(req.astype(np.uint64) ^ self._seed) ^ item.astype(np.uint64))

    def _dedup_keys(self, pair: np.ndarray, code: np.ndarray, ts: np.ndarray) -> np.ndarray:
        return _mix(pair ^ _mix(ts.astype(np.uint64) * np.uint64(8) + code.astype(np.uint64)))

    def _ticks(self, ms: np.ndarray) -> np.ndarray:
        """Expiry, in ticks since the tables' epoch, of rows that must be gone at time ``ms`` (>= 1)."""
        return np.maximum(-(-ms // self.config.close_tick_ms) - self._base, 1)

    def close_ms(self, ms: np.ndarray | int) -> np.ndarray:
        """When a deadline ``ms`` is reached by the join: rounded up to the close tick."""
        tick = self.config.close_tick_ms
        return -(-np.asarray(ms, dtype=np.int64) // tick) * tick

    # -- the micro-batch ------------------------------------------------------------

    def process(self, impressions: pa.RecordBatch | None, actions: pa.RecordBatch | None,
                watermark_ms: int) -> pa.RecordBatch:
        """Join one micro-batch; return the samples it emits (``SAMPLE_SCHEMA``).

        Args:
            impressions: rows of ``IMPRESSION_SCHEMA`` (validated: ids in [0, 2**53)), or None.
            actions: rows of ``ACTION_SCHEMA`` (validated: codes of ``ACTIONS``), or None.
            watermark_ms: event time up to which the sources are complete; windows with C(D) <= it
                close in this call. REQUIRES: not below the previous call's.

        Returns:
            The samples: eager samples and corrections first, then the closes, then late corrections
            of closed impressions; ``emit_ts_ms`` is ``watermark_ms``.
        """
        wm = int(watermark_ms)
        pending, closed, dedup, parked = self._ensure_tables(wm)
        out: _Out = []
        self._clock.ticks = 0  # updates: nothing expires
        replay = self._impressions(impressions, wm, pending, parked) if impressions is not None else None
        acts = self._new_actions(actions, wm, dedup) if actions is not None else None
        if replay is not None or acts is not None:
            self._actions(_concat_actions(replay, acts), pending, closed, parked, out)
        self._close(wm, out)
        batch = self._samples(out, wm)
        self.counts["samples"] += batch.num_rows
        return batch

    def _impressions(self, imps: pa.RecordBatch, wm: int, pending: EmbeddingTable, parked_t: EmbeddingTable
                     ) -> tuple[np.ndarray, ...] | None:
        """Insert new impressions; return the actions parked for them (to apply as if new)."""
        n = imps.num_rows
        self.counts["impressions"] += n
        if n == 0:
            return None
        col = {name: imps.column(name).to_numpy(zero_copy_only=False) for name in imps.schema.names}
        ts = col["ts_ms"].astype(np.int64)
        on_time = self.close_ms(ts + self._W) > wm
        keys = self._pair_keys(col["request_id"], col["item_id"])
        _, first = np.unique(keys, return_index=True)
        keep = np.zeros(n, dtype=bool)
        keep[first] = True
        self.counts["duplicate_impressions"] += n - first.size
        self.counts["late_impressions"] += int(np.count_nonzero(keep & ~on_time))
        keep &= on_time
        idx = np.flatnonzero(keep)
        keys = keys[idx]
        present = pending.contains(keys)
        self.counts["duplicate_impressions"] += int(np.count_nonzero(present))
        idx, keys = idx[~present], keys[~present]
        if idx.size == 0:
            return None
        have, parked = parked_t.find(keys)
        clash = parked & ((have[:, _REQ] != col["request_id"][idx])
                          | (have[:, _PITEM] != col["item_id"][idx]))
        if clash.any():
            self.counts["key_collisions"] += int(np.count_nonzero(clash))
            keep = ~clash
            idx, keys, have, parked = idx[keep], keys[keep], have[keep], parked[keep]
        rows = np.zeros((idx.size, _DIM))
        for c, name in ((_REQ, "request_id"), (_USER, "user_id"), (_ITEM, "item_id"), (_TS, "ts_ms"),
                        (_POS, "position"), (_CAT, "category"), (_DEV, "device"), (_HOUR, "hour")):
            rows[:, c] = col[name][idx]
        for c, name in ((_GTC, "gt_click"), (_GTL, "gt_like"), (_GTF, "gt_finish")):
            g = col[name][idx].astype(np.float64)
            rows[:, c] = np.where(np.isfinite(g), g, _NO_GT)
        rows[:, _ELAB] = -1
        pending.insert_or_assign(keys, rows, ttl_s=self._ticks(ts[idx] + self._W))
        if not parked.any():
            return None
        parked_t.erase(keys[parked])  # claimed
        # The parked actions of the claimed rows, as a flat action list (apply order: slot order).
        p = have[parked]
        n_p = p[:, _NPARK].astype(np.int64)
        slot = np.arange(_PARK_SLOTS)
        use = slot[None, :] < n_p[:, None]
        which = np.repeat(np.arange(p.shape[0]), n_p)
        code = p[:, _PARK::3][use].astype(np.int64)
        t = p[:, _PARK + 1::3][use].astype(np.int64)
        v = p[:, _PARK + 2::3][use]
        r = rows[parked][which]
        return (keys[parked][which], code, t, v, r[:, _USER].astype(np.int64),
                r[:, _REQ].astype(np.int64), r[:, _ITEM].astype(np.int64))

    def _new_actions(self, acts: pa.RecordBatch, wm: int, dedup: EmbeddingTable
                     ) -> tuple[np.ndarray, ...] | None:
        """Drop too-old and duplicate actions, append the rest to sequences; return them keyed."""
        n = acts.num_rows
        self.counts["actions"] += n
        if n == 0:
            return None
        req = acts.column("request_id").to_numpy()
        user = acts.column("user_id").to_numpy()
        item = acts.column("item_id").to_numpy()
        ts = acts.column("ts_ms").to_numpy().astype(np.int64)
        code = acts.column("action").to_numpy().astype(np.int64)
        val = acts.column("value").to_numpy().astype(np.float64)
        gone = ts + self._W + self._H
        young = self.close_ms(gone) > wm
        self.counts["too_old_actions"] += int(n - np.count_nonzero(young))
        pair = self._pair_keys(req, item)
        dk = self._dedup_keys(pair, code, ts)
        _, first = np.unique(dk, return_index=True)
        keep = np.zeros(n, dtype=bool)
        keep[first] = True
        keep &= young
        idx = np.flatnonzero(keep)
        seen = dedup.contains(dk[idx])
        idx = idx[~seen]
        self.counts["duplicate_actions"] += int(np.count_nonzero(young)) - idx.size
        if idx.size == 0:
            return None
        dedup.insert_or_assign(dk[idx], np.zeros((idx.size, 1)), ttl_s=self._ticks(gone[idx]))
        self.sequences.append(user[idx], item[idx], code[idx], ts[idx], extras={"value": val[idx]})
        return pair[idx], code[idx], ts[idx], val[idx], user[idx], req[idx], item[idx]

    def _actions(self, a: tuple[np.ndarray, ...], pending: EmbeddingTable, closed: EmbeddingTable,
                 parked: EmbeddingTable, out: _Out) -> None:
        """Apply actions to pending rows (labels, late bits, eager samples), to closed rows, or park them."""
        pair, code, ts, val, req, item = a[0], a[1], a[2], a[3], a[5], a[6]
        ukeys, inv = np.unique(pair, return_inverse=True)
        rows, found = pending.find(ukeys)
        bit = (1 << (code - 1)).astype(np.int64)
        # A key whose row belongs to another pair (a 64-bit collision) drops the action, counted.
        bad = found[inv] & ((rows[inv, _REQ] != req) | (rows[inv, _ITEM] != item))
        if bad.any():
            self.counts["key_collisions"] += int(np.count_nonzero(bad))
        ok = ~bad
        on_imp = found[inv] & ok
        deadline = rows[inv, _TS] + self._W
        timely = on_imp & (ts < deadline)
        late_p = on_imp & ~timely
        touched = np.zeros(ukeys.size, dtype=bool)
        if timely.any():
            u = inv[timely]
            lab = rows[:, _LAB].astype(np.int64)
            np.bitwise_or.at(lab, u, bit[timely])
            rows[:, _LAB] = lab
            np.add.at(rows[:, _WATCH], u, val[timely])
            touched[u] = True
        if late_p.any():
            u = inv[late_p]
            if self.config.late == "correct":
                lab = rows[:, _LLAB].astype(np.int64)
                np.bitwise_or.at(lab, u, bit[late_p])
                rows[:, _LLAB] = lab
                np.add.at(rows[:, _LWATCH], u, val[late_p])
                touched[u] = True
                self.counts["late_corrections"] += int(np.count_nonzero(late_p))
            else:
                self.counts["late_actions_dropped"] += int(np.count_nonzero(late_p))
        if self.config.policy == "eager" and touched.any():
            self._eager(rows, touched, out)
        if touched.any():
            t = np.flatnonzero(touched)
            pending.assign(ukeys[t], rows[t], ttl_s=self._ticks(rows[t, _TS].astype(np.int64) + self._W))
        rest = ~on_imp & ok
        if rest.any():
            self._closed_or_park(pair[rest], code[rest], ts[rest], val[rest], req[rest], item[rest],
                                 parked, closed, out)

    def _eager(self, rows: np.ndarray, touched: np.ndarray, out: _Out) -> None:
        """Kind 1 (a first positive) and kind 2 (labels changed since the last emission) of touched rows."""
        lab = rows[:, _LAB].astype(np.int64)
        never = rows[:, _ELAB] < 0
        first = touched & never & ((lab & _POSITIVE) != 0)
        again = touched & ~never & ((rows[:, _ELAB] != rows[:, _LAB]) | (rows[:, _EWATCH] != rows[:, _WATCH]))
        for sel, kind in ((first, 1), (again, 2)):
            if sel.any():
                r = rows[sel]
                out.append((r, r[:, _LAB].astype(np.int64), r[:, _WATCH], _kinds(r, kind)))
        emitted = first | again
        rows[emitted, _ELAB] = rows[emitted, _LAB]
        rows[emitted, _EWATCH] = rows[emitted, _WATCH]

    def _closed_or_park(self, pair: np.ndarray, code: np.ndarray, ts: np.ndarray, val: np.ndarray,
                        req: np.ndarray, item: np.ndarray, parked: EmbeddingTable, closed: EmbeddingTable,
                        out: _Out) -> None:
        """Actions with no pending impression: a late correction of a closed one, or parked."""
        bit = (1 << (code - 1)).astype(np.int64)
        ck, cinv = np.unique(pair, return_inverse=True)
        crow, cfound = closed.find(ck)
        drop = cfound[cinv] & ((crow[cinv, _REQ] != req) | (crow[cinv, _ITEM] != item))  # a collision
        if drop.any():
            self.counts["key_collisions"] += int(np.count_nonzero(drop))
        is_closed = cfound[cinv] & ~drop
        if is_closed.any():
            n = int(np.count_nonzero(is_closed))
            if self.config.late == "drop":
                self.counts["late_actions_dropped"] += n
            else:
                self.counts["late_corrections"] += n
                u = cinv[is_closed]
                lab = crow[:, _LAB].astype(np.int64)
                before, w_before = lab.copy(), crow[:, _WATCH].copy()
                np.bitwise_or.at(lab, u, bit[is_closed])
                crow[:, _LAB] = lab
                np.add.at(crow[:, _WATCH], u, val[is_closed])
                changed = cfound & ((lab != before) | (crow[:, _WATCH] != w_before))
                if changed.any():
                    r = crow[changed]
                    out.append((r, r[:, _LAB].astype(np.int64), r[:, _WATCH], _kinds(r, 3)))
                    t = np.flatnonzero(changed)
                    closed.assign(ck[t], crow[t],
                                  ttl_s=self._ticks(crow[t, _TS].astype(np.int64) + self._W + self._H))
        park = ~is_closed & ~drop
        if park.any():
            self._park(pair[park], code[park], ts[park], val[park], req[park], item[park], parked)

    def _park(self, pair: np.ndarray, code: np.ndarray, ts: np.ndarray, val: np.ndarray, req: np.ndarray,
              item: np.ndarray, parked: EmbeddingTable) -> None:
        """Keep actions that came before their impression in the pair's row, in arrival order."""
        o = np.argsort(pair, kind="stable")
        pair, code, ts, val, req, item = pair[o], code[o], ts[o], val[o], req[o], item[o]
        ukeys, first, inv = np.unique(pair, return_index=True, return_inverse=True)
        rows, found = parked.find(ukeys)
        bad = found & ((rows[:, _REQ] != req[first]) | (rows[:, _PITEM] != item[first]))
        if bad.any():  # another pair's row under this key: these actions go, counted
            self.counts["key_collisions"] += int(np.count_nonzero(bad[inv]))
            keep = ~bad[inv]
            if not keep.any():
                return
            self._park(pair[keep], code[keep], ts[keep], val[keep], req[keep], item[keep], parked)
            return
        rows[~found] = 0
        rows[~found, _REQ] = req[first[~found]]
        rows[~found, _PITEM] = item[first[~found]]
        rank = np.arange(pair.size) - first[inv]
        slot = rows[inv, _NPARK].astype(np.int64) + rank
        fits = slot < _PARK_SLOTS
        self.counts["parked_actions"] += int(np.count_nonzero(fits))
        self.counts["parked_overflow"] += int(pair.size - np.count_nonzero(fits))
        u, s = inv[fits], slot[fits]
        rows[u, _PARK + 3 * s] = code[fits]
        rows[u, _PARK + 3 * s + 1] = ts[fits]
        rows[u, _PARK + 3 * s + 2] = val[fits]
        rows[:, _NPARK] = np.minimum(rows[:, _NPARK] + np.bincount(inv, minlength=ukeys.size), _PARK_SLOTS)
        # A parked row lives until no impression that could claim it can still arrive (module doc).
        last = np.maximum.reduceat(np.where(fits, ts, 0), first)  # an overflowed action extends nothing
        prev = np.where(found, rows[:, _PARK + 1::3].max(axis=1), 0)
        until = np.maximum(last, prev.astype(np.int64)) + self._W
        parked.insert_or_assign(ukeys, rows, ttl_s=self._ticks(until))

    def _close(self, wm: int, out: _Out) -> None:
        """Advance the tables' clock to the watermark; emit the windows ``on_evict`` reports closed."""
        assert self._tables is not None
        closed = self._tables[1]
        self._clock.ticks = max(wm // self.config.close_tick_ms - self._base, 0)
        self._closed_now.clear()
        for t in self._tables:
            t.expire()
        self._clock.ticks = 0
        if not self._closed_now:
            return
        keys = np.concatenate([k for k, _ in self._closed_now])
        rows = np.concatenate([r for _, r in self._closed_now])
        self._closed_now.clear()
        final = rows[:, _ELAB] < 0
        if final.any():
            r = rows[final]
            out.append((r, r[:, _LAB].astype(np.int64), r[:, _WATCH], _kinds(r, 0)))
        llab = rows[:, _LLAB].astype(np.int64)
        lab = rows[:, _LAB].astype(np.int64) | llab
        watch = rows[:, _WATCH] + rows[:, _LWATCH]
        late = (llab != 0) | (rows[:, _LWATCH] != 0)
        if late.any():
            out.append((rows[late], lab[late], watch[late], _kinds(late[late], 3)))
        rows[:, _LAB] = lab
        rows[:, _WATCH] = watch
        until = rows[:, _TS].astype(np.int64) + self._W + self._H
        keep = self.close_ms(until) > wm
        if keep.any():
            closed.insert_or_assign(keys[keep], rows[keep], ttl_s=self._ticks(until[keep]))

    def _samples(self, out: _Out, wm: int) -> pa.RecordBatch:
        if out:
            rows = np.concatenate([o[0] for o in out])
            lab = np.concatenate([o[1] for o in out])
            watch = np.concatenate([o[2] for o in out])
            kind = np.concatenate([o[3] for o in out])
        else:
            rows, lab, watch = np.zeros((0, _DIM)), np.zeros(0, np.int64), np.zeros(0)
            kind = np.zeros(0, np.int8)
        cols: list[pa.Array] = []
        for c, t in ((_REQ, np.int64), (_USER, np.int64), (_ITEM, np.int64), (_TS, np.int64),
                     (_POS, np.int32), (_CAT, np.int32), (_DEV, np.int32), (_HOUR, np.int8)):
            cols.append(pa.array(rows[:, c].astype(t)))
        cols.extend(pa.array(((lab >> (code - 1)) & 1).astype(np.int8)) for code in _CODES)
        cols.append(pa.array(watch.astype(np.float32)))
        cols.append(pa.array(kind))
        cols.append(pa.array(np.full(kind.size, wm, dtype=np.int64)))
        for c in (_GTC, _GTL, _GTF):
            g = rows[:, c]
            cols.append(pa.array(g.astype(np.float32), mask=g < 0))
        return pa.RecordBatch.from_arrays(cols, schema=SAMPLE_SCHEMA)


def _concat_actions(a: tuple[np.ndarray, ...] | None, b: tuple[np.ndarray, ...] | None
                    ) -> tuple[np.ndarray, ...]:
    """Parked actions replayed first, then the new ones: (pair, code, ts, value, user, request, item)."""
    if a is None or b is None:
        got = a if a is not None else b
        assert got is not None
        return got
    return tuple(np.concatenate([x, y]) for x, y in zip(a, b, strict=True))


def _kinds(rows: np.ndarray, kind: int) -> np.ndarray:
    return np.full(rows.shape[0], kind, dtype=np.int8)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise (uint64 arithmetic wraps, as intended)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _check_int(name: str, v: Any, lo: int, hi: int) -> None:
    if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
        raise ConfigError(f"must be an int in [{lo}, {hi}], got {v!r}", field=name)
