"""EmbeddingTable against a dict model: every operation, growth, reserve, initializer determinism."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from numpy.testing import assert_array_equal

from streamrec import EmbeddingTable, Initializer

U64_MAX = 2**64 - 1

# A small pool, so batches repeat keys and keys come back after being erased;
# the edges of uint64 and keys that collide in their low or high bits included.
KEY_POOL = [
    0, 1, 2, 3, 7, 42, 255, 256, 2**31, 2**32 - 1, 2**32, 2**32 + 1,
    2**48 + 5, 2**63 - 1, 2**63, 2**63 + 1, 0x9E3779B97F4A7C15, 0xDEADBEEFCAFEBABE,
    U64_MAX - 2**32, U64_MAX - 1, U64_MAX,
]

# Values, gradients and learning rates are dyadic rationals of few bits, so
# every sum and product below is exact in float32 and float64 alike and the
# model can demand bitwise equality.
dyadic = st.integers(-64, 64).map(lambda i: i / 4)
learning_rates = st.sampled_from([0.125, 0.25, 0.5, 1.0, 2.0])  # > 0: a zero rate is refused
key_batches = st.lists(st.sampled_from(KEY_POOL), max_size=16)


def _keys(batch: list[int]) -> np.ndarray:
    return np.array(batch, dtype=np.uint64)


def _exported(table: EmbeddingTable, chunk_rows: int, include_state: bool = False) -> dict[int, np.ndarray]:
    """The table as {key: row}, from its export, checking no key appears twice."""
    out: dict[int, np.ndarray] = {}
    for keys, values in table.export(chunk_rows=chunk_rows, include_state=include_state):
        assert keys.dtype == np.uint64
        assert values.shape == (keys.shape[0], table.dim + (table.state_width if include_state else 0))
        assert 1 <= keys.shape[0] <= chunk_rows
        for k, v in zip(keys.tolist(), values, strict=True):
            assert k not in out, f"key {k} exported twice"
            out[k] = v.copy()
    return out


class TableModel(RuleBasedStateMachine):
    """Random sequences of every table operation, mirrored on a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[int, np.ndarray] = {}

    @initialize(
        dim=st.integers(1, 5),
        dtype=st.sampled_from(["float32", "float64"]),
        capacity=st.sampled_from([1, 2, 7]),
        init_value=st.sampled_from([None, 0.5, -1.25]),
    )
    def make_table(self, dim: int, dtype: str, capacity: int, init_value: float | None) -> None:
        if init_value is None:
            init = Initializer(kind="zeros")
        else:
            init = Initializer(kind="constant", value=init_value)
        self.init_row = np.full(dim, 0.0 if init_value is None else init_value)
        self.kwargs = {"dim": dim, "dtype": dtype, "initializer": init, "huge_pages": False}
        self.table = EmbeddingTable(capacity=capacity, **self.kwargs)
        self.dim = dim
        self.bulk_next = 0

    # -- helpers ------------------------------------------------------------------

    def _rows(self, data: st.DataObject, n: int) -> np.ndarray:
        flat = data.draw(st.lists(dyadic, min_size=n * self.dim, max_size=n * self.dim))
        return np.array(flat, dtype=np.float64).reshape(n, self.dim)

    def _expected(self, batch: list[int]) -> tuple[np.ndarray, np.ndarray]:
        zero = np.zeros(self.dim)
        rows = [self.model.get(k, zero) for k in batch]
        values = np.array(rows).reshape(len(batch), self.dim)
        return values, np.array([k in self.model for k in batch], dtype=bool)

    # -- reads -----------------------------------------------------------------------

    @rule(batch=key_batches, use_out=st.booleans())
    def find(self, batch: list[int], use_out: bool) -> None:
        out = np.full((len(batch), self.dim), 99.0, dtype=self.table.dtype) if use_out else None
        values, found = self.table.find(_keys(batch), out=out)
        if out is not None:
            assert values is out
        want_values, want_found = self._expected(batch)
        assert values.dtype == self.table.dtype
        assert_array_equal(found, want_found)
        assert_array_equal(values, want_values)

    @rule(batch=key_batches)
    def contains(self, batch: list[int]) -> None:
        assert_array_equal(self.table.contains(batch), self._expected(batch)[1])

    # -- writes ----------------------------------------------------------------------

    @rule(batch=key_batches)
    def find_or_insert(self, batch: list[int]) -> None:
        values = self.table.find_or_insert(_keys(batch))
        for k in batch:
            if k not in self.model:
                self.model[k] = self.init_row.copy()
        assert_array_equal(values, self._expected(batch)[0])

    @rule(batch=key_batches, data=st.data())
    def insert_or_assign(self, batch: list[int], data: st.DataObject) -> None:
        rows = self._rows(data, len(batch))
        inserted = self.table.insert_or_assign(_keys(batch), rows)
        want = []
        for k, row in zip(batch, rows, strict=True):  # in batch order: the last occurrence wins
            want.append(k not in self.model)
            self.model[k] = row.copy()
        assert_array_equal(inserted, np.array(want, dtype=bool))

    @rule(batch=key_batches, data=st.data())
    def assign(self, batch: list[int], data: st.DataObject) -> None:
        rows = self._rows(data, len(batch))
        found = self.table.assign(batch, rows)
        want = []
        for k, row in zip(batch, rows, strict=True):
            want.append(k in self.model)
            if k in self.model:
                self.model[k] = row.copy()
        assert_array_equal(found, np.array(want, dtype=bool))

    @rule(batch=key_batches)
    def erase(self, batch: list[int]) -> None:
        found = self.table.erase(_keys(batch))
        want = []
        for k in batch:  # a key repeated in the batch is found once, then absent
            want.append(k in self.model)
            self.model.pop(k, None)
        assert_array_equal(found, np.array(want, dtype=bool))

    @rule(batch=key_batches, lr=learning_rates, data=st.data())
    def apply_gradients(self, batch: list[int], lr: float, data: st.DataObject) -> None:
        grads = self._rows(data, len(batch))
        found = self.table.apply_gradients(_keys(batch), grads, lr=lr)
        assert_array_equal(found, self._expected(batch)[1])
        sums: dict[int, np.ndarray] = {}
        for k, g in zip(batch, grads, strict=True):
            if k in self.model:
                sums[k] = sums[k] + g if k in sums else g.copy()
        for k, g in sums.items():
            self.model[k] = self.model[k] - lr * g

    @rule(n=st.integers(1, 400), seed=st.integers(0, 2**32 - 1), assign=st.booleans())
    def bulk_insert(self, n: int, seed: int, assign: bool) -> None:
        """Many new keys at once: the index grows (doubling) while the batch runs."""
        rng = np.random.default_rng(seed)
        keys = rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)
        if assign:
            rows = rng.integers(-64, 65, size=(n, self.dim)) / 4
            self.table.insert_or_assign(keys, rows)
            for k, row in zip(keys.tolist(), rows, strict=True):
                self.model[k] = row
        else:
            self.table.find_or_insert(keys)
            for k in keys.tolist():
                self.model.setdefault(k, self.init_row.copy())

    @precondition(lambda self: len(self.model) > 0)
    @rule(fraction=st.floats(0.1, 1.0), seed=st.integers(0, 2**32 - 1))
    def bulk_erase(self, fraction: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        keys = np.array(sorted(self.model), dtype=np.uint64)
        gone = rng.choice(keys, size=max(1, int(fraction * keys.size)), replace=False)
        assert self.table.erase(gone).all()
        for k in gone.tolist():
            del self.model[k]

    @rule(n=st.integers(0, 3000))
    def reserve(self, n: int) -> None:
        self.table.reserve(n)

    # -- export and import -----------------------------------------------------------

    @rule(chunk_rows=st.integers(1, 9))
    def export_matches_model(self, chunk_rows: int) -> None:
        got = _exported(self.table, chunk_rows)
        assert got.keys() == self.model.keys()
        for k, row in self.model.items():
            assert_array_equal(got[k], row.astype(self.table.dtype), err_msg=f"key {k}")

    @rule(chunk_rows=st.integers(1, 9), capacity=st.sampled_from([1, 1000]))
    def import_into_fresh_table(self, chunk_rows: int, capacity: int) -> None:
        fresh = EmbeddingTable(capacity=capacity, **self.kwargs)
        assert fresh.import_chunks(self.table.export(chunk_rows=chunk_rows)) == len(self.model)
        assert len(fresh) == len(self.model)
        keys = np.array(list(self.model), dtype=np.uint64)
        values, found = fresh.find(keys)
        assert found.all()
        assert_array_equal(values, self._expected(keys.tolist())[0])

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def counters_agree(self) -> None:
        assert len(self.table) == len(self.model)
        stats = self.table.stats()
        assert stats.rows == len(self.model)
        assert 0.0 <= self.table.load_factor <= 1.0
        assert stats.high_water_rows - stats.free_rows == len(self.model)

    @invariant()
    def every_key_is_where_the_model_says(self) -> None:
        keys = KEY_POOL + list(self.model)
        values, found = self.table.find(_keys(keys))
        want_values, want_found = self._expected(keys)
        assert_array_equal(found, want_found)
        assert_array_equal(values, want_values)


TableModel.TestCase.settings = settings(stateful_step_count=40)
test_table_model = TableModel.TestCase


# -- growth and reserve -------------------------------------------------------------------


def _key_rows(keys: np.ndarray, dim: int) -> np.ndarray:
    """A row per key that is a function of the key, exact in float32."""
    low = (keys & np.uint64(0xFFFF)).astype(np.float64)
    return low[:, None] + np.arange(dim)[None, :] / 8


def test_growth_from_capacity_16_loses_nothing() -> None:
    rng = np.random.default_rng(2024)
    keys = np.unique(rng.integers(0, 2**64, size=200_000, dtype=np.uint64, endpoint=False))
    rng.shuffle(keys)
    table = EmbeddingTable(dim=4, capacity=16)
    assert table.stats().buckets <= 4
    for part in np.array_split(keys, 7):  # batches of different sizes, growth inside each
        assert table.insert_or_assign(part, _key_rows(part, 4)).all()
    stats = table.stats()
    assert len(table) == keys.size
    assert stats.index_grows >= 10
    assert 0.0 < table.load_factor <= 1.0
    values, found = table.find(keys)
    assert found.all()
    assert_array_equal(values, _key_rows(keys, 4).astype(np.float32))
    absent = rng.integers(0, 2**64, size=10_000, dtype=np.uint64, endpoint=False)
    absent = absent[~np.isin(absent, keys)]
    assert not table.contains(absent).any()

    # Erase half: the rest stay, the erased are gone, and their rows are reused.
    gone, kept = keys[::2], keys[1::2]
    assert table.erase(gone).all()
    assert len(table) == kept.size
    assert table.contains(kept).all() and not table.contains(gone).any()
    high = table.stats().high_water_rows
    assert table.insert_or_assign(gone, _key_rows(gone, 4)).all()
    assert table.stats().high_water_rows == high
    values, found = table.find(keys)
    assert found.all()
    assert_array_equal(values, _key_rows(keys, 4).astype(np.float32))


@given(n=st.integers(1, 60_000), capacity=st.sampled_from([1, 16, 500]), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=15)
def test_reserve_then_insert_does_not_grow(n: int, capacity: int, seed: int) -> None:
    table = EmbeddingTable(dim=2, capacity=capacity, huge_pages=False)
    table.reserve(n)
    grows = table.stats().index_grows
    buckets = table.stats().buckets
    keys = np.random.default_rng(seed).integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)
    table.find_or_insert(keys)
    assert table.stats().index_grows == grows
    assert table.stats().buckets == buckets
    assert len(table) == np.unique(keys).size
    assert table.contains(keys).all()


