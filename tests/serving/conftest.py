"""Shared pieces of the serving tests: a small STCA model, a sequence store with histories, and the
direct model call a server's answer must equal."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from streamrec.model.batch import RequestBatch
from streamrec.model.stca import STCA, ModelConfig
from streamrec.serving import ModelRunner
from streamrec.store import SequenceStore

NOW_MS = 1_767_225_600_000 + 86_400_000
USERS = (1, 2, 3, 4, 5)
TASKS = ("click", "like", "finish")


def small_config(**kw: object) -> ModelConfig:
    base: dict[str, Any] = {"dim": 16, "heads": 2, "layers": 2, "mlp": (32,), "item_buckets": 1 << 12,
                            "user_buckets": 1 << 8, "sparse_buckets": 1 << 10, "category_buckets": 64,
                            "sparse_features": 3, "attn_chunk": 16}
    base.update(kw)
    return ModelConfig(**base)


def small_model(seed: int = 0, **kw: object) -> STCA:
    torch.manual_seed(seed)
    model = STCA(small_config(**kw))
    with torch.no_grad():  # weights large enough that scores differ visibly between inputs
        for p in model.parameters():
            p.mul_(20.0 if p.dim() == 2 and p.shape[0] > 1000 else 1.0)
    return model.eval()


@pytest.fixture
def store() -> SequenceStore:
    """Histories of 0 to 300 events for USERS (user 5 has none), all older than NOW_MS."""
    rng = np.random.default_rng(1)
    s = SequenceStore(max_len=1000, extra_fields=("value",))
    for u, n in zip(USERS, (300, 40, 7, 1, 0), strict=True):
        if n:
            s.append(np.full(n, u), rng.integers(0, 5000, n), rng.integers(1, 7, n),
                     np.sort(NOW_MS - rng.integers(1_000, 10**9, n)), extras={"value": rng.random(n) * 30})
    return s


def direct_scores(model: torch.nn.Module, store: SequenceStore | None, user: int, items: np.ndarray, *,
                  device: int = 0, hour: int | None = None, position: int = 0,
                  category: np.ndarray | None = None,
                  now_ms: int = NOW_MS, max_len: int = 10_000) -> np.ndarray:
    """Probabilities (M, K) of one request by a plain ``model(batch)`` call, history from the store."""
    if store is not None:
        _, cols = store.read(np.array([user], np.uint64))
        keep = cols["timestamp"] < now_ms
        idx = np.flatnonzero(keep)[-max_len:]
        h = {k: v[idx] for k, v in cols.items()}
    else:
        h = {"item": np.zeros(0, np.int64), "action": np.zeros(0, np.int64),
             "timestamp": np.zeros(0, np.int64), "value": np.zeros(0, np.float32)}
    m = items.shape[0]
    hour = (now_ms // 3_600_000) % 24 if hour is None else hour
    batch = RequestBatch.from_numpy(
        hist_offsets=[0, h["item"].shape[0]], hist_item=h["item"].astype(np.int64),
        hist_action=h["action"].astype(np.int64), hist_ts_ms=h["timestamp"], hist_value=h["value"],
        request_ts_ms=[now_ms], user_id=[user], target_offsets=[0, m], target_item=items,
        target_category=category if category is not None else np.zeros(m, np.int64),
        sparse=np.stack([np.full(m, device), np.full(m, hour), np.full(m, position)], axis=1))
    with torch.no_grad():
        return torch.sigmoid(model(batch)).numpy()


@pytest.fixture
def runner() -> ModelRunner:
    return ModelRunner(small_model(), version=1)
