"""The feature DSL: each kind's values against a reference, training == serving, the manifest, bad input."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamrec.errors import ConfigError, FeatureError, MissingColumns, NonFiniteInput
from streamrec.pipeline.events import ACTIONS
from streamrec.pipeline.features import (
    Bucketize,
    Categorical,
    Cross,
    FeatureSet,
    Function,
    HashedId,
    Ratio,
    Sequence,
    Stores,
    TimePart,
    WindowCount,
    default_features,
)
from streamrec.store import SequenceStore
from streamrec.store._index import hash_key_of_seed, hash_keys

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a Thursday
CLICK = ACTIONS["click"]


def batch(**cols: object) -> pa.RecordBatch:
    return pa.record_batch({k: pa.array(v) for k, v in cols.items()})


def sip(x: int, key: tuple[int, int]) -> int:
    out = np.empty(1, np.uint64)
    hash_keys(np.array([x], np.uint64), np.uint64(key[0]), np.uint64(key[1]), out)
    return int(out[0])


# -- each kind ---------------------------------------------------------------------------------------


def test_hashed_id_and_cross_are_keyed_siphash() -> None:
    ids = np.array([0, 1, 7, 2**53 - 1, 123456789], np.int64)
    cats = np.array([3, 3, 9, 0, 5], np.int64)
    h = HashedId("u", column="user_id", buckets=1000)
    c = Cross("uxc", columns=("user_id", "category"), buckets=777)
    out = FeatureSet([h, c]).transform(batch(user_id=ids, category=cats), Stores())
    key = hash_key_of_seed(h.seed)
    assert out.column("u").to_pylist() == [sip(int(x), key) % 1000 for x in ids]
    k0, k1 = hash_key_of_seed(c.seed)
    want = []
    for x, y in zip(ids.tolist(), cats.tolist(), strict=True):
        first = sip(x, (k0, k1))
        want.append(sip(y, (k0 ^ first, k1)) % 777)
    assert out.column("uxc").to_pylist() == want
    # The key is the feature's (seeded by its name): another name hashes differently, the same one alike.
    ids_b = batch(user_id=ids)
    other = FeatureSet([HashedId("v", column="user_id", buckets=1000)]).transform(ids_b, Stores())
    assert other.column("v").to_pylist() != out.column("u").to_pylist()
    again = FeatureSet([HashedId("u", column="user_id", buckets=1000)]).transform(ids_b, Stores())
    assert again.column("u").to_pylist() == out.column("u").to_pylist()


def test_categorical_bucketize_time_parts() -> None:
    rng = np.random.default_rng(1)
    ts = rng.integers(0, 2**41, 200)
    pos = rng.integers(-3, 120, 200)
    score = rng.normal(0, 10, 200)
    fs = FeatureSet([
        Categorical("pos_id", column="position", size=50),
        Bucketize("pos_b", column="position", boundaries=(1, 2, 5, 10)),
        Bucketize("score_b", column="score", boundaries=(-5.5, 0.0, 2.5)),
        TimePart("h", part="hour"), TimePart("d", part="day_of_week"), TimePart("m", part="minute_of_day"),
        TimePart("h_ist", part="hour", utc_offset_min=330),
    ])
    out = fs.transform(batch(ts_ms=ts, position=pos, score=score), Stores())
    assert out.column("pos_id").to_pylist() == [p if 0 <= p < 50 else 50 for p in pos.tolist()]
    assert out.column("pos_b").to_pylist() == np.digitize(pos, [1, 2, 5, 10]).tolist()
    assert out.column("score_b").to_pylist() == np.digitize(score, [-5.5, 0.0, 2.5]).tolist()
    utc = [dt.datetime.fromtimestamp(t / 1000, dt.UTC) for t in ts.tolist()]
    assert out.column("h").to_pylist() == [u.hour for u in utc]
    assert out.column("d").to_pylist() == [u.weekday() for u in utc]
    assert out.column("m").to_pylist() == [u.hour * 60 + u.minute for u in utc]
    ist = [dt.datetime.fromtimestamp(t / 1000 + 330 * 60, dt.UTC).hour for t in ts.tolist()]
    assert out.column("h_ist").to_pylist() == ist


def counting_set() -> FeatureSet:
    return FeatureSet([
        WindowCount("u_clicks", key="user_id", event="click", window_ms=60_000, bucket_ms=1000),
        WindowCount("i_imps", key="item_id", event="impression", window_ms=10_000, bucket_ms=1000),
        WindowCount("i_clicks", key="item_id", event="click", window_ms=10_000, bucket_ms=1000),
        Ratio("i_ctr", numerator="i_clicks", denominator="i_imps", prior=0.1, weight=10.0),
    ], horizon_ms=120_000)


def test_window_counts_and_ratio_against_brute_force() -> None:
    rng = np.random.default_rng(2)
    fs = counting_set()
    assert sorted(fs.counter_specs) == ["item_id_w10000_b1000", "user_id_w60000_b1000"]
    assert [c.name for c in fs.counter_specs["item_id_w10000_b1000"].channels] == ["impression", "click"]
    stores = fs.make_stores()
    n = 3000
    imp_ts = np.sort(T0 + rng.integers(0, 90_000, n))
    imp = batch(user_id=rng.integers(0, 5, n), item_id=rng.integers(0, 8, n), ts_ms=imp_ts)
    k = 1500
    act_ts = np.sort(T0 + rng.integers(0, 90_000, k))
    acts = batch(user_id=rng.integers(0, 5, k), item_id=rng.integers(0, 8, k), ts_ms=act_ts,
                 action=pa.array(rng.choice([CLICK, ACTIONS["like"]], k), pa.int8()))
    for lo in range(0, n, 500):  # micro-batches, as the runner feeds them
        stores.observe(imp.slice(lo, 500), acts.slice(lo // 2, 250))
    q_ts = T0 + rng.integers(40_000, 95_000, 300)
    q = batch(user_id=rng.integers(0, 6, 300), item_id=rng.integers(0, 9, 300), ts_ms=q_ts)
    out = fs.transform(q, stores)

    def count(ids: np.ndarray, ts: np.ndarray, mask: np.ndarray, key_v: int, t: int, window: int) -> int:
        b = np.asarray(ts) // 1000
        bq = t // 1000
        sel = mask & (np.asarray(ids) == key_v) & (b >= bq - window // 1000) & (b <= bq - 1)
        return int(sel.sum())

    is_click = acts.column("action").to_numpy() == CLICK
    for i in range(300):
        u, it, t = q.column("user_id")[i].as_py(), q.column("item_id")[i].as_py(), int(q_ts[i])
        uc = count(acts.column("user_id").to_numpy(), act_ts, is_click, u, t, 60_000)
        ii = count(imp.column("item_id").to_numpy(), imp_ts, np.ones(n, bool), it, t, 10_000)
        ic = count(acts.column("item_id").to_numpy(), act_ts, is_click, it, t, 10_000)
        assert out.column("u_clicks")[i].as_py() == uc
        assert out.column("i_imps")[i].as_py() == ii
        assert out.column("i_clicks")[i].as_py() == ic
        assert out.column("i_ctr")[i].as_py() == pytest.approx((ic + 1.0) / (ii + 10.0), rel=1e-6)


class SeqModel:
    """Events per user in append order; a query is a list comprehension."""

    def __init__(self) -> None:
        self.events: dict[int, list[tuple[int, int, int, float]]] = {}

    def append(self, u: int, item: int, act: int, ts: int, v: float) -> None:
        self.events.setdefault(u, []).append((item, act, ts, v))

    def query(self, u: int, t: int, last: int | None, cap: int) -> list[tuple[int, int, int, float]]:
        held = self.events.get(u, [])[-cap:]
        older = [e for e in held if e[2] < t]
        return older if last is None else older[-last:] if last else []


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6), st.integers(1, 6), st.integers(0, 400)),
                max_size=120),
       st.lists(st.tuples(st.integers(0, 4), st.integers(0, 420)), min_size=1, max_size=20),
       st.sampled_from([None, 1, 3, 40]))
def test_sequences_as_of_against_brute_force(events: list, queries: list, last: int | None) -> None:
    """Out-of-order appends, rows at any time (many events newer than a row: the read window grows),
    users capped by max_len; with and without ``last``."""
    store = SequenceStore(max_len=64, extra_fields=("value",), huge_pages=False)
    model = SeqModel()
    for u, item, act, ts in events:
        model.append(u, item, act, T0 + ts, ts / 7)
    if events:
        store.append([e[0] for e in events], [e[1] for e in events], [e[2] for e in events],
                     [T0 + e[3] for e in events], {"value": [e[3] / 7 for e in events]})
    f = Sequence("h", last=last, fields=("item", "action", "timestamp", "value"))
    rows = batch(user_id=[q[0] for q in queries], ts_ms=[T0 + q[1] for q in queries])
    out = FeatureSet([f]).transform(rows, Stores(sequences=store))
    for i, (u, t) in enumerate(queries):
        want = model.query(u, T0 + t, last, 64)
        assert out.column("h_item")[i].as_py() == [e[0] for e in want]
        assert out.column("h_action")[i].as_py() == [e[1] for e in want]
        assert out.column("h_ts_ms")[i].as_py() == [e[2] for e in want]
        assert out.column("h_value")[i].as_py() == pytest.approx([e[3] for e in want])


def test_sequence_rows_sharing_a_request_read_it_once_and_agree() -> None:
    store = SequenceStore(max_len=100, huge_pages=False)
    store.append([1] * 6 + [2] * 3, list(range(9)), [1] * 9, [T0 + i for i in range(9)])
    users = [1] * 5 + [2] * 5 + [1]
    ts = [T0 + 4] * 5 + [T0 + 100] * 5 + [T0 + 100]
    fs = FeatureSet([Sequence("h", last=3)])
    out = fs.transform(batch(user_id=users, ts_ms=ts), Stores(sequences=store))
    assert out.column("h_item").to_pylist() == [[1, 2, 3]] * 5 + [[6, 7, 8]] * 5 + [[3, 4, 5]]


def test_functions_vectorised_and_scalar() -> None:
    fs = FeatureSet([
        Function("log_pos", fn="numpy:log1p", args=("position",)),
        Function("log_pos_scalar", fn="math:log1p", args=("position",), scalar=True, dtype="float64"),
    ])
    assert fs.schema.field("log_pos_scalar").metadata[b"scalar"] == b"true"
    assert fs.schema.field("log_pos").metadata[b"scalar"] == b"false"
    out = fs.transform(batch(position=pa.array([0, 1, 9], pa.int32())), Stores())
    assert out.column("log_pos").to_pylist() == pytest.approx(np.log1p([0, 1, 9]).tolist())
    assert out.column("log_pos_scalar").to_pylist() == pytest.approx(np.log1p([0, 1, 9]).tolist())
    assert fs.scalar_rows == {"log_pos_scalar": 3}


# -- one object, two paths -------------------------------------------------------------------------


def traffic(seed: int = 3) -> tuple[FeatureSet, Stores, pa.RecordBatch]:
    """Ten minutes of impressions and actions counted and appended; then samples of 40 requests
    emitted late (after their own actions arrived), as the join emits them at window close."""
    rng = np.random.default_rng(seed)
    fs = default_features(id_buckets=1 << 16, cross_buckets=1 << 12, history=8)
    catalog = rng.integers(0, 50, 500).astype(np.int32)
    stores = fs.make_stores(sequences=SequenceStore(max_len=200, extra_fields=("value",), huge_pages=False),
                            item_category=catalog)
    rows = []
    for r in range(400):
        ts = T0 + r * 1500
        user = int(rng.integers(0, 20))
        items = rng.choice(500, size=int(rng.integers(1, 6)), replace=False)
        for p, it in enumerate(items.tolist()):
            rows.append((r, user, it, ts, p, int(catalog[it]), r % 3, 9))
    imp = batch(**{name: pa.array([row[i] for row in rows], typ) for i, (name, typ) in enumerate(
        [("request_id", pa.int64()), ("user_id", pa.int64()), ("item_id", pa.int64()), ("ts_ms", pa.int64()),
         ("position", pa.int32()), ("category", pa.int32()), ("device", pa.int32()), ("hour", pa.int8())])})
    clicked = rng.random(len(rows)) < 0.3
    a_rows = [(row[1], row[2], row[3] + int(rng.integers(0, 4000)), CLICK if c else ACTIONS["skip"])
              for row, c in zip(rows, clicked.tolist(), strict=True)]
    a_rows.sort(key=lambda a: a[2])
    acts = batch(user_id=[a[0] for a in a_rows], item_id=[a[1] for a in a_rows], ts_ms=[a[2] for a in a_rows],
                 action=pa.array([a[3] for a in a_rows], pa.int8()),
                 value=pa.array([0.0] * len(a_rows), pa.float32()))
    for lo in range(0, len(rows), 97):
        stores.observe(imp.slice(lo, 97), None)
    for lo in range(0, len(a_rows), 89):
        part = acts.slice(lo, 89)
        stores.observe(None, part)
        assert stores.sequences is not None
        stores.sequences.append(part.column("user_id"), part.column("item_id"),
                                part.column("action").to_numpy().astype(np.uint8), part.column("ts_ms"),
                                {"value": part.column("value")})
    last_requests = imp.filter(pa.compute.greater_equal(imp.column("request_id"), 360))
    return fs, stores, last_requests


def test_training_and_serving_give_identical_features() -> None:
    fs, stores, samples = traffic()
    trained = fs.transform(samples, stores)
    names = fs.schema.names
    assert trained.num_rows == samples.num_rows
    assert any(v > 0 for v in trained.column("user_clicks_1h").to_pylist())
    assert any(len(h) for h in trained.column("hist_item").to_pylist())
    rid = samples.column("request_id").to_numpy()
    for r in np.unique(rid).tolist():
        rows = trained.filter(pa.compute.equal(trained.column("request_id"), r))
        ctx = {"device": rows.column("device")[0].as_py(), "hour": rows.column("hour")[0].as_py(),
               "position": rows.column("position").to_numpy(), "request_id": r}
        # No category in the context: the stores' catalog gives it.
        served = fs.request_features(rows.column("user_id")[0].as_py(), rows.column("item_id").to_numpy(),
                                     ctx, rows.column("ts_ms")[0].as_py(), stores)
        assert served.schema.names == ["item_id", *names]
        for name in names:
            assert served.column(name).to_pylist() == rows.column(name).to_pylist(), (r, name)


def test_no_label_leaks_into_a_late_sample() -> None:
    """The sample's own click (counted and appended before the sample is emitted) is not in its features."""
    fs = FeatureSet([WindowCount("uc", key="user_id", event="click", window_ms=60_000, bucket_ms=1000),
                     Sequence("h", last=5)])
    stores = fs.make_stores(sequences=SequenceStore(max_len=10, huge_pages=False))
    stores.observe(None, batch(user_id=[1, 1], item_id=[5, 6], ts_ms=[T0 + 100, T0 + 5_000],
                               action=pa.array([CLICK, CLICK], pa.int8())))
    assert stores.sequences is not None
    stores.sequences.append([1, 1], [5, 6], [CLICK, CLICK], [T0 + 100, T0 + 5_000])
    out = fs.transform(batch(user_id=[1], ts_ms=[T0 + 4_000]), stores)  # impression of item 6 at 4 s
    assert out.column("uc").to_pylist() == [1.0]
    assert out.column("h_item").to_pylist() == [[5]]


