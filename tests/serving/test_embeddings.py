"""A model whose item and user rows live in the store (``StoreEmbedding`` in training) serves from
its checkpoint's tables through the bounded hot-embedding cache: the scores equal the trained
model's, ids absent from the tables get the default (zero) embedding, and repeats hit the cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import numpy as np
import torch

from streamrec.model.checkpoint import publish
from streamrec.model.embedding import StoreEmbedding
from streamrec.model.stca import STCA
from streamrec.pipeline.features import Stores
from streamrec.serving import ServeConfig, Server
from streamrec.serving.cache import EmbeddingCache
from streamrec.serving.versions import embedding_caches
from streamrec.store import EmbeddingTable, SequenceStore
from tests.serving.conftest import NOW_MS, direct_scores, small_config


def test_store_backed_rows_serve_through_the_embedding_cache(tmp_path: Path, store: SequenceStore) -> None:
    rng = np.random.default_rng(0)
    items, users = EmbeddingTable(dim=16), EmbeddingTable(dim=16)
    known = np.arange(5000, dtype=np.uint64)
    items.insert_or_assign(known, rng.normal(size=(5000, 16)).astype(np.float32))
    users.insert_or_assign(np.arange(10, dtype=np.uint64), rng.normal(size=(10, 16)).astype(np.float32))
    torch.manual_seed(0)
    model = STCA(small_config(), item_embedding=StoreEmbedding(items, insert="never"),
                 user_embedding=StoreEmbedding(users, insert="never")).eval()
    publish(tmp_path, model.state_dict(), tables={"items": items, "users": users}, fsync=False,
            model_config={"class": "STCA", **dataclasses.asdict(model.config)})
    cfg = ServeConfig(port=0, embedding_cache_rows=100)
    with Server(cfg, model_dir=tmp_path, stores=Stores(sequences=store)) as s, \
            httpx.Client(base_url=s.url) as c:
        asked = np.array([3, 4, 9_999_999, 3, 4000])  # 9,999,999: in no table, the default row
        assert s.slot.runner is not None
        caches = embedding_caches(s.slot.runner)
        for i in range(3):
            before = {k: (v.stats.hits, v.stats.lookups) for k, v in caches.items()}
            r = c.post("/rank", json={"user_id": 2, "item_ids": asked.tolist(), "ts_ms": NOW_MS})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(np.array(r.json()["scores"]), direct_scores(model, store, 2, asked),
                                       rtol=1e-4, atol=1e-6)
            for k, v in caches.items():
                hits, lookups = v.stats.hits - before[k][0], v.stats.lookups - before[k][1]
                assert lookups > 0 and (hits == lookups if i else hits < lookups), (i, k, hits, lookups)
        assert 'cache="embedding_items"' in c.get("/metrics").text


def test_embedding_cache_is_bounded_and_counts() -> None:
    calls: list[np.ndarray] = []

    def fetch(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(ids.copy())
        return np.repeat(ids[:, None].astype(np.float32), 2, axis=1), ids % 2 == 0

    cache = EmbeddingCache(fetch, dim=2, max_rows=3)
    got = cache.lookup(np.array([2, 3, 2, 4]))
    np.testing.assert_array_equal(got, [[2, 2], [0, 0], [2, 2], [4, 4]])  # 3 is absent: zeros
    np.testing.assert_array_equal(cache.lookup(np.array([3])), [[0, 0]])  # absent, and cached so
    cache.lookup(np.array([2, 4, 6, 8]))  # 2, 4 hit; 6, 8 fetched; the oldest evicted past 3 rows
    assert len(cache) == 3 and cache.stats.hits == 3 and cache.stats.lookups == 8
    assert [c.tolist() for c in calls] == [[2, 3, 4], [6, 8]]
