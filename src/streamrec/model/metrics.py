"""Ranking and classification metrics: AUC, per-user GAUC, logloss, HR@K and NDCG@K, and the
progressive (online) accumulator the trainer reports from.

Owns: the definitions the model's figures are quoted in. Every function is vectorised numpy,
O(n log n) at worst; none imports torch (callers pass ``tensor.numpy()``).

Definitions (each with the convention it follows):
    auc       area under the ROC curve as the Mann-Whitney statistic with average ranks, so tied
              scores count one half, exactly as sklearn's ``roc_auc_score`` (unweighted).
    gauc      per-user AUC averaged with each user's impression count as weight, over the users
              that have both a positive and a negative (users with one class have no AUC and are
              skipped; their impressions do not count in the weights). This is the GAUC of
              Zhu et al. (DIN, KDD 2018) and of most industrial papers.
    logloss   mean binary cross-entropy of probabilities clipped to [eps, 1 - eps].
    hr_ndcg   leave-one-out full ranking: one held-out target per user, ranked among all
              candidates not excluded; ties with the target are broken uniformly at random and
              the figures are that expectation (a constant scorer gets HR@K = K / n, not 1 or 0).

Undefined values (an AUC with one class only, an empty input) are ``nan``, not an exception:
online evaluation meets them on its first batches and must keep going.

Thread safety: the functions are pure. ``ProgressiveMetrics`` is not thread-safe; one trainer
thread updates and reads it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "ProgressiveMetrics",
    "TaskSummary",
    "auc",
    "gauc",
    "hr_ndcg_at_k",
    "logloss",
    "target_ranks",
]

_EPS = 1e-7  # logloss clip: probabilities this close to 0 or 1 cost at most ~16 nats
# ProgressiveMetrics bins scores on the logit axis: 2**16 bins over [-16, 16] are 0.0005 wide in
# logit, so two scores share a bin only if their probabilities differ by < 0.0125 % relative; the
# cumulative AUC counts such pairs one half (its error is at most the share of pairs in one bin).
_BINS = 1 << 16
_LOGIT_RANGE = 16.0


def _as_1d(name: str, x: object, dtype: type) -> np.ndarray:
    a: np.ndarray = np.asarray(x, dtype=dtype)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d array, got shape {a.shape}")
    return a


def _labels_scores(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray]:
    y = _as_1d("labels", labels, np.float64)
    s = _as_1d("scores", scores, np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores: expected equal lengths, got {y.size} and {s.size}")
    if y.size and not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels: expected only 0 and 1")
    if not np.isfinite(s).all():
        raise ValueError("scores: expected finite values (NaN or inf found)")
    return y > 0.5, s


def _average_ranks(keys_sorted_equal: np.ndarray, n: int) -> np.ndarray:
    """1-based ranks 1..n of a sorted sequence, tied runs (where ``keys_sorted_equal[i]`` says
    element i+1 equals element i) given the mean rank of their run."""
    starts = np.flatnonzero(np.concatenate(([True], ~keys_sorted_equal)))
    ends = np.concatenate((starts[1:], [n]))  # exclusive
    mean = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    return np.repeat(mean, ends - starts)


def auc(labels: object, scores: object) -> float:
    """ROC AUC of ``scores`` for binary ``labels``; ties count one half (as sklearn).

    Args:
        labels: (N,) of 0/1 (any numeric or bool dtype).
        scores: (N,) finite floats; any monotone transform (logit or probability) gives the same AUC.

    Returns the AUC, or ``nan`` if ``labels`` hold only one class (or are empty).
    Raises ValueError for mismatched lengths, labels other than 0/1, or non-finite scores.
    """
    y, s = _labels_scores(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="stable")
    ss = s[order]
    ranks = _average_ranks(ss[1:] == ss[:-1], s.size)
    r_pos = float(ranks[y[order]].sum())
    return (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def gauc(labels: object, scores: object, users: object) -> float:
    """Impression-weighted mean of per-user AUCs over users that have both classes.

    Args:
        labels: (N,) of 0/1.
        scores: (N,) finite floats.
        users: (N,) integer user ids (any order; impressions need not be grouped).

    Returns the GAUC, or ``nan`` if no user has both a positive and a negative.
    Raises ValueError as ``auc``, or if ``users`` has another length.
    """
    y, s = _labels_scores(labels, scores)
    u = _as_1d("users", users, np.int64)
    if u.shape != y.shape:
        raise ValueError(f"users: expected length {y.size}, got {u.size}")
    if y.size == 0:
        return math.nan
    order = np.lexsort((s, u))  # grouped by user, scores ascending within each user
    us, ss, ys = u[order], s[order], y[order]
    n = y.size
    same_user = us[1:] == us[:-1]
    # Ranks within a user are global ranks minus the user's start; ties never span users.
    ranks = _average_ranks(same_user & (ss[1:] == ss[:-1]), n)
    group_start = np.flatnonzero(np.concatenate(([True], ~same_user)))
    sizes = np.diff(np.concatenate((group_start, [n])))
    ranks -= np.repeat(group_start, sizes)
    n_pos = np.add.reduceat(ys.astype(np.float64), group_start)
    r_pos = np.add.reduceat(np.where(ys, ranks, 0.0), group_start)
    n_neg = sizes - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return math.nan
    per_user = (r_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    w = sizes[ok].astype(np.float64)
    return float((per_user * w).sum() / w.sum())


def logloss(labels: object, probs: object, eps: float = _EPS) -> float:
    """Mean binary cross-entropy (natural log) of ``probs`` clipped to [eps, 1 - eps].

    Returns ``nan`` for empty input. Raises ValueError as ``auc``, or for probabilities outside [0, 1].
    """
    y, p = _labels_scores(labels, probs)
    if y.size == 0:
        return math.nan
    if (p < 0).any() or (p > 1).any():
        raise ValueError("probs: expected probabilities in [0, 1]")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def target_ranks(scores: object, targets: object, exclude: object = None) -> tuple[np.ndarray, np.ndarray]:
    """For each row, how many candidates score above the target, and how many tie with it.

    Args:
        scores: (U, I) float scores of every candidate item for each of U users.
        targets: (U,) int column of each user's held-out item.
        exclude: optional (U, I) bool; True marks candidates that do not compete (items the user
            already interacted with in training). The target is never excluded.

    Returns ``(greater, ties)``, both (U,) int64; ``ties`` does not count the target itself.
    Raises ValueError on shapes, out-of-range targets, or non-finite target scores.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores: expected (U, I), got shape {s.shape}")
    t = _as_1d("targets", targets, np.int64)
    if t.size != s.shape[0]:
        raise ValueError(f"targets: expected {s.shape[0]} entries (one per row), got {t.size}")
    if t.size and (t.min() < 0 or t.max() >= s.shape[1]):
        raise ValueError(f"targets: expected columns in [0, {s.shape[1]}), got [{t.min()}, {t.max()}]")
    rows = np.arange(t.size)
    st = s[rows, t]
    if not np.isfinite(st).all():
        raise ValueError("scores: a target's score is not finite")
    compete = np.ones(s.shape, dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
    if compete.shape != s.shape:
        raise ValueError(f"exclude: expected shape {s.shape}, got {compete.shape}")
    compete[rows, t] = False
    greater = ((s > st[:, None]) & compete).sum(axis=1)
    ties = ((s == st[:, None]) & compete).sum(axis=1)
    return greater.astype(np.int64), ties.astype(np.int64)


def hr_ndcg_at_k(greater: object, ties: object, k: int = 10) -> tuple[float, float]:
    """HR@K and NDCG@K of leave-one-out ranks, ties broken uniformly at random (in expectation).

    With ``g`` candidates above the target and ``t`` tied with it, the target's 0-based rank is
    uniform on g .. g + t; HR@K is the chance it is below K, and NDCG@K the mean of
    1 / log2(rank + 2) over those ranks below K (one relevant item, so the ideal DCG is 1).

    Args:
        greater, ties: (U,) as returned by ``target_ranks``.
        k: the cut-off, >= 1.

    Returns ``(hr, ndcg)`` averaged over users (``nan`` for no users).
    """
    if k < 1:
        raise ValueError(f"k: expected >= 1, got {k}")
    g = _as_1d("greater", greater, np.int64)
    t = _as_1d("ties", ties, np.int64)
    if g.shape != t.shape or (g < 0).any() or (t < 0).any():
        raise ValueError("greater and ties: expected equal-length non-negative counts")
    if g.size == 0:
        return math.nan, math.nan
    # disc_cum[r] = sum of 1/log2(j+2) for j < r, r = 0..k: ranks past k contribute nothing.
    disc_cum = np.concatenate(([0.0], np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))))
    lo = np.minimum(g, k)
    hi = np.minimum(g + t + 1, k)  # exclusive end of the ranks that count
    hits = np.maximum(hi - lo, 0)
    hr = hits / (t + 1.0)
    ndcg = (disc_cum[hi] - disc_cum[lo]) / (t + 1.0)
    return float(hr.mean()), float(ndcg.mean())


