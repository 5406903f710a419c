"""The torch bridge to sparse embeddings held in the store.

Owns: ``StoreEmbedding``, a module that looks the batch's distinct ids up in an in-process
``EmbeddingTable`` or through a ``PSClient`` (creating absent rows from the table's own
initializer, subject to its admission filter) and returns them as a tensor; on backward it
sums the gradient per distinct id and pushes it to the store's ``apply_gradients``, so the
optimizer step and its state (Adagrad accumulators, Adam moments) stay in the store rows.
The dense weights of the model are left to an ordinary torch optimizer. It must not keep
rows or optimizer state of its own.

Semantics match a dense ``nn.Embedding`` trained with the same optimizer: the store's
Adagrad is ``acc += g**2; w -= lr * g / (sqrt(acc) + eps)``, PyTorch's formula, with its
``eps`` and ``initial_accumulator`` from the table config (``torch.optim.Adagrad(lr,
eps=eps, initial_accumulator_value=initial_accumulator)`` is the dense twin); a row absent
from a batch gets no step, as in a dense Adagrad or SGD where its gradient is 0 (the
store's Adam is the lazy variant: equal to dense Adam for rows present at every step).

The step happens during ``backward()``, one per forward call: call the bridge once per
batch with every id (``SequenceRanker.embed`` does) and backward once per forward.

Thread safety: one training thread per bridge. The store underneath takes its own locks,
so serving threads may read the same table while this one trains.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from streamrec.ps.client import PSClient
from streamrec.store.table import EmbeddingTable

__all__ = ["StoreEmbedding"]


class _Rows(Protocol):
    @property
    def dim(self) -> int: ...

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def find_or_insert(self, keys: np.ndarray) -> np.ndarray: ...
    def apply_gradients(self, keys: np.ndarray, grads: np.ndarray, lr: float) -> np.ndarray: ...


class _Client:
    """A ``PSClient`` table seen through the table's three calls."""

    def __init__(self, client: PSClient, table: str) -> None:
        self.client, self.table = client, table
        self._dim = int(client.spec.table(table)[1].config.dim)

    @property
    def dim(self) -> int:
        return self._dim

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.client.find(self.table, keys)

    def find_or_insert(self, keys: np.ndarray) -> np.ndarray:
        return self.client.find_or_insert(self.table, keys)

    def apply_gradients(self, keys: np.ndarray, grads: np.ndarray, lr: float) -> np.ndarray:
        return self.client.apply_gradients(self.table, keys, grads, lr)


class _Lookup(torch.autograd.Function):
    """Rows of distinct ids in, gradient per distinct id pushed to the store on backward."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, rows: torch.Tensor, keys: np.ndarray,
                bridge: StoreEmbedding) -> torch.Tensor:
        ctx.keys, ctx.bridge = keys, bridge
        return rows

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, ...]:
        ctx.bridge._push(ctx.keys, grad)
        return None, None, None, None


class StoreEmbedding(nn.Module):
    """Embedding rows kept in the store, looked up per batch and stepped by the store's optimizer.

    Shape: ids int64 (M,) (any shape; values >= 0, repeats allowed) -> rows (M, D), D the
    table's dim, in ``dtype``.

    Args:
        source: an ``EmbeddingTable`` (in-process) or a ``PSClient``.
        table: the table's name (with a ``PSClient``; ignored for an ``EmbeddingTable``).
        lr: learning rate of the store's optimizer step (> 0).
        insert: when absent ids get rows: ``"train"`` (default: in training mode,
            with ``find_or_insert``; in eval mode absent ids read as zeros and
            nothing is written, as a serving replica must not grow the table),
            ``"always"``, or ``"never"`` (reads only; absent ids are zeros).
        dtype: the dtype of the returned rows (float32).

    Raises:
        ValueError: a bad ``lr`` or ``insert``; at forward, negative ids.

    Attributes:
        pushed_keys: distinct keys stepped by the last backward (for tests and latency probes).

    Example::

        table = EmbeddingTable(dim=64, optimizer="adagrad")
        model = STCA(cfg, item_embedding=StoreEmbedding(table, lr=0.05))
        opt = torch.optim.Adam(model.parameters())      # dense weights only
        model.loss(batch).backward()                    # item rows stepped in the store here
        opt.step()
    """

    def __init__(self, source: EmbeddingTable | PSClient, table: str = "emb", *, lr: float = 0.05,
                 insert: str = "train", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and np.isfinite(lr) and lr > 0):
            raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")
        if insert not in ("train", "always", "never"):
            raise ValueError(f"insert: expected 'train', 'always' or 'never', got {insert!r}")
        self.rows: _Rows = _Client(source, table) if isinstance(source, PSClient) else source
        self.lr = float(lr)
        self.insert = insert
        self.dtype = dtype
        self.dim = int(self.rows.dim)
        # A leaf that requires grad, so autograd calls _Lookup.backward; not a parameter.
        self._anchor = torch.zeros((), requires_grad=True)
        self.pushed_keys = np.zeros(0, np.uint64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if flat.numel() and int(flat.min()) < 0:
            raise ValueError(f"ids: expected values >= 0 (store keys), got {int(flat.min())}")
        uniq, inverse = torch.unique(flat, return_inverse=True)
        keys = uniq.cpu().numpy().astype(np.uint64)
        creating = self.insert == "always" or (self.insert == "train" and self.training)
        if creating:
            got = self.rows.find_or_insert(keys)
        else:
            got, _ = self.rows.find(keys)
        rows = torch.from_numpy(np.ascontiguousarray(got)).to(device=ids.device, dtype=self.dtype)
        if torch.is_grad_enabled() and creating:
            rows = _Lookup.apply(self._anchor, rows, keys, self)
        return rows[inverse].reshape(*ids.shape, self.dim)

    def _push(self, keys: np.ndarray, grad: torch.Tensor) -> None:
        """One store step with ``grad`` (U, D), already summed per distinct key by autograd."""
        g = np.ascontiguousarray(grad.detach().to("cpu", torch.float32).numpy())
        self.rows.apply_gradients(keys, g, self.lr)
        self.pushed_keys = keys

    def extra_repr(self) -> str:
        return f"dim={self.dim}, lr={self.lr}, insert={self.insert!r}, rows={type(self.rows).__name__}"
