"""MovieLens-100k as a time-ordered event log, with the leave-one-out split and full-ranking requests.

Owns: fetching the data (the ``recbole==1.2.1`` wheel ships it under
``recbole/dataset_example/ml-100k``; the wheel is fetched with ``pip download --no-deps`` into a
cache directory at run time and read straight from the zip: recbole is never installed and the
data is never committed), parsing RecBole's atomic files, the event log, and the leave-one-out
split, turning both into ``RequestBatch``es (``training_requests``, ``ranking_requests``), and the
next-item protocol over them: ``train_ml100k`` (through ``train.Trainer``), ``evaluate_ml100k``
(full ranking) and ``compare_ml100k`` (the issue's table: every model trained and ranked alike).

The event log: one event per rating, ordered by time (ties keep the file's order). A rating >= 4
is a positive action (``ACTIONS["like"]``); lower ratings are ``ACTIONS["click"]`` (the user
watched, did not like). Item categories are the first genre of the item's ``class`` field.

Leave-one-out (``leave_one_out``): per user, the last positive event is the test target; the
user's events before it (in time) are the history and the training data; events after it are
dropped (they would leak). Users with no positive before their last one are not evaluated. The
evaluation ranks every item as a candidate of one request per user (RLB's best case), excluding
the items in the user's history, and reports HR@K / NDCG@K (``metrics.hr_ndcg_at_k``).

Thread safety: the loaders are pure functions of their input files; results are immutable by
convention (numpy arrays the caller should not write).
"""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from streamrec.model.batch import RequestBatch, suffix_index
from streamrec.model.metrics import hr_ndcg_at_k, target_ranks
from streamrec.pipeline.events import ACTIONS

if TYPE_CHECKING:
    from streamrec.model.train import Ranker, StreamReport, Trainer

__all__ = [
    "POSITIVE_RATING",
    "RECBOLE_WHEEL",
    "TASKS",
    "LeaveOneOut",
    "MovieLens",
    "cache_dir",
    "compare_ml100k",
    "evaluate_ml100k",
    "fetch_wheel",
    "leave_one_out",
    "load_ml100k",
    "parse_atomic",
    "ranking_requests",
    "train_ml100k",
    "training_requests",
]

RECBOLE_WHEEL = "recbole==1.2.1"
_ZIP_DIR = "recbole/dataset_example/ml-100k/"
POSITIVE_RATING = 4.0  # ratings >= 4 are positives: RecBole's ml-100k threshold ({'rating': 4})


def cache_dir() -> Path:
    """Where fetched wheels are kept: ``$STREAMREC_CACHE`` or ``~/.cache/streamrec``, plus ``/wheels``."""
    root = os.environ.get("STREAMREC_CACHE") or Path.home() / ".cache" / "streamrec"
    return Path(root) / "wheels"


def fetch_wheel(directory: str | os.PathLike[str] | None = None, *, timeout_s: float = 300.0) -> Path:
    """The recbole wheel in ``directory`` (default ``cache_dir()``), downloaded there if absent.

    Runs ``python -m pip download --no-deps recbole==1.2.1 -d DIR`` (nothing is installed).

    Raises:
        FileNotFoundError: pip could not fetch it (offline, no index); the message has pip's output.
    """
    d = Path(directory) if directory is not None else cache_dir()
    found = sorted(d.glob("recbole-1.2.1-*.whl"))
    if found:
        return found[0]
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           RECBOLE_WHEEL, "-d", str(d)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        out = res.stdout + res.stderr
    except subprocess.TimeoutExpired:
        out = f"timed out after {timeout_s} s"
    found = sorted(d.glob("recbole-1.2.1-*.whl"))
    if not found:
        raise FileNotFoundError(f"could not fetch {RECBOLE_WHEEL} into {d}: {out.strip()[-500:]}")
    return found[0]