# -- manifest --------------------------------------------------------------------------------------


def test_manifest_round_trip(tmp_path) -> None:
    fs = FeatureSet([*default_features(history=4).features,
                     Function("lp", fn="math:log1p", args=("position",), scalar=True)],
                    name="mine", horizon_ms=1_800_000)
    fs.save(tmp_path / "features.json")
    back = FeatureSet.load(tmp_path / "features.json")
    assert back.fingerprint == fs.fingerprint
    assert back.schema == fs.schema
    assert back.features == fs.features
    assert back.counter_specs == fs.counter_specs
    _, stores, samples = traffic()
    a = fs.transform(samples, stores)
    b = back.transform(samples, stores)
    assert a.equals(b)

    raw = json.loads((tmp_path / "features.json").read_text())
    raw["features"][0]["buckets"] = 12
    with pytest.raises(ConfigError, match="fingerprint"):
        FeatureSet.from_manifest(raw)
    raw = json.loads((tmp_path / "features.json").read_text())
    raw["features"][0]["kind"] = "nope"
    with pytest.raises(ConfigError, match="unknown kind"):
        FeatureSet.from_manifest(raw)
    raw = json.loads((tmp_path / "features.json").read_text())
    raw["features"][-1]["fn"] = "math:no_such_function"
    with pytest.raises(ConfigError, match="cannot import"):
        FeatureSet.from_manifest(raw)


