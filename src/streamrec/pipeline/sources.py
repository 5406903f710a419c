"""Sources of raw event batches: files, directories (optionally followed as they grow), iterators.

Owns: the ``Source`` protocol (``read(max_rows)``, ``offset``, ``seek(offset)``, ``finished``, ``close``),
``Offset`` (file index + row, what a runner checkpoints), ``FileSource`` (JSONL, Parquet, CSV files and
directories of them, with tail mode) and ``IteratorSource``. A source returns rows as they are stored, with
loose types (a CSV gives strings, a JSONL file whatever its values are); typing, validation and event-time
sorting happen in ``events.EventReader``. It must not drop a row silently: a line that does not parse is
handed to ``on_malformed``, and so is a file that cannot be read at all (its name and the error), which
is then skipped.

The protocol is small on purpose: a Kafka source is ``read`` = poll up to max_rows from one partition,
``offset`` = (partition, next offset), ``seek`` = assign and seek.

Files of a directory are read in name order; a file is taken once it is complete, and the rule for
writers is: write ``NAME.tmp`` (or a name starting with ``.`` or ``_``) and rename it to its final name
when done. Files with other suffixes than ``.jsonl``, ``.json``, ``.parquet``, ``.csv`` are ignored. In tail
mode the directory is listed again when the source runs dry; a new file whose name sorts before the last one
taken cannot be read in order, so it is skipped and counted in ``skipped_files``.

Thread safety: a source belongs to one thread.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

__all__ = ["FORMATS", "FileSource", "IteratorSource", "Offset", "Source", "read_file"]

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Offset:
    """A position in a source: the next row to read is row ``row`` of file (or batch) ``file``.

    ``frontier_ms`` is carried by ``EventReader`` (the largest event time it passed, which validation
    depends on); raw sources leave it None. ``to_dict``/``from_dict`` make it JSON for checkpoints.
    """

    file: int = 0
    row: int = 0
    frontier_ms: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Offset:
        wm = d.get("frontier_ms")
        return cls(int(d["file"]), int(d["row"]), None if wm is None else int(wm))


@runtime_checkable
class Source(Protocol):
    """Raw record batches in order, resumable from an ``Offset``.

    ``read`` returns up to ``max_rows`` rows, or None when nothing is available now (then ``finished`` says
    whether more can ever come). ``offset`` is the position after the last row returned; ``seek`` makes the
    next ``read`` start there, so reading, saving ``offset``, and seeking a fresh source to it continues
    exactly, without loss or repeats.
    """

    def read(self, max_rows: int) -> pa.RecordBatch | None: ...

    @property
    def offset(self) -> Offset: ...

    def seek(self, offset: Offset) -> None: ...

    @property
    def finished(self) -> bool: ...

    def close(self) -> None: ...


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.combine_chunks().to_batches()
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)


# -- files --------------------------------------------------------------------------------------------------


def _columns_from_rows(rows: list[dict[str, Any]]) -> pa.Table:
    """A table from parsed JSON objects of mixed types: a column of ints stays int64, of numbers float64,
    anything else becomes strings (JSON text for non-strings), for validation to sort out."""
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r))
    cols = {}
    for name in names:
        vals = [r.get(name) for r in rows]
        present = [v for v in vals if v is not None]
        if all(type(v) is int for v in present):
            cols[name] = pa.array(vals, pa.int64()) if all(-2**63 <= v < 2**63 for v in present) else \
                pa.array([None if v is None else str(v) for v in vals], pa.string())
        elif all(type(v) in (int, float) for v in present):
            cols[name] = pa.array([None if v is None else float(v) for v in vals], pa.float64())
        else:
            cols[name] = pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v)
                                   for v in vals], pa.string())
    return pa.table(cols) if cols else pa.table({"_empty": pa.array([None] * len(rows), pa.null())})


def read_file(path: Path) -> tuple[pa.Table, list[tuple[int, str]]]:
    """One file as a table of loose types, plus its malformed lines as (rows before it, text).

    JSONL goes through Arrow's reader; when that refuses the file (a line that is not JSON, a column whose
    type changes between lines) the file is parsed line by line instead, which keeps every good line.
    CSV is read with every column as a string (inference from the first block would fail on a bad row
    further down); rows with the wrong number of fields are malformed.
    """
    fmt = FORMATS.get(path.suffix)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path), []
    if fmt == "csv":
        import pyarrow.csv as pcsv

        bad: list[tuple[int, str]] = []

        def invalid(row: Any) -> str:
            at = 0 if row.number is None else max(0, row.number - 2 - len(bad))  # rows before it
            bad.append((at, row.text or ""))
            return "skip"

        with path.open("rb") as fb:
            header = fb.readline().decode("utf-8", "replace").strip().split(",")
        convert = pcsv.ConvertOptions(column_types={h: pa.string() for h in header},
                                      strings_can_be_null=True, quoted_strings_can_be_null=False)
        # One thread, so the handler learns each bad row's line number (parallel parsing does not know it).
        table = pcsv.read_csv(path, read_options=pcsv.ReadOptions(use_threads=False),
                              parse_options=pcsv.ParseOptions(invalid_row_handler=invalid),
                              convert_options=convert)
        return table, bad
    if fmt == "jsonl":
        import pyarrow.json as pjson

        try:
            return pjson.read_json(path), []
        except pa.ArrowInvalid:
            pass
        rows: list[dict[str, Any]] = []
        malformed: list[tuple[int, str]] = []
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                text = line.strip()
                if not text:
                    continue
                try:
                    obj = json.loads(text)
                except ValueError:
                    obj = None
                if isinstance(obj, dict):
                    rows.append(obj)
                else:
                    malformed.append((len(rows), text))
        return _columns_from_rows(rows), malformed
    raise ValueError(f"{path}: unknown format (expected one of {sorted(FORMATS)})")


def _listing(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if p.suffix in FORMATS and not p.name.startswith((".", "_")) and p.is_file())


class FileSource:
    """Rows of a file, or of every file of a directory in name order, optionally following it (tail).

    Args:
        path: a file or a directory.
        tail: keep listing the directory for new files when the known ones are read (a directory only).
        poll_s: least seconds between two listings in tail mode.
        on_malformed: called with the texts of lines/rows that do not parse, when a read passes them.

    A file is held in memory while it is read (the generator rolls files at about a million rows).

    Thread safety: one thread.

    Example:
        >>> src = FileSource("events/actions", tail=True)  # doctest: +SKIP
        >>> batch = src.read(65536); saved = src.offset; src.seek(saved)  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, *, tail: bool = False, poll_s: float = 0.2,
                 on_malformed: Callable[[list[str]], None] | None = None) -> None:
        self.path = Path(path)
        self.is_dir = self.path.is_dir()
        if tail and not self.is_dir:
            raise ValueError(f"tail mode follows a directory; {self.path} is not one")
        if not self.is_dir and self.path.suffix not in FORMATS:
            raise ValueError(f"{self.path}: unknown format (expected one of {sorted(FORMATS)})")
        self.tail = tail
        self.poll_s = poll_s
        self.on_malformed = on_malformed
        self._skipped: set[Path] = set()
        self.files: list[Path] = _listing(self.path) if self.is_dir else [self.path]
        self._last_list = time.monotonic()
        self._file = 0
        self._row = 0
        self._table: pa.Table | None = None
        self._malformed: list[tuple[int, str]] = []

    @property
    def offset(self) -> Offset:
        return Offset(self._file, self._row)

    @property
    def finished(self) -> bool:
        return not self.tail and self._file >= len(self.files)

    def seek(self, offset: Offset) -> None:
        if self.is_dir:
            self._relist(force=True)
        if offset.file > len(self.files) or offset.file < 0 or offset.row < 0:
            raise ValueError(f"offset {offset} is beyond the {len(self.files)} files of {self.path}")
        self._file, self._row = offset.file, offset.row
        self._table = None

    def _relist(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_list < self.poll_s:
            return
        self._last_list = now
        last = self.files[-1].name if self.files else ""
        known = set(self.files) | self._skipped
        for p in _listing(self.path):
            if p in known:
                continue
            if p.name > last:
                self.files.append(p)
                last = p.name
            else:  # appeared out of name order: reading it now would break event-time order
                self._skipped.add(p)

    @property
    def skipped_files(self) -> int:
        """Files that appeared (in tail mode) with a name before one already taken; they are not read."""
        return len(self._skipped)

    def read(self, max_rows: int) -> pa.RecordBatch | None:
        while True:
            if self._file >= len(self.files):
                if not self.tail:
                    return None
                self._relist()
                if self._file >= len(self.files):
                    return None
            if self._table is None:
                path = self.files[self._file]
                try:
                    self._table, self._malformed = read_file(path)
                except (pa.ArrowInvalid, OSError, ValueError) as exc:
                    # A torn or foreign file is one bad input, not the end of the stream: report it whole.
                    self._table, self._malformed = pa.table({}), [(0, f"unreadable file {path.name}: {exc}")]
            if self._row < self._table.num_rows:
                lo, hi = self._row, min(self._row + max_rows, self._table.num_rows)
                self._report(lo, hi)
                self._row = hi
                return _one_batch(self._table.slice(lo, hi - lo))
            self._report(self._row, self._row + 1)  # malformed lines after the last good row
            self._file += 1
            self._row = 0
            self._table = None

    def _report(self, lo: int, hi: int) -> None:
        if self.on_malformed is not None and self._malformed:
            texts = [t for at, t in self._malformed if lo <= at < hi]
            if texts:
                self.on_malformed(texts)

    def close(self) -> None:
        self._table = None


# -- iterators ----------------------------------------------------------------------------------------------


class IteratorSource:
    """Rows of an iterable of record batches (or tables).

    Args:
        batches: an iterable, or a zero-argument callable that returns a fresh one (then ``seek`` can go
            back; with a plain iterator it can only go forward).

    ``Offset.file`` counts batches of the iterable, ``Offset.row`` rows within the batch.

    Thread safety: one thread.
    """

    def __init__(self, batches: Iterable[pa.RecordBatch | pa.Table]
                 | Callable[[], Iterable[pa.RecordBatch | pa.Table]]) -> None:
        self._factory = batches if callable(batches) else None
        self._it: Iterator[pa.RecordBatch | pa.Table] = iter(batches() if callable(batches) else batches)
        self._batch: pa.Table | None = None
        self._index = -1  # index of self._batch
        self._file = 0
        self._row = 0
        self._done = False

    @property
    def offset(self) -> Offset:
        return Offset(self._file, self._row)

    @property
    def finished(self) -> bool:
        return self._done

    def _advance(self) -> bool:
        """Load batch number ``self._file``; False at the end."""
        while self._index < self._file:
            try:
                b = next(self._it)
            except StopIteration:
                self._done = True
                return False
            self._index += 1
            self._batch = b if isinstance(b, pa.Table) else pa.Table.from_batches([b])
        return True

    def read(self, max_rows: int) -> pa.RecordBatch | None:
        while not self._done:
            if not self._advance():
                return None
            assert self._batch is not None
            if self._row < self._batch.num_rows:
                n = min(max_rows, self._batch.num_rows - self._row)
                out = _one_batch(self._batch.slice(self._row, n))
                self._row += n
                return out
            self._file += 1
            self._row = 0
        return None

    def seek(self, offset: Offset) -> None:
        if offset.file < self._index:
            if self._factory is None:
                raise ValueError(f"cannot seek a plain iterator back to {offset}; pass a callable")
            self._it = iter(self._factory())
            self._index = -1
            self._batch = None
        self._done = False
        self._file, self._row = offset.file, offset.row

    def close(self) -> None:
        self._batch = None