@dataclass(frozen=True)
class MovieLens:
    """A ratings event log, time-ordered.

    Shapes: N events, I items, G genres.

    Attributes:
        user_id, item_id: (N,) int64, the dataset's own ids.
        ts_ms: (N,) int64 milliseconds since the epoch, non-decreasing.
        rating: (N,) float32.
        action: (N,) int8, ``ACTIONS["like"]`` where rating >= 4, else ``ACTIONS["click"]``.
        items: (I,) int64, every item id of the item file (and of the ratings), sorted.
        item_category: (I,) int32, index into ``genres`` of each item's first genre (0 if none).
        item_genres: (I, G) bool, every genre of each item.
        genres: the genre names, sorted.
    """

    user_id: np.ndarray
    item_id: np.ndarray
    ts_ms: np.ndarray
    rating: np.ndarray
    action: np.ndarray
    items: np.ndarray
    item_category: np.ndarray
    item_genres: np.ndarray
    genres: tuple[str, ...]

    @property
    def positive(self) -> np.ndarray:
        """(N,) bool: rating >= 4."""
        return np.asarray(self.action == ACTIONS["like"])

    def select_users(self, users: np.ndarray) -> MovieLens:
        """The log of these users only (every item kept): a smaller problem on the same catalogue."""
        keep = np.isin(self.user_id, users)
        return dataclasses.replace(self, user_id=self.user_id[keep], item_id=self.item_id[keep],
                                   ts_ms=self.ts_ms[keep], rating=self.rating[keep], action=self.action[keep])

    def item_index(self, item_ids: np.ndarray) -> np.ndarray:
        """Column of each item id in ``items`` (every id must be known)."""
        return np.searchsorted(self.items, item_ids)

    def __len__(self) -> int:
        return int(self.user_id.size)


def _read_atomic(text: bytes, what: str) -> pd.DataFrame:
    """An atomic file: tab-separated, header ``name:type``; columns renamed to the bare names."""
    df = pd.read_csv(io.BytesIO(text), sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":", 1)[0] for c in df.columns]
    if df.empty:
        raise ValueError(f"{what}: no rows")
    return df


def parse_atomic(inter: bytes, item: bytes | None = None) -> MovieLens:
    """Build the event log from the bytes of a ``.inter`` file and, optionally, an ``.item`` file.

    ``.inter`` needs ``user_id``, ``item_id``, ``rating`` and ``timestamp`` (seconds); ``.item``
    needs ``item_id`` and ``class`` (space-separated genres). Without ``.item`` every item has
    category 0 and no genre.

    Raises ValueError naming the file and column when one is missing or not numeric.
    """
    df = _read_atomic(inter, ".inter")
    try:
        cols = {c: pd.to_numeric(df[c]).to_numpy() for c in ("user_id", "item_id", "rating", "timestamp")}
    except KeyError as exc:
        raise ValueError(f".inter: column {exc.args[0]!r} missing (have {list(df.columns)})") from None
    except ValueError as exc:
        raise ValueError(f".inter: a column is not numeric: {exc}") from None
    order = np.argsort(cols["timestamp"], kind="stable")
    user = cols["user_id"].astype(np.int64)[order]
    item_id = cols["item_id"].astype(np.int64)[order]
    rating = cols["rating"].astype(np.float32)[order]
    ts_ms = (cols["timestamp"].astype(np.float64)[order] * 1000).round().astype(np.int64)
    action = np.where(rating >= POSITIVE_RATING, ACTIONS["like"], ACTIONS["click"]).astype(np.int8)

    genres: tuple[str, ...] = ()
    classes: dict[int, list[str]] = {}
    if item is not None:
        it = _read_atomic(item, ".item")
        if "item_id" not in it.columns or "class" not in it.columns:
            raise ValueError(f".item: expected columns item_id and class, have {list(it.columns)}")
        ids = pd.to_numeric(it["item_id"]).to_numpy().astype(np.int64)
        classes = {int(i): c.split() for i, c in zip(ids, it["class"], strict=True)}
        genres = tuple(sorted({g for gs in classes.values() for g in gs}))
    items = np.union1d(np.fromiter(classes, dtype=np.int64, count=len(classes)), item_id)
    g_index = {g: j for j, g in enumerate(genres)}
    item_genres = np.zeros((items.size, len(genres)), dtype=bool)
    category = np.zeros(items.size, dtype=np.int32)
    for col, i in enumerate(items.tolist()):  # once per item at load time, not a hot path
        gs = classes.get(i, [])
        if gs:
            category[col] = g_index[gs[0]]
            item_genres[col, [g_index[g] for g in gs]] = True
    return MovieLens(user_id=user, item_id=item_id, ts_ms=ts_ms, rating=rating, action=action, items=items,
                     item_category=category, item_genres=item_genres, genres=genres)


