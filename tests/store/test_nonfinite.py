"""NaN, infinity and float32 overflow at the table: the ``nonfinite`` policy and learning rates.

Under "raise" (the default) a write with any non-finite row is refused whole and
the table, optimizer state included, is exactly as it was; under "skip" the other
rows are written and the dropped ones counted. Values are judged in the table's
dtype (a float64 1e40 is inf in float32), gradient steps by their result.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.config import TableConfig, table_config_from_dict, table_config_to_dict
from streamrec.errors import ConfigError, NonFiniteValues
from streamrec.store import EmbeddingTable

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

D = 4
F32_MAX = float(np.finfo(np.float32).max)
BAD = [math.nan, math.inf, -math.inf]


def _table(opt: str | None = "adagrad", dtype: str = "float32", **kw: Any) -> EmbeddingTable:
    t = EmbeddingTable(dim=D, dtype=dtype, optimizer=opt, **kw)
    keys = np.arange(1, 33, dtype=np.uint64)
    t.insert_or_assign(keys, np.arange(32 * D, dtype=np.float64).reshape(32, D) / 16)
    t.apply_gradients(keys[::2], np.ones((16, D)), lr=0.5)  # some optimizer state to protect
    return t


def _state(t: EmbeddingTable) -> tuple[np.ndarray, np.ndarray]:
    """Every row, optimizer state included, in key order."""
    keys = np.sort(np.concatenate([k for k, _ in t.export()]))
    return keys, t.find(keys, include_state=True)[0]


def _assert_unchanged(t: EmbeddingTable, before: tuple[np.ndarray, np.ndarray]) -> None:
    keys, rows = _state(t)
    np.testing.assert_array_equal(keys, before[0])
    np.testing.assert_array_equal(rows, before[1])


# -- values: assign, insert_or_assign, import -----------------------------------------------------


@pytest.mark.parametrize("bad", [*BAD, 1e40])
@pytest.mark.parametrize("op", ["assign", "insert_or_assign", "import"])
def test_raise_refuses_the_whole_batch_and_names_rows_and_first_key(op: str, bad: float) -> None:
    t = _table()
    before = _state(t)
    stats = t.stats()
    keys = np.array([5, 40, 7, 9, 41], dtype=np.uint64)  # present and absent keys
    vals = np.ones((5, D))
    vals[2, 1] = bad
    vals[4, 3] = bad
    with pytest.raises(NonFiniteValues, match="2 row") as err:
        if op == "assign":
            t.assign(keys, vals)
        elif op == "insert_or_assign":
            t.insert_or_assign(keys, vals)
        else:
            t.import_chunks([(keys[:2], vals[:2]), (keys, vals)])
    assert (err.value.rows, err.value.first_key) == (2, 7)
    assert "first key 7" in str(err.value)
    if op == "import":  # the first, clean chunk went in; the refused one wrote nothing
        before[1][4] = np.concatenate([np.ones(D), before[1][4, D:]])
        before = (np.append(before[0], 40), np.vstack([before[1], np.concatenate([np.ones(D), np.zeros(D)])]))
        order = np.argsort(before[0])
        before = (before[0][order], before[1][order])
    _assert_unchanged(t, before)
    assert t.stats().nonfinite_skipped == stats.nonfinite_skipped == 0


def test_import_with_state_checks_the_optimizer_state_too() -> None:
    t = _table()
    before = _state(t)
    rows = np.ones((2, 2 * D))
    rows[1, D + 2] = math.nan  # an accumulator, not the embedding
    with pytest.raises(NonFiniteValues) as err:
        t.import_chunks([(np.array([3, 99], dtype=np.uint64), rows)], include_state=True)
    assert (err.value.rows, err.value.first_key) == (1, 99)
    _assert_unchanged(t, before)


def test_float64_table_keeps_what_float32_cannot() -> None:
    t = _table(dtype="float64")
    t.assign([3], np.full((1, D), 1e40))
    assert t.find([3])[0][0, 0] == 1e40
    with pytest.raises(NonFiniteValues):
        t.assign([3], np.full((1, D), math.inf))


def test_float32_boundary_is_exact() -> None:
    """A float64 that rounds to FLT_MAX is finite; one that rounds to inf is not."""
    t = _table()
    t.assign([3], np.full((1, D), F32_MAX + 2.0**102))  # rounds down to FLT_MAX
    assert t.find([3])[0][0, 0] == np.float32(F32_MAX)
    with pytest.raises(NonFiniteValues):
        t.assign([3], np.full((1, D), F32_MAX + 2.0**103))  # the tie rounds up to inf


@pytest.mark.parametrize("op", ["assign", "insert_or_assign"])
def test_skip_writes_the_rest_and_counts(op: str) -> None:
    t = _table(nonfinite="skip", ttl_s=1000, clock=lambda: 0.0)
    before = dict(zip(*(a.tolist() for a in _state(t)), strict=True))
    keys = np.array([5, 40, 7, 9, 41, 6], dtype=np.uint64)
    vals = np.arange(6 * D, dtype=np.float64).reshape(6, D)
    vals[2, 0] = math.nan
    vals[4, 1] = 1e40
    ttl = np.array([10, 20, 30, 40, 50, 60])
    flags = getattr(t, op)(keys, vals, ttl_s=ttl)
    assert t.stats().nonfinite_skipped == 2
    if op == "assign":  # found and written
        assert flags.tolist() == [True, False, False, True, False, True]
    else:  # inserted
        assert flags.tolist() == [False, True, False, False, False, False]
    got, found = t.find(keys)
    assert found.tolist() == [True, op == "insert_or_assign", True, True, False, True]
    for i in (0, 3, 5):
        np.testing.assert_array_equal(got[i], vals[i])
    np.testing.assert_array_equal(got[2], np.asarray(before[7])[:D])  # key 7 kept its old row
    if op == "insert_or_assign":
        np.testing.assert_array_equal(got[1], vals[1])
    t.assign(keys, vals, ttl_s=ttl)
    assert t.stats().nonfinite_skipped == 4


def test_skip_with_every_row_bad_writes_nothing() -> None:
    t = _table(nonfinite="skip")
    before = _state(t)
    assert t.insert_or_assign([1, 2, 77], np.full((3, D), math.inf)).tolist() == [False] * 3
    _assert_unchanged(t, before)
    assert t.stats().nonfinite_skipped == 3


def test_callable_initializer_returning_nan_is_refused_under_either_policy() -> None:
    for policy in ("raise", "skip"):
        t = EmbeddingTable(dim=D, initializer=lambda k: np.where(k[:, None] == 8, np.nan, 1.0) * np.ones(D),
                           nonfinite=policy)
        t.find_or_insert([1, 2])
        with pytest.raises(NonFiniteValues) as err:
            t.find_or_insert([3, 8, 1])
        assert (err.value.rows, err.value.first_key) == (1, 8)
        assert len(t) == 2 and not t.contains([3, 8]).any()


# -- gradient steps ---------------------------------------------------------------------------------


@pytest.mark.parametrize("opt", [None, "adagrad", "adam"])
@pytest.mark.parametrize("case", ["nan", "inf", "huge_lr", "duplicates_cancel"])
def test_gradient_step_that_would_not_be_finite_is_refused_whole(opt: str | None, case: str) -> None:
    t = _table(opt)
    before = _state(t)
    keys = np.array([2, 50, 4, 6, 4], dtype=np.uint64)  # 50 absent; 4 twice
    g = np.ones((5, D), dtype=np.float32)
    lr = 0.1
    if case == "nan":
        g[3, 0] = np.nan
        first, rows = 6, 1
    elif case == "inf":
        g[2, 2] = -np.inf
        first, rows = 4, 1
    elif case == "huge_lr":  # finite in float64, past float32 (the step, or Adagrad's and Adam's g**2)
        lr, g[:] = 1e20, 1e30
        first, rows = 2, 3
    else:  # +inf and -inf summed for key 4 (and a NaN for the absent key, which is never read)
        g[2, 0], g[4, 0], g[1, 0] = np.inf, -np.inf, np.nan
        first, rows = 4, 1
    with pytest.raises(NonFiniteValues) as err:
        t.apply_gradients(keys, g, lr=lr)
    assert (err.value.rows, err.value.first_key) == (rows, first)
    _assert_unchanged(t, before)


def test_absent_keys_gradients_are_not_read() -> None:
    t = _table()
    g = np.ones((2, D))
    g[1] = np.nan
    assert t.apply_gradients([2, 500], g, lr=0.1).tolist() == [True, False]


def test_result_overflow_boundary_is_exact() -> None:
    """SGD from FLT_MAX: a step that rounds back to FLT_MAX is kept, one that rounds to inf is not."""
    t = EmbeddingTable(dim=D, optimizer=None)
    t.insert_or_assign([1], np.full((1, D), F32_MAX))
    assert t.apply_gradients([1], -np.ones((1, D)), lr=2.0**102).all()
    assert t.find([1])[0][0, 0] == np.float32(F32_MAX)
    with pytest.raises(NonFiniteValues):
        t.apply_gradients([1], -np.ones((1, D)), lr=2.0**103)
    assert t.apply_gradients([1], np.zeros((1, D)), lr=1e300).all()  # a huge rate on a zero gradient is fine


@pytest.mark.parametrize("opt", [None, "adagrad", "adam"])
def test_skip_leaves_bad_rows_and_steps_the_rest(opt: str | None) -> None:
    t = _table(opt, nonfinite="skip")
    ref = _table(opt)
    before = dict(zip(*(a.tolist() for a in _state(t)), strict=True))
    keys = np.array([2, 3, 4, 3, 5], dtype=np.uint64)
    g = np.full((5, D), 0.25, dtype=np.float32)
    g[3, 1] = np.inf  # key 3's summed gradient is inf: both of its positions are not updated
    found = t.apply_gradients(keys, g, lr=0.1)
    assert found.tolist() == [True, False, True, False, True]
    assert t.stats().nonfinite_skipped == 1
    ref.apply_gradients(keys[[0, 2, 4]], g[[0, 2, 4]], lr=0.1)  # what the good rows must equal
    ks = np.array([2, 4, 5], dtype=np.uint64)
    np.testing.assert_array_equal(t.find(ks, include_state=True)[0], ref.find(ks, include_state=True)[0])
    np.testing.assert_array_equal(t.find([3], include_state=True)[0][0], before[3])


@pytest.mark.parametrize("lr", [0, 0.0, -1.0, math.nan, math.inf, -math.inf])
def test_learning_rate_must_be_finite_and_positive(lr: float) -> None:
    t = _table()
    before = _state(t)
    with pytest.raises(ValueError, match="lr: expected a finite number > 0"):
        t.apply_gradients([2], np.ones((1, D)), lr=lr)
    _assert_unchanged(t, before)


# -- against a model ----------------------------------------------------------------------------------

_values = st.one_of(st.floats(-4, 4, width=32), st.sampled_from([math.nan, math.inf, -math.inf, 1e40]))


@settings(max_examples=60, deadline=None)
@given(policy=st.sampled_from(["raise", "skip"]),
       batches=st.lists(st.tuples(st.booleans(), st.lists(st.tuples(st.integers(0, 12), st.lists(
           _values, min_size=D, max_size=D)), max_size=8)), max_size=6))
def test_writes_match_a_model(policy: str, batches: list[tuple[bool, list[tuple[int, list[float]]]]]) -> None:
    """SGD on float32 against a dict of float32 rows: insert_or_assign, or a step with lr 1e38
    (which overflows now and then on gradients up to 4)."""
    t = EmbeddingTable(dim=D, optimizer=None, nonfinite=policy)
    model: dict[int, np.ndarray] = {}
    skipped = 0
    for step, batch in batches:
        keys = [k for k, _ in batch]
        vals = np.array([v for _, v in batch], dtype=np.float64).reshape(-1, D)
        rows32 = vals.astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            if step:  # one step per distinct present key, its gradients summed in batch order
                after = {}
                for k in dict.fromkeys(keys):
                    if k in model:
                        g = np.zeros(D)
                        for kk, row in zip(keys, rows32, strict=True):
                            if kk == k:
                                g = g + row.astype(np.float64)
                        after[k] = (model[k].astype(np.float64) - 1e38 * g).astype(np.float32)
                bad = [k for k, v in after.items() if not np.isfinite(v).all()]
            else:
                bad = [k for k, row in zip(keys, rows32, strict=True) if not np.isfinite(row).all()]
        def call(keys: list[int] = keys, rows32: np.ndarray = rows32, vals: np.ndarray = vals,
                 step: bool = step) -> None:
            if step:
                t.apply_gradients(keys, rows32, lr=1e38)
            else:
                t.insert_or_assign(keys, vals)

        if bad and policy == "raise":
            with pytest.raises(NonFiniteValues) as err:
                call()
            assert (err.value.rows, err.value.first_key) == (len(bad), bad[0])
            continue
        call()
        skipped += len(bad)
        if step:
            model.update((k, v) for k, v in after.items() if k not in bad)
        else:  # in order, so of a repeated key the last finite row stands
            model.update((k, row) for k, row in zip(keys, rows32, strict=True) if np.isfinite(row).all())
    assert t.stats().nonfinite_skipped == skipped
    assert len(t) == len(model)
    if model:
        got, found = t.find(np.array(sorted(model), dtype=np.uint64))
        assert found.all()
        np.testing.assert_array_equal(got, np.array([model[k] for k in sorted(model)]))


# -- config ---------------------------------------------------------------------------------------------


def test_policy_is_validated_and_round_trips_through_toml_form() -> None:
    with pytest.raises(ConfigError, match=r"table\.nonfinite"):
        TableConfig(dim=4, nonfinite="ignore")  # type: ignore[arg-type]
    assert TableConfig(dim=4).nonfinite == "raise"
    cfg = TableConfig(dim=4, nonfinite="skip")
    assert table_config_from_dict(table_config_to_dict(cfg)) == cfg
