"""The dense weights' optimizer: Adam for the dense layers, SparseAdam for the hashed embedding tables.

Owns: ``SplitAdam``, one optimizer object over a model whose ``HashedEmbedding`` tables have sparse
gradients (the rows a batch touched). Stepping those rows only is what keeps an online step's cost
the batch's, not the tables': a dense Adam over the hashed tables was most of a step's time in the
demo's profile (0.39 s of 1.75 s in Adam, most of the 0.7 s backward materialising dense gradients).
SparseAdam is lazy Adam (moments of untouched rows do not decay), as TorchRec's row-wise optimizers
are. Rows that live in the store (``embedding.StoreEmbedding``) take the store's own step instead.

Thread safety: as a torch optimizer, one thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from streamrec.model._layers import HashedEmbedding

__all__ = ["SplitAdam"]


class SplitAdam:
    """Adam over a module's dense parameters, SparseAdam over its hashed embedding tables.

    Args:
        model: the module.
        lr: both optimizers' learning rate.
        weight_decay: Adam's L2 on the dense parameters (SparseAdam has none).

    Example::

        opt = SplitAdam(model, lr=1e-3)
        opt.zero_grad(); model.loss(batch).backward(); opt.step()
    """

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        hashed = {id(m.weight): m.weight for m in model.modules() if isinstance(m, HashedEmbedding)}
        self.dense_params = [p for p in model.parameters() if p.requires_grad and id(p) not in hashed]
        self.dense = torch.optim.Adam(self.dense_params, lr=lr, weight_decay=weight_decay)
        self.sparse = torch.optim.SparseAdam(list(hashed.values()), lr=lr) if hashed else None

    def _all(self) -> Iterable[torch.optim.Optimizer]:
        return (self.dense,) if self.sparse is None else (self.dense, self.sparse)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self._all():
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self._all():
            o.step()

    def state_dict(self) -> dict[str, Any]:
        """``{"dense": Adam's state_dict, "sparse": SparseAdam's or None}``."""
        return {"dense": self.dense.state_dict(),
                "sparse": self.sparse.state_dict() if self.sparse is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output (the same model's)."""
        self.dense.load_state_dict(state["dense"])
        if (self.sparse is None) != (state.get("sparse") is None):
            raise ValueError("load_state_dict: the state's hashed tables differ from this model's")
        if self.sparse is not None:
            self.sparse.load_state_dict(state["sparse"])
