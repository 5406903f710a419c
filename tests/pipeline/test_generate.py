"""The traffic generator: determinism, the ground truth, the configured rates, and long-range interests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamrec.errors import ConfigError
from streamrec.pipeline.events import ACTION_SCHEMA, ACTIONS, IMPRESSION_SCHEMA
from streamrec.pipeline.generate import (
    GeneratorConfig,
    GroundTruth,
    generate,
    histories,
    load_generator_config,
    write_events,
)

SMALL = GeneratorConfig(users=300, items=5000, categories=50, impressions_per_s=5000,
                        late_delay_s=(5.0, 20.0), duplicate_delay_s=2.0, duplicate_rate=0.05, late_rate=0.05)


def _tables(cfg: GeneratorConfig, events: int) -> tuple[pa.Table, pa.Table, list[int]]:
    """Impressions, actions, and the step each action arrived in."""
    pairs = list(generate(cfg, events=events))
    steps = [i for i, (_, a) in enumerate(pairs) for _ in range(a.num_rows)]
    return (pa.Table.from_batches([p[0] for p in pairs], schema=IMPRESSION_SCHEMA),
            pa.Table.from_batches([p[1] for p in pairs], schema=ACTION_SCHEMA), steps)


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half (pandas' average ranks)."""
    r = pd.Series(score).rank().to_numpy()
    n1 = int(y.sum())
    n0 = y.size - n1
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def test_same_seed_same_batches_and_another_seed_others() -> None:
    a = [p for _, p in zip(range(5), generate(SMALL), strict=False)]
    b = [p for _, p in zip(range(5), generate(SMALL), strict=False)]
    assert all(x[0].equals(y[0]) and x[1].equals(y[1]) for x, y in zip(a, b, strict=True))
    c = next(generate(GeneratorConfig(**{**SMALL.__dict__, "seed": 1})))
    assert not c[0].equals(a[0][0])


def test_batches_are_sorted_and_every_action_follows_its_impression() -> None:
    imps, acts, _ = _tables(SMALL, 60_000)
    for batch in generate(SMALL, events=20_000):
        for b in batch:
            ts = b.column("ts_ms").to_numpy()
            assert np.all(ts[1:] >= ts[:-1])
    imp = imps.to_pandas().drop_duplicates(["request_id", "item_id"])
    assert imp.groupby("request_id")["item_id"].nunique().sum() == len(imp)  # one per (request, item)
    assert (imp.groupby("request_id")["position"].agg(lambda p: list(p) == list(range(len(p))))).all()
    act = acts.to_pandas().merge(imp, on=["request_id", "item_id"], how="left", suffixes=("", "_imp"))
    assert act["ts_ms_imp"].notna().all()  # the generator drains: every action's impression was emitted
    assert (act["ts_ms"] >= act["ts_ms_imp"]).all() and (act["user_id"] == act["user_id_imp"]).all()
    assert set(act["action"]) == set(ACTIONS.values())
    fin = act[act["action"] == ACTIONS["finish"]]
    assert (fin["value"] > 0).all() and (act.loc[act["action"] != ACTIONS["finish"], "value"] == 0).all()


