"""The traffic generator: a catalog, users with long-lived drifting interests, and the hidden ground truth.

Owns: ``GeneratorConfig``; ``GroundTruth`` (the catalog, the users and the click/like/finish model every
impression is drawn from); ``generate`` (the stream of (impressions, actions) record batches per simulated
time step, with action delays, duplicates and late arrivals); ``histories`` (per-user warm-up action
sequences before the stream starts, from the same ground truth); ``write_events`` (rolling files). It must not
import ``model``, and nothing it emits may be read back as a feature except through the pipeline: the
``gt_*`` columns are the answers.

The world, once (all drawn from ``seed``):
- **Items** have a category (uniform), a quality (normal) and a duration (log-normal, 3-300 s); their
  popularity is Zipf over a random ranking (``zipf_exponent``).
- **Users** have ``interests_per_user`` interests over categories. ``rare_interests`` of them are long-period:
  candidates of that category are shown only once every ``rare_period`` impressions of the user (log-uniform
  per interest) but are liked a lot (``rare_affinity``), and they never drift. The others are frequent
  (``interest_share`` of all candidates) and drift: each moves to the next category about once every
  ``1 / drift_rate`` impressions of its user. A category's affinity for the user is the largest strength of
  the interests that point at it (0 for every other category), so a rare interest is visible only in old
  history: the last 100 events hold one with probability about 100 / period.
- **Ground truth** per impression: ``p_click = sigmoid(base + user bias + item quality + affinity + device +
  hour of day + position)``; ``p_like = p_click * sigmoid(...affinity, user's like bias, quality)``;
  ``p_finish = p_click * sigmoid(...affinity, duration)``. They are written as ``gt_click``, ``gt_like``,
  ``gt_finish``.
- **Actions**: click after a log-normal delay (``action_delay_s`` median), then like / share / follow after
  ``reaction_delay_s`` and finish (``value`` = duration) after the item's duration; an impression not clicked
  is skipped with ``skip_prob``. ``duplicate_rate`` of impressions and actions are sent twice (the copy
  up to ``duplicate_delay_s`` later); ``late_rate`` of actions arrive ``late_delay_s`` after their event
  time, i.e. in a later batch, behind the watermark.

Determinism: a step's randomness comes from ``default_rng([seed, stream, step])``, the world's from
``default_rng([seed, world])``: the same config gives the same batches, on any machine with the same numpy.

Thread safety: ``GroundTruth`` is read-only after construction (share it freely); a ``generate`` iterator
belongs to one thread.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from streamrec.errors import ConfigError
from streamrec.pipeline._generator_kernels import Segments, ground_truth, sample_items
from streamrec.pipeline.events import ACTION_SCHEMA, ACTIONS, IMPRESSION_SCHEMA

__all__ = [
    "Catalog",
    "GeneratorConfig",
    "GroundTruth",
    "Histories",
    "generate",
    "histories",
    "load_generator_config",
    "write_events",
    "write_histories",
]

_WORLD, _STREAM, _HISTORY = 0x3E1D, 0x57EA, 0x4157  # rng stream tags: world, stream steps, warm-up histories
_MS_PER_HOUR = 3_600_000
_BLOCK = 64  # steps: rows due sooner wait as views of their step's arrays, later ones as copies per block


@dataclass(frozen=True)
class GeneratorConfig:
    """What the generator simulates. Every default is a plain, documented choice; none is measured.

    Attributes:
        users: number of users (ids 0..users-1). Default 10,000.
        items: number of items (ids 0..items-1). Default 100,000.
        categories: number of item categories. Default 200.
        interests_per_user: interests per user, rare ones included. Default 6.
        rare_interests: how many of them are long-period (rarely shown, strongly liked, never drifting).
            Default 2.
        rare_period: (low, high) impressions of the user between two exposures of one rare interest;
            log-uniform per interest. Default (500, 5000): "every few thousand events".
        rare_affinity: click log-odds boost of a rare interest's category. Default 3.0 (from a 4 % base
            CTR to about 45 %).
        affinity: median log-odds boost of a frequent interest (log-normal, sigma 0.3). Default 1.5.
        interest_share: fraction of candidates drawn from the user's frequent interests; the rest follow
            global popularity. Default 0.5.
        drift_rate: moves per impression of the user: each frequent interest moves to the next category
            once every ``1 / drift_rate`` of the user's impressions (at a random phase per interest).
            Default 1e-4 (one move per 10k impressions).
        zipf_exponent: item popularity ~ rank**-s. Default 0.9.
        candidates_median: median candidates per request (log-normal). Default 16.
        candidates_sigma: log-normal sigma of candidates per request. Default 0.6.
        max_candidates: cap on candidates per request. Default 256.
        base_logit: click log-odds of an average impression outside the user's interests. Default -3.2.
        skip_prob: chance that an impression not clicked is skipped explicitly. Default 0.6.
        action_delay_s: median delay of a click or skip after its impression (log-normal, sigma 1,
            capped at 30 medians). Default 2 s.
        reaction_delay_s: median delay of like, share and follow after the click (log-normal, sigma 1,
            capped at 30 medians).
            Default 15 s. With watch time (finish comes after the item's duration) this spreads actions
            from seconds to minutes.
        duplicate_rate: fraction of impressions and of actions delivered twice. Default 0.01.
        duplicate_delay_s: the copy arrives up to this much later (uniform). Default 30 s.
        late_rate: fraction of actions that arrive late. Default 0.01.
        late_delay_s: (low, high) arrival delay of a late action after its event time (uniform).
            Default (60, 600): behind a 1-minute watermark, inside or beyond a label window.
        devices: number of device types (context). Default 4.
        seed: the seed of everything. Default 0.
        start_ms: event time of the first step (ms since the epoch). Default 2026-01-01T00:00:00Z.
        impressions_per_s: impressions per second of simulated time (actions come on top, about 0.7 per
            impression with the defaults). Default 100,000.
        step_s: simulated seconds per emitted step. Default 1.0.
    """

    users: int = 10_000
    items: int = 100_000
    categories: int = 200
    interests_per_user: int = 6
    rare_interests: int = 2
    rare_period: tuple[float, float] = (500.0, 5000.0)
    rare_affinity: float = 3.0
    affinity: float = 1.5
    interest_share: float = 0.5
    drift_rate: float = 1e-4
    zipf_exponent: float = 0.9
    candidates_median: float = 16.0
    candidates_sigma: float = 0.6
    max_candidates: int = 256
    base_logit: float = -3.2
    skip_prob: float = 0.6
    action_delay_s: float = 2.0
    reaction_delay_s: float = 15.0
    duplicate_rate: float = 0.01
    duplicate_delay_s: float = 30.0
    late_rate: float = 0.01
    late_delay_s: tuple[float, float] = (60.0, 600.0)
    devices: int = 4
    seed: int = 0
    start_ms: int = 1_767_225_600_000
    impressions_per_s: float = 100_000.0
    step_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("users", "items", "categories", "interests_per_user", "max_candidates", "devices"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, name)}", field=name)
        if not 0 <= self.rare_interests < self.interests_per_user:
            raise ConfigError(f"must be in [0, interests_per_user), got {self.rare_interests}",
                              field="rare_interests")
        if self.items < self.categories:
            raise ConfigError(f"needs at least one item per category ({self.categories}), got {self.items}",
                              field="items")
        for name in ("interest_share", "skip_prob", "duplicate_rate", "late_rate", "drift_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"must be in [0, 1], got {getattr(self, name)}", field=name)
        lo, hi = self.rare_period
        if not 1.0 <= lo <= hi:
            raise ConfigError(f"must be 1 <= low <= high, got {self.rare_period}", field="rare_period")
        if self.rare_interests and self.rare_interests / lo + self.interest_share > 1.0:
            raise ConfigError("rare exposures plus interest_share exceed all candidates", field="rare_period")
        if not 0.0 <= self.late_delay_s[0] <= self.late_delay_s[1]:
            raise ConfigError(f"must be 0 <= low <= high, got {self.late_delay_s}", field="late_delay_s")
        for name in ("impressions_per_s", "step_s", "candidates_median", "action_delay_s",
                     "reaction_delay_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"must be > 0, got {getattr(self, name)}", field=name)
        if self.step_s * 1000 != int(self.step_s * 1000):
            raise ConfigError(f"must be a whole number of ms, got {self.step_s}", field="step_s")

    @property
    def mean_candidates(self) -> float:
        """Expected candidates per request (the log-normal's mean, before rounding and the cap)."""
        return float(self.candidates_median * math.exp(self.candidates_sigma**2 / 2))


def load_generator_config(path: str | Path, **overrides: Any) -> GeneratorConfig:
    """A ``GeneratorConfig`` from a TOML file (top level or a ``[generate]`` table), then ``overrides``.

    Raises:
        ConfigError: the file is missing or unreadable, or a field is unknown or invalid (names the field).
    """
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: {exc}") from exc
    doc = doc.get("generate", doc)
    known = {f.name: f for f in dataclasses.fields(GeneratorConfig)}
    values: dict[str, Any] = {}
    for key, value in {**doc, **overrides}.items():
        if key not in known:
            raise ConfigError("unknown field", field=f"generate.{key}")
        values[key] = tuple(value) if isinstance(value, list) else value
    try:
        return GeneratorConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# -- the world ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Catalog:
    """The items. Shape: (I,) arrays indexed by item id.

    Attributes:
        category: (I,) int32, each item's category in [0, categories).
        popularity: (I,) float64, global exposure probability (Zipf over a random ranking; sums to 1).
        quality: (I,) float32, the item's click log-odds offset in the ground truth.
        duration_s: (I,) float32, the item's length in seconds (the watch time of a finish).
    """

    category: np.ndarray
    popularity: np.ndarray
    quality: np.ndarray
    duration_s: np.ndarray


class GroundTruth:
    """The hidden model: catalog, users and interests, and the probabilities of every action.

    Args:
        cfg: the generator config; the world depends on ``seed`` and the sizes only.

    Attributes:
        catalog: the ``Catalog``.
        interest_category: (U, K) int32, each interest's category at ``start_ms`` before drift (rare
            interests are the last ``rare_interests`` columns and never drift).
        interest_strength: (U, K) float32, the click log-odds boost of each interest.
        interest_rare: (K,) bool, which columns are rare interests.
        rate: (U,) float64, the user's impressions per simulated second in the stream.

    Thread safety: read-only after construction.

    Example:
        >>> gt = GroundTruth(GeneratorConfig(users=100, items=1000, categories=20))
        >>> gt.affinity(np.array([0]), np.array([3]), np.array([gt.cfg.start_ms])).shape
        (1,)
    """

    def __init__(self, cfg: GeneratorConfig) -> None:
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, _WORLD])
        n_i, n_u, n_c = cfg.items, cfg.users, cfg.categories
        k, kr = cfg.interests_per_user, cfg.rare_interests
        category = np.concatenate([np.arange(n_c), rng.integers(0, n_c, n_i - n_c)]).astype(np.int32)
        rank = rng.permutation(n_i)
        popularity = (rank + 1.0) ** -cfg.zipf_exponent
        popularity /= popularity.sum()
        self.catalog = Catalog(
            category=category,
            popularity=popularity,
            quality=rng.normal(0.0, 0.5, n_i).astype(np.float32),
            duration_s=np.clip(rng.lognormal(math.log(20.0), 0.6, n_i), 3.0, 300.0).astype(np.float32),
        )
        self.interest_category = _distinct_categories(rng, n_u, k, n_c)
        self.interest_rare = np.arange(k) >= k - kr
        strength = cfg.affinity * rng.lognormal(0.0, 0.3, (n_u, k))
        strength[:, self.interest_rare] = cfg.rare_affinity
        self.interest_strength = strength.astype(np.float32)
        lo, hi = cfg.rare_period
        period = np.exp(rng.uniform(math.log(lo), math.log(hi), (n_u, kr)))
        self._rare_cum = np.cumsum(1.0 / period, axis=1)  # (U, kr): thresholds of the exposure draw
        self._drift_phase = rng.random((n_u, k))
        self._user_bias = rng.normal(0.0, 0.3, n_u).astype(np.float32)
        self._like_bias = rng.normal(0.0, 0.5, n_u).astype(np.float32)
        self._home_device = rng.integers(0, cfg.devices, n_u).astype(np.int32)
        self._tz_hours = rng.integers(0, 24, n_u).astype(np.int64)
        self._device_effect = rng.normal(0.0, 0.15, cfg.devices).astype(np.float32)
        activity = rng.lognormal(0.0, 0.5, n_u)
        activity /= activity.sum()
        self.rate = activity * cfg.impressions_per_s
        self._users = Segments(activity, np.array([0, n_u]), np.arange(n_u, dtype=np.int64))
        self._items = Segments(popularity, np.array([0, n_i]), np.arange(n_i, dtype=np.int64))
        by_cat = np.argsort(category, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(category, minlength=n_c))])
        self._by_category = Segments(popularity[by_cat], starts, by_cat.astype(np.int64))
        c = self.catalog
        self._item_table = np.stack([c.category, c.quality, c.duration_s], axis=1).astype(np.float64)

    def interests_at(self, user: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
        """(N, K) int32: the categories of ``user``'s interests at ``ts_ms`` (frequent ones drift)."""
        moves = np.floor((ts_ms - self.cfg.start_ms)[:, None] / 1000.0 * self.rate[user][:, None]
                         * self.cfg.drift_rate + self._drift_phase[user])
        moves[:, self.interest_rare] = 0
        cats = (self.interest_category[user] + moves.astype(np.int64)) % self.cfg.categories
        return cats.astype(np.int32)

    def affinity(self, user: np.ndarray, category: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
        """(N,) float32: the click log-odds boost of ``category`` for ``user`` at ``ts_ms``."""
        hit = self.interests_at(user, ts_ms) == category[:, None]
        return np.max(np.where(hit, self.interest_strength[user], 0.0), axis=1).astype(np.float32)

    def probabilities(self, user: np.ndarray, item: np.ndarray, ts_ms: np.ndarray, position: np.ndarray,
                      device: np.ndarray, hour: np.ndarray,
                      aff: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p_click, p_like, p_finish), each (N,) float32, unconditional probabilities of the labels.

        ``aff`` may pass ``affinity(user, category[item], ts_ms)`` when the caller has it already.
        """
        cat = self.catalog
        if aff is None:
            aff = self.affinity(user, cat.category[item], ts_ms)
        q = cat.quality[item]
        hour_effect = 0.25 * np.cos((hour.astype(np.float32) - 21.0) * np.float32(2 * math.pi / 24))
        logit = (self.cfg.base_logit + self._user_bias[user] + q + aff + self._device_effect[device]
                 + hour_effect - 0.15 * np.log1p(position.astype(np.float32)))
        click = _sigmoid(logit.astype(np.float32))
        like = click * _sigmoid(-1.0 + self._like_bias[user] + 0.6 * aff + 0.5 * q)
        finish = click * _sigmoid(1.5 - cat.duration_s[item] / 30.0 + 0.5 * aff)
        return click, like.astype(np.float32), finish.astype(np.float32)

    # -- drawing impressions and actions (shared by the stream and the warm-up histories) ------------------

    def draw_impressions(self, rng: np.random.Generator, user: np.ndarray, ts_ms: np.ndarray,
                         first_request_id: int) -> dict[str, np.ndarray]:
        """Candidates for requests (``user``, ``ts_ms``), as IMPRESSION_SCHEMA columns (numpy).

        Requests get consecutive ids from ``first_request_id``; rows stay in request order. A request
        draws a log-normal number of candidates; an item drawn twice for one request is shown once.
        """
        cfg = self.cfg
        r = user.size
        m = np.clip(np.rint(cfg.candidates_median * np.exp(cfg.candidates_sigma * rng.standard_normal(r))),
                    1, cfg.max_candidates).astype(np.int64)
        n = int(m.sum())
        device = np.where(rng.random(r) < 0.8, self._home_device[user],
                          rng.integers(0, cfg.devices, r)).astype(np.int32)
        hour = ((ts_ms // _MS_PER_HOUR + self._tz_hours[user]) % 24).astype(np.int8)
        uv = rng.random((2, n))
        drawn = np.empty(n, np.int64)
        interests = self.interests_at(user, ts_ms)
        cat, items = self._by_category, self._items
        sample_items(m, user, interests, uv[0], uv[1], self._rare_cum,
                      cfg.interests_per_user - cfg.rare_interests, max(cfg.interest_share, 1e-12),
                      cat.starts, cat.table, items.table, drawn)
        keep = drawn >= 0
        out_i = drawn[keep]
        req = np.repeat(np.arange(r), m)[keep]
        m = np.bincount(req, minlength=r)
        out_p = np.empty((3, out_i.size), np.float32)
        out_pos = np.empty(out_i.size, np.int32)
        ground_truth(m, user, interests, out_i, self.interest_strength, self._item_table, self._user_bias,
                      self._like_bias, self._device_effect, device, hour, cfg.base_logit, out_pos, out_p)
        return {
            "request_id": first_request_id + req, "user_id": user[req], "item_id": out_i,
            "ts_ms": ts_ms[req], "position": out_pos, "category": self.catalog.category[out_i],
            "device": device[req], "hour": hour[req], "gt_click": out_p[0], "gt_like": out_p[1],
            "gt_finish": out_p[2],
        }

    def draw_actions(self, rng: np.random.Generator, imp: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Actions sampled from the ground truth of impressions ``imp``, as ACTION_SCHEMA columns (numpy),
        grouped by action type (not sorted by time)."""
        cfg = self.cfg
        p = imp["gt_click"]
        u = rng.random(p.size)
        clicked = np.flatnonzero(u < p)
        # The same uniform, rescaled above p, decides the skip of an impression not clicked.
        skipped = np.flatnonzero((u >= p) & ((u - p) < cfg.skip_prob * (1.0 - p)))
        n_c = clicked.size
        click_ts = imp["ts_ms"][clicked] + _delay_ms(rng, cfg.action_delay_s, n_c)
        w = rng.random((n_c, 4))
        pc = p[clicked]
        liked = w[:, 0] * pc < imp["gt_like"][clicked]  # P(like | click) = gt_like / gt_click
        finished = w[:, 1] * pc < imp["gt_finish"][clicked]
        shared = w[:, 2] < 0.03
        followed = liked & (w[:, 3] < 0.1)
        dur = self.catalog.duration_s[imp["item_id"][clicked]]
        react = _delay_ms(rng, cfg.reaction_delay_s, n_c)
        skip_ts = imp["ts_ms"][skipped] + _delay_ms(rng, cfg.action_delay_s, skipped.size)
        finish_ts = click_ts[finished] + (dur[finished] * 1000).astype(np.int64)
        parts = [
            (clicked, click_ts, ACTIONS["click"], None),
            (skipped, skip_ts, ACTIONS["skip"], None),
            (clicked[liked], click_ts[liked] + react[liked], ACTIONS["like"], None),
            (clicked[finished], finish_ts, ACTIONS["finish"], dur[finished]),
            (clicked[shared], click_ts[shared] + 2 * react[shared], ACTIONS["share"], None),
            (clicked[followed], click_ts[followed] + react[followed] + 1000, ACTIONS["follow"], None),
        ]
        rows = np.concatenate([ix for ix, _, _, _ in parts])
        return {
            "request_id": imp["request_id"][rows], "user_id": imp["user_id"][rows],
            "item_id": imp["item_id"][rows], "ts_ms": np.concatenate([t for _, t, _, _ in parts]),
            "action": np.repeat(np.array([a for _, _, a, _ in parts], np.int8),
                                [ix.size for ix, _, _, _ in parts]),
            "value": np.concatenate([np.zeros(ix.size, np.float32) if v is None else v
                                     for ix, _, _, v in parts]),
        }

    def sample_requests(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n,) int64 users of n requests, by activity."""
        return self._users.sample(0, rng.random(n))


def _distinct_categories(rng: np.random.Generator, n_users: int, k: int, n_cat: int) -> np.ndarray:
    """(n_users, k) int32 categories, distinct within each row (so one category is one interest)."""
    cats = rng.integers(0, n_cat, (n_users, k))
    while True:
        s = np.sort(cats, axis=1)
        bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1)) if k > 1 else np.empty(0, np.int64)
        if not bad.size:
            return cats.astype(np.int32)
        cats[bad] = rng.integers(0, n_cat, (bad.size, k))


def _delay_ms(rng: np.random.Generator, median_s: float, n: int) -> np.ndarray:
    """Log-normal delays (sigma 1) capped at 30 medians (3.4 sigma), so "minutes" does not become hours."""
    return (median_s * 1000.0 * np.minimum(np.exp(rng.standard_normal(n)), 30.0)).astype(np.int64)


# -- the stream ---------------------------------------------------------------------------------------------


def _take(cols: dict[str, np.ndarray], ix: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[ix] for k, v in cols.items()}


def _concat(parts: list[dict[str, np.ndarray]], schema: pa.Schema) -> dict[str, np.ndarray]:
    if not parts:
        return {f.name: np.empty(0, f.type.to_pandas_dtype()) for f in schema}
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _batch(cols: dict[str, np.ndarray], schema: pa.Schema) -> pa.RecordBatch:
    ts = cols["ts_ms"]
    if not np.all(ts[1:] >= ts[:-1]):  # a step's own impressions come sorted; only copies disorder them
        order = np.argsort(ts, kind="stable")
        cols = {k: v[order] for k, v in cols.items()}
    return pa.RecordBatch.from_arrays([pa.array(cols[f.name], f.type) for f in schema], schema=schema)


class _Stream:
    """The state between steps: actions and copies waiting for their arrival step.

    Rows due within ``_BLOCK`` steps wait in ``pending[step]`` as views of their step's arrays; later ones
    (late and duplicate arrivals, minutes ahead) wait as copies in ``far[block]`` and are split per step
    when their block of ``_BLOCK`` steps begins, so a step files tens of groups, not hundreds.
    """

    def __init__(self, cfg: GeneratorConfig, truth: GroundTruth) -> None:
        self.cfg, self.truth = cfg, truth
        self.step_ms = round(cfg.step_s * 1000)
        self.requests_per_step = max(1, round(cfg.impressions_per_s * cfg.step_s / cfg.mean_candidates))
        self.next_request = 0
        self.pending: dict[int, tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]] = {}
        self.far: dict[int, list[tuple[int, dict[str, np.ndarray]]]] = {}

    @property
    def idle(self) -> bool:
        return not self.pending and not self.far

    def _defer(self, step: int, cols: dict[str, np.ndarray], arrival_ms: np.ndarray, which: int) -> None:
        """File rows (``which``: 0 impressions, 1 actions) under their arrival step."""
        due = (arrival_ms - self.cfg.start_ms) // self.step_ms
        if "_due" in cols:
            due = cols.pop("_due")
        at = due - step
        far = at >= _BLOCK
        if far.any():
            ix = np.flatnonzero(far)
            block = due[ix] // _BLOCK
            for b in np.unique(block):
                sel = ix[block == b]
                self.far.setdefault(int(b), []).append((which, {**_take(cols, sel), "_due": due[sel]}))
            near = np.flatnonzero(~far)
            cols, at = _take(cols, near), at[near]
        order = np.argsort(at.astype(np.uint8), kind="stable")  # a counting sort: offsets < _BLOCK
        at = at[order]
        cols = _take(cols, order)
        bounds = np.flatnonzero(np.diff(at)) + 1
        for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [at.size]]), strict=True):
            if hi > lo:
                part = {k: v[lo:hi] for k, v in cols.items()}
                self.pending.setdefault(step + int(at[lo]), ([], []))[which].append(part)

    def _refile(self, s: int) -> None:
        """At the start of a block, split its far rows per step."""
        for which in (0, 1):
            parts = [cols for w, cols in self.far.get(s // _BLOCK, []) if w == which]
            if parts:
                cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                self._defer(s, cols, cols["_due"], which)
        self.far.pop(s // _BLOCK, None)

    def _dup_delay(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return (rng.random(n) * self.cfg.duplicate_delay_s * 1000).astype(np.int64)

    def _copies(self, rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
        k = rng.binomial(n, rate) if n else 0
        return np.unique(rng.integers(0, n, k)) if k else np.empty(0, np.int64)

    def step(self, s: int, new_impressions: bool) -> tuple[pa.RecordBatch, pa.RecordBatch]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, _STREAM, s])
        t0 = cfg.start_ms + s * self.step_ms
        imps: list[dict[str, np.ndarray]] = []
        if s % _BLOCK == 0:
            self._refile(s)
        if new_impressions:
            r = self.requests_per_step
            ts = t0 + np.sort(rng.integers(0, self.step_ms, r))
            imp = self.truth.draw_impressions(rng, self.truth.sample_requests(rng, r), ts, self.next_request)
            self.next_request += r
            imps.append(imp)
            dup = self._copies(rng, imp["ts_ms"].size, cfg.duplicate_rate)
            if dup.size:
                copy = _take(imp, dup)
                self._defer(s, copy, copy["ts_ms"] + self._dup_delay(rng, dup.size), 0)
            act = self.truth.draw_actions(rng, imp)
            arrival = act["ts_ms"].copy()
            late = self._copies(rng, arrival.size, cfg.late_rate)
            lo, hi = cfg.late_delay_s
            arrival[late] += (rng.uniform(lo, hi, late.size) * 1000).astype(np.int64)
            dup = self._copies(rng, arrival.size, cfg.duplicate_rate)
            if dup.size:
                self._defer(s, _take(act, dup), arrival[dup] + self._dup_delay(rng, dup.size), 1)
            self._defer(s, act, arrival, 1)
        waiting_imps, waiting_acts = self.pending.pop(s, ([], []))
        return (_batch(_concat(imps + waiting_imps, IMPRESSION_SCHEMA), IMPRESSION_SCHEMA),
                _batch(_concat(waiting_acts, ACTION_SCHEMA), ACTION_SCHEMA))


def generate(cfg: GeneratorConfig, events: int | None = None,
             truth: GroundTruth | None = None) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
    """The stream: one (impressions, actions) pair of record batches per simulated step of ``cfg.step_s``.

    Each batch holds the rows that *arrive* during the step, sorted by ``ts_ms``: impressions of the step
    (plus duplicate copies), and actions whose delay brought them here (late ones carry an event time from
    steps ago). Both follow IMPRESSION_SCHEMA / ACTION_SCHEMA.

    Args:
        cfg: the config.
        events: stop drawing new requests once this many rows (impressions plus actions) were emitted,
            then keep stepping until every pending action and copy has arrived (so the total is a little
            above ``events``). None: endless.
        truth: a ``GroundTruth(cfg)`` built earlier (it is deterministic; passing it saves the build).

    Example:
        >>> imps, acts = next(generate(GeneratorConfig(users=100, items=1000, categories=20)))
        >>> imps.schema == IMPRESSION_SCHEMA
        True
    """
    stream = _Stream(cfg, truth if truth is not None else GroundTruth(cfg))
    emitted = 0
    s = 0
    while True:
        drawing = events is None or emitted < events
        if not drawing and stream.idle:
            return
        imps, acts = stream.step(s, drawing)
        emitted += imps.num_rows + acts.num_rows
        s += 1
        yield imps, acts


# -- warm-up histories -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Histories:
    """Per-user action sequences before the stream starts, ragged (values plus offsets), oldest first.

    Shape: U users, N actions in all; user ``users[j]`` owns rows ``offsets[j]:offsets[j+1]``.

    Attributes:
        users: (U,) int64 user ids.
        offsets: (U+1,) int64.
        item_id, category (int32), action (int8), ts_ms (int64), value (float32, watch time of finishes):
            (N,) columns, as the join appends them to the ``SequenceStore``.
    """

    users: np.ndarray
    offsets: np.ndarray
    item_id: np.ndarray
    category: np.ndarray
    action: np.ndarray
    ts_ms: np.ndarray
    value: np.ndarray


def histories(cfg: GeneratorConfig, n_events: int, users: np.ndarray | None = None,
              truth: GroundTruth | None = None) -> Histories:
    """The last ``n_events`` actions of each user before ``cfg.start_ms``, from the same ground truth.

    Each user's requests go back in time at the user's stream rate (so drift and rare interests line up
    with what ``generate`` draws next); no duplicates or late arrivals (it is the stored sequence).

    Args:
        n_events: actions per user (exactly this many).
        users: which users (default all), any order; returned in that order.

    Memory: about 33 bytes per action returned (10k users x 10k actions is 3.3 GB: take a subset of users,
    or ``write_histories``, which goes in chunks). Speed: about 0.6 M actions/s on one core.
    """
    truth = truth if truth is not None else GroundTruth(cfg)
    users = np.arange(cfg.users, dtype=np.int64) if users is None else np.asarray(users, np.int64)
    out: list[dict[str, np.ndarray]] = []
    chunk = max(1, 500_000 // max(1, n_events))  # about 150 MB of temporaries
    for c, lo in enumerate(range(0, users.size, chunk)):
        part = users[lo:lo + chunk]
        need = n_events * 2.0  # actions per impression is about 0.7 with the defaults; start at 2 to 1
        while True:
            rng = np.random.default_rng([cfg.seed, _HISTORY, c, int(need)])
            per_user = math.ceil(need / cfg.mean_candidates) + 1
            req_user = np.repeat(part, per_user)
            mean_gap_s = cfg.mean_candidates / truth.rate[part]
            gaps = rng.exponential(1.0, (part.size, per_user)) * mean_gap_s[:, None]
            ts = (cfg.start_ms - np.cumsum(gaps, axis=1)[:, ::-1] * 1000).astype(np.int64).ravel()
            imp = truth.draw_impressions(rng, req_user, ts, 0)
            act = truth.draw_actions(rng, imp)
            keep = act["ts_ms"] < cfg.start_ms
            act = _take(act, np.flatnonzero(keep))
            rank = np.searchsorted(part, act["user_id"]) if np.all(np.diff(part) > 0) else \
                _rank_of(part, act["user_id"])
            order = np.lexsort((act["ts_ms"], rank))
            act, rank = _take(act, order), rank[order]
            counts = np.bincount(rank, minlength=part.size)
            if counts.min() >= n_events:
                break
            need *= 2
        ends = np.cumsum(counts)
        take = (np.arange(rank.size) >= (ends - n_events)[rank])
        out.append(_take(act, np.flatnonzero(take)))
    cols = _concat(out, ACTION_SCHEMA)
    return Histories(
        users=users, offsets=np.arange(users.size + 1, dtype=np.int64) * n_events,
        item_id=cols["item_id"], category=truth.catalog.category[cols["item_id"]],
        action=cols["action"], ts_ms=cols["ts_ms"], value=cols["value"],
    )


def write_histories(cfg: GeneratorConfig, n_events: int, path: str | Path,
                    on_chunk: Callable[[int], None] | None = None) -> int:
    """``histories(cfg, n_events)`` of every user into one Parquet file, flat and sorted by (user, time):
    columns user_id, item_id, category, action, ts_ms, value. Written in chunks of users (``on_chunk`` gets
    each chunk's user count) through ``PATH.tmp`` and a rename. Returns the rows written."""
    import pyarrow.parquet as pq

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    truth = GroundTruth(cfg)
    chunk = max(1, 2_000_000 // max(1, n_events))
    rows = 0
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("category", pa.int32()),
                        ("action", pa.int8()), ("ts_ms", pa.int64()), ("value", pa.float32())])
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for lo in range(0, cfg.users, chunk):
            users = np.arange(lo, min(cfg.users, lo + chunk), dtype=np.int64)
            h = histories(cfg, n_events, users=users, truth=truth)
            writer.write_table(pa.table([np.repeat(h.users, np.diff(h.offsets)), h.item_id, h.category,
                                         h.action, h.ts_ms, h.value], schema=schema))
            rows += h.item_id.size
            if on_chunk is not None:
                on_chunk(users.size)
    os.replace(tmp, out)
    return rows


def _rank_of(part: np.ndarray, user: np.ndarray) -> np.ndarray:
    order = np.argsort(part, kind="stable")
    return order[np.searchsorted(part[order], user)]


# -- files ------------------------------------------------------------------------------------------------


def _write_file(table: pa.Table, path: Path, fmt: str) -> None:
    """Write ``table`` to ``path`` through ``path.tmp`` and a rename, so a tailing reader never sees a
    partial file (sources skip ``*.tmp``)."""
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, tmp, compression="zstd")
    elif fmt == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, tmp)
    else:
        # 15 decimals: a float32 probability as small as 1e-6 keeps its 9 significant digits (exact).
        table.to_pandas().to_json(tmp, orient="records", lines=True, double_precision=15)
    os.replace(tmp, path)