def load_ml100k(wheel: str | os.PathLike[str] | None = None) -> MovieLens:
    """MovieLens-100k from the recbole wheel (fetched into the cache if ``wheel`` is None).

    Raises FileNotFoundError if the wheel cannot be had, ValueError if it lacks the dataset.
    """
    path = Path(wheel) if wheel is not None else fetch_wheel()
    with zipfile.ZipFile(path) as z:
        try:
            inter = z.read(_ZIP_DIR + "ml-100k.inter")
            item = z.read(_ZIP_DIR + "ml-100k.item")
        except KeyError as exc:
            raise ValueError(f"{path}: no {exc.args[0]} in the wheel") from None
    return parse_atomic(inter, item)


@dataclass(frozen=True)
class LeaveOneOut:
    """The leave-one-out split of a ``MovieLens`` log.

    Shapes: N events; U evaluated users; H = total history events of evaluated users; I items.

    Attributes:
        train: (N,) bool, events that may be trained on: each user's events before that user's
            test event (every event of a user that is not evaluated).
        users: (U,) int64 evaluated user ids, ascending.
        target_item: (U,) int64 the held-out positive item; ``target_ts_ms`` (U,) its time.
        history_offsets: (U + 1,) int64 into the ``history_*`` arrays (ragged, time-ordered).
        history_item, history_action, history_ts_ms: (H,) the user's events before the target.
        exclude: (U, I) bool, items of the user's history (they are not ranked).
    """

    train: np.ndarray
    users: np.ndarray
    target_item: np.ndarray
    target_ts_ms: np.ndarray
    history_offsets: np.ndarray
    history_item: np.ndarray
    history_action: np.ndarray
    history_ts_ms: np.ndarray
    exclude: np.ndarray


def leave_one_out(data: MovieLens) -> LeaveOneOut:
    """Hold out each user's last positive event (see the module docstring)."""
    n = len(data)
    # Events grouped by user, time order kept within a user (the log is time-ordered).
    by_user = np.argsort(data.user_id, kind="stable")
    u = data.user_id[by_user]
    pos = data.positive[by_user]
    starts = np.flatnonzero(np.concatenate(([True], u[1:] != u[:-1])))
    ends = np.concatenate((starts[1:], [n]))
    idx = np.arange(n)
    # last positive position per user group (-1 if none)
    last_pos = np.maximum.reduceat(np.where(pos, idx, -1), starts)
    group = np.repeat(np.arange(starts.size), ends - starts)
    # evaluated: has a last positive and some positive before it
    first_pos = np.minimum.reduceat(np.where(pos, idx, n), starts)
    evaluated = (last_pos >= 0) & (first_pos < last_pos)
    cut = np.where(evaluated, last_pos, ends)  # events before `cut` are history / train
    keep = idx < cut[group]
    train = np.zeros(n, dtype=bool)
    train[by_user[keep]] = True

    ev = np.flatnonzero(evaluated)
    hist_mask = keep & evaluated[group]
    h_sorted = by_user[hist_mask]  # grouped by user ascending, time-ordered within
    lengths = cut[ev] - starts[ev]
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    target_rows = by_user[last_pos[ev]]
    history_item = data.item_id[h_sorted]
    exclude = np.zeros((ev.size, data.items.size), dtype=bool)
    exclude[np.repeat(np.arange(ev.size), lengths), data.item_index(history_item)] = True
    return LeaveOneOut(
        train=train,
        users=u[starts[ev]],
        target_item=data.item_id[target_rows],
        target_ts_ms=data.ts_ms[target_rows],
        history_offsets=offsets,
        history_item=history_item,
        history_action=data.action[h_sorted],
        history_ts_ms=data.ts_ms[h_sorted],
        exclude=exclude,
    )


TASKS = ("like",)  # the one task of ml100k: is the next item one the user rates >= 4