def test_the_fused_kernel_matches_the_numpy_ground_truth() -> None:
    truth = GroundTruth(SMALL)
    imps = pa.Table.from_batches([p[0] for p in generate(SMALL, events=30_000, truth=truth)]).to_pandas()
    click, like, finish = truth.probabilities(
        imps["user_id"].to_numpy(), imps["item_id"].to_numpy(), imps["ts_ms"].to_numpy(),
        imps["position"].to_numpy(), imps["device"].to_numpy(), imps["hour"].to_numpy())
    np.testing.assert_allclose(imps["gt_click"], click, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(imps["gt_like"], like, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(imps["gt_finish"], finish, rtol=2e-5, atol=1e-7)
    assert (imps["category"] == truth.catalog.category[imps["item_id"]]).all()
    assert (imps["gt_like"] <= imps["gt_click"]).all() and (imps["gt_finish"] <= imps["gt_click"]).all()


def test_sampled_labels_duplicates_and_late_arrivals_match_their_rates() -> None:
    imps, acts, steps = _tables(SMALL, 200_000)
    imp, act = imps.to_pandas(), acts.to_pandas()
    first = ~imp.duplicated(["request_id", "item_id"])
    assert abs((~first).mean() - SMALL.duplicate_rate) < 0.01
    assert abs(act.duplicated().mean() - SMALL.duplicate_rate) < 0.01
    arrived = np.array(steps)
    lag_s = arrived - (act["ts_ms"].to_numpy() - SMALL.start_ms) // 1000
    late = lag_s >= SMALL.late_delay_s[0] - 1  # on time: lag 0; duplicates: at most 2 s
    assert abs(late.mean() - SMALL.late_rate) < 0.01
    assert lag_s.min() >= 0
    once = act.drop_duplicates()
    counts = once.pivot_table(index=["request_id", "item_id"], columns="action", values="value",
                              aggfunc="size", fill_value=0).reset_index()
    labels = imp[first].merge(counts, on=["request_id", "item_id"], how="left").fillna(0)
    n = len(labels)
    for code, gt in ((ACTIONS["click"], labels["gt_click"]), (ACTIONS["like"], labels["gt_like"]),
                     (ACTIONS["finish"], labels["gt_finish"])):
        rate, want = (labels[code] > 0).mean(), gt.mean()
        assert abs(rate - want) < 5 * np.sqrt(want * (1 - want) / n), (code, rate, want)
    skip_want = ((1 - labels["gt_click"]) * SMALL.skip_prob).mean()
    assert abs((labels[ACTIONS["skip"]] > 0).mean() - skip_want) < 0.01


def test_a_long_history_carries_signal_its_last_100_events_do_not() -> None:
    """The ground truth's rare interests: a category shown to the user once every few thousand events and
    clicked at ~45 %. From the last 100 events it looks like any category; from 5,000 it stands out."""
    cfg = GeneratorConfig(users=300, items=20_000, categories=200, impressions_per_s=3000)
    truth = GroundTruth(cfg)
    n = 5000
    hist = histories(cfg, n, truth=truth)
    imps = pa.Table.from_batches([p[0] for p in generate(cfg, events=100_000, truth=truth)])
    u, c = imps.column("user_id").to_numpy(), imps.column("category").to_numpy()
    gt = imps.column("gt_click").to_numpy()

    def ctr_estimate(last: int) -> np.ndarray:
        """Each impression's (user, category) click-through from the user's last ``last`` events."""
        act = hist.action.reshape(cfg.users, n)[:, -last:].ravel()
        cat = hist.category.reshape(cfg.users, n)[:, -last:].ravel()
        usr = np.repeat(np.arange(cfg.users), last)
        clicks = np.zeros((cfg.users, cfg.categories))
        shown = np.zeros((cfg.users, cfg.categories))
        np.add.at(clicks, (usr[act == ACTIONS["click"]], cat[act == ACTIONS["click"]]), 1)
        seen = (act == ACTIONS["click"]) | (act == ACTIONS["skip"])
        np.add.at(shown, (usr[seen], cat[seen]), 1)
        return ((clicks + 0.1) / (shown + 1.0))[u, c]

    aff = truth.affinity(u, c, imps.column("ts_ms").to_numpy())
    rare, none = aff == cfg.rare_affinity, aff == 0
    assert rare.mean() > 0.003 and gt[rare].mean() > 3 * gt.mean()
    both = rare | none
    y = np.random.default_rng(0).random(gt.size) < gt
    short, full = ctr_estimate(100), ctr_estimate(n)
    # Telling a rare interest from a category the user does not care about:
    assert _auc(rare[both], short[both]) < 0.75
    assert _auc(rare[both], full[both]) > 0.95
    # And predicting clicks overall:
    assert _auc(y, full) > _auc(y, short) + 0.03
    assert _auc(y, gt) > _auc(y, full)  # the ground truth stays the best achievable


def test_histories_are_exact_sorted_and_before_the_stream() -> None:
    users = np.array([5, 3, 250])
    h = histories(SMALL, 700, users=users)
    assert h.users.tolist() == users.tolist() and h.offsets.tolist() == [0, 700, 1400, 2100]
    truth = GroundTruth(SMALL)
    assert (h.category == truth.catalog.category[h.item_id]).all()
    ts = h.ts_ms.reshape(3, 700)
    assert (np.diff(ts, axis=1) >= 0).all() and ts.max() < SMALL.start_ms
    assert set(np.unique(h.action)) <= set(ACTIONS.values())
    again = histories(SMALL, 700, users=users)
    assert np.array_equal(again.item_id, h.item_id) and np.array_equal(again.ts_ms, h.ts_ms)


def test_frequent_interests_drift_and_rare_ones_stay() -> None:
    truth = GroundTruth(SMALL)
    users = np.arange(SMALL.users)
    t0 = np.full(users.size, SMALL.start_ms)
    # Three moves per frequent interest (one every 1 / drift_rate impressions of the user, at a random phase).
    later = t0 + (3 / SMALL.drift_rate / truth.rate * 1000).astype(np.int64)
    a, b = truth.interests_at(users, t0), truth.interests_at(users, later)
    assert np.array_equal(a[:, truth.interest_rare], b[:, truth.interest_rare])
    assert np.array_equal((b - a)[:, ~truth.interest_rare] % SMALL.categories,
                          np.full((users.size, int((~truth.interest_rare).sum())), 3))
    soon = t0 + (0.01 / SMALL.drift_rate / truth.rate * 1000).astype(np.int64)
    assert (truth.interests_at(users, soon) != a).mean() < 0.05


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rare_interests"):
        GeneratorConfig(interests_per_user=2, rare_interests=2)
    with pytest.raises(ConfigError, match="late_rate"):
        GeneratorConfig(late_rate=1.5)
    f = tmp_path / "gen.toml"
    f.write_text("[generate]\nusers = 50\nrare_period = [100.0, 200.0]\n")
    cfg = load_generator_config(f, seed=7)
    assert (cfg.users, cfg.rare_period, cfg.seed) == (50, (100.0, 200.0), 7)
    f.write_text("[generate]\nuser = 50\n")
    with pytest.raises(ConfigError, match=r"generate\.user"):
        load_generator_config(f)


def test_write_events_writes_the_catalog_and_the_config(tmp_path: Path) -> None:
    counts = write_events(SMALL, tmp_path, events=10_000, fmt="parquet")
    assert counts["impressions"] + counts["actions"] >= 10_000
    cat = pq.read_table(tmp_path / "catalog.parquet")
    assert cat.num_rows == SMALL.items
    assert np.array_equal(cat.column("category").to_numpy(), GroundTruth(SMALL).catalog.category)
    assert json.loads((tmp_path / "generator.json").read_text())["seed"] == SMALL.seed