def write_events(cfg: GeneratorConfig, out_dir: str | Path, *, events: int, fmt: str = "parquet",
                 rows_per_file: int = 1_000_000,
                 on_step: Callable[[int], None] | None = None) -> dict[str, int]:
    """Generate ``events`` rows into rolling files under ``out_dir``.

    Layout: ``impressions/part-NNNNNN.EXT`` and ``actions/part-NNNNNN.EXT`` (names in arrival order, about
    ``rows_per_file`` rows each; rows in arrival order, each step's rows sorted by ``ts_ms``, so late actions
    sit behind newer ones as they would in a log), ``catalog.parquet`` (item_id, category, popularity) and
    ``generator.json`` (the config). Files appear by rename, so a tailing source can follow the directory.

    Args:
        fmt: "parquet", "jsonl" or "csv".
        on_step: called with the rows emitted by each step (a progress bar).

    Returns:
        {"impressions": rows, "actions": rows, "files": files written}.
    """
    if fmt not in ("parquet", "jsonl", "csv"):
        raise ValueError(f"fmt must be 'parquet', 'jsonl' or 'csv', got {fmt!r}")
    out = Path(out_dir)
    truth = GroundTruth(cfg)
    counts = {"impressions": 0, "actions": 0, "files": 0}
    buffers: dict[str, list[pa.RecordBatch]] = {"impressions": [], "actions": []}
    index = {"impressions": 0, "actions": 0}
    for kind in buffers:
        (out / kind).mkdir(parents=True, exist_ok=True)

    def flush(kind: str) -> None:
        if buffers[kind]:
            path = out / kind / f"part-{index[kind]:06d}.{fmt}"
            _write_file(pa.Table.from_batches(buffers[kind]), path, fmt)
            index[kind] += 1
            counts["files"] += 1
            buffers[kind] = []

    for imps, acts in generate(cfg, events, truth):
        for kind, batch in (("impressions", imps), ("actions", acts)):
            if batch.num_rows:
                buffers[kind].append(batch)
                counts[kind] += batch.num_rows
                if sum(b.num_rows for b in buffers[kind]) >= rows_per_file:
                    flush(kind)
        if on_step is not None:
            on_step(imps.num_rows + acts.num_rows)
    for kind in buffers:
        flush(kind)
    cat = truth.catalog
    _write_file(pa.table({"item_id": np.arange(cat.category.size, dtype=np.int64), "category": cat.category,
                          "popularity": cat.popularity}), out / "catalog.parquet", "parquet")
    (out / "generator.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    return counts