def test_reserve_never_shrinks_and_rejects_bad_sizes() -> None:
    table = EmbeddingTable(dim=2, capacity=5000, huge_pages=False, max_rows=100_000)
    buckets = table.stats().buckets
    table.reserve(10)
    table.reserve(0)
    assert table.stats().buckets == buckets
    with pytest.raises(ValueError, match="n"):
        table.reserve(-1)
    with pytest.raises(ValueError, match="max_rows"):
        table.reserve(100_001)


# -- the default initializer: a pure function of (key, seed) -------------------------------------


@given(
    keys=st.lists(st.integers(0, U64_MAX), min_size=1, max_size=50, unique=True),
    seed=st.integers(0, U64_MAX),
    order_seed=st.integers(0, 2**32 - 1),
)
def test_normal_initializer_is_a_function_of_key_and_seed(
    keys: list[int], seed: int, order_seed: int
) -> None:
    init = Initializer(seed=seed)
    a = EmbeddingTable(dim=6, initializer=init, capacity=1, huge_pages=False)
    b = EmbeddingTable(dim=6, initializer=init, capacity=1, huge_pages=False)
    wide = EmbeddingTable(dim=6, dtype="float64", initializer=init, huge_pages=False)
    rows_a = a.find_or_insert(_keys(keys))
    # b creates the same keys in another order, split over batches, with repeats.
    shuffled = np.random.default_rng(order_seed).permutation(_keys(keys + keys[:3]))
    for part in np.array_split(shuffled, 3):
        b.find_or_insert(part)
    rows_b, found = b.find(_keys(keys))
    assert found.all()
    assert_array_equal(rows_a, rows_b)
    # float32 rows are the float64 draws rounded once.
    assert_array_equal(rows_a, wide.find_or_insert(_keys(keys)).astype(np.float32))
    # A second find_or_insert of existing keys returns them unchanged.
    assert_array_equal(a.find_or_insert(_keys(keys)), rows_a)
    assert np.isfinite(rows_a).all()


