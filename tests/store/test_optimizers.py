"""EmbeddingTable.apply_gradients against dense references of SGD, Adagrad and Adam (PyTorch's formulas)."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

from streamrec import Adagrad, Adam, EmbeddingTable, Initializer

# -- a dense reference, written from PyTorch's documented update rules -------------------------


class DenseSGD:
    def __init__(self, w: np.ndarray) -> None:
        self.w = w.astype(np.float64)

    def step(self, g: np.ndarray, lr: float) -> None:
        self.w = self.w - lr * g


class DenseAdagrad:
    """torch.optim.Adagrad without decay: acc += g^2; w -= lr * g / (sqrt(acc) + eps)."""

    def __init__(self, w: np.ndarray, eps: float = 1e-10, initial_accumulator: float = 0.0) -> None:
        self.w = w.astype(np.float64)
        self.acc = np.full_like(self.w, initial_accumulator)
        self.eps = eps

    def step(self, g: np.ndarray, lr: float) -> None:
        self.acc = self.acc + g * g
        self.w = self.w - lr * g / (np.sqrt(self.acc) + self.eps)


class DenseAdam:
    """torch.optim.Adam (amsgrad=False, no weight decay), with its bias correction."""

    def __init__(self, w: np.ndarray, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8) -> None:
        self.w = w.astype(np.float64)
        self.m = np.zeros_like(self.w)
        self.v = np.zeros_like(self.w)
        self.t = 0
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    def step(self, g: np.ndarray, lr: float) -> None:
        b1, b2 = self.beta1, self.beta2
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        step_size = lr / (1 - b1**self.t)
        denom = np.sqrt(self.v) / np.sqrt(1 - b2**self.t) + self.eps
        self.w = self.w - step_size * self.m / denom


OPTIMIZERS = {
    "sgd": (None, DenseSGD, {}),
    "adagrad": (Adagrad(), DenseAdagrad, {}),
    "adagrad-acc0.1": (Adagrad(eps=1e-6, initial_accumulator=0.1), DenseAdagrad,
                       {"eps": 1e-6, "initial_accumulator": 0.1}),
    "adam": (Adam(), DenseAdam, {}),
    "adam-custom": (Adam(beta1=0.5, beta2=0.9, eps=1e-3), DenseAdam,
                    {"beta1": 0.5, "beta2": 0.9, "eps": 1e-3}),
}
TOL = {"float64": {"rtol": 1e-10, "atol": 1e-14}, "float32": {"rtol": 1e-5, "atol": 1e-7}}


def _tol(dtype: str, lr_sum: float) -> dict[str, float]:
    """Tolerance after steps of total learning rate ``lr_sum``.

    float64 rows match to rounding. float32 rows are rounded on every store, and
    an element near 0 that moved by ~lr per step carries that rounding as an
    absolute error of the update's scale, so float32 gets an atol in units of lr.
    """
    if dtype == "float64":
        return TOL["float64"]
    return {"rtol": 1e-5, "atol": 1e-5 * lr_sum}


def _grads_with_duplicates(rng: np.random.Generator, keys: np.ndarray, dim: int, dtype: str
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch holding every key once or more, in random order: (batch keys, grads, per-key sums)."""
    reps = rng.integers(1, 4, size=keys.size)
    pos = rng.permutation(np.repeat(np.arange(keys.size), reps))
    grads = rng.normal(0, 1, size=(pos.size, dim)).astype(dtype)
    sums = np.zeros((keys.size, dim))
    np.add.at(sums, pos, grads.astype(np.float64))
    return keys[pos], grads, sums


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_apply_gradients_matches_dense_reference(name: str, dtype: str) -> None:
    opt, dense_cls, kwargs = OPTIMIZERS[name]
    dim, n, steps = 5, 40, 8
    rng = np.random.default_rng(zlib.crc32(f"{name}/{dtype}".encode()))
    keys = np.unique(rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False))
    table = EmbeddingTable(dim=dim, dtype=dtype, optimizer=opt, initializer=Initializer(std=0.1),
                           capacity=1, huge_pages=False)
    dense = dense_cls(table.find_or_insert(keys), **kwargs)
    lr_sum = 0.0
    for step in range(steps):
        batch, grads, sums = _grads_with_duplicates(rng, keys, dim, dtype)
        lr = [0.1, 0.01, 0.5][step % 3]
        found = table.apply_gradients(batch, grads, lr=lr)
        assert found.all()
        dense.step(sums, lr)
        lr_sum += lr
        values, _ = table.find(keys)
        assert_allclose(values, dense.w, **_tol(dtype, lr_sum), err_msg=f"{name} step {step}")


