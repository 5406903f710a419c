"""The dead-letter sink: events the pipeline refused, each with the reason, counted by reason.

Owns: ``DeadLetters``, the one place a bad event goes. It writes the refused rows as they came (every
original column, whatever its type) plus the kind and the reason, to a JSONL or Parquet file, and keeps the
counts. It must not raise for a bad event: refusing events is its normal work, and the pipeline goes on.

Reasons (``Reason`` below) are short strings, ``"<what>"`` or ``"<what>:<field>"``: ``missing:user_id``,
``mistyped:ts_ms``, ``id_out_of_range:item_id``, ``out_of_range:hour``, ``unknown_action``, ``future``,
``too_late``, ``malformed`` (a line or row that does not parse at all).

Thread safety: ``write`` and the counters are guarded by one lock, so several readers may share a sink.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["DeadLetters", "Reason"]


class Reason:
    """The reason vocabulary (prefixes; the field name follows a colon where one is named)."""

    MISSING = "missing"
    MISTYPED = "mistyped"
    ID_OUT_OF_RANGE = "id_out_of_range"
    OUT_OF_RANGE = "out_of_range"
    UNKNOWN_ACTION = "unknown_action"
    FUTURE = "future"
    TOO_LATE = "too_late"
    MALFORMED = "malformed"


_DL_SCHEMA = pa.schema([("kind", pa.string()), ("reason", pa.string()), ("event", pa.string())])


class DeadLetters:
    """A sink for refused events: a JSONL or Parquet file, plus counts by reason.

    Args:
        path: the file to write (``.parquet`` writes Parquet, anything else JSONL, one object per line:
            ``{"kind", "reason", "event": {original columns}}``); None keeps counts only.

    Attributes:
        count: ``Counter`` of reason -> rows refused.

    Raises:
        OSError: the file cannot be opened (at construction, not per event).

    Thread safety: safe to share; writes are serialised.

    Example:
        >>> dl = DeadLetters(None)
        >>> dl.write("actions", pa.RecordBatch.from_pydict({"action": [9]}), np.array(["unknown_action"]))
        >>> dl.count["unknown_action"]
        1
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self.count: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._jsonl: Any = None
        self._parquet: Any = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.suffix == ".parquet":
                import pyarrow.parquet as pq

                self._parquet = pq.ParquetWriter(self.path, _DL_SCHEMA)
            else:
                self._jsonl = self.path.open("a", encoding="utf-8")

    @property
    def total(self) -> int:
        """Rows refused so far."""
        return sum(self.count.values())

    def write(self, kind: str, rows: pa.RecordBatch | pa.Table, reasons: np.ndarray) -> None:
        """Record refused ``rows`` (as they came) with one reason each.

        Args:
            kind: "impressions" or "actions" (or the caller's name for the stream).
            rows: the refused rows, every original column.
            reasons: (rows,) strings.
        """
        if rows.num_rows != len(reasons):
            raise ValueError(f"{rows.num_rows} rows but {len(reasons)} reasons")
        if not rows.num_rows:
            return
        events = rows.to_pylist()  # the refused rows only: rare, and their types are anyone's guess
        self._record(kind, [str(r) for r in reasons], [json.dumps(e, default=str) for e in events])

    def write_raw(self, kind: str, texts: list[str], reason: str = Reason.MALFORMED) -> None:
        """Record lines or rows that did not parse at all, as their text."""
        if texts:
            self._record(kind, [reason] * len(texts), [json.dumps({"raw": t}) for t in texts])

    def _record(self, kind: str, reasons: list[str], events: list[str]) -> None:
        with self._lock:
            self.count.update(reasons)
            if self._jsonl is not None:
                self._jsonl.write("".join(f'{{"kind": {json.dumps(kind)}, "reason": {json.dumps(r)}, '
                                          f'"event": {e}}}\n' for r, e in zip(reasons, events, strict=True)))
                self._jsonl.flush()
            elif self._parquet is not None:
                self._parquet.write_table(pa.table({"kind": [kind] * len(reasons), "reason": reasons,
                                                    "event": events}, schema=_DL_SCHEMA))

    def close(self) -> None:
        """Flush and close the file (counts stay readable)."""
        with self._lock:
            if self._jsonl is not None:
                self._jsonl.close()
                self._jsonl = None
            if self._parquet is not None:
                self._parquet.close()
                self._parquet = None

    def __enter__(self) -> DeadLetters:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