def training_requests(data: MovieLens, split: LeaveOneOut, rng: np.random.Generator, *,
                      negatives: int = 16, max_len: int = 200, requests: int = 256) -> list[RequestBatch]:
    """One epoch of next-item training requests, shuffled, ``requests`` per batch.

    Each positive training event (with at least one event before it) is a request: its history is
    the user's training events before it (the newest ``max_len``), its targets the event's item
    (label 1) and ``negatives`` items drawn uniformly from all items (label 0; a draw equal to the
    positive is kept, a 1/I chance). The targets share the history: request-level batching.
    """
    if negatives < 0 or max_len < 1 or requests < 1:
        raise ValueError(f"expected negatives >= 0, max_len >= 1, requests >= 1; got {negatives}, "
                         f"{max_len}, {requests}")
    tr = np.flatnonzero(split.train)
    order = tr[np.argsort(data.user_id[tr], kind="stable")]  # by user, time order kept
    u = data.user_id[order]
    first = np.r_[True, u[1:] != u[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(u.size), 0))  # group start of each
    j = np.arange(u.size) - start  # events of the user before this one
    req = np.flatnonzero(data.positive[order] & (j > 0))
    req = req[rng.permutation(req.size)]
    out = []
    for lo in range(0, req.size, requests):
        rows = req[lo:lo + requests]
        off, idx = _newest_before(rows, np.minimum(j[rows], max_len))
        hist = order[idx]
        m = 1 + negatives
        items = np.empty((rows.size, m), dtype=np.int64)
        items[:, 0] = data.item_id[order[rows]]
        items[:, 1:] = data.items[rng.integers(0, data.items.size, size=(rows.size, negatives))]
        labels = np.zeros((rows.size, m), dtype=np.float32)
        labels[:, 0] = 1.0
        flat = items.reshape(-1)
        out.append(RequestBatch.from_numpy(
            hist_offsets=off, hist_item=data.item_id[hist], hist_action=data.action[hist],
            hist_ts_ms=data.ts_ms[hist], request_ts_ms=data.ts_ms[order[rows]],
            user_id=data.user_id[order[rows]], target_offsets=np.arange(rows.size + 1) * m,
            target_item=flat, target_category=data.item_category[data.item_index(flat)],
            labels=labels.reshape(-1, 1), tasks=TASKS))
    return out


def ranking_requests(data: MovieLens, split: LeaveOneOut, *, max_len: int = 10_000,
                     users: int = 8) -> list[tuple[np.ndarray, RequestBatch]]:
    """The full-ranking evaluation: one request per evaluated user, every item a candidate.

    Returns ``(rows, batch)`` pairs, ``users`` requests per batch: ``rows`` are the users' rows of
    ``split`` and the batch's targets are ``data.items`` for each in turn (R x I targets, in
    ``items`` order), so ``model(batch)[:, 0].reshape(R, I)`` is the score matrix of those rows.
    Histories are the split's (newest ``max_len``); request time is the held-out event's time.
    """
    if max_len < 0 or users < 1:
        raise ValueError(f"expected max_len >= 0 and users >= 1; got {max_len}, {users}")
    n_items = data.items.size
    out = []
    for lo in range(0, split.users.size, users):
        rows = np.arange(lo, min(lo + users, split.users.size))
        held = np.diff(split.history_offsets)[rows]
        run_off = split.history_offsets[np.r_[rows, rows[-1] + 1]]
        # the rows are consecutive, so their runs are one contiguous slice of the history arrays
        off, idx = suffix_index(run_off - run_off[0], np.minimum(held, max_len))
        idx = idx + run_off[0]
        out.append((rows, RequestBatch.from_numpy(
            hist_offsets=off, hist_item=split.history_item[idx], hist_action=split.history_action[idx],
            hist_ts_ms=split.history_ts_ms[idx], request_ts_ms=split.target_ts_ms[rows],
            user_id=split.users[rows], target_offsets=np.arange(rows.size + 1) * n_items,
            target_item=np.tile(data.items, rows.size),
            target_category=np.tile(data.item_category, rows.size), tasks=TASKS)))
    return out