def test_counters_survive_a_snapshot(tmp_path) -> None:
    fs, stores, samples = traffic()
    stores.snapshot_counters(tmp_path)
    reopened = fs.open_stores(tmp_path, sequences=stores.sequences)
    assert fs.transform(samples, reopened).equals(fs.transform(samples, stores))


# -- bad input -------------------------------------------------------------------------------------


def test_bad_input_gets_clear_errors() -> None:
    fs = FeatureSet([Bucketize("b", column="score", boundaries=(0.0, 1.0)), HashedId("u", column="user_id")])
    with pytest.raises(MissingColumns) as e:
        fs.transform(batch(other=[1]), Stores())
    assert e.value.columns == ["score", "user_id"]
    with pytest.raises(NonFiniteInput) as nf:
        fs.transform(batch(score=[0.5, np.nan, np.inf, 2.0], user_id=[1, 2, 3, 4]), Stores())
    assert (nf.value.rows, nf.value.first_row, nf.value.column) == (2, 1, "score")
    with pytest.raises(FeatureError, match="null"):
        fs.transform(batch(score=[0.5], user_id=pa.array([None], pa.int64())), Stores())
    with pytest.raises(FeatureError, match="non-negative"):
        fs.transform(batch(score=[0.5], user_id=[-4]), Stores())
    with pytest.raises(FeatureError, match="already in the samples"):
        fs.transform(batch(score=[0.5], user_id=[4], u=[1]), Stores())
    nan_fn = FeatureSet([Function("f", fn="numpy:log", args=("x",))])
    with pytest.raises(NonFiniteInput), np.errstate(divide="ignore", invalid="ignore"):
        nan_fn.transform(batch(x=[1.0, 0.0]), Stores())
    with pytest.raises(FeatureError, match="sequence store"):
        FeatureSet([Sequence("h")]).transform(batch(user_id=[1], ts_ms=[T0]), Stores())
    with pytest.raises(FeatureError, match="counter group"):
        counting_set().transform(batch(user_id=[1], item_id=[1], ts_ms=[T0]), Stores())
    d = default_features()
    stores = d.make_stores(sequences=SequenceStore(max_len=4, huge_pages=False))
    with pytest.raises(MissingColumns) as e:
        d.request_features(1, np.array([1, 2]), {"device": 1}, T0, stores)
    assert e.value.columns == ["category", "hour", "position"]
    with pytest.raises(FeatureError, match="shape"):
        ctx = {"device": [1, 2, 3], "hour": 1, "position": 0, "category": 1}
        d.request_features(1, np.array([1, 2]), ctx, T0, stores)
    with pytest.raises(FeatureError, match="catalog"):
        stores.item_category = np.zeros(2, np.int32)
        d.request_features(1, np.array([1, 2]), {"device": 1, "hour": 1, "position": 0}, T0, stores)


