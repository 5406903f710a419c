"""Training: batch and online, with progressive validation, per-task metrics and periodic
checkpoints.

Owns: ``TrainConfig``, ``Trainer`` (one optimisation step per ``RequestBatch``, each batch scored
before it is trained on), the loops over sample sources (``train_stream``: Parquet files, or the
pipeline's in-process subscription: ``train_online``), the event-to-update latency probe, models by
name, and the ``streamrec train`` command (MovieLens-100k's protocol is in ``movielens``). It must
not define models (``stca``, ``baselines``) or read raw events (``pipeline``).

Progressive validation: ``Trainer.step`` computes the batch's logits with the weights as they
were before the batch, records them against the batch's labels (``metrics.ProgressiveMetrics``),
and only then takes the gradient step, so every figure is out-of-sample. With length sampling on,
those logits are of the training window (the sampled history suffix), not of the full history.
Each impression is scored once: samples the join re-emits for an impression already emitted
(``kind`` 2, a correction after an eager positive, and 3, a late correction) are trained on but
not scored, since the model has already learnt that very sample as a positive, and scoring the
repeat would credit it with recognising it (on eager streams that inflates click AUC by ~0.15).

The model protocol (``Ranker``): ``model(batch) -> logits (T, K)`` for the tasks
``model.config.tasks``, ``model.loss(batch, logits) -> scalar``, and torch's ``parameters`` and
``state_dict``. Sparse rows that live in the store (``embedding.StoreEmbedding``) take their
optimizer step during ``backward``; the dense weights take a torch optimizer's step after it.

Thread safety: a ``Trainer`` belongs to one thread.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from streamrec.model.batch import DEFAULT_TASKS, RequestBatch
from streamrec.model.checkpoint import publish
from streamrec.model.metrics import ProgressiveMetrics, TaskSummary
from streamrec.model.optimizer import SplitAdam

if TYPE_CHECKING:
    import pyarrow as pa

    from streamrec.model._layers import ModelConfig, SequenceRanker
    from streamrec.pipeline.generate import GeneratorConfig
    from streamrec.pipeline.join import JoinConfig
    from streamrec.pipeline.runner import PipelineConfig, RunStats
    from streamrec.store.sequence import SequenceStore
    from streamrec.store.table import EmbeddingTable

__all__ = [
    "MODELS",
    "SCORED_KINDS",
    "Ranker",
    "Step",
    "StreamReport",
    "TrainConfig",
    "Trainer",
    "event_to_update",
    "make_model",
    "parquet_samples",
    "run_command",
    "sample_batches",
    "train_online",
    "train_stream",
]


SCORED_KINDS = (0, 1)  # a sample's first emission: final at close, or the eager positive


@dataclass(frozen=True)
class Step:
    """One batch to train on, with what progressive validation and the latency need.

    Attributes:
        batch: the ``RequestBatch``.
        scored: (T,) bool, the targets to score (first emissions), or None for all.
        arrival_s: ``time.perf_counter()`` when the batch's samples arrived, or None (the loop
            then takes the moment it receives the step).
    """

    batch: RequestBatch
    scored: np.ndarray | None = None
    arrival_s: float | None = None


class Ranker(Protocol):
    """What the trainer needs of a model (``stca.STCA`` and the baselines satisfy it)."""

    config: Any  # has .tasks

    def __call__(self, batch: RequestBatch) -> torch.Tensor: ...

    def loss(self, batch: RequestBatch, logits: torch.Tensor | None = None) -> torch.Tensor: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def train(self, mode: bool = True) -> Any: ...


@dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Attributes:
        lr: the dense optimizer's (Adam) learning rate (1e-3, Adam's default).
        weight_decay: Adam's L2 on dense weights (0).
        min_len, max_len: each request's training history is cut to a length drawn between these
            (``RequestBatch.sample_lengths``; the STCA recipe for length extrapolation). 0, 0: no
            cut (the history as read). Defaults 0, 0.
        eval_max_len: the history window of scoring outside training (10,000, the issue's serving L).
        window: samples per task the windowed AUC/GAUC keep (100,000).
        max_targets: a sample record batch larger than this is trained in slices of this many rows
            (4,096): bounds a step's memory whatever the source hands over.
        publish_every_s: seconds between checkpoint publishes when a model directory is given
            (60; 0 = only at the end).
        keep: checkpoint versions kept (3).
        grad_clip: max global norm of the dense gradients (0 = none).
        seed: seeds torch and the length sampler (0).
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    min_len: int = 0
    max_len: int = 0
    eval_max_len: int = 10_000
    window: int = 100_000
    max_targets: int = 4096
    publish_every_s: float = 60.0
    keep: int = 3
    grad_clip: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr: expected > 0, got {self.lr!r}")
        if not (0 <= self.min_len <= self.max_len):
            raise ValueError(f"TrainConfig.min_len/max_len: expected 0 <= min_len <= max_len, got "
                             f"{self.min_len}, {self.max_len}")
        for name in ("eval_max_len", "window", "max_targets", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}: expected >= 1, got {getattr(self, name)!r}")
        if self.publish_every_s < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("TrainConfig.publish_every_s/grad_clip/weight_decay: expected >= 0")


class Trainer:
    """Trains one model on ``RequestBatch``es, scoring each before it learns from it.

    Args:
        model: a ``Ranker`` (``torch.nn.Module``).
        config: ``TrainConfig``.
        model_dir: where to publish checkpoints (``checkpoint.publish``), or None.
        tables: in-process ``EmbeddingTable``s the model's sparse rows live in (snapshotted into
            each checkpoint), by name.
        features: a JSON-able description of the feature set (goes into the manifest).

    Example::

        trainer = Trainer(STCA(cfg), TrainConfig(min_len=16, max_len=2000), model_dir="models/stca")
        for batch in batches:
            trainer.step(batch)
        trainer.summary()["click"].auc

    Thread safety: one thread.
    """

    def __init__(self, model: Ranker, config: TrainConfig | None = None, *,
                 model_dir: str | Path | None = None, tables: Mapping[str, EmbeddingTable] | None = None,
                 features: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.config = config or TrainConfig()
        self.tasks: tuple[str, ...] = tuple(model.config.tasks)
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.tables = dict(tables or {})
        self.features = dict(features or {})
        torch.manual_seed(self.config.seed)
        self._rng = np.random.default_rng(self.config.seed)
        assert isinstance(model, torch.nn.Module)
        self.optimizer = SplitAdam(model, lr=self.config.lr, weight_decay=self.config.weight_decay)
        self.metrics = ProgressiveMetrics(self.tasks, window=self.config.window)
        self.best = ProgressiveMetrics(self.tasks, window=self.config.window)  # the generator's truth
        self.samples = 0
        self.batches = 0
        self.last_loss = math.nan
        self.versions: list[int] = []
        self._last_publish = time.monotonic()

    def step(self, batch: RequestBatch, scored: np.ndarray | None = None) -> float:
        """Score ``batch`` (recorded in ``metrics``), then take one optimisation step on it.

        Args:
            batch: the batch.
            scored: (T,) bool, which targets to record in the metrics (None: all).

        Returns the batch's loss. Raises ValueError if the batch's tasks differ from the model's.
        """
        if tuple(batch.tasks) != self.tasks:
            raise ValueError(f"batch.tasks: expected {self.tasks}, got {tuple(batch.tasks)}")
        c = self.config
        if c.max_len:
            batch = batch.sample_lengths(self._rng, c.min_len, c.max_len)
        self.model.train()
        logits = self.model(batch)
        self._record(batch, logits.detach(), scored)
        loss = self.model.loss(batch, logits)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip:  # the dense layers' norm (a hashed table's rows are scaled by Adam itself)
            torch.nn.utils.clip_grad_norm_(self.optimizer.dense_params, c.grad_clip)
        self.optimizer.step()
        self.samples += batch.num_targets
        self.batches += 1
        self.last_loss = float(loss.detach())
        if self.model_dir is not None and c.publish_every_s and (
                time.monotonic() - self._last_publish >= c.publish_every_s):
            self.publish()
        return self.last_loss

    def _record(self, batch: RequestBatch, logits: torch.Tensor, scored: np.ndarray | None) -> None:
        users = batch.user_id[batch.target_request].numpy()
        labels = batch.labels.numpy()
        z = logits.float().numpy()
        if scored is not None:
            keep = np.asarray(scored, dtype=bool)
            if keep.shape != (batch.num_targets,):
                raise ValueError(f"scored: expected ({batch.num_targets},) bools, got shape {keep.shape}")
            users, labels, z = users[keep], labels[keep], z[keep]
        self.metrics.update({t: labels[:, k] for k, t in enumerate(self.tasks)},
                            {t: z[:, k] for k, t in enumerate(self.tasks)}, users=users)
        if batch.truth is not None:
            truth = batch.truth.numpy().astype(np.float64)
            if scored is not None:
                truth = truth[keep]
            for k, t in enumerate(self.tasks):
                ok = np.isfinite(truth[:, k])
                if ok.any():
                    p = np.clip(truth[ok, k], 1e-7, 1 - 1e-7)
                    self.best.update({t: labels[ok, k]}, {t: np.log(p / (1 - p))}, users=users[ok])

    def summary(self) -> dict[str, TaskSummary]:
        """Per task, the progressive figures so far."""
        return self.metrics.summary()

    def best_summary(self) -> dict[str, TaskSummary]:
        """Per task, the same figures for the generator's ground truth (nan without truth)."""
        return self.best.summary()

    def publish(self) -> int:
        """Publish a checkpoint now (dense weights, optimizer, tables, manifest); returns its version."""
        if self.model_dir is None:
            raise ValueError("publish: the trainer has no model_dir")
        cfg = self.model.config
        model_cfg = (dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)
                     else dict(vars(cfg)))
        v = publish(self.model_dir, self.model.state_dict(), tables=self.tables,
                    optimizer=self.optimizer.state_dict(),
                    model_config={"class": type(self.model).__name__, **model_cfg},
                    features=self.features,
                    counters={"samples": self.samples, "batches": self.batches}, keep=self.config.keep)
        self.versions.append(v)
        self._last_publish = time.monotonic()
        return v


