"""The request-level batch every ranking model in this package takes.

Owns: ``RequestBatch`` (the tensors of a set of requests: one ragged history per
request and that request's targets), its constructors from numpy arrays and
from the pipeline's sample batches (histories read from a ``SequenceStore``),
and the ragged reshapes training needs: the newest suffix of each history
(``truncate``), a sampled length per request (``sample_lengths``, the
length-extrapolation recipe) and one request per target with the history
copied (``repeat_per_target``, the per-sample form RLB must equal). It must not
know any model.

Leakage rule: a history holds only events strictly older than its request
(``ts_ms < request_ts_ms``); ``from_samples`` drops the rest, so a label's own
action, already in the sequence store when the sample is emitted, never leaks
into the features. With an arrival count per impression (``arrived_column``)
it also drops older events that arrived after the request (a delayed like),
which otherwise tell an early-emitted positive from a negative emitted at the
window close (notes/train-findings.md).

Thread safety: a ``RequestBatch`` is a value; its methods return new batches and
never change the receiver. Share one across threads only read-only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import pyarrow as pa

    from streamrec.store.sequence import SequenceStore

__all__ = ["DEFAULT_TASKS", "RequestBatch", "ragged_gather", "suffix_index"]

DEFAULT_TASKS: tuple[str, ...] = ("click", "like", "finish")

# Columns of SAMPLE_SCHEMA that are ids, labels or bookkeeping, never model features.
_NOT_FEATURES = frozenset({
    "request_id", "user_id", "item_id", "ts_ms", "category", "click", "like", "follow", "finish", "skip",
    "share", "watch_time", "kind", "emit_ts_ms", "gt_click", "gt_like", "gt_finish",
})
# Context columns of SAMPLE_SCHEMA used as categorical features by default.
_CONTEXT = ("device", "hour", "position")


@dataclass
class RequestBatch:
    """R requests, each with one ragged history and its own targets.

    Shape contract (named dimensions): R requests, N history events in all, T
    targets in all, F dense features, C categorical features, K tasks. Request
    r's events are ``hist_*[hist_offsets[r]:hist_offsets[r + 1]]``, oldest
    first; its targets are ``target_*[target_offsets[r]:target_offsets[r + 1]]``.
    Ids are int64 (the pipeline's ids are below 2**53).

    Attributes:
        hist_offsets: int64 (R + 1,), non-decreasing, from 0 to N.
        hist_item: int64 (N,) item ids.
        hist_action: int64 (N,) action codes (``pipeline.events.ACTIONS``; 0 = none).
        hist_ts_ms: int64 (N,) event times.
        hist_value: float32 (N,) the extra float of an event (watch time s; 0 if none).
        request_ts_ms: int64 (R,) request times; histories hold only older events.
        user_id: int64 (R,).
        target_offsets: int64 (R + 1,), non-decreasing, from 0 to T.
        target_item: int64 (T,) candidate item ids.
        target_category: int64 (T,) the candidates' categories.
        dense: float32 (T, F) numeric features (user, candidate, context).
        sparse: int64 (T, C) categorical feature ids (context and feature-set ids).
        labels: float32 (T, K) 0/1 labels, one column per task (zeros when unknown).
        tasks: the K task names, in the order of ``labels``' columns.
        request_id: int64 (R,) (zeros when not known).
        truth: float32 (T, K) or None: the generator's ground-truth probabilities
            per task (NaN where absent), for the best achievable AUC; never a feature.
        sample_index: int64 (T,) or None: each target's row in the sample batch
            it came from (``from_samples``), to align scores with samples.

    Example::

        b = RequestBatch.from_numpy(hist_offsets=[0, 3, 3], hist_item=[5, 6, 7], hist_action=[1, 4, 1],
                                    hist_ts_ms=[10, 20, 30], request_ts_ms=[40, 50],
                                    target_offsets=[0, 2, 3], target_item=[8, 9, 5])
        b.num_requests, b.num_targets      # 2, 3; request 1 has an empty history
        b.repeat_per_target().num_requests # 3, each with its request's history
    """

    hist_offsets: torch.Tensor
    hist_item: torch.Tensor
    hist_action: torch.Tensor
    hist_ts_ms: torch.Tensor
    hist_value: torch.Tensor
    request_ts_ms: torch.Tensor
    user_id: torch.Tensor
    target_offsets: torch.Tensor
    target_item: torch.Tensor
    target_category: torch.Tensor
    dense: torch.Tensor
    sparse: torch.Tensor
    labels: torch.Tensor
    tasks: tuple[str, ...] = DEFAULT_TASKS
    request_id: torch.Tensor | None = None
    truth: torch.Tensor | None = None
    sample_index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.request_id is None:
            self.request_id = torch.zeros(self.num_requests, dtype=torch.int64)
        self.validate()

    # -- sizes ----------------------------------------------------------------------------

    @property
    def num_requests(self) -> int:
        return int(self.hist_offsets.shape[0]) - 1

    @property
    def num_targets(self) -> int:
        return int(self.target_item.shape[0])

    @property
    def num_events(self) -> int:
        return int(self.hist_item.shape[0])

    @property
    def hist_lengths(self) -> torch.Tensor:
        """int64 (R,): events per request."""
        return self.hist_offsets[1:] - self.hist_offsets[:-1]

    @property
    def targets_per_request(self) -> torch.Tensor:
        """int64 (R,): targets per request."""
        return self.target_offsets[1:] - self.target_offsets[:-1]

    @property
    def target_request(self) -> torch.Tensor:
        """int64 (T,): the request of each target."""
        return torch.repeat_interleave(torch.arange(self.num_requests, device=self.target_offsets.device),
                                       self.targets_per_request)

    @property
    def event_request(self) -> torch.Tensor:
        """int64 (N,): the request of each history event."""
        return torch.repeat_interleave(torch.arange(self.num_requests, device=self.hist_offsets.device),
                                       self.hist_lengths)

    # -- checks -------------------------------------------------------------------------

    def validate(self) -> None:
        """Check dtypes and shapes against the contract.

        Raises:
            ValueError: naming the first field that breaks it and what was expected.
        """
        r, n, t = self.num_requests, self.num_events, self.num_targets
        want: dict[str, tuple[torch.dtype, tuple[int | None, ...]]] = {
            "hist_offsets": (torch.int64, (r + 1,)), "hist_item": (torch.int64, (n,)),
            "hist_action": (torch.int64, (n,)), "hist_ts_ms": (torch.int64, (n,)),
            "hist_value": (torch.float32, (n,)), "request_ts_ms": (torch.int64, (r,)),
            "user_id": (torch.int64, (r,)), "target_offsets": (torch.int64, (r + 1,)),
            "target_item": (torch.int64, (t,)), "target_category": (torch.int64, (t,)),
            "dense": (torch.float32, (t, None)), "sparse": (torch.int64, (t, None)),
            "labels": (torch.float32, (t, len(self.tasks))), "request_id": (torch.int64, (r,)),
            "truth": (torch.float32, (t, len(self.tasks))), "sample_index": (torch.int64, (t,)),
        }
        if r < 0:
            raise ValueError("hist_offsets: expected (R + 1,) offsets, got an empty tensor")
        for name, (dtype, shape) in want.items():
            v = getattr(self, name)
            if v is None and name in ("truth", "sample_index"):
                continue
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{name}: expected a torch.Tensor, got {type(v).__name__}")
            ok = v.dtype == dtype and v.dim() == len(shape) and all(
                s is None or s == got for s, got in zip(shape, v.shape, strict=True))
            if not ok:
                raise ValueError(f"{name}: expected {dtype} of shape {shape} (None: any), got {v.dtype} "
                                 f"{tuple(v.shape)}")
        for name, end in (("hist_offsets", n), ("target_offsets", t)):
            off = getattr(self, name)
            if int(off[0]) != 0 or int(off[-1]) != end or bool((off[1:] < off[:-1]).any()):
                raise ValueError(f"{name}: expected non-decreasing offsets from 0 to {end}, got "
                                 f"{off[:8].tolist()}{'...' if off.shape[0] > 8 else ''}")

    # -- constructors -------------------------------------------------------------------

    @classmethod
    def from_numpy(cls, *, hist_offsets: Any, hist_item: Any, hist_action: Any, hist_ts_ms: Any,
                   request_ts_ms: Any, target_offsets: Any, target_item: Any,
                   hist_value: Any = None, user_id: Any = None, target_category: Any = None,
                   dense: Any = None, sparse: Any = None, labels: Any = None,
                   tasks: Sequence[str] = DEFAULT_TASKS, request_id: Any = None, truth: Any = None,
                   sample_index: Any = None) -> RequestBatch:
        """A batch from array-likes; optional fields default to zeros (no features, no labels).

        Raises:
            ValueError: a field of the wrong shape, or offsets that are not
                non-decreasing from 0 to the flat length.
        """
        off = _i64(hist_offsets)
        toff = _i64(target_offsets)
        r = off.shape[0] - 1
        n, t = int(off[-1]) if r >= 0 else 0, int(toff[-1]) if toff.shape[0] else 0
        k = len(tuple(tasks))
        return cls(
            hist_offsets=off, hist_item=_i64(hist_item), hist_action=_i64(hist_action),
            hist_ts_ms=_i64(hist_ts_ms),
            hist_value=_f32(hist_value) if hist_value is not None else torch.zeros(n),
            request_ts_ms=_i64(request_ts_ms),
            user_id=_i64(user_id) if user_id is not None else torch.zeros(r, dtype=torch.int64),
            target_offsets=toff, target_item=_i64(target_item),
            target_category=(_i64(target_category) if target_category is not None
                             else torch.zeros(t, dtype=torch.int64)),
            dense=_mat(_f32(dense), t) if dense is not None else torch.zeros(t, 0),
            sparse=_mat(_i64(sparse), t) if sparse is not None else torch.zeros(t, 0, dtype=torch.int64),
            labels=_f32(labels).reshape(t, k) if labels is not None else torch.zeros(t, k),
            tasks=tuple(tasks),
            request_id=_i64(request_id) if request_id is not None else None,
            truth=_f32(truth).reshape(t, k) if truth is not None else None,
            sample_index=_i64(sample_index) if sample_index is not None else None,
        )

    @classmethod
    def from_samples(cls, samples: pa.RecordBatch | pa.Table, sequences: SequenceStore | None, *,
                     tasks: Sequence[str] = DEFAULT_TASKS, max_len: int = 10_000,
                     dense_columns: Sequence[str] | None = None, sparse_columns: Sequence[str] | None = None,
                     value_field: str | None = "value", arrived_column: str = "hist_len") -> RequestBatch:
        """A batch from the pipeline's samples (``SAMPLE_SCHEMA`` plus feature columns).

        Rows are grouped by ``request_id`` (targets ordered by request id, rows of
        one request in their sample order; ``sample_index`` maps them back). A
        request's time is the earliest ``ts_ms`` of its rows, and its history is
        the user's events in ``sequences`` older than that, the newest
        ``max_len`` of them (read in one batch call for all users).

        Args:
            samples: sample rows; ``user_id`` must be the same on every row of a request.
            sequences: the store the join appends actions to (fields ``item``,
                ``action``, ``timestamp`` and the extra ``value_field``); None for
                empty histories.
            tasks: label columns, in order (int 0/1); ``gt_<task>`` columns, when
                present, fill ``truth``.
            max_len: newest events kept per history.
            dense_columns: float feature columns; default every floating column
                that is not part of ``SAMPLE_SCHEMA``.
            sparse_columns: categorical columns; default ``device``, ``hour``,
                ``position`` and every integer column not part of ``SAMPLE_SCHEMA``.
            value_field: the store's extra field for ``hist_value`` (None: zeros).
            arrived_column: when the samples have this integer column, it holds, per
                impression, how many events the user's sequence held when the
                impression was served; the history is then also cut to those
                first events (append order is arrival order), so a sample emitted
                late (at the window close) sees no action that arrived after its
                request, exactly as serving did. Exact while the user's sequence
                holds fewer than the store's ``max_len`` events (nothing dropped);
                a user at ``max_len`` falls back to the event-time rule alone.

        Raises:
            ValueError: a missing column, or a request whose rows name several users.
        """
        import pyarrow as pa

        if max_len < 0:
            raise ValueError(f"max_len: expected >= 0, got {max_len}")
        names = list(samples.schema.names)
        cols = {name: samples.column(name) for name in names}

        def col(name: str) -> np.ndarray:
            if name not in cols:
                raise ValueError(f"samples: expected a column {name!r}, have {names}")
            return np.asarray(cols[name].to_numpy(zero_copy_only=False))

        scalar = {n for n in names if pa.types.is_integer(samples.schema.field(n).type)
                  or pa.types.is_floating(samples.schema.field(n).type)}
        extra = [n for n in names if n in scalar and n not in _NOT_FEATURES and n not in _CONTEXT
                 and n != arrived_column]
        if dense_columns is None:
            dense_columns = [n for n in extra if pa.types.is_floating(samples.schema.field(n).type)]
        if sparse_columns is None:
            sparse_columns = [*[c for c in _CONTEXT if c in cols],
                              *[n for n in extra if pa.types.is_integer(samples.schema.field(n).type)]]

        rid = col("request_id").astype(np.int64)
        order = np.argsort(rid, kind="stable")
        rid_sorted = rid[order]
        starts = (np.flatnonzero(np.r_[True, rid_sorted[1:] != rid_sorted[:-1]]) if rid.size
                  else np.zeros(0, np.int64))
        toff = np.r_[starts, rid.size].astype(np.int64)
        users_t = col("user_id").astype(np.int64)[order]
        ts_t = col("ts_ms").astype(np.int64)[order]
        users = users_t[starts]
        if rid.size and (users_t != np.repeat(users, np.diff(toff))).any():
            bad = int(rid_sorted[np.flatnonzero(users_t != np.repeat(users, np.diff(toff)))[0]])
            raise ValueError(f"samples: request {bad} has rows of several users")
        req_ts = np.minimum.reduceat(ts_t, starts) if rid.size else np.zeros(0, np.int64)

        if sequences is not None and users.size:
            off, seq = sequences.read(users.astype(np.uint64))
            owner = np.repeat(np.arange(users.size), np.diff(off))
            keep = seq["timestamp"] < req_ts[owner]
            if arrived_column in cols:
                arrived = np.minimum.reduceat(col(arrived_column).astype(np.int64)[order], starts)
                exact = np.diff(off) < sequences.max_len
                nth = np.arange(owner.size) - off[:-1][owner]
                keep &= ~exact[owner] | (nth < arrived[owner])
            held = np.bincount(owner[keep], minlength=users.size).astype(np.int64)
            flat = np.flatnonzero(keep)
            held_off = np.r_[0, np.cumsum(held)].astype(np.int64)
            hist_off, sel = suffix_index(held_off, np.minimum(held, max_len))
            idx = flat[sel]
            items = seq["item"][idx].astype(np.int64)
            acts = seq["action"][idx].astype(np.int64)
            tss = seq["timestamp"][idx]
            vals = seq[value_field][idx] if value_field is not None and value_field in seq else None
        else:
            hist_off = np.zeros(users.size + 1, np.int64)
            items = acts = tss = np.zeros(0, np.int64)
            vals = None

        def matrix(cs: Sequence[str], dtype: type) -> np.ndarray:
            if not cs:
                return np.zeros((rid.size, 0), dtype)
            return np.stack([np.nan_to_num(col(c).astype(dtype))[order] for c in cs], axis=1)

        k = len(tuple(tasks))
        labels = matrix(list(tasks), np.float32) if k else np.zeros((rid.size, 0), np.float32)
        truth = None
        if k and all(f"gt_{task}" in cols for task in tasks):
            truth = np.stack([col(f"gt_{task}").astype(np.float32)[order] for task in tasks], axis=1)
        category = col("category").astype(np.int64)[order] if "category" in cols else None
        return cls.from_numpy(
            hist_offsets=hist_off, hist_item=items, hist_action=acts, hist_ts_ms=tss, hist_value=vals,
            request_ts_ms=req_ts, user_id=users, target_offsets=toff,
            target_item=col("item_id").astype(np.int64)[order], target_category=category,
            dense=matrix(dense_columns, np.float32), sparse=matrix(sparse_columns, np.int64),
            labels=labels, tasks=tasks, request_id=rid_sorted[starts] if rid.size else np.zeros(0, np.int64),
            truth=truth, sample_index=order.astype(np.int64),
        )

    # -- reshapes -----------------------------------------------------------------------

    def to(self, device: torch.device | str) -> RequestBatch:
        """The same batch with every tensor on ``device``."""
        moved: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device) if isinstance(v, torch.Tensor) else v
        return RequestBatch(**moved)

    def with_history_lengths(self, lengths: Any) -> RequestBatch:
        """Each request's history cut to its newest ``min(lengths[r], held)`` events.

        Args:
            lengths: (R,) integers >= 0.
        """
        want = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if want.shape[0] != self.num_requests or (want < 0).any():
            raise ValueError(f"lengths: expected ({self.num_requests},) integers >= 0, got {want.shape}")
        off = self.hist_offsets.cpu().numpy()
        new_off, idx = suffix_index(off, np.minimum(np.diff(off), want))
        return replace(self, **self._events(torch.from_numpy(new_off), torch.from_numpy(idx)))

    def truncate(self, max_len: int) -> RequestBatch:
        """Each history cut to its newest ``max_len`` events (serving and evaluation windows)."""
        if max_len < 0:
            raise ValueError(f"max_len: expected >= 0, got {max_len}")
        return self.with_history_lengths(np.full(self.num_requests, max_len))

    def sample_lengths(self, rng: np.random.Generator, min_len: int, max_len: int, *,
                       beta: float = 0.5, multiple: int = 8) -> RequestBatch:
        """Each history cut to a sampled length, newest suffix kept (training for extrapolation).

        The length is ``min_len + s * (max_len - min_len)`` with ``s ~ Beta(beta,
        beta)`` (U-shaped for beta < 1: short and long windows both common),
        rounded up to a multiple of ``multiple``, as the STCA paper trains.

        Raises:
            ValueError: ``0 <= min_len <= max_len`` or ``beta > 0`` or ``multiple >= 1`` fails.
        """
        if not (0 <= min_len <= max_len) or not beta > 0 or multiple < 1:
            raise ValueError(f"expected 0 <= min_len <= max_len, beta > 0, multiple >= 1; got "
                             f"min_len={min_len}, max_len={max_len}, beta={beta}, multiple={multiple}")
        s = rng.beta(beta, beta, size=self.num_requests)
        raw = min_len + s * (max_len - min_len)
        lengths = np.minimum(np.ceil(raw / multiple) * multiple, max_len).astype(np.int64)
        return self.with_history_lengths(lengths)

    def repeat_per_target(self) -> RequestBatch:
        """One request per target, each with a copy of its request's history.

        The per-sample form of the batch: a model evaluated on it does the
        history work once per target instead of once per request, which is
        what request-level batching saves (and must equal).
        """
        req = self.target_request
        new_off, idx = ragged_gather(self.hist_offsets.cpu().numpy(), req.cpu().numpy())
        dev = self.hist_offsets.device
        return replace(self, **self._events(torch.from_numpy(new_off), torch.from_numpy(idx)),
                       request_ts_ms=self.request_ts_ms[req], user_id=self.user_id[req],
                       request_id=self.request_id[req] if self.request_id is not None else None,
                       target_offsets=torch.arange(self.num_targets + 1, dtype=torch.int64, device=dev))

    def _events(self, offsets: torch.Tensor, idx: torch.Tensor) -> dict[str, Any]:
        """The history fields of the events at flat ``idx``, under new ``offsets``."""
        dev = self.hist_offsets.device
        idx = idx.to(dev)
        return {"hist_offsets": offsets.to(dev), "hist_item": self.hist_item[idx],
                "hist_action": self.hist_action[idx], "hist_ts_ms": self.hist_ts_ms[idx],
                "hist_value": self.hist_value[idx]}


def suffix_index(offsets: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The newest ``keep[r]`` elements of each ragged run, as new offsets and flat indices.

    Requires: offsets int64 (R + 1,) non-decreasing; keep int (R,) with
    ``0 <= keep[r] <= offsets[r + 1] - offsets[r]``.

    Returns:
        ``(new_offsets (R + 1,), index (sum(keep),))``: run r's kept elements are
        ``flat[index[new_offsets[r]:new_offsets[r + 1]]]``, oldest first.
    """
    keep = np.asarray(keep, dtype=np.int64)
    new_off = np.zeros(keep.shape[0] + 1, dtype=np.int64)
    np.cumsum(keep, out=new_off[1:])
    starts = np.asarray(offsets[1:], dtype=np.int64) - keep
    return new_off, _runs(starts, keep, new_off)


def ragged_gather(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs ``rows`` of a ragged array (repeats allowed), as new offsets and flat indices.

    Requires: offsets int64 (R + 1,) non-decreasing; rows int (M,) in [0, R).
    """
    rows = np.asarray(rows, dtype=np.int64)
    lens = (offsets[1:] - offsets[:-1])[rows]
    new_off = np.zeros(rows.shape[0] + 1, dtype=np.int64)
    np.cumsum(lens, out=new_off[1:])
    return new_off, _runs(np.asarray(offsets[:-1], dtype=np.int64)[rows], lens, new_off)


def _runs(starts: np.ndarray, lens: np.ndarray, new_off: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(starts[i], starts[i] + lens[i])`` without a loop per run."""
    total = int(new_off[-1])
    return np.arange(total, dtype=np.int64) - np.repeat(new_off[:-1] - starts, lens)


def _i64(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(torch.int64)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x), dtype=np.int64)).clone()


def _mat(x: torch.Tensor, t: int) -> torch.Tensor:
    """A (T, F) matrix from a (T, F) or a (T,) (one feature) tensor."""
    return x.reshape(t, 1) if x.dim() == 1 else x


def _f32(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(torch.float32)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x), dtype=np.float32)).clone()