@dataclass(frozen=True)
class TaskSummary:
    """One task's progressive figures.

    Attributes:
        samples: samples scored so far.
        positives: of them, positives.
        auc: cumulative AUC over every scored sample (binned on the logit axis; see module notes).
        window_auc: exact AUC over the last ``window`` samples.
        logloss: cumulative mean logloss.
        gauc: exact GAUC over the last ``window`` samples (``nan`` without user ids).
    """

    samples: int
    positives: int
    auc: float
    window_auc: float
    logloss: float
    gauc: float


@dataclass
class _TaskState:
    pos: np.ndarray
    neg: np.ndarray
    loss_sum: float = 0.0
    samples: int = 0
    positives: int = 0
    ring_y: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))
    ring_s: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ring_u: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


class ProgressiveMetrics:
    """Progressive validation: each batch is scored before it is trained on, and this keeps the score.

    Per task it keeps histograms of positive and negative logits (2**16 bins over [-16, 16], so
    memory is constant and the cumulative AUC costs O(bins) to read), the summed logloss, and a
    ring of the last ``window`` (label, logit, user) for an exact windowed AUC and GAUC, which is
    what "running AUC" on a drifting stream should mean.

    Args:
        tasks: task names, e.g. ``("click", "like", "finish")``.
        window: samples kept per task for the windowed figures (default 100,000).

    Example::

        pm = ProgressiveMetrics(["click"])
        pm.update({"click": labels}, {"click": logits}, users=user_ids)
        pm.summary()["click"].auc

    Thread safety: none; one thread updates and reads.
    """

    def __init__(self, tasks: Sequence[str], window: int = 100_000) -> None:
        if not tasks:
            raise ValueError("tasks: expected at least one task name")
        if window < 1:
            raise ValueError(f"window: expected >= 1, got {window}")
        self.tasks = tuple(tasks)
        self.window = window
        self._state = {t: _TaskState(np.zeros(_BINS, np.int64), np.zeros(_BINS, np.int64))
                       for t in self.tasks}

    def update(self, labels: Mapping[str, object], logits: Mapping[str, object],
               users: object = None) -> None:
        """Add one batch: for each task present in both mappings, (B,) 0/1 labels and (B,) logits.

        Tasks missing from either mapping are skipped for this batch. ``users`` is (B,) ints or None.
        """
        u = None if users is None else _as_1d("users", users, np.int64)
        for task in self.tasks:
            if task not in labels or task not in logits:
                continue
            y, z = _labels_scores(labels[task], logits[task])
            if u is not None and u.size != y.size:
                raise ValueError(f"users: expected length {y.size}, got {u.size}")
            st = self._state[task]
            b = _bin(z)
            st.pos += np.bincount(b[y], minlength=_BINS)
            st.neg += np.bincount(b[~y], minlength=_BINS)
            # logloss from logits without forming probabilities: softplus(-z) for y=1, softplus(z) else
            zz = np.clip(np.where(y, -z, z), -1e4, 1e4)
            st.loss_sum += float(np.logaddexp(0.0, zz).sum())
            st.samples += y.size
            st.positives += int(y.sum())
            uu = u if u is not None else np.full(y.size, -1, np.int64)
            st.ring_y = np.concatenate((st.ring_y, y.astype(np.int8)))[-self.window:]
            st.ring_s = np.concatenate((st.ring_s, z))[-self.window:]
            st.ring_u = np.concatenate((st.ring_u, uu))[-self.window:]

    def summary(self) -> dict[str, TaskSummary]:
        """Per task, the figures so far (``nan`` where undefined)."""
        out = {}
        for task, st in self._state.items():
            have_users = bool(st.ring_u.size) and bool((st.ring_u >= 0).all())
            out[task] = TaskSummary(
                samples=st.samples,
                positives=st.positives,
                auc=_binned_auc(st.pos, st.neg),
                window_auc=auc(st.ring_y, st.ring_s) if st.ring_y.size else math.nan,
                logloss=st.loss_sum / st.samples if st.samples else math.nan,
                gauc=gauc(st.ring_y, st.ring_s, st.ring_u) if have_users else math.nan,
            )
        return out


def _bin(z: np.ndarray) -> np.ndarray:
    scaled = (np.clip(z, -_LOGIT_RANGE, _LOGIT_RANGE) + _LOGIT_RANGE) * (_BINS / (2 * _LOGIT_RANGE))
    return np.minimum(scaled.astype(np.int64), _BINS - 1)


def _binned_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    p, q = pos.astype(np.float64), neg.astype(np.float64)
    neg_below = np.cumsum(q) - q  # negatives in lower bins
    wins = (p * neg_below).sum() + 0.5 * (p * q).sum()
    return float(wins / (n_pos * n_neg))
