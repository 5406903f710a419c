"""A server on loopback answers OIP v2 (tritonclient, JSON and binary) and /rank with the scores of a
direct model call; health, metadata and metrics routes answer."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as tc

from streamrec.pipeline.features import Stores
from streamrec.serving import ModelRunner, ServeConfig, Server
from streamrec.store import SequenceStore
from tests.serving.conftest import NOW_MS, direct_scores, small_config, small_model


@pytest.fixture
def server(store: SequenceStore, runner: ModelRunner) -> Iterator[Server]:
    s = Server(ServeConfig(port=0, model_threads=2, max_wait_ms=0.5), runner=runner,
               stores=Stores(sequences=store)).start()
    yield s
    s.stop()


def _infer(client: tc.InferenceServerClient, user: int, items: np.ndarray, binary: bool,
           **ctx: int) -> np.ndarray:
    inputs = []
    for name, arr in (("user_id", np.array([user], np.int64)), ("item_ids", items.astype(np.int64)),
                      *((k, np.array([v], np.int64)) for k, v in ctx.items())):
        t = tc.InferInput(name, list(arr.shape), "INT64")
        t.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(t)
    outputs = [tc.InferRequestedOutput("scores", binary_data=binary)]
    got = client.infer("stca", inputs, outputs=outputs)
    return got.as_numpy("scores")


def test_tritonclient_round_trip_equals_direct_model_call(server: Server, store: SequenceStore,
                                                          runner: ModelRunner) -> None:
    client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("stca")
    meta = client.get_model_metadata("stca")
    assert meta["outputs"][0]["name"] == "scores"
    rng = np.random.default_rng(3)
    seen = []
    for user in (1, 2, 3, 4, 5, 999):  # 999: unknown user, empty history
        for binary in (True, False):
            items = rng.integers(0, 10**6, int(rng.integers(1, 300)))
            items[::7] = items[0]  # repeats are scored once and answered at every position
            got = _infer(client, user, items, binary, ts_ms=NOW_MS, device=3, position=2)
            want = direct_scores(runner.model, store, user, items, device=3, position=2)
            assert got.shape == (items.shape[0], 3)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
            seen.append(got[0, 0])
    assert len(set(np.round(seen, 5))) > 3  # the scores do depend on the request


def test_rank_endpoint_and_routes(server: Server, store: SequenceStore, runner: ModelRunner) -> None:
    items = np.array([5, 17, 5, 4999, 10**12])  # an id no item table has: default row, still scored
    with httpx.Client(base_url=server.url) as c:
        r = c.post("/rank", json={"user_id": 1, "item_ids": items.tolist(), "ts_ms": NOW_MS,
                                  "context": {"device": 1, "hour": 7}})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tasks"] == ["click", "like", "finish"] and body["model_version"] == "1"
        want = direct_scores(runner.model, store, 1, items, device=1, hour=7)
        np.testing.assert_allclose(np.array(body["scores"]), want, rtol=1e-4, atol=1e-6)
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/v2/health/ready").status_code == 200
        assert c.get("/v2/models/stca/versions/1").json()["versions"] == ["1"]
        assert c.get("/v2/models/stca/versions/2").status_code == 404
        assert c.get("/v2/models/other").status_code == 404
        text = c.get("/metrics").text
        for needle in ('stage="model"', 'stage="preprocess"', 'stage="queue"',
                       "streamrec_serving_batch_candidates",
                       "streamrec_serving_queue_candidates", 'cache="history"'):
            assert needle in text, needle


def test_history_cache_hits_and_sees_new_events(store: SequenceStore) -> None:
    model = small_model(seed=4)
    runner = ModelRunner(model, version=1)
    with Server(ServeConfig(port=0), runner=runner, stores=Stores(sequences=store)) as s, \
            httpx.Client(base_url=s.url) as c:
        items = [3, 4, 5]

        def ask(now: int) -> np.ndarray:
            r = c.post("/rank", json={"user_id": 2, "item_ids": items, "ts_ms": now})
            assert r.status_code == 200, r.text
            return np.array(r.json()["scores"])

        first = ask(NOW_MS)
        later = ask(NOW_MS + 3_600_000)  # same events, buckets of the newest moved: refreshed, not re-read
        assert s.cache is not None and s.cache.stats.hits == 1
        want = direct_scores(model, store, 2, np.array(items), now_ms=NOW_MS + 3_600_000)
        np.testing.assert_allclose(later, want,
                                   rtol=1e-4, atol=1e-6)
        store.append([2], [77], [1], [NOW_MS + 1000], extras={"value": [1.0]})
        encoded = s.pre.encoded_events
        after = ask(NOW_MS + 7_200_000)  # the new event changes the fingerprint: a miss...
        assert s.cache.stats.hits == 1
        assert s.pre.encoded_events - encoded <= 1 + 40 // 2  # ...the old events reused (buckets moved)
        want = direct_scores(model, store, 2, np.array(items), now_ms=NOW_MS + 7_200_000)
        np.testing.assert_allclose(after, want,
                                   rtol=1e-4, atol=1e-6)
        assert not np.allclose(first, after)


def test_a_baseline_model_runs_whole_through_the_server(store: SequenceStore) -> None:
    from streamrec.model.baselines import DIN

    torch.manual_seed(1)
    model = DIN(small_config()).eval()  # its window of 100 events: not split, history passed whole
    runner = ModelRunner(model, 1)
    assert not runner.split
    rng = np.random.default_rng(2)
    cfg = ServeConfig(port=0, chunk_candidates=32)
    with Server(cfg, runner=runner, stores=Stores(sequences=store)) as s, httpx.Client(base_url=s.url) as c:
        for user in (1, 2, 5, 12345):
            items = rng.integers(0, 10**5, 90)
            r = c.post("/rank", json={"user_id": user, "item_ids": items.tolist(), "ts_ms": NOW_MS})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(np.array(r.json()["scores"]), direct_scores(model, store, user, items),
                                       rtol=1e-4, atol=1e-6)