@given(seed=st.integers(0, U64_MAX - 1))
@settings(max_examples=10)
def test_different_seeds_give_different_rows(seed: int) -> None:
    keys = np.arange(64, dtype=np.uint64)
    a = EmbeddingTable(dim=4, initializer=Initializer(seed=seed), huge_pages=False)
    b = EmbeddingTable(dim=4, initializer=Initializer(seed=seed + 1), huge_pages=False)
    ra, rb = a.find_or_insert(keys), b.find_or_insert(keys)
    assert not (ra == rb).all(axis=1).any()
    # And different keys under one seed differ from each other.
    assert np.unique(ra, axis=0).shape[0] == keys.size


@pytest.mark.parametrize(
    ("init", "check"),
    [
        (Initializer(kind="normal", mean=1.0, std=0.5),
         lambda x: abs(x.mean() - 1) < 0.02 and abs(x.std() - 0.5) < 0.02),
        (Initializer(kind="uniform", low=-2.0, high=3.0),
         lambda x: x.min() >= -2 and x.max() < 3 and abs(x.mean() - 0.5) < 0.05),
        (Initializer(kind="truncated_normal", mean=0.0, std=1.0),
         lambda x: np.abs(x).max() <= 2 and abs(x.mean()) < 0.02 and 0.8 < x.std() < 0.9),
        (Initializer(kind="constant", value=-3.5), lambda x: (x == -3.5).all()),
        (Initializer(kind="zeros"), lambda x: (x == 0).all()),
    ],
    ids=["normal", "uniform", "truncated_normal", "constant", "zeros"],
)
def test_initializer_kinds_have_their_distribution(init: Initializer, check: object) -> None:
    table = EmbeddingTable(dim=8, dtype="float64", initializer=init, huge_pages=False)
    x = table.find_or_insert(np.arange(20_000, dtype=np.uint64))
    assert callable(check) and check(x)