# -- sample sources --------------------------------------------------------------------------------


def parquet_samples(paths: Sequence[str | Path], batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """Record batches of sample Parquet files (files, or directories of ``*.parquet``), in order."""
    import pyarrow.parquet as pq

    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("**/*.parquet")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no Parquet files in {[str(p) for p in paths]}")
    for f in files:
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows)


def sample_batches(samples: Iterable[pa.RecordBatch], sequences: SequenceStore | None, *,
                   tasks: Sequence[str] = DEFAULT_TASKS, max_len: int = 10_000, max_targets: int = 4096,
                   kinds: Sequence[int] | None = None) -> Iterator[Step]:
    """Training steps from sample record batches (``SAMPLE_SCHEMA`` plus features).

    Histories come from ``sequences`` (only events older than each request: ``from_samples``).
    A record batch is cut into slices of at most ``max_targets`` rows; ``kinds`` keeps only
    samples of those ``kind`` codes (None: all: eager positives, corrections and finals alike).
    Each step's ``scored`` marks first emissions (``SCORED_KINDS``; all rows if there is no
    ``kind`` column) and its ``arrival_s`` is when its record batch came out of ``samples``.
    """
    import pyarrow.compute as pc

    it = iter(samples)
    while True:
        try:
            rb = next(it)
        except StopIteration:
            return
        arrived = time.perf_counter()
        if kinds is not None and rb.num_rows:
            rb = rb.filter(pc.is_in(rb.column("kind"), value_set=_pa_int8(kinds)))
        for lo in range(0, rb.num_rows, max_targets):
            part = rb.slice(lo, max_targets)
            batch = RequestBatch.from_samples(part, sequences, tasks=tasks, max_len=max_len)
            scored = None
            if "kind" in part.schema.names and batch.sample_index is not None:
                first = np.isin(part.column("kind").to_numpy(zero_copy_only=False), SCORED_KINDS)
                scored = first[batch.sample_index.numpy()]
            yield Step(batch, scored, arrived)


