"""EmbeddingTable input checks: keys, values, grads, out, empty batches, bad args, TableFull, init fns."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from streamrec import Adagrad, ConfigError, EmbeddingTable, Initializer, StoreError, TableFull

U64_MAX = 2**64 - 1
DIM = 3


def small(**kwargs: object) -> EmbeddingTable:
    kwargs.setdefault("dim", DIM)
    kwargs.setdefault("huge_pages", False)
    kwargs.setdefault("initializer", Initializer(kind="constant", value=0.5))
    return EmbeddingTable(**kwargs)  # type: ignore[arg-type]


def _key_ops(table: EmbeddingTable) -> dict[str, Callable[[object], object]]:
    """Every method taking keys, with well-formed other arguments for a batch of n keys."""

    def rows(keys: object) -> np.ndarray:
        return np.ones((np.shape(keys)[0] if np.ndim(keys) else 1, DIM))

    return {
        "find": table.find,
        "contains": table.contains,
        "find_or_insert": table.find_or_insert,
        "insert_or_assign": lambda k: table.insert_or_assign(k, rows(k)),
        "assign": lambda k: table.assign(k, rows(k)),
        "erase": table.erase,
        "apply_gradients": lambda k: table.apply_gradients(k, rows(k), lr=0.1),
        "import_chunks": lambda k: table.import_chunks([(k, rows(k))]),
    }


OPS = list(_key_ops(small()))


# -- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys",
    [
        np.array([0, 7, 255], dtype=np.uint8),
        np.array([0, 7, 2**32 - 1], dtype=np.uint32),
        np.array([0, 7, 2**31 - 1], dtype=np.int32),
        np.array([0, 7, 2**63 - 1], dtype=np.int64),
        np.array([0, 7, U64_MAX], dtype=np.uint64),
        np.array([0, 7, U64_MAX], dtype=">u8"),
        [0, 7, U64_MAX],
        [0, 7, 2**63],
        [np.uint64(3), 2**64 - 2],
        (1, 2, 3),
        np.arange(12, dtype=np.uint64)[::4],  # non-contiguous
        np.arange(12, dtype=np.int64)[::-3],  # negative stride
    ],
    ids=["uint8", "uint32", "int32", "int64", "uint64", "uint64-big-endian", "list-max", "list-2**63",
         "mixed", "tuple", "strided", "reversed"],
)
def test_integer_keys_of_any_width_and_layout_are_accepted(keys: object) -> None:
    table = small()
    expect = [int(k) for k in keys]  # type: ignore[attr-defined]
    assert table.insert_or_assign(keys, np.arange(len(expect) * DIM).reshape(-1, DIM)).all()
    assert len(table) == len(expect)
    values, found = table.find(np.array(expect, dtype=np.uint64))
    assert found.all()
    assert_array_equal(values, np.arange(len(expect) * DIM).reshape(-1, DIM))
    assert table.contains(keys).all()
    assert_array_equal(table.find(keys)[0], values)


@pytest.mark.parametrize(
    ("keys", "error", "match"),
    [
        (np.array([1.0, 2.0]), TypeError, "integer.*float64"),
        (np.array([1, 2], dtype=np.float32), TypeError, "integer.*float32"),
        ([1.0, 2.5], TypeError, "integer"),
        (np.array([True, False]), TypeError, "integer.*bool"),
        ([True, False], TypeError, "integer.*bool"),
        (["a", "b"], TypeError, "integer"),
        (np.array([1 + 2j]), TypeError, "integer"),
        (np.array([3, -1], dtype=np.int64), ValueError, "non-negative.*-1"),
        ([-5, 3], ValueError, "non-negative"),
        (np.array([-1], dtype=np.int8), ValueError, "non-negative"),
        ([2**64], ValueError, r"\[0, 2\*\*64\)"),
        ([1, 2**70], ValueError, r"\[0, 2\*\*64\)"),
        ([-1, U64_MAX], ValueError, r"\[0, 2\*\*64\)"),
        (np.zeros((2, 2), dtype=np.uint64), ValueError, r"1-D.*\(2, 2\)"),
        ([[1, 2]], ValueError, "1-D"),
        (5, ValueError, "1-D"),
        (np.uint64(5), ValueError, "1-D"),
    ],
    ids=["float64", "float32", "float-list", "bool", "bool-list", "str", "complex", "negative-int64",
         "negative-list", "negative-int8", "2**64", "2**70", "negative-and-huge", "2-D", "nested-list",
         "scalar", "numpy-scalar"],
)
@pytest.mark.parametrize("op", OPS)
def test_bad_keys_are_refused_saying_what_was_expected(op: str, keys: object, error: type,
                                                       match: str) -> None:
    table = small()
    table.insert_or_assign([1, 2, 3], np.zeros((3, DIM)))
    with pytest.raises(error, match=match) as info:
        _key_ops(table)[op](keys)
    assert "keys" in str(info.value)
    assert len(table) == 3  # nothing was written


# -- values, grads, out --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        np.ones((2, DIM + 1)),
        np.ones((2, DIM - 1)),
        np.ones((3, DIM)),
        np.ones((1, DIM)),
        np.ones(2 * DIM),
        np.ones((2, DIM, 1)),
        np.ones((DIM, 2)),
    ],
    ids=["too-wide", "too-narrow", "too-many-rows", "too-few-rows", "flat", "3-D", "transposed"],
)
@pytest.mark.parametrize("op", ["insert_or_assign", "assign", "apply_gradients", "import_chunks"])
def test_values_and_grads_of_the_wrong_shape_are_refused(op: str, values: np.ndarray) -> None:
    table = small()
    keys = np.array([1, 2], dtype=np.uint64)
    table.insert_or_assign(keys, np.zeros((2, DIM)))
    call = {
        "insert_or_assign": lambda: table.insert_or_assign(keys, values),
        "assign": lambda: table.assign(keys, values),
        "apply_gradients": lambda: table.apply_gradients(keys, values, lr=0.1),
        "import_chunks": lambda: table.import_chunks([(keys, values)]),
    }[op]
    with pytest.raises(ValueError, match=rf"expected shape \(2, {DIM}\)"):
        call()
    assert_array_equal(table.find(keys)[0], np.zeros((2, DIM)))


@pytest.mark.parametrize(
    "values",
    [np.array([["a"] * DIM] * 2), np.ones((2, DIM), dtype=complex), np.ones((2, DIM), dtype=bool),
     np.array([[object()] * DIM] * 2)],
    ids=["str", "complex", "bool", "object"],
)
def test_values_that_are_not_real_numbers_are_refused(values: np.ndarray) -> None:
    table = small()
    with pytest.raises(TypeError, match="real numbers"):
        table.insert_or_assign([1, 2], values)
    with pytest.raises(TypeError, match=r"grads.*real numbers"):
        table.apply_gradients([1, 2], values, lr=0.1)
    assert len(table) == 0


def test_values_of_other_real_dtypes_and_layouts_are_converted() -> None:
    table = small(dtype="float64")
    keys = np.arange(4, dtype=np.uint64)
    base = np.arange(8 * DIM, dtype=np.float32).reshape(8, DIM)
    table.insert_or_assign(keys, base[::2])  # non-contiguous float32
    assert_array_equal(table.find(keys)[0], base[::2])
    table.assign(keys, np.asfortranarray(np.arange(4 * DIM, dtype=np.int16).reshape(4, DIM)))
    assert_array_equal(table.find(keys)[0], np.arange(4 * DIM).reshape(4, DIM))
    table.apply_gradients(keys, np.ones((4, DIM), dtype=np.uint8), lr=1)
    assert_array_equal(table.find(keys)[0], np.arange(4 * DIM).reshape(4, DIM) - 1)
    table.insert_or_assign(keys, [[0.25] * DIM] * 4)  # nested lists
    assert_array_equal(table.find(keys)[0], np.full((4, DIM), 0.25))


@pytest.mark.parametrize(
    ("out", "error"),
    [
        (np.empty((2, DIM), dtype=np.float64), ValueError),
        (np.empty((2, DIM), dtype=np.int32), ValueError),
        (np.empty((3, DIM), dtype=np.float32), ValueError),
        (np.empty((2, DIM + 1), dtype=np.float32), ValueError),
        (np.empty(2 * DIM, dtype=np.float32), ValueError),
        (np.empty((4, DIM), dtype=np.float32)[::2], ValueError),
        (np.asfortranarray(np.empty((2, DIM), dtype=np.float32)), ValueError),
        ([[0.0] * DIM] * 2, TypeError),
    ],
    ids=["float64", "int32", "rows", "cols", "flat", "strided", "fortran", "list"],
)
@pytest.mark.parametrize("op", ["find", "find_or_insert"])
def test_bad_out_buffers_are_refused(op: str, out: object, error: type) -> None:
    table = small()
    with pytest.raises(error, match="out"):
        getattr(table, op)([1, 2], out=out)
    assert len(table) == 0


def test_read_only_out_is_refused_and_good_out_is_filled_in_place() -> None:
    table = small()
    out = np.zeros((2, DIM), dtype=np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        table.find([1, 2], out=out)
    out = np.full((2, DIM), 7.0, dtype=np.float32)
    assert table.find_or_insert([1, 2], out=out) is out
    assert_array_equal(out, np.full((2, DIM), 0.5))
    out[:] = 7.0
    values, found = table.find([2, 9], out=out)
    assert values is out
    assert_array_equal(found, [True, False])
    assert_array_equal(out, [[0.5] * DIM, [0.0] * DIM])


def test_found_mask_is_filled_in_place_and_bad_ones_are_refused() -> None:
    table = small()
    table.find_or_insert([2])
    mask = np.ones(2, dtype=np.bool_)
    values, found = table.find([2, 9], found=mask)
    assert found is mask
    assert_array_equal(mask, [True, False])
    assert_array_equal(values, [[0.5] * DIM, [0.0] * DIM])
    read_only = np.zeros(2, dtype=np.bool_)
    read_only.flags.writeable = False
    for bad, error in ((np.zeros(3, np.bool_), ValueError), (np.zeros(2, np.uint8), ValueError),
                       (read_only, ValueError), ([True, False], TypeError)):
        with pytest.raises(error, match="found"):
            table.find([2, 9], found=bad)


@pytest.mark.parametrize("lr", [-0.1, 0.0, float("nan"), float("inf"), "0.1", None, np.array([0.1])])
def test_bad_learning_rates_are_refused(lr: object) -> None:
    table = small()
    table.insert_or_assign([1], np.ones((1, DIM)))
    with pytest.raises(ValueError, match="lr"):
        table.apply_gradients([1], np.ones((1, DIM)), lr=lr)  # type: ignore[arg-type]
    assert_array_equal(table.find([1])[0], np.ones((1, DIM)))


@pytest.mark.parametrize("chunk_rows", [0, -1, 1.5, None])
def test_bad_chunk_rows_are_refused(chunk_rows: object) -> None:
    with pytest.raises(ValueError, match="chunk_rows"):
        next(small().export(chunk_rows=chunk_rows))  # type: ignore[arg-type]


def test_import_with_state_needs_the_state_columns() -> None:
    src = small(optimizer="adagrad")
    src.find_or_insert([1, 2])
    dst = small(optimizer="adagrad")
    with pytest.raises(ValueError, match=rf"expected shape \(2, {2 * DIM}\)"):
        dst.import_chunks(src.export(), include_state=True)
    with pytest.raises(ValueError, match=rf"expected shape \(2, {DIM}\)"):
        dst.import_chunks(src.export(include_state=True))


# -- empty batches -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys",
    [[], (), np.array([], dtype=np.uint64), np.array([], dtype=np.int32), np.array([], dtype=np.uint8)],
    ids=["list", "tuple", "uint64", "int32", "uint8"],
)
@pytest.mark.parametrize("optimizer", [None, "adagrad", "adam"])
def test_empty_batches_work_for_every_operation(keys: object, optimizer: str | None) -> None:
    table = small(optimizer=optimizer)
    table.insert_or_assign([5], np.ones((1, DIM)))
    no_rows = np.empty((0, DIM))
    values, found = table.find(keys)
    assert values.shape == (0, DIM) and values.dtype == np.float32
    assert found.shape == (0,) and found.dtype == np.bool_
    assert table.find(keys, out=np.empty((0, DIM), dtype=np.float32))[0].shape == (0, DIM)
    assert table.contains(keys).shape == (0,)
    assert table.find_or_insert(keys).shape == (0, DIM)
    for mask in (
        table.insert_or_assign(keys, no_rows),
        table.assign(keys, no_rows),
        table.apply_gradients(keys, no_rows, lr=0.1),
        table.erase(keys),
    ):
        assert mask.shape == (0,) and mask.dtype == np.bool_
    assert table.import_chunks([(keys, no_rows)]) == 0
    assert table.import_chunks([]) == 0
    assert len(table) == 1
    assert_array_equal(table.find([5])[0], np.ones((1, DIM)))

    empty = small(optimizer=optimizer)
    assert list(empty.export()) == []
    assert list(empty.export(include_state=True)) == []
    with_fn = small(initializer=lambda k: pytest.fail("initializer called for an empty batch"))
    assert with_fn.find_or_insert(keys).shape == (0, DIM)


# -- constructor arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dim": 0}, "table.dim"),
        ({"dim": -3}, "table.dim"),
        ({"dim": 2.0}, "table.dim"),
        ({"dim": True}, "table.dim"),
        ({"dim": "4"}, "table.dim"),
        ({"dim": 4, "dtype": "int8"}, "table.dtype"),
        ({"dim": 4, "dtype": "float16"}, "table.dtype"),
        ({"dim": 4, "dtype": np.int64}, "table.dtype"),
        ({"dim": 4, "capacity": 0}, "table.capacity"),
        ({"dim": 4, "capacity": 2**32}, "table.capacity"),
        ({"dim": 4, "capacity": 10.0}, "table.capacity"),
        ({"dim": 4, "max_rows": -1}, "table.max_rows"),
        ({"dim": 4, "max_rows": 2**32}, "table.max_rows"),
        ({"dim": 4, "optimizer": Adagrad(), "initializer": Initializer(kind="constant", value=1.0),
          "max_rows": 1.5}, "table.max_rows"),
        ({"dim": 4, "dtype": "bogus"}, "table.dtype"),
        ({"dim": 4, "optimizer": "sgdx"}, "table.optimizer"),
        ({"dim": 4, "optimizer": 3}, "table.optimizer"),
        ({"dim": 4, "initializer": "normal"}, "table.initializer"),
    ],
    ids=["dim=0", "dim<0", "dim-float", "dim-bool", "dim-str", "int8", "float16", "np.int64", "capacity=0",
         "capacity-huge", "capacity-float", "max_rows<0", "max_rows-huge", "max_rows-float", "dtype-unknown",
         "optimizer-name", "optimizer-int", "initializer-str"],
)
def test_bad_constructor_arguments_raise_config_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        EmbeddingTable(huge_pages=False, **kwargs)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_optimizer_names_and_configs_are_accepted() -> None:
    for opt, width in [(None, 0), ("sgd", 0), ("none", 0), ("adagrad", DIM), ("adam", 2 * DIM + 1),
                       (Adagrad(eps=1e-3), DIM)]:
        assert small(optimizer=opt).state_width == width
    table = small(dtype=np.float64, capacity=1)
    assert table.dtype == np.float64 and table.dim == DIM


# -- TableFull ------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["insert_or_assign", "find_or_insert", "import_chunks", "find_or_insert-fn"])
def test_table_full_carries_its_counts_and_leaves_the_table_usable(op: str) -> None:
    table = small(max_rows=10, capacity=1)
    if op == "find_or_insert-fn":
        table = small(max_rows=10, capacity=1, initializer=lambda k: np.full((k.size, DIM), 0.5))
    keys = np.arange(100, 120, dtype=np.uint64)
    rows = np.full((20, DIM), 0.5)
    call = {
        "insert_or_assign": lambda: table.insert_or_assign(keys, rows),
        "find_or_insert": lambda: table.find_or_insert(keys),
        "find_or_insert-fn": lambda: table.find_or_insert(keys),
        "import_chunks": lambda: table.import_chunks([(keys[:5], rows[:5]), (keys[5:], rows[5:])]),
    }[op]
    with pytest.raises(TableFull) as info:
        call()
    err = info.value
    assert isinstance(err, StoreError)
    assert err.rows == 10 and err.max_rows == 10 and table.max_rows == 10
    assert 0 <= err.position <= 20
    assert 0.0 < err.load_factor <= 1.0
    assert "max_rows=10" in str(err)
    assert len(table) == 10
    # The batch stopped where it says: the keys before that are in, with their values.
    first = keys[:10]
    if op != "import_chunks":  # import_chunks reports the position within the failing chunk
        assert err.position == 10
    values, found = table.find(first)
    assert found.all()
    assert_array_equal(values, np.full((10, DIM), 0.5))
    assert not table.contains(keys[10:]).any()
    stats = table.stats()
    assert stats.rows == 10 and stats.high_water_rows == 10

    # Still usable: existing keys update, reads work, and erasing makes room again.
    assert table.assign(first, np.ones((10, DIM))).all()
    assert_array_equal(table.find(first)[0], np.ones((10, DIM)))
    with pytest.raises(TableFull):
        table.insert_or_assign([999], np.ones((1, DIM)))
    assert table.erase(first[:3]).all()
    assert table.insert_or_assign(keys[10:13], np.full((3, DIM), 2.0)).all()
    assert len(table) == 10
    assert_array_equal(table.find(keys[10:13])[0], np.full((3, DIM), 2.0))
    assert sorted(k for chunk, _ in table.export(chunk_rows=3) for k in chunk.tolist()) == sorted(
        first[3:].tolist() + keys[10:13].tolist()
    )


# -- callable initializers ----------------------------------------------------------------------------


def test_callable_initializer_is_called_for_new_keys_only() -> None:
    calls: list[np.ndarray] = []

    def init(keys: np.ndarray) -> np.ndarray:
        calls.append(keys.copy())
        return np.repeat(keys.astype(np.float64)[:, None] + 0.5, DIM, axis=1)

    table = small(initializer=init, dtype="float64")
    assert_array_equal(table.find_or_insert([3, 1, 3]), [[3.5] * DIM, [1.5] * DIM, [3.5] * DIM])
    assert len(calls) == 1 and sorted(calls[0].tolist()) == [1, 3]
    assert calls[0].dtype == np.uint64
    table.insert_or_assign([7], np.zeros((1, DIM)))
    assert len(calls) == 1  # writes never initialise
    assert_array_equal(table.find_or_insert([1, 7, 9]), [[1.5] * DIM, [0.0] * DIM, [9.5] * DIM])
    assert len(calls) == 2 and calls[1].tolist() == [9]
    table.find_or_insert([1, 3, 7, 9])
    assert len(calls) == 2  # nothing new, no call
    assert len(table) == 4


@pytest.mark.parametrize(
    "result",
    [
        lambda k: np.zeros((k.size, DIM + 1)),
        lambda k: np.zeros((k.size + 1, DIM)),
        lambda k: np.zeros(k.size * DIM),
        lambda k: np.zeros((DIM, k.size)),
    ],
    ids=["wide", "long", "flat", "transposed"],
)
def test_callable_initializer_of_the_wrong_shape_is_refused(
    result: Callable[[np.ndarray], np.ndarray],
) -> None:
    table = small(initializer=result)
    table.insert_or_assign([1], np.ones((1, DIM)))
    with pytest.raises(ValueError, match="initializer"):
        table.find_or_insert([1, 2, 5])
    assert len(table) == 1
    assert not table.contains([2, 5]).any()


def test_table_full_position_indexes_the_callers_batch_with_a_callable_initializer() -> None:
    """Regression: the position once indexed the sorted unique missing keys, not the caller's batch."""
    table = small(max_rows=10, initializer=lambda k: np.zeros((k.size, DIM)))
    keys = np.arange(119, 99, -1, dtype=np.uint64)
    with pytest.raises(TableFull) as info:
        table.find_or_insert(keys)
    pos = info.value.position
    assert table.contains(keys[:pos]).all()
    assert not table.contains(keys[pos : pos + 1]).any()