@pytest.mark.parametrize("name", ["adagrad", "adam"])
def test_rows_keep_their_own_state(name: str) -> None:
    """A row that skips a step does not advance its state: sparse (lazy) semantics."""
    opt, dense_cls, _ = OPTIMIZERS[name]
    table = EmbeddingTable(dim=3, dtype="float64", optimizer=opt, initializer=Initializer(std=0.1),
                           huge_pages=False)
    keys = np.array([5, 6], dtype=np.uint64)
    start = table.find_or_insert(keys)
    a, b = dense_cls(start[:1]), dense_cls(start[1:])
    rng = np.random.default_rng(3)
    for step in range(6):
        g = rng.normal(size=(2, 3))
        if step % 2:  # key 6 gets every other step only
            table.apply_gradients(keys, g, lr=0.05)
            b.step(g[1:], 0.05)
        else:
            table.apply_gradients(keys[:1], g[:1], lr=0.05)
        a.step(g[:1], 0.05)
    values, _ = table.find(keys)
    assert_allclose(values, np.vstack([a.w, b.w]), rtol=1e-12)


@given(
    batch=st.lists(st.integers(0, 9), max_size=30),
    seed=st.integers(0, 2**32 - 1),
    opt=st.sampled_from(["sgd", "adagrad", "adam"]),
)
def test_absent_keys_are_skipped_and_reported(batch: list[int], seed: int, opt: str) -> None:
    """Keys 0..4 exist, 5..9 do not: only present rows change, the mask says which were found."""
    table = EmbeddingTable(dim=2, dtype="float64", optimizer=opt, huge_pages=False,
                           initializer=Initializer(std=0.1))
    present = np.arange(5, dtype=np.uint64)
    start = table.find_or_insert(present)
    keys = np.array(batch, dtype=np.uint64)
    grads = np.random.default_rng(seed).normal(size=(keys.size, 2))
    found = table.apply_gradients(keys, grads, lr=0.1)
    assert_array_equal(found, keys < 5)
    assert len(table) == 5
    assert not table.contains(np.arange(5, 10)).any()
    sums = np.zeros((5, 2))
    np.add.at(sums, keys[found].astype(np.int64), grads[found])
    touched = np.isin(np.arange(5), keys[found].astype(np.int64))
    values, _ = table.find(present)
    assert_array_equal(values[~touched], start[~touched])
    # The dense reference steps only the touched rows.
    dense_touched = OPTIMIZERS[opt][1](start[touched])
    dense_touched.step(sums[touched], 0.1)
    assert_allclose(values[touched], dense_touched.w, rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["sgd", "adagrad-acc0.1", "adam"])