def _pa_int8(values: Sequence[int]) -> pa.Array:
    import pyarrow as pa

    return pa.array(list(values), type=pa.int8())


@dataclass(frozen=True)
class StreamReport:
    """What ``train_stream`` did.

    Attributes:
        samples, batches: trained.
        seconds: wall time of the loop.
        samples_per_s: samples / seconds.
        tasks: per task, the progressive figures; ``best``: the same for the ground truth.
        update_latency_s: per batch, from the batch's arrival (``arrivals``, else when the loop
            received it) to the end of its step (the store holds its updated rows then).
        versions: checkpoint versions published.
    """

    samples: int
    batches: int
    seconds: float
    samples_per_s: float
    tasks: dict[str, TaskSummary]
    best: dict[str, TaskSummary]
    update_latency_s: np.ndarray
    versions: list[int]


def train_stream(trainer: Trainer, batches: Iterable[RequestBatch | Step], *,
                 progress: bool = False, max_batches: int | None = None,
                 on_step: Callable[[Trainer], None] | None = None) -> StreamReport:
    """Train on a stream of batches (online mode when the stream is the pipeline's subscription).

    Args:
        trainer: the ``Trainer``.
        batches: ``RequestBatch``es or ``Step``s (``sample_batches``); a step's ``arrival_s`` starts
            its event-to-update latency (else the moment the loop receives it).
        progress: show a rich progress bar (samples, samples/s, running AUC per task).
        max_batches: stop after this many.
        on_step: called after each step (e.g. to stop a source, or log).

    Returns a ``StreamReport``; publishes a last checkpoint if the trainer has a model directory.
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    lat: list[float] = []
    start = time.perf_counter()
    n0 = trainer.samples
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  disable=not progress, transient=False) as bar:
        task = bar.add_task("training", total=None)
        it = iter(batches)
        while max_batches is None or trainer.batches < max_batches:
            try:
                item = next(it)
            except StopIteration:
                break
            step = item if isinstance(item, Step) else Step(item)
            arrived = step.arrival_s if step.arrival_s is not None else time.perf_counter()
            trainer.step(step.batch, step.scored)
            lat.append(time.perf_counter() - arrived)
            if on_step is not None:
                on_step(trainer)
            if progress:
                bar.update(task, description=_progress_line(trainer, time.perf_counter() - start, n0))
    if trainer.model_dir is not None and trainer.batches:
        trainer.publish()
    secs = time.perf_counter() - start
    n = trainer.samples - n0
    return StreamReport(samples=n, batches=trainer.batches, seconds=secs,
                        samples_per_s=n / secs if secs > 0 else math.nan, tasks=trainer.summary(),
                        best=trainer.best_summary(), update_latency_s=np.asarray(lat),
                        versions=list(trainer.versions))


def _progress_line(trainer: Trainer, secs: float, n0: int) -> str:
    rate = (trainer.samples - n0) / secs if secs > 0 else 0.0
    parts = [f"{trainer.samples:,} samples  {rate:,.0f}/s  loss {trainer.last_loss:.4f}"]
    best = trainer.best_summary()
    for t, s in trainer.summary().items():
        b = best[t].window_auc
        parts.append(f"{t} AUC {s.window_auc:.4f}" + ("" if math.isnan(b) else f" (best {b:.4f})"))
    return "  ".join(parts)


# -- models and online mode ------------------------------------------------------------------------

MODELS = ("stca", "sasrec", "din", "mean", "popularity")


def make_model(name: str, config: ModelConfig, *, store_embeddings: bool = False,
               store_lr: float = 0.05) -> tuple[Ranker, dict[str, EmbeddingTable]]:
    """A model by name (``MODELS``), and the in-process tables its sparse rows live in.

    With ``store_embeddings`` the item and user rows are ``embedding.StoreEmbedding``s over
    in-process ``EmbeddingTable``s (Adagrad, ``store_lr``), returned by name for checkpoints;
    otherwise the rows are in-model hashed embeddings and the dict is empty.
    """
    from streamrec.model import baselines, stca

    if name not in MODELS:
        raise ValueError(f"model: expected one of {MODELS}, got {name!r}")
    if name == "popularity":
        return baselines.Popularity(config), {}
    tables: dict[str, EmbeddingTable] = {}
    kw: dict[str, Any] = {}
    if store_embeddings:
        from streamrec.model.embedding import StoreEmbedding
        from streamrec.store.table import EmbeddingTable

        tables = {"items": EmbeddingTable(dim=config.dim, optimizer="adagrad", huge_pages=False),
                  "users": EmbeddingTable(dim=config.dim, optimizer="adagrad", huge_pages=False)}
        kw = {"item_embedding": StoreEmbedding(tables["items"], lr=store_lr),
              "user_embedding": StoreEmbedding(tables["users"], lr=store_lr)}
    classes: dict[str, type[SequenceRanker]] = {
        "stca": stca.STCA, "sasrec": baselines.SASRec, "din": baselines.DIN, "mean": baselines.MeanPool}
    return classes[name](config, **kw), tables


def train_online(pipeline: PipelineConfig, make: Callable[[RequestBatch], tuple[Ranker, Mapping[str, Any]]],
                 config: TrainConfig | None = None, *, model_dir: str | Path | None = None,
                 history_len: int = 10_000, progress: bool = False,
                 max_batches: int | None = None) -> tuple[Trainer, StreamReport, RunStats]:
    """Online mode: run the pipeline in a thread and train on its subscription as samples are emitted.

    Args:
        pipeline: the ``PipelineConfig`` (its output is rewritten: the run starts over).
        make: builds ``(model, tables)`` from the first batch (whose feature columns fix the
            model's input widths, e.g. ``ModelConfig(...).for_batch(batch)``).
        config: ``TrainConfig``.
        model_dir: publish checkpoints there.
        history_len: newest history events read per request (before any training cut).
        progress: the trainer's progress bar.
        max_batches: stop training after this many steps (the pipeline runs to its end).

    Returns ``(trainer, report, pipeline stats)``. Re-raises the pipeline's error if it failed.
    """
    import itertools
    import threading

    from streamrec.pipeline.runner import EmbeddedRunner

    cfg = config or TrainConfig()
    runner = EmbeddedRunner(pipeline, resume=False)
    sub = runner.subscribe()
    failed: list[BaseException] = []

    def run() -> None:
        try:
            runner.run()
        except BaseException as exc:  # handed to the caller below (run() ends the subscription)
            failed.append(exc)

    thread = threading.Thread(target=run, name="pipeline", daemon=True)
    thread.start()
    features = runner.features.to_manifest() if runner.features is not None else {}
    steps = sample_batches(sub, runner.join.sequences, max_len=history_len, max_targets=cfg.max_targets)
    first = next(steps, None)
    if first is None:
        thread.join()
        if failed:
            raise failed[0]
        raise ValueError("the pipeline emitted no samples")
    model, tables = make(first.batch)
    trainer = Trainer(model, cfg, model_dir=model_dir, tables=tables, features=features)
    report = train_stream(trainer, itertools.chain([first], steps), progress=progress,
                          max_batches=max_batches)
    for _ in sub:  # drain, so a full subscription queue cannot block the pipeline's end
        pass
    thread.join()
    if failed:
        raise failed[0]
    return trainer, report, runner.stats


def event_to_update(generator: GeneratorConfig, join: JoinConfig, base: ModelConfig, *, events: int = 50_000,
                    micro_batch_ms: int = 100, lateness_ms: int = 1000, history_len: int = 1000,
                    config: TrainConfig | None = None) -> dict[str, float]:
    """Online mode's latency from an action's arrival to the store holding its sample's updated rows.

    One thread does what the embedded runner and the trainer do, micro-batch by micro-batch: the
    generator's arrivals of ``micro_batch_ms`` (``step_s``) are handed over at ``t0``; the feature
    counters observe them, the join emits samples, the default feature set adds their features,
    and STCA (item and user rows in store tables, ``StoreEmbedding``) trains on them; the store
    rows are stepped in ``backward``. Each eager sample (``kind`` 1 or 2) of the micro-batch is
    one observation of ``end - t0``. In real time an action also waits for its micro-batch to
    close, at most ``micro_batch_ms``: returned apart, as ``wait_max_s``. The first micro-batch
    with samples builds the model and the optimizer (torch's first-use imports take seconds) and
    is not an observation.

    Verifies, for every step, that the item rows of every target were pushed to the store.

    Returns p50_s, p99_s, max_s (over eager samples), wait_max_s, eager_samples, samples, steps.
    """
    from streamrec.pipeline.features import default_features
    from streamrec.pipeline.generate import generate
    from streamrec.pipeline.join import SampleJoin

    gen = dataclasses.replace(generator, step_s=micro_batch_ms / 1000)
    sj = SampleJoin(dataclasses.replace(join, policy="eager"))
    fs = default_features()
    stores = fs.make_stores(sequences=sj.sequences)
    trainer: Trainer | None = None
    lat: list[np.ndarray] = []
    samples = 0
    cut = gen.start_ms
    for imps, acts in generate(gen, events):
        t0 = time.perf_counter()
        cut += micro_batch_ms
        stores.observe(imps, acts)
        out = sj.process(imps, acts, cut - lateness_ms)
        if not out.num_rows:
            continue
        out = fs.transform(out, stores)
        warmup = trainer is None
        for step in sample_batches([out], sj.sequences, max_len=history_len, max_targets=1 << 30):
            if trainer is None:
                model, tables = make_model("stca", base.for_batch(step.batch), store_embeddings=True)
                trainer = Trainer(model, config or TrainConfig(), tables=tables)
            trainer.step(step.batch, step.scored)
            pushed = trainer.model.item_embedding.pushed_keys  # type: ignore[attr-defined]
            if not np.isin(step.batch.target_item.numpy().astype(np.uint64), pushed).all():
                raise RuntimeError("a target's item row was not pushed to the store by its step")
        end = time.perf_counter()
        eager = int(np.isin(out.column("kind").to_numpy(zero_copy_only=False), (1, 2)).sum())
        samples += out.num_rows
        if not warmup:
            lat.append(np.full(eager, end - t0))
    all_lat = np.concatenate(lat) if lat else np.zeros(0)
    if not all_lat.size or trainer is None:
        raise ValueError("no eager samples: raise events or the click rate")
    return {"p50_s": float(np.percentile(all_lat, 50)), "p99_s": float(np.percentile(all_lat, 99)),
            "max_s": float(all_lat.max()), "wait_max_s": micro_batch_ms / 1000,
            "eager_samples": float(all_lat.size), "samples": float(samples), "steps": float(trainer.batches)}


# -- the ``streamrec train`` command ---------------------------------------------------------------


def run_command(args: Any) -> int:
    """``streamrec train SOURCE``: the CLI's arguments (``cli.build_parser``) to a run; prints a summary."""
    from rich.console import Console
    from rich.table import Table

    from streamrec.model._layers import ModelConfig

    torch.set_num_threads(args.threads)
    console = Console()
    tcfg = TrainConfig(lr=args.lr, min_len=args.min_len, max_len=args.max_len, seed=args.seed,
                       publish_every_s=args.publish_every)
    base = ModelConfig(dim=args.dim, heads=args.heads, layers=args.layers)

    def build(batch: RequestBatch) -> tuple[Ranker, dict[str, EmbeddingTable]]:
        return make_model(args.model, base.for_batch(batch), store_embeddings=args.store_embeddings)

    progress = not args.no_progress and console.is_terminal
    if args.source == "movielens":
        from streamrec.model.movielens import TASKS, evaluate_ml100k, leave_one_out, load_ml100k, train_ml100k

        data = load_ml100k(args.wheel)
        split = leave_one_out(data)
        model, tables = make_model(args.model, dataclasses.replace(base, tasks=TASKS),
                                   store_embeddings=args.store_embeddings)
        trainer = Trainer(model, tcfg, model_dir=args.model_dir, tables=tables,
                          features={"dataset": "ml-100k"})
        report = train_ml100k(trainer, data, split, epochs=args.epochs, negatives=args.negatives,
                              max_len=args.history, progress=progress)
        hr, ndcg = evaluate_ml100k(model, data, split, k=10, max_len=args.history)
        console.print(f"ml-100k {args.model}: HR@10 {hr:.4f}  NDCG@10 {ndcg:.4f}  ({split.users.size} users, "
                      f"{data.items.size} items ranked each; {report.samples:,} training samples)")
    elif args.source == "samples":
        from streamrec.store.sequence import SequenceStore

        seqs = SequenceStore.open(args.sequences) if args.sequences else None
        steps = sample_batches(parquet_samples(args.paths), seqs, max_len=args.history,
                               max_targets=tcfg.max_targets)
        first = next(steps, None)
        if first is None:
            console.print("no samples")
            return 1
        model, tables = build(first.batch)
        trainer = Trainer(model, tcfg, model_dir=args.model_dir, tables=tables)
        import itertools

        report = train_stream(trainer, itertools.chain([first], steps), progress=progress,
                              max_batches=args.max_batches)
    else:
        from streamrec.pipeline.runner import PipelineConfig, load_pipeline_config

        pcfg = (load_pipeline_config(args.pipeline, progress=False) if args.pipeline
                else PipelineConfig(features="default", progress=False))
        if args.events:
            pcfg = dataclasses.replace(pcfg, events=args.events)
        trainer, report, stats = train_online(pcfg, build, tcfg, model_dir=args.model_dir,
                                              history_len=args.history, progress=progress,
                                              max_batches=args.max_batches)
        console.print(f"pipeline: {stats.events:,} events, {stats.samples:,} samples in "
                      f"{stats.seconds:.1f} s")
    if args.source != "movielens":
        table = Table("task", "AUC", "best AUC", "GAUC", "logloss", "samples scored")
        for t, s in report.tasks.items():
            b = report.best[t]
            table.add_row(t, f"{s.auc:.4f}", "-" if math.isnan(b.auc) else f"{b.auc:.4f}", f"{s.gauc:.4f}",
                          f"{s.logloss:.4f}", f"{s.samples:,}")
        console.print(table)
        console.print(f"{report.samples:,} samples in {report.seconds:.1f} s ({report.samples_per_s:,.0f}/s)")
        lat = report.update_latency_s
        if args.source == "online" and lat.size:  # a file's batches have no arrival time worth the name
            console.print(f"sample batch arrival to its update: p50 {np.percentile(lat, 50):.3f} s, "
                          f"p99 {np.percentile(lat, 99):.3f} s")
    if report.versions:
        console.print(f"published versions {report.versions} into {args.model_dir}")
    return 0
