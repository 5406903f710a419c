"""The embedded runner: sources, micro-batches, join, features, a Parquet sink, checkpoints, in one process.

Owns: ``PipelineConfig`` (and ``load_pipeline_config`` for ``pipeline.toml``) and ``EmbeddedRunner``. It must
not hold join state itself: the join's tables, the sequences and the feature counters are store objects it
snapshots; what it adds to a checkpoint is where each source stands (rows consumed), the micro-batch grid's
last cut, and the sink's committed files.

How a run goes:

- **Sources.** Reader threads put record batches into bounded queues (``queue_batches`` deep), so a slow
  join stops the readers (backpressure) instead of buffering without bound. A generator source is one
  thread feeding (impressions, actions) pairs; file sources are a thread per stream.
- **Micro-batches on an event-time grid.** Batch k takes, from each stream, the longest prefix of rows
  with ``ts_ms`` below its cut (a multiple of ``batch_ms``), pulling from a stream until it holds a row at or
  past the cut; its watermark is the cut minus ``lateness_ms``. Rows behind a later row (late arrivals)
  go in a later batch, as late. Cuts depend on the data only, never on thread timing or on how sources
  chunk their rows, so a resumed run cuts exactly as an uninterrupted one.
- **Exactly once.** Every ``checkpoint_every`` batches the sink closes its file, then a checkpoint directory
  is written (the join's and counters' snapshots, the offsets, the cut, the committed files), renamed into
  place and named in ``CURRENT`` (atomic replace). Sink files are named by the epoch that commits them
  (``part-EEEEEE-SSSS.parquet``); on resume every file of a later epoch is deleted and the sources skip the
  rows consumed, so the output after a crash at any point equals that of a run that never crashed.
  A reader of the output takes the files ``CURRENT``'s checkpoint lists (``committed_files``).
- **Subscribers.** ``subscribe()`` returns an iterator over the sample batches as they are emitted (before
  their file is committed: a crash can repeat them to an in-process subscriber, never to the files).

Thread safety: one thread calls ``run``; ``subscribe`` may be called from any thread before or during it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shutil
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streamrec.errors import ConfigError
from streamrec.pipeline.deadletter import DeadLetters
from streamrec.pipeline.events import ACTION_SCHEMA, IMPRESSION_SCHEMA, read_events
from streamrec.pipeline.generate import GeneratorConfig, generate
from streamrec.pipeline.join import JoinConfig, SampleJoin

__all__ = ["EmbeddedRunner", "PipelineConfig", "RunStats", "committed_files", "load_pipeline_config"]

_CURRENT = "CURRENT"
_STREAMS = ("impressions", "actions")
_SCHEMAS = (IMPRESSION_SCHEMA, ACTION_SCHEMA)
_DONE = object()  # end of a source queue / of a subscription


@dataclass(frozen=True)
class PipelineConfig:
    """What the embedded runner reads, how it batches, where it writes.

    Attributes:
        source: ``"generate"`` (default: the traffic generator in-process, ``generator`` and ``events``)
            or ``"files"`` (``impressions`` and ``actions``: a file or a directory of JSONL, Parquet or CSV
            files, read in name order through ``events.read_events``: validated, in arrival order,
            refused rows written to ``dead_letters`` with their reason).
        impressions, actions: paths for ``source = "files"``.
        dead_letters: the dead-letter file for ``source = "files"`` (``.parquet`` or JSONL); default
            ``<output>/_dead_letters.jsonl``.
        tail: follow the directories as they grow (files appear by rename from ``*.tmp``; default False).
        idle_timeout_s: in tail mode, end the run after this long without a new event (default 0: never).
        events: events the generator draws (default 1,000,000).
        generator: the ``GeneratorConfig`` (TOML table ``[generator]``).
        join: the ``JoinConfig`` (TOML table ``[join]``).
        features: ``"default"`` (``default_features()``, the model's) or ``"none"`` (default: samples only).
        output: directory of the sample files (default ``"samples"``).
        checkpoint_dir: directory of checkpoints (default: ``<output>/_checkpoints``).
        batch_ms: event-time width of a micro-batch (default 100 ms: a tenth of the 1 s close-to-emit
            target, a few thousand events at 100 k events/s).
        lateness_ms: allowed lateness; the watermark trails the cut by it (default 1,000 ms).
        checkpoint_every: micro-batches between checkpoints (default 600: a minute of event time).
        rows_per_file: a sink file rolls at this many rows (default 1,000,000), and at every checkpoint.
        queue_batches: depth of each source queue (default 8).
        flush_at_end: when the sources end, advance the watermark past every window so each impression
            is emitted (default True).
        pace: event-time seconds replayed per wall second; 0 (default) as fast as possible.
        progress: show a progress bar (default True; off when not a terminal).
    """

    source: Literal["generate", "files"] = "generate"
    impressions: str = ""
    actions: str = ""
    dead_letters: str = ""
    tail: bool = False
    idle_timeout_s: float = 0.0
    events: int = 1_000_000
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    join: JoinConfig = field(default_factory=JoinConfig)
    features: Literal["default", "none"] = "none"
    output: str = "samples"
    checkpoint_dir: str = ""
    batch_ms: int = 100
    lateness_ms: int = 1000
    checkpoint_every: int = 600
    rows_per_file: int = 1_000_000
    queue_batches: int = 8
    flush_at_end: bool = True
    pace: float = 0.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.source not in ("generate", "files"):
            raise ConfigError(f"must be 'generate' or 'files', got {self.source!r}",
                              field="pipeline.source")
        if self.source == "files" and not (self.impressions and self.actions):
            raise ConfigError("source 'files' needs both impressions and actions paths",
                              field="pipeline.impressions")
        if not (isinstance(self.idle_timeout_s, (int, float)) and self.idle_timeout_s >= 0):
            raise ConfigError(f"must be a number >= 0, got {self.idle_timeout_s!r}",
                              field="pipeline.idle_timeout_s")
        if self.features not in ("default", "none"):
            raise ConfigError(f"must be 'default' or 'none', got {self.features!r}",
                              field="pipeline.features")
        for name, lo in (("events", 0), ("batch_ms", 1), ("lateness_ms", 0), ("checkpoint_every", 1),
                         ("rows_per_file", 1), ("queue_batches", 1)):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= lo):
                raise ConfigError(f"must be an int >= {lo}, got {v!r}", field=f"pipeline.{name}")
        if not (isinstance(self.pace, (int, float)) and self.pace >= 0):
            raise ConfigError(f"must be a number >= 0, got {self.pace!r}", field="pipeline.pace")

    @property
    def checkpoints(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(self.output) / "_checkpoints"


def load_pipeline_config(path: str | os.PathLike[str], **overrides: Any) -> PipelineConfig:
    """Read ``pipeline.toml``: top-level fields of ``PipelineConfig``, tables ``[join]`` and ``[generator]``.

    Raises:
        ConfigError: unreadable TOML or a bad or unknown field, named.
    """
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", field="pipeline") from exc
    raw.update(overrides)
    return _from_dict(raw)


def _from_dict(raw: dict[str, Any]) -> PipelineConfig:
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    for k in raw:
        if k not in known:
            raise ConfigError(f"unknown field (known: {', '.join(sorted(known))})", field=f"pipeline.{k}")
    kw = dict(raw)
    for name, cls in (("join", JoinConfig), ("generator", GeneratorConfig)):
        if name in kw and isinstance(kw[name], dict):
            sub = kw[name]
            fields = {f.name for f in dataclasses.fields(cls)}
            for k in sub:
                if k not in fields:
                    raise ConfigError("unknown field", field=f"{name}.{k}")
            sub = {k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()}
            try:
                kw[name] = cls(**sub)
            except TypeError as exc:
                raise ConfigError(str(exc), field=name) from exc
    return PipelineConfig(**kw)


@dataclass
class RunStats:
    """Counters of a run (since the first start, across resumes)."""

    batches: int = 0
    events: int = 0
    samples: int = 0
    checkpoints: int = 0
    files: int = 0
    seconds: float = 0.0
    join: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)


def committed_files(output: str | os.PathLike[str], checkpoint_dir: str | os.PathLike[str] | None = None
                    ) -> list[Path]:
    """The sample files the last checkpoint committed, in order (what a reader of the output takes)."""
    ck = Path(checkpoint_dir) if checkpoint_dir else Path(output) / "_checkpoints"
    state = _read_state(ck)
    return [Path(output) / f for f in state["files"]] if state else []


def _read_state(ck: Path) -> dict[str, Any] | None:
    cur = ck / _CURRENT
    if not cur.exists():
        return None
    state: dict[str, Any] = json.loads((ck / cur.read_text().strip() / "state.json").read_text())
    state["dir"] = str(ck / cur.read_text().strip())
    return state


# -- sources ----------------------------------------------------------------------------------------------


class _Reader:
    """A thread that iterates a source into a bounded queue; ``get`` blocks (the backpressure)."""

    def __init__(self, make: Callable[[], Iterator[Any]], depth: int) -> None:
        self.q: queue.Queue[Any] = queue.Queue(depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._t = threading.Thread(target=self._run, args=(make,), daemon=True, name="pipeline-source")
        self._t.start()

    def _run(self, make: Callable[[], Iterator[Any]]) -> None:
        try:
            for item in make():
                while not self._stop.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._error = exc
        self.q.put(_DONE)

    def get(self) -> Any:
        item = self.q.get()
        if item is _DONE and self._error is not None:
            raise self._error
        return item

    def close(self) -> None:
        self._stop.set()


class _Streams:
    """The two event streams: buffers of rows not yet taken, fed by the readers, and rows consumed."""

    def __init__(self, cfg: PipelineConfig, offsets: list[int]) -> None:
        self.offsets = list(offsets)
        self.buf: list[list[pa.RecordBatch]] = [[], []]
        self._max: list[list[int]] = [[], []]  # max ts_ms of each buffered batch
        self.done = [False, False]
        self.dead_letters: DeadLetters | None = None
        depth = cfg.queue_batches
        if cfg.source == "generate":
            gen, n = cfg.generator, cfg.events
            self._readers = [_Reader(lambda: _skip_pairs(generate(gen, n), offsets), depth)]
        else:
            for path in (cfg.impressions, cfg.actions):  # a missing input is a mistake, not a dead letter
                if not Path(path).exists():
                    raise FileNotFoundError(f"pipeline source {path!r} does not exist")
            self.dead_letters = DeadLetters(cfg.dead_letters or Path(cfg.output) / "_dead_letters.jsonl")
            self._readers = [_Reader(_file_source(cfg, path, i, offsets[i], self.dead_letters), depth)
                             for i, path in enumerate((cfg.impressions, cfg.actions))]

    def _reader_of(self, s: int) -> _Reader:
        return self._readers[0] if len(self._readers) == 1 else self._readers[s]

    def pull(self, s: int) -> None:
        """Take the next chunk from stream ``s``'s reader (a pair source feeds both buffers)."""
        r = self._reader_of(s)
        item = r.get()
        if item is _DONE:
            if len(self._readers) == 1:
                self.done = [True, True]
            else:
                self.done[s] = True
            return
        for k, b in enumerate(item):
            if b is not None and b.num_rows:
                self.buf[k].append(b)
                self._max[k].append(int(b.column("ts_ms").to_numpy().max()))

    def head_ts(self, s: int) -> int | None:
        return int(self.buf[s][0].column("ts_ms")[0].as_py()) if self.buf[s] else None

    def has_at_or_past(self, s: int, cut: int) -> bool:
        return any(m >= cut for m in self._max[s])

    def take(self, s: int, cut: int) -> pa.RecordBatch:
        """The longest prefix of buffered rows of stream ``s`` with ``ts_ms < cut``."""
        taken: list[pa.RecordBatch] = []
        while self.buf[s]:
            b = self.buf[s][0]
            ts = b.column("ts_ms").to_numpy()
            past = np.flatnonzero(ts >= cut)
            if past.size == 0:
                taken.append(b)
                self.buf[s].pop(0)
                self._max[s].pop(0)
                continue
            k = int(past[0])
            if k:
                taken.append(b.slice(0, k))
                self.buf[s][0] = b.slice(k)
            break
        n = sum(t.num_rows for t in taken)
        self.offsets[s] += n
        if n == 0:
            return pa.RecordBatch.from_pylist([], schema=_SCHEMAS[s])
        if len(taken) == 1:
            return taken[0]
        return pa.Table.from_batches(taken, schema=_SCHEMAS[s]).combine_chunks().to_batches()[0]

    def exhausted(self) -> bool:
        return all(self.done) and not self.buf[0] and not self.buf[1]

    def close(self) -> None:
        for r in self._readers:
            r.close()
        if self.dead_letters is not None:
            self.dead_letters.close()


def _file_source(cfg: PipelineConfig, path: str, stream: int, offset: int, dead_letters: DeadLetters
                 ) -> Callable[[], Iterator[tuple[pa.RecordBatch | None, pa.RecordBatch | None]]]:
    """Stream ``stream``'s validated events after the first ``offset`` good rows (a resumed source
    re-reads and drops what it consumed)."""
    def chunks() -> Iterator[tuple[pa.RecordBatch | None, pa.RecordBatch | None]]:
        # Arrival order: the micro-batch grid orders by event time and counts rows behind a later one
        # as late, the same for a file as for the generator; a per-read sort would move that line.
        for b in read_events(path, _STREAMS[stream], dead_letters=dead_letters, tail=cfg.tail, skip=offset,
                             idle_timeout_s=cfg.idle_timeout_s or None, sort=False):
            yield (b, None) if stream == 0 else (None, b)

    return chunks


def _skip_pairs(pairs: Iterator[tuple[pa.RecordBatch, pa.RecordBatch]], offsets: list[int]
                ) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
    """(impressions, actions) pairs after the first ``offsets[0]`` and ``offsets[1]`` rows of each stream."""
    left = list(offsets)
    for pair in pairs:
        out = []
        for k, b in enumerate(pair):
            cut = min(left[k], b.num_rows)
            left[k] -= cut
            out.append(b.slice(cut) if cut else b)
        yield out[0], out[1]


# -- the sink ---------------------------------------------------------------------------------------------


class _Sink:
    """Rolling Parquet files named by the epoch that commits them (module doc)."""

    def __init__(self, out: Path, rows_per_file: int, epoch: int, files: list[str]) -> None:
        self.out, self.rows_per_file, self.epoch = out, rows_per_file, epoch
        self.files = list(files)
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._name = ""
        self._rows = 0
        self._seq = 0
        out.mkdir(parents=True, exist_ok=True)
        keep = set(files)
        for f in out.glob("part-*"):  # uncommitted: written after the checkpoint we resume from
            if f.name not in keep:
                f.unlink()

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        if self._writer is None:
            self._name = f"part-{self.epoch:06d}-{self._seq:04d}.parquet"
            self._tmp = self.out / (self._name + ".tmp")
            self._writer = pq.ParquetWriter(self._tmp, batch.schema)
            self._seq += 1
        self._writer.write_batch(batch)
        self._rows += batch.num_rows
        if self._rows >= self.rows_per_file:
            self.roll()

    def roll(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        assert self._tmp is not None
        os.replace(self._tmp, self.out / self._name)
        self.files.append(self._name)
        self._writer, self._rows = None, 0

    def next_epoch(self) -> None:
        self.epoch += 1
        self._seq = 0


# -- the runner -------------------------------------------------------------------------------------------


class EmbeddedRunner:
    """Runs the pipeline in this process: sources -> join -> features -> Parquet and subscribers.

    Args:
        config: a ``PipelineConfig``.
        resume: start from the last checkpoint in ``config.checkpoints`` if there is one (default True);
            False deletes the output and checkpoints and starts over.

    Raises:
        ConfigError: the checkpoint was written under another join configuration.

    Thread safety: module doc.

    Example::

        runner = EmbeddedRunner(load_pipeline_config("pipeline.toml"))
        for batch in runner.subscribe():        # in a trainer thread
            ...
        stats = runner.run()                    # in the main thread
    """

    def __init__(self, config: PipelineConfig, *, resume: bool = True) -> None:
        self.config = config
        ck = config.checkpoints
        out = Path(config.output)
        if not resume:
            shutil.rmtree(ck, ignore_errors=True)
            for f in out.glob("part-*"):
                f.unlink()
        ck.mkdir(parents=True, exist_ok=True)
        state = _read_state(ck)
        self.stats = RunStats()
        if state is not None:
            if state["join"] != dataclasses.asdict(config.join):
                raise ConfigError(f"{state['dir']} was written under join {state['join']}",
                                  field="pipeline.join")
            self.join = SampleJoin(config.join, store_dir=Path(state["dir"]) / "join")
            self._offsets = list(state["offsets"])
            self._cut: int | None = state["cut"]
            self._epoch = int(state["epoch"])
            self.stats = RunStats(**{k: v for k, v in state["stats"].items() if k != "join"})
        else:
            self.join = SampleJoin(config.join)
            self._offsets, self._cut, self._epoch = [0, 0], None, 0
        self._finished = bool(state and state.get("finished"))
        self.features: Any = None
        self.stores: Any = None
        if config.features == "default":
            from streamrec.pipeline.features import default_features

            self.features = default_features()
            if state is not None and (Path(state["dir"]) / "counters").exists():
                self.stores = self.features.open_stores(Path(state["dir"]) / "counters",
                                                        sequences=self.join.sequences)
            else:
                self.stores = self.features.make_stores(sequences=self.join.sequences)
        self._sink = _Sink(out, config.rows_per_file, self._epoch + 1, state["files"] if state else [])
        self._refused: tuple[dict[str, int], DeadLetters | None] = ({}, None)
        self._subs: list[queue.Queue[Any]] = []
        self._subs_lock = threading.Lock()

    def subscribe(self, maxsize: int = 64) -> Iterator[pa.RecordBatch]:
        """An iterator over sample batches as they are emitted, until the run ends.

        A full subscriber queue (``maxsize`` batches) blocks the runner: a slow trainer slows the pipeline
        rather than losing samples.
        """
        q: queue.Queue[Any] = queue.Queue(maxsize)
        with self._subs_lock:
            self._subs.append(q)

        def it() -> Iterator[pa.RecordBatch]:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                yield item

        return it()

    def _emit(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        self._sink.write(batch)
        self.stats.samples += batch.num_rows
        with self._subs_lock:
            subs = list(self._subs)
        for q in subs:
            q.put(batch)

    def _checkpoint(self, finished: bool = False) -> None:
        """Close the file, snapshot the stores, write the checkpoint directory, switch CURRENT to it."""
        self._sink.roll()
        self._epoch += 1
        ck = self.config.checkpoints
        name = f"epoch-{self._epoch:06d}"
        # Named for this process: a snapshot child orphaned by a killed run may still write its own.
        tmp = ck / f"{name}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        self.join.snapshot(tmp / "join")
        if self.stores is not None:
            self.stores.snapshot_counters(tmp / "counters")
        self.stats.checkpoints += 1
        self.stats.files = len(self._sink.files)
        self.stats.join = dict(self.join.counts)
        self._count_refused()
        state = {"offsets": self._offsets, "cut": self._cut, "epoch": self._epoch, "files": self._sink.files,
                 "join": dataclasses.asdict(self.config.join), "finished": finished,
                 "stats": dataclasses.asdict(self.stats)}
        _write_atomic(tmp / "state.json", json.dumps(state))
        shutil.rmtree(ck / name, ignore_errors=True)
        os.replace(tmp, ck / name)
        _fsync_dir(ck)
        _write_atomic(ck / _CURRENT, name)
        for old in sorted(ck.glob("epoch-*")):  # keep this one and the one before
            if old.name < f"epoch-{self._epoch - 1:06d}":
                shutil.rmtree(old, ignore_errors=True)
        self._sink.next_epoch()

    def run(self, max_batches: int | None = None) -> RunStats:
        """Consume the sources to their end (or ``max_batches`` micro-batches); returns the counters."""
        cfg = self.config
        t_start = time.perf_counter()
        if self._finished:
            self._close_subs()
            return self.stats
        try:
            streams = _Streams(cfg, self._offsets)
        except BaseException:
            self._close_subs()  # a subscriber must not wait for a run that never started
            raise
        self._refused = (dict(self.stats.dead_letters), streams.dead_letters)
        progress = _Progress(cfg.progress)
        first_cut: int | None = None
        wall0 = time.monotonic()
        done_batches = 0
        try:
            while True:
                if max_batches is not None and done_batches >= max_batches:
                    self._checkpoint()
                    return self.stats  # subscribers end here too (finally)
                for s in (0, 1):  # every live stream shows its head, so the next cut is known
                    while not streams.done[s] and not streams.buf[s]:
                        streams.pull(s)
                if streams.exhausted():
                    break
                heads = [h for h in (streams.head_ts(0), streams.head_ts(1)) if h is not None]
                nxt = (min(heads) // cfg.batch_ms + 1) * cfg.batch_ms
                cut = nxt if self._cut is None else max(self._cut + cfg.batch_ms, nxt)
                for s in (0, 1):
                    while not streams.done[s] and not streams.has_at_or_past(s, cut):
                        streams.pull(s)
                imps, acts = streams.take(0, cut), streams.take(1, cut)
                self._cut = cut
                self._offsets = list(streams.offsets)
                if cfg.pace:
                    first_cut = cut if first_cut is None else first_cut
                    ahead = (cut - first_cut) / 1000 / cfg.pace - (time.monotonic() - wall0)
                    if ahead > 0:
                        time.sleep(ahead)
                self._step(imps, acts, cut - cfg.lateness_ms)
                done_batches += 1
                progress.update(self)
                if self.stats.batches % cfg.checkpoint_every == 0:
                    self._checkpoint()
            if cfg.flush_at_end and self._cut is not None:
                j = cfg.join
                end = self._cut + (j.window_s + j.late_horizon_s) * 1000 + 2 * j.close_tick_ms
                self._step(None, None, end)
            self._checkpoint(finished=True)
            self._finished = True
        finally:
            streams.close()
            self._count_refused()
            progress.close()
            self.stats.seconds += time.perf_counter() - t_start
            self._close_subs()  # also when the run fails: a subscriber must not wait for ever
        return self.stats

    def _count_refused(self) -> None:
        """Dead letters by reason: those of earlier runs (resumed) plus this run's."""
        base, dl = self._refused
        if dl is not None:
            self.stats.dead_letters = {k: base.get(k, 0) + dl.count.get(k, 0) for k in base.keys() | dl.count}

    def _step(self, imps: pa.RecordBatch | None, acts: pa.RecordBatch | None, wm: int) -> None:
        if self.stores is not None:
            self.stores.observe(imps, acts)
        samples = self.join.process(imps, acts, wm)
        if self.features is not None and samples.num_rows:
            samples = self.features.transform(samples, self.stores)
        self._emit(samples)
        self.stats.batches += 1
        self.stats.events += sum(b.num_rows for b in (imps, acts) if b is not None)

    def _close_subs(self) -> None:
        with self._subs_lock:
            for q in self._subs:
                q.put(_DONE)


class _Progress:
    """A rich progress line with counters, refreshed at most 5 times a second."""

    def __init__(self, enabled: bool) -> None:
        import sys

        self._p: Any = None
        self._last = 0.0
        self._start = time.monotonic()
        self._events0: int | None = None
        if enabled and sys.stderr.isatty():
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._p = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                               transient=False)
            self._p.start()
            self._task = self._p.add_task("starting")

    def update(self, r: EmbeddedRunner) -> None:
        if self._p is None:
            return
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        s, c = r.stats, r.join.counts
        if self._events0 is None:
            self._events0 = s.events
        rate = (s.events - self._events0) / max(now - self._start, 1e-9)
        self._p.update(self._task, description=(
            f"events {s.events:,}  samples {s.samples:,}  pending {r.join.pending:,}  "
            f"late {c['late_impressions'] + c['late_actions_dropped']:,}  dup "
            f"{c['duplicate_impressions'] + c['duplicate_actions']:,}  ckpt {s.checkpoints}  "
            f"{rate:,.0f} ev/s"))

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
