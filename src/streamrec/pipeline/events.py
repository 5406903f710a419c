"""The event schemas of the pipeline and the validation that splits a batch into good rows and dead letters.

Owns: ``IMPRESSION_SCHEMA``, ``ACTION_SCHEMA``, ``SAMPLE_SCHEMA`` and ``ACTIONS`` (every other pipeline and
model module imports these names from here); ``validate``, which splits a record batch into good rows and
dead letters with a reason per row (vectorised over columns, never a loop per row); ``EventReader``, a
``Source`` of validated events; and ``read_events``, the one call that turns a path, a ``Source`` or an
iterator into validated batches in event-time order. Raw sources live in ``sources.py``, the dead-letter
sink in ``deadletter.py`` (both re-exported here). It must not import ``model``; it does not know about the
join or features.

Thread safety: the constants are immutable; ``validate`` holds no state; an ``EventReader`` belongs to one
thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamrec.errors import ConfigError
from streamrec.pipeline.deadletter import DeadLetters, Reason
from streamrec.pipeline.sources import FileSource, IteratorSource, Offset, Source

__all__ = [
    "ACTIONS",
    "ACTION_SCHEMA",
    "IMPRESSION_SCHEMA",
    "MAX_ID",
    "SAMPLE_SCHEMA",
    "DeadLetters",
    "EventReader",
    "Offset",
    "Source",
    "Split",
    "ValidationConfig",
    "open_source",
    "read_events",
    "schema_of",
    "validate",
]

# Ids must survive a round trip through a float64 (JSON readers, pandas) unchanged: 2**53.
MAX_ID = 2**53

# Action codes; 0 is reserved as "no action" and is never valid in an event.
ACTIONS: dict[str, int] = {"click": 1, "like": 2, "follow": 3, "finish": 4, "skip": 5, "share": 6}

IMPRESSION_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts_ms", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("category", pa.int32(), nullable=False),
        pa.field("device", pa.int32(), nullable=False),
        pa.field("hour", pa.int8(), nullable=False),
        # Ground truth from the generator: passed through for the best achievable AUC, never a feature.
        pa.field("gt_click", pa.float32(), nullable=True),
        pa.field("gt_like", pa.float32(), nullable=True),
        pa.field("gt_finish", pa.float32(), nullable=True),
    ]
)

ACTION_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts_ms", pa.int64(), nullable=False),
        pa.field("action", pa.int8(), nullable=False),
        pa.field("value", pa.float32(), nullable=False),  # watch time in seconds for finish; 0 otherwise
    ]
)

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts_ms", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("category", pa.int32(), nullable=False),
        pa.field("device", pa.int32(), nullable=False),
        pa.field("hour", pa.int8(), nullable=False),
        pa.field("click", pa.int8(), nullable=False),
        pa.field("like", pa.int8(), nullable=False),
        pa.field("follow", pa.int8(), nullable=False),
        pa.field("finish", pa.int8(), nullable=False),
        pa.field("skip", pa.int8(), nullable=False),
        pa.field("share", pa.int8(), nullable=False),
        pa.field("watch_time", pa.float32(), nullable=False),
        # 0 final at window close, 1 eager positive, 2 correction, 3 late correction (after close).
        pa.field("kind", pa.int8(), nullable=False),
        pa.field("emit_ts_ms", pa.int64(), nullable=False),
        pa.field("gt_click", pa.float32(), nullable=True),
        pa.field("gt_like", pa.float32(), nullable=True),
        pa.field("gt_finish", pa.float32(), nullable=True),
    ]
)

_SCHEMAS = {"impressions": IMPRESSION_SCHEMA, "actions": ACTION_SCHEMA}
_ID_FIELDS = ("request_id", "user_id", "item_id")
_INT_RE = r"^[+-]?\d{1,18}$"
_FLOAT_RE = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,3})?$"
_ACTION_CODES = np.array(sorted(ACTIONS.values()), np.int64)


def schema_of(kind: str) -> pa.Schema:
    """IMPRESSION_SCHEMA for "impressions", ACTION_SCHEMA for "actions"."""
    try:
        return _SCHEMAS[kind]
    except KeyError:
        raise ValueError(f"kind must be 'impressions' or 'actions', got {kind!r}") from None


@dataclass(frozen=True)
class ValidationConfig:
    """What validation refuses besides missing and mistyped fields and out-of-range values.

    Attributes:
        max_future_ms: an event more than this far ahead of the reference time is ``future``; None turns
            the check off. Default 1 h: a clock a little fast, or a quiet stream whose batch spans
            minutes, passes; a clock a day or a year off does not.
        allowed_lateness_ms: an event more than this far behind the watermark is ``too_late``; None turns
            the check off. Default 1 h: beyond the longest label window (30 min), so the join sees late
            actions within its reach and decides itself (drop or correct).
        clock: the reference of ``future``: "event" (the stream's own time: the later of the largest event
            time passed so far and the batch's median, so a stream that resumes after a quiet gap is not
            refused; right for replays) or "wall" (the machine's clock; right for live traffic).
            Default "event".
    """

    max_future_ms: int | None = 3_600_000
    allowed_lateness_ms: int | None = 3_600_000
    clock: str = "event"

    def __post_init__(self) -> None:
        if self.clock not in ("event", "wall"):
            raise ConfigError(f"must be 'event' or 'wall', got {self.clock!r}", field="clock")
        for name in ("max_future_ms", "allowed_lateness_ms"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"must be >= 0 or None, got {v}", field=name)


class Split(NamedTuple):
    """A validated batch: ``good`` rows in the kind's schema (input order), ``bad`` rows as they came
    (every original column), ``reasons`` (bad rows,) strings."""

    good: pa.RecordBatch
    bad: pa.RecordBatch
    reasons: np.ndarray


def _coerce(col: pa.Array | pa.ChunkedArray, want_int: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values as int64 or float64 with 0 where unusable, null mask, mistyped mask), vectorised.

    Integers and floats convert when exact (a float id must be integral); strings when they spell a
    number; anything else (bools, lists, structs) is mistyped.
    """
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    null = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else np.zeros(n, bool)
    no = np.zeros(n, bool)
    t = arr.type
    if pa.types.is_null(t):
        return np.zeros(n, np.int64 if want_int else np.float64), np.ones(n, bool), no
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        trimmed = pc.utf8_trim_whitespace(arr)
        ok = pc.fill_null(pc.match_substring_regex(trimmed, _INT_RE if want_int else _FLOAT_RE), False)
        ok_np = ok.to_numpy(zero_copy_only=False)
        clean = pc.if_else(ok, trimmed, "0")
        vals = pc.cast(clean, pa.int64() if want_int else pa.float64()).to_numpy(zero_copy_only=False)
        return vals, null, ~ok_np & ~null
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        raw = (pc.fill_null(arr, 0) if arr.null_count else arr).to_numpy(zero_copy_only=False)
        if pa.types.is_integer(t):
            if t == pa.uint64():
                bad = raw > np.uint64(2**63 - 1)
                out = np.where(bad, 0, raw).astype(np.int64) if want_int else raw.astype(np.float64)
                return out, null, bad
            return raw.astype(np.int64 if want_int else np.float64, copy=False), null, no
        f = raw.astype(np.float64, copy=False)
        if not want_int:
            return f, null, no
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(f) | (np.floor(f) != f) | (np.abs(f) >= 2.0**63)
        return np.where(bad, 0.0, f).astype(np.int64), null, bad & ~null
    return np.zeros(n, np.int64 if want_int else np.float64), null, ~null


def validate(batch: pa.RecordBatch | pa.Table, kind: str, *, reference_ms: int | None = None,
             watermark_ms: int | None = None, config: ValidationConfig | None = None) -> Split:
    """Split ``batch`` into good rows (in the kind's schema) and dead letters with a reason each.

    Vectorised over columns; the first failing check names a row's reason, in this order: a missing
    field (absent column or null), a mistyped field, an id outside [0, 2**53), another value out of its
    range (position, category, device >= 0 and int32; hour 0-23; value finite >= 0; gt_* in [0, 1]),
    an unknown action (a code outside ``ACTIONS``, or a name that is not one of its keys), then ``future``
    (later than ``reference_ms + max_future_ms``; with the "event" clock the reference is the later of
    ``reference_ms`` and the median event time of the rows good so far, with the "wall" clock it is
    ``reference_ms`` or else now) and ``too_late`` (earlier than ``watermark_ms - allowed_lateness_ms``;
    skipped when ``watermark_ms`` is None). Extra columns are dropped; a missing nullable column is all nulls.

    Args:
        batch: rows of any column types (a CSV's strings, a JSON reader's guesses, an exact batch).
        kind: "impressions" or "actions".

    Returns:
        ``Split(good, bad, reasons)``.
    """
    schema = schema_of(kind)
    cfg = config if config is not None else ValidationConfig()
    n = batch.num_rows
    code = np.zeros(n, np.int16)  # 0: good so far; k: reasons[k - 1]
    reasons: list[str] = []

    def refuse(mask: np.ndarray, reason: str) -> None:
        hit = mask & (code == 0)
        if hit.any():
            reasons.append(reason)
            code[hit] = len(reasons)

    names = set(batch.schema.names)
    values: dict[str, np.ndarray] = {}
    nulls: dict[str, np.ndarray] = {}
    for f in schema:
        want_int = pa.types.is_integer(f.type)
        if f.name not in names:
            values[f.name] = np.zeros(n, np.int64 if want_int else np.float64)
            nulls[f.name] = np.ones(n, bool)
            if not f.nullable:
                refuse(np.ones(n, bool), f"{Reason.MISSING}:{f.name}")
            continue
        col = batch.column(f.name)
        if f.name == "action" and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            vals, null, bad = _action_names(col)
        else:
            vals, null, bad = _coerce(col, want_int)
        values[f.name], nulls[f.name] = vals, null
        if not f.nullable:
            refuse(null, f"{Reason.MISSING}:{f.name}")
        refuse(bad, f"{Reason.UNKNOWN_ACTION}" if f.name == "action" else f"{Reason.MISTYPED}:{f.name}")
    for name in _ID_FIELDS:
        v = values[name]
        refuse((v < 0) | (v >= MAX_ID), f"{Reason.ID_OUT_OF_RANGE}:{name}")
    for name in ("position", "category", "device"):
        if name in values:
            v = values[name]
            refuse((v < 0) | (v > 2**31 - 1), f"{Reason.OUT_OF_RANGE}:{name}")
    if "hour" in values:
        refuse((values["hour"] < 0) | (values["hour"] > 23), f"{Reason.OUT_OF_RANGE}:hour")
    if "value" in values:
        with np.errstate(invalid="ignore"):
            refuse(~(np.isfinite(values["value"]) & (values["value"] >= 0)), f"{Reason.OUT_OF_RANGE}:value")
    for name in ("gt_click", "gt_like", "gt_finish"):
        if name in values:
            v = values[name]
            with np.errstate(invalid="ignore"):
                refuse(~nulls[name] & ~((v >= 0) & (v <= 1)), f"{Reason.OUT_OF_RANGE}:{name}")
    if "action" in values:
        refuse(~np.isin(values["action"], _ACTION_CODES), Reason.UNKNOWN_ACTION)
    ts = values["ts_ms"]
    refuse(ts < 0, f"{Reason.OUT_OF_RANGE}:ts_ms")
    if cfg.max_future_ms is not None:
        ref = reference_ms
        if cfg.clock == "wall":
            ref = int(time.time() * 1000) if ref is None else ref
        elif (code == 0).any():
            median = int(np.median(ts[code == 0]))
            ref = median if ref is None else max(ref, median)
        if ref is not None:
            refuse(ts > ref + cfg.max_future_ms, Reason.FUTURE)
    if cfg.allowed_lateness_ms is not None and watermark_ms is not None:
        refuse(ts < watermark_ms - cfg.allowed_lateness_ms, Reason.TOO_LATE)

    good_ix = np.flatnonzero(code == 0)
    bad_ix = np.flatnonzero(code)
    rb = batch if isinstance(batch, pa.RecordBatch) else _as_batch(batch)
    exact = all(f.name in names and rb.column(f.name).type == f.type for f in schema)
    if exact and bad_ix.size == 0:
        good = pa.RecordBatch.from_arrays([rb.column(f.name) for f in schema], schema=schema)
    else:
        cols = []
        for f in schema:
            v = values[f.name][good_ix].astype(f.type.to_pandas_dtype())
            mask = nulls[f.name][good_ix] if f.nullable and nulls[f.name].any() else None
            cols.append(pa.array(v, f.type, mask=mask))
        good = pa.RecordBatch.from_arrays(cols, schema=schema)
    bad = rb.take(pa.array(bad_ix)) if bad_ix.size else rb.slice(0, 0)
    why = np.array(reasons, dtype=object)[code[bad_ix] - 1] if bad_ix.size else np.empty(0, object)
    return Split(good, bad, why)


def _action_names(col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Action codes from strings: a name of ``ACTIONS`` or a number; anything else is unknown."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    trimmed = pc.utf8_lower(pc.utf8_trim_whitespace(arr))
    names = list(ACTIONS)
    idx = pc.index_in(trimmed, value_set=pa.array(names)).to_numpy(zero_copy_only=False)
    by_name = ~np.isnan(idx.astype(np.float64))
    vals, null, bad = _coerce(arr, True)
    codes = np.array([ACTIONS[k] for k in names], np.int64)
    vals = np.where(by_name, codes[np.nan_to_num(idx, nan=0).astype(np.int64)], vals)
    return vals, null, bad & ~by_name


def _as_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.combine_chunks().to_batches()
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)


# -- reading ------------------------------------------------------------------------------------------------


class EventReader:
    """A source of validated events: raw batches in, good rows sorted by ``ts_ms`` out, bad rows to the
    dead letters. It is itself a ``Source`` (``read``, ``offset``, ``seek``, ``finished``, ``close``).

    Args:
        source: the raw ``Source``.
        kind: "impressions" or "actions".
        dead_letters: where refused rows go (None: they are only counted in ``refused``).
        config: the ``ValidationConfig``.
        sort: sort each read's good rows by ``ts_ms`` (default); False keeps arrival order, for a consumer
            that orders by event time itself (the embedded runner's micro-batch grid: sorting per read
            would make which actions count as late depend on how many rows a read takes).

    Attributes:
        watermark_ms: set by a runner to judge ``too_late`` against its watermark; None: against the largest
            event time this reader passed.
        refused: rows refused so far.

    The offset carries the frontier (largest good event time), so a reader seeked to a saved offset
    judges the next rows exactly as the first reader would have.

    Thread safety: one thread.
    """

    def __init__(self, source: Source, kind: str, *, dead_letters: DeadLetters | None = None,
                 config: ValidationConfig | None = None, sort: bool = True) -> None:
        self.schema = schema_of(kind)
        self.source, self.kind = source, kind
        self.dead_letters = dead_letters
        self.config = config if config is not None else ValidationConfig()
        self.sort = sort
        self.watermark_ms: int | None = None
        self.refused = 0
        self._frontier: int | None = None

    @property
    def offset(self) -> Offset:
        o = self.source.offset
        return Offset(o.file, o.row, self._frontier)

    @property
    def finished(self) -> bool:
        return self.source.finished

    def seek(self, offset: Offset) -> None:
        self.source.seek(Offset(offset.file, offset.row))
        self._frontier = offset.frontier_ms

    def read(self, max_rows: int) -> pa.RecordBatch | None:
        """The good rows of the source's next raw batch (possibly none), sorted by ``ts_ms``; None when the
        source has nothing now."""
        raw = self.source.read(max_rows)
        if raw is None:
            return None
        ref = None if self.config.clock == "wall" else self._frontier
        wm = self.watermark_ms if self.watermark_ms is not None else self._frontier
        split = validate(raw, self.kind, reference_ms=ref, watermark_ms=wm, config=self.config)
        if split.bad.num_rows:
            self.refused += split.bad.num_rows
            if self.dead_letters is not None:
                self.dead_letters.write(self.kind, split.bad, split.reasons)
        good = split.good
        if good.num_rows:
            ts = good.column("ts_ms").to_numpy()
            if self.sort and not np.all(ts[1:] >= ts[:-1]):
                good = good.take(pa.array(np.argsort(ts, kind="stable")))
            top = int(ts.max())
            self._frontier = top if self._frontier is None else max(self._frontier, top)
        return good

    def close(self) -> None:
        self.source.close()


def open_source(path_or_iter: str | Path | Source | Iterable[pa.RecordBatch] | Callable[[], Iterable[Any]],
                kind: str, *, dead_letters: DeadLetters | None = None, tail: bool = False,
                poll_s: float = 0.2) -> Source:
    """The raw ``Source`` for a path (file or directory), a ``Source``, or an iterable of batches."""
    if isinstance(path_or_iter, (str, Path)):
        on_bad = None if dead_letters is None else \
            (lambda texts: dead_letters.write_raw(kind, texts))
        return FileSource(path_or_iter, tail=tail, poll_s=poll_s, on_malformed=on_bad)
    if isinstance(path_or_iter, Source):
        return path_or_iter
    return IteratorSource(path_or_iter)


def read_events(path_or_iter: str | Path | Source | Iterable[pa.RecordBatch] | Callable[[], Iterable[Any]],
                kind: str = "impressions", *, dead_letters: DeadLetters | None = None,
                config: ValidationConfig | None = None, max_rows: int = 65_536, tail: bool = False,
                poll_s: float = 0.2, idle_timeout_s: float | None = None, skip: int = 0, sort: bool = True
                ) -> Iterator[pa.RecordBatch]:
    """Validated record batches of ``kind`` from a path, a ``Source`` or an iterable, in event-time order
    (files by name, each batch sorted by ``ts_ms``); bad rows go to ``dead_letters``; it never stops for one.

    Args:
        tail: follow a directory as it grows (then it ends only after ``idle_timeout_s`` without a new row;
            None: never).
        max_rows: rows per raw read (a batch may come out smaller after validation).
        sort: sort each read by event time (default); False keeps arrival order (``EventReader``).
        skip: drop the first ``skip`` good rows, without writing again the refused rows of the raw reads
            that held them (a resumed runner re-reads what it consumed; reads are deterministic, so those
            were written by the first run). Dead letters are thus at least once: a crash repeats those of
            raw reads past the resume point that the first run had read ahead.
    """
    source = open_source(path_or_iter, kind, dead_letters=dead_letters, tail=tail, poll_s=poll_s)
    reader = EventReader(source, kind, dead_letters=None if skip else dead_letters, config=config, sort=sort)
    idle_since = time.monotonic()
    try:
        while True:
            batch = reader.read(max_rows)
            if skip and batch is not None:
                if batch.num_rows <= skip:
                    skip -= batch.num_rows
                    continue
                batch, skip = batch.slice(skip), 0
                reader.dead_letters = dead_letters
            if batch is None:
                if reader.finished:
                    return
                if idle_timeout_s is not None and time.monotonic() - idle_since > idle_timeout_s:
                    return
                time.sleep(poll_s)
                continue
            idle_since = time.monotonic()
            if batch.num_rows:
                yield batch
    finally:
        reader.close()
