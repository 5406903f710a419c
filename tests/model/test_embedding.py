"""The store bridge equals a dense ``nn.Embedding`` trained with the same torch optimizer: the same
gradient per row and the same rows after several steps (Adagrad with the store's eps and initial
accumulator, SGD, and Adam on rows present at every step), in-process and through a PSClient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from streamrec.config import Adagrad, Adam, Initializer
from streamrec.model.embedding import StoreEmbedding
from streamrec.model.stca import STCA, ModelConfig
from streamrec.store.table import EmbeddingTable
from tests.model.test_stca import make_batch

torch.set_num_threads(1)

DIM = 8
VOCAB = np.arange(40, dtype=np.int64) * 1_000_003 + 7  # sparse ids, far apart
INIT = Initializer(kind="normal", std=0.1, seed=3)


def _table(optimizer: Adagrad | Adam | None) -> EmbeddingTable:
    return EmbeddingTable(dim=DIM, optimizer=optimizer, initializer=INIT, huge_pages=False)


def _dense_twin(optimizer: Adagrad | Adam | None, lr: float) -> tuple[nn.Embedding, torch.optim.Optimizer]:
    # The initializer is a function of the key, so a second table gives the rows the bridge will create.
    init = _table(None).find_or_insert(VOCAB.astype(np.uint64))
    dense = nn.Embedding(VOCAB.size, DIM)
    with torch.no_grad():
        dense.weight.copy_(torch.from_numpy(init))
    if isinstance(optimizer, Adagrad):
        opt: torch.optim.Optimizer = torch.optim.Adagrad(dense.parameters(), lr=lr, eps=optimizer.eps,
                                                         initial_accumulator_value=optimizer.initial_accumulator)
    elif isinstance(optimizer, Adam):
        opt = torch.optim.Adam(dense.parameters(), lr=lr, betas=(optimizer.beta1, optimizer.beta2),
                               eps=optimizer.eps)
    else:
        opt = torch.optim.SGD(dense.parameters(), lr=lr)
    return dense, opt


def _loss(rows: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((torch.tanh(rows @ w) - y) ** 2).sum()


def _run(optimizer: Adagrad | Adam | None, *, every_row: bool, steps: int = 6, lr: float = 0.05) -> None:
    rng = np.random.default_rng(0)
    table = _table(optimizer)
    bridge = StoreEmbedding(table, lr=lr)
    dense, opt = _dense_twin(optimizer, lr)
    seen: set[int] = set()
    for step in range(steps):
        # Repeats within the batch; later steps bring ids never seen (rows created then).
        pool = VOCAB.size if every_row else min(VOCAB.size, 10 + 6 * step)
        pos = rng.integers(0, pool, size=30)
        if every_row:
            pos = np.r_[pos, np.arange(VOCAB.size)]
        ids = torch.from_numpy(VOCAB[pos])
        w = torch.from_numpy(rng.normal(size=(DIM, 3)).astype(np.float32))
        y = torch.from_numpy(rng.normal(size=(pos.size, 3)).astype(np.float32))

        out = bridge(ids)
        opt.zero_grad()
        ref = dense(torch.from_numpy(pos))
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
        _loss(out, w, y).backward()
        _loss(ref, w, y).backward()
        # The pushed gradient per distinct id is the dense gradient's row.
        uniq = np.unique(pos)
        assert set(bridge.pushed_keys.tolist()) == set(VOCAB[uniq].tolist())
        opt.step()
        seen |= set(uniq.tolist())
        idx = np.array(sorted(seen))
        got, found = table.find(VOCAB[idx].astype(np.uint64))
        assert found.all() and len(table) == len(seen)
        torch.testing.assert_close(torch.from_numpy(got), dense.weight[idx].detach(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("initial", [0.0, 0.1])
def test_adagrad_bridge_equals_dense_adagrad(initial: float) -> None:
    _run(Adagrad(eps=1e-10, initial_accumulator=initial), every_row=False)


def test_sgd_bridge_equals_dense_sgd() -> None:
    _run(None, every_row=False)


def test_adam_bridge_equals_dense_adam_when_every_row_is_present() -> None:
    _run(Adam(), every_row=True)


def test_pushed_gradient_is_the_dense_gradient_summed_per_id() -> None:
    table = _table(None)
    bridge = StoreEmbedding(table, lr=1.0)
    ids = torch.tensor([VOCAB[3], VOCAB[5], VOCAB[3], VOCAB[3]])
    before = table.find_or_insert(ids.numpy().astype(np.uint64)).copy()
    out = bridge(ids)
    coef = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    (out * coef).sum().backward()
    after, _ = table.find(ids.numpy().astype(np.uint64))
    # SGD with lr 1: row -= summed gradient (1 + 3 + 4 for id 3, 2 for id 5) in every element.
    want = np.array([[8.0], [2.0], [8.0], [8.0]]) * np.ones(DIM)
    np.testing.assert_allclose(before - after, want, rtol=1e-6)


def test_eval_mode_reads_without_creating_rows() -> None:
    table = _table(Adagrad())
    bridge = StoreEmbedding(table).eval()
    out = bridge(torch.from_numpy(VOCAB[:5]))
    assert len(table) == 0 and torch.equal(out, torch.zeros(5, DIM))
    bridge.train()
    with torch.no_grad():
        rows = bridge(torch.from_numpy(VOCAB[:5]))
    assert len(table) == 5 and rows.abs().sum() > 0


def test_bad_arguments_are_named() -> None:
    table = _table(None)
    with pytest.raises(ValueError, match="lr"):
        StoreEmbedding(table, lr=0.0)
    with pytest.raises(ValueError, match="insert"):
        StoreEmbedding(table, insert="sometimes")
    with pytest.raises(ValueError, match="ids"):
        StoreEmbedding(table)(torch.tensor([-1]))


def test_through_a_ps_client_equals_the_table() -> None:
    """The embedded PSClient (Adagrad table "emb", D=64, 2 shards) steps rows as an in-process table does."""
    from streamrec.ps.client import PSClient

    with PSClient() as ps:
        spec = ps.spec.table("emb")[1].config
        local = EmbeddingTable.from_config(spec)
        a, b = StoreEmbedding(ps, "emb", lr=0.1), StoreEmbedding(local, lr=0.1)
        rng = np.random.default_rng(1)
        for _ in range(3):
            ids = torch.from_numpy(VOCAB[rng.integers(0, 20, size=25)])
            w = torch.from_numpy(rng.normal(size=(spec.dim, 2)).astype(np.float32))
            y = torch.zeros(25, 2)
            ra, rb = a(ids), b(ids)
            torch.testing.assert_close(ra, rb)
            _loss(ra, w, y).backward()
            _loss(rb, w, y).backward()
        keys = VOCAB[:20].astype(np.uint64)
        got, found = ps.find("emb", keys)
        want, found_local = local.find(keys)
        assert (found == found_local).all()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_stca_with_store_rows_steps_them_once_per_backward() -> None:
    b = make_batch(np.random.default_rng(2), [0, 3, 12], [2, 1, 3])
    table = EmbeddingTable(dim=16, optimizer="adagrad", huge_pages=False)
    torch.manual_seed(0)
    model = STCA(ModelConfig(dim=16, heads=2, mlp=(16,)).for_batch(b), item_embedding=StoreEmbedding(table))
    assert not any(p.numel() == 0 for p in model.parameters())
    ids = np.unique(np.r_[b.hist_item.numpy(), b.target_item.numpy()]).astype(np.uint64)
    model.loss(b).backward()
    bridge = model.item_embedding
    assert isinstance(bridge, StoreEmbedding)
    assert len(table) == ids.size and set(bridge.pushed_keys.tolist()) == set(ids.tolist())
    first, _ = table.find(ids, include_state=True)
    # Adagrad: after one step each accumulator is the squared gradient, so w moved by lr * sign(g).
    assert (first[:, 16:] > 0).any()
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("item_embedding"))


def test_admission_filter_of_the_table_applies() -> None:
    """With ``admit_after=2`` an id gets a row at its second sighting; before that it reads the
    initializer's values and its gradient is dropped (the store skips absent keys)."""
    table = EmbeddingTable(dim=DIM, optimizer="adagrad", initializer=INIT, huge_pages=False, admit_after=2)
    bridge = StoreEmbedding(table, lr=0.1)
    ids = torch.from_numpy(VOCAB[:3])
    first = bridge(ids)
    first.sum().backward()
    assert len(table) == 0 and table.stats().not_admitted == 3
    init = _table(None).find_or_insert(VOCAB[:3].astype(np.uint64))
    torch.testing.assert_close(first, torch.from_numpy(init))
    second = bridge(ids)
    torch.testing.assert_close(second, first)  # admitted now, with the initializer's row, not yet stepped
    second.sum().backward()
    assert len(table) == 3
    stepped, _ = table.find(VOCAB[:3].astype(np.uint64))
    assert (np.abs(stepped - first.detach().numpy()) > 0.05).all()  # Adagrad's first step moves by ~lr