def test_definitions_are_checked() -> None:
    with pytest.raises(ConfigError, match="repeats"):
        FeatureSet([HashedId("a", column="user_id"), HashedId("a", column="item_id")])
    with pytest.raises(ConfigError, match="declared before"):
        FeatureSet([Ratio("r", numerator="x", denominator="y")])
    with pytest.raises(ConfigError, match="increasing"):
        Bucketize("b", column="x", boundaries=(2.0, 1.0))
    with pytest.raises(ConfigError, match="event"):
        WindowCount("w", key="user_id", event="purchase")
    with pytest.raises(ConfigError, match="two or more"):
        Cross("c", columns=("user_id",))
    with pytest.raises(ConfigError, match="only Bucketize and Function"):
        FeatureSet([HashedId("a", column="b"), HashedId("b", column="user_id")])
    with pytest.raises(ConfigError, match="only Bucketize and Function"):
        FeatureSet([Sequence("h"), Function("f", fn="numpy:log1p", args=("h_item",))])


def test_features_of_features() -> None:
    """Bucketize and Function read earlier features: bucketed counts, a log of a count."""
    fs = FeatureSet([WindowCount("c", key="user_id", event="click", window_ms=60_000, bucket_ms=1000),
                     Bucketize("c_b", column="c", boundaries=(1, 3)),
                     Function("c_log", fn="numpy:log1p", args=("c",))])
    assert fs.inputs == ("user_id", "ts_ms")
    stores = fs.make_stores()
    stores.observe(None, batch(user_id=[1, 1, 1, 2], ts_ms=[T0, T0 + 1, T0 + 2, T0],
                               action=pa.array([CLICK] * 4, pa.int8())))
    out = fs.transform(batch(user_id=[1, 2, 3], ts_ms=[T0 + 5000] * 3), stores)
    assert out.column("c").to_pylist() == [3.0, 1.0, 0.0]
    assert out.column("c_b").to_pylist() == [2, 1, 0]
    assert out.column("c_log").to_pylist() == pytest.approx(np.log1p([3.0, 1.0, 0.0]).tolist())