def test_export_import_with_state_continues_training_identically(name: str, dtype: str) -> None:
    opt = OPTIMIZERS[name][0]
    rng = np.random.default_rng(11)
    keys = np.unique(rng.integers(0, 2**64, size=300, dtype=np.uint64, endpoint=False))
    kwargs = {"dim": 4, "dtype": dtype, "optimizer": opt, "huge_pages": False}
    a = EmbeddingTable(**kwargs)
    a.find_or_insert(keys)
    grads = [rng.normal(size=(keys.size, 4)) for _ in range(6)]
    for g in grads[:3]:
        a.apply_gradients(keys, g, lr=0.05)
    assert a.state_width == {"sgd": 0, "adagrad-acc0.1": 4, "adam": 2 * 4 + 1}[name]

    b = EmbeddingTable(capacity=1, **kwargs)
    assert b.import_chunks(a.export(chunk_rows=37, include_state=True), include_state=True) == keys.size
    state_a = dict(_pairs(a.export(include_state=True)))
    state_b = dict(_pairs(b.export(include_state=True)))
    assert state_a.keys() == state_b.keys()
    for k, row in state_a.items():
        assert_array_equal(state_b[k], row)

    for g in grads[3:]:
        a.apply_gradients(keys, g, lr=0.05)
        b.apply_gradients(keys, g, lr=0.05)
    assert_array_equal(b.find(keys)[0], a.find(keys)[0])

    # Without the state, imported rows start afresh: they match a restart of the optimizer.
    if opt is not None:
        c = EmbeddingTable(**kwargs)
        c.import_chunks(a.export(chunk_rows=50))
        fresh = OPTIMIZERS[name][1](a.find(keys)[0], **OPTIMIZERS[name][2])
        c.apply_gradients(keys, grads[0], lr=0.05)
        fresh.step(grads[0].astype(dtype).astype(np.float64), 0.05)
        assert_allclose(c.find(keys)[0], fresh.w, **_tol(dtype, 0.05))


def test_float32_adam_matches_pytorch_to_float32_rounding() -> None:
    """A float32 Adam row against the same steps with m, v and w rounded to float32 on store,
    bias corrections exact (as PyTorch computes them, from an integer step).

    Regression: rows once stored beta1**t and beta2**t in the row's float32, whose
    rounding put ~1e-5 relative error into 1 - beta2**t and drifted ~40 ulps in 20 steps.
    """
    rng = np.random.default_rng(1)
    keys = np.arange(64, dtype=np.uint64)
    table = EmbeddingTable(dim=8, optimizer=Adam(), initializer=Initializer(std=0.1), huge_pages=False)
    dense = DenseAdam(table.find_or_insert(keys))
    for _ in range(20):
        g = rng.normal(size=(keys.size, 8)).astype(np.float32)
        table.apply_gradients(keys, g, lr=0.1)
        dense.step(g.astype(np.float64), 0.1)
        for name in ("w", "m", "v"):  # rounded on store, as the table's row is
            setattr(dense, name, getattr(dense, name).astype(np.float32).astype(np.float64))
    ulp = float(np.spacing(np.float32(np.abs(dense.w).max())))
    assert_allclose(table.find(keys)[0], dense.w, rtol=0, atol=4 * ulp)


def _pairs(chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[int, np.ndarray]]:
    for keys, values in chunks:
        yield from zip(keys.tolist(), values, strict=True)


def test_apply_gradients_against_torch_optimizers() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    keys = np.arange(100, 130, dtype=np.uint64)
    for opt, make in [
        (Adagrad(), lambda p: torch.optim.Adagrad([p], lr=0.1)),
        (Adagrad(initial_accumulator=0.1, eps=1e-6),
         lambda p: torch.optim.Adagrad([p], lr=0.1, initial_accumulator_value=0.1, eps=1e-6)),
        (Adam(), lambda p: torch.optim.Adam([p], lr=0.1)),
        (Adam(beta1=0.8, beta2=0.99, eps=1e-6),
         lambda p: torch.optim.Adam([p], lr=0.1, betas=(0.8, 0.99), eps=1e-6)),
    ]:
        table = EmbeddingTable(dim=6, dtype="float64", optimizer=opt, huge_pages=False)
        param = torch.nn.Parameter(torch.from_numpy(table.find_or_insert(keys).copy()))
        torch_opt = make(param)
        for _ in range(10):
            batch, grads, sums = _grads_with_duplicates(rng, keys, 6, "float64")
            table.apply_gradients(batch, grads, lr=0.1)
            param.grad = torch.from_numpy(sums)
            torch_opt.step()
        assert_allclose(table.find(keys)[0], param.detach().numpy(), rtol=1e-10, atol=1e-14,
                        err_msg=repr(opt))