def _newest_before(ends: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and flat indices of the runs ``[ends[r] - keep[r], ends[r])`` (any order of ends)."""
    off = np.zeros(ends.size + 1, dtype=np.int64)
    np.cumsum(keep, out=off[1:])
    return off, np.arange(int(off[-1]), dtype=np.int64) - np.repeat(off[:-1] - (ends - keep), keep)


# -- training and evaluation --------------------------------------------------------------------------------


def train_ml100k(trainer: Trainer, data: MovieLens, split: LeaveOneOut, *, epochs: int = 1,
                 negatives: int = 16, max_len: int = 200, requests: int = 256,
                 progress: bool = False) -> StreamReport:
    """Train next-item prediction on the split's training events for ``epochs`` epochs
    (``movielens.training_requests``: each positive with ``negatives`` sampled negatives)."""
    from streamrec.model.train import train_stream

    rng = np.random.default_rng(trainer.config.seed)
    report = None
    for _ in range(epochs):
        batches = training_requests(data, split, rng, negatives=negatives, max_len=max_len, requests=requests)
        report = train_stream(trainer, batches, progress=progress)
    if report is None:
        raise ValueError(f"epochs: expected >= 1, got {epochs}")
    return report


@torch.no_grad()
def evaluate_ml100k(model: Ranker, data: MovieLens, split: LeaveOneOut, *, k: int = 10,
                    max_len: int = 10_000, users: int = 8) -> tuple[float, float]:
    """HR@K and NDCG@K of leave-one-out full ranking: every item scored as a candidate of one
    request per evaluated user (the user's history items excluded), ties broken at random in
    expectation (``metrics.hr_ndcg_at_k``)."""
    model.train(False)
    scores = np.empty((split.users.size, data.items.size), dtype=np.float32)
    for rows, batch in ranking_requests(data, split, max_len=max_len, users=users):
        scores[rows] = model(batch)[:, 0].float().numpy().reshape(rows.size, data.items.size)
    greater, ties = target_ranks(scores, data.item_index(split.target_item), split.exclude)
    return hr_ndcg_at_k(greater, ties, k)


def compare_ml100k(models: Sequence[str] = ("stca", "sasrec", "din", "mean", "popularity"), *,
                   epochs: int = 3, dim: int = 64, heads: int = 4, layers: int = 2, negatives: int = 16,
                   max_len: int = 200, lr: float = 1e-3, users: int = 0, seed: int = 0, k: int = 10,
                   data: MovieLens | None = None, progress: bool = False) -> dict[str, dict[str, float]]:
    """The ml100k table: each model trained the same way on the same leave-one-out split.

    Every model gets the same training requests (``epochs`` epochs, ``negatives`` sampled negatives
    per positive, histories of the newest ``max_len`` events), the same ``ModelConfig`` sizes and
    seed, and is evaluated by full ranking with its whole history (SASRec and DIN cut it to their
    own windows, 200 and 100).

    Args:
        models: names from ``MODELS``.
        users: 0 for all 943; else that many users drawn with ``seed`` (a quicker, noisier run).
        data: the log (default: ``load_ml100k()``).

    Returns name -> {"hr": HR@k, "ndcg": NDCG@k, "train_s", "eval_s", "samples"}.
    """
    import time

    from streamrec.model._layers import ModelConfig
    from streamrec.model.train import TrainConfig, Trainer, make_model

    ml = data if data is not None else load_ml100k()
    if users:
        pick = np.random.default_rng(seed).choice(np.unique(ml.user_id), size=users, replace=False)
        ml = ml.select_users(pick)
    split = leave_one_out(ml)
    cfg = ModelConfig(dim=dim, heads=heads, layers=layers, tasks=TASKS, item_buckets=1 << 12)
    out: dict[str, dict[str, float]] = {}
    for name in models:
        torch.manual_seed(seed)
        model, _ = make_model(name, cfg)
        trainer = Trainer(model, TrainConfig(lr=lr, seed=seed))
        t0 = time.perf_counter()
        train_ml100k(trainer, ml, split, epochs=epochs, negatives=negatives, max_len=max_len,
                     progress=progress)
        t1 = time.perf_counter()
        hr, ndcg = evaluate_ml100k(model, ml, split, k=k)
        out[name] = {"hr": hr, "ndcg": ndcg, "train_s": t1 - t0, "eval_s": time.perf_counter() - t1,
                     "samples": float(trainer.samples)}
    return out
