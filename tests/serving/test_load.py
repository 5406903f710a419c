"""Under load: overload answers 429 with Retry-After and the server recovers; deadlines answer 504;
a model swap under load fails no request; split and packed requests score as they would alone."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from streamrec.model.batch import RequestBatch
from streamrec.model.checkpoint import publish
from streamrec.model.stca import STCA
from streamrec.pipeline.features import Stores
from streamrec.serving import ModelRunner, ServeConfig, Server
from streamrec.serving.executor import Encoded
from streamrec.store import SequenceStore
from tests.serving.conftest import NOW_MS, direct_scores, small_model


class SlowRunner(ModelRunner):
    """The model, with every call taking at least ``delay_s`` (a loaded machine, made certain)."""

    delay_s = 0.03

    def score(self, batch: RequestBatch, encoded: Sequence[Encoded] | None = None) -> torch.Tensor:
        time.sleep(self.delay_s)
        return super().score(batch, encoded)


async def _burst(url: str, n: int, items: int, timeout_ms: float | None = None) -> list[httpx.Response]:
    body = {"user_id": 1, "item_ids": list(range(items)), "ts_ms": NOW_MS}
    if timeout_ms is not None:
        body["timeout_ms"] = timeout_ms
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as c:
        return list(await asyncio.gather(*(c.post("/rank", json=body) for _ in range(n))))


def test_overload_answers_429_with_retry_after_then_recovers(store: SequenceStore) -> None:
    cfg = ServeConfig(port=0, queue_candidates=2_000, max_candidates=1_000, batch_candidates=500,
                      chunk_candidates=500, model_threads=1, retry_after_s=2)
    with Server(cfg, runner=SlowRunner(small_model(), 1), stores=Stores(sequences=store)) as s:
        got = asyncio.run(_burst(s.url, 40, 400))
        codes = [r.status_code for r in got]
        assert set(codes) <= {200, 429}, codes
        assert codes.count(429) >= 10 and codes.count(200) >= 4, codes  # 2,000 admitted = 5 at a time
        busy = next(r for r in got if r.status_code == 429)
        assert busy.headers["retry-after"] == "2" and "queue full" in busy.json()["error"]
        assert s.orchestrator.pending_candidates == 0
        again = asyncio.run(_burst(s.url, 3, 400))
        assert [r.status_code for r in again] == [200, 200, 200]
        assert "streamrec_serving_queue_candidates 0.0" in httpx.get(f"{s.url}/metrics").text


def test_deadline_passed_in_the_queue_answers_504(store: SequenceStore) -> None:
    cfg = ServeConfig(port=0, model_threads=1, batch_candidates=100, chunk_candidates=100)
    with Server(cfg, runner=SlowRunner(small_model(), 1), stores=Stores(sequences=store)) as s:
        got = asyncio.run(_burst(s.url, 12, 100, timeout_ms=50))
        codes = [r.status_code for r in got]
        assert set(codes) <= {200, 504} and 504 in codes, codes
        assert "deadline" in next(r for r in got if r.status_code == 504).json()["error"]
        assert asyncio.run(_burst(s.url, 1, 100))[0].status_code == 200


@pytest.mark.parametrize("dso", [True, False])
def test_split_and_packed_requests_score_as_alone(store: SequenceStore, dso: bool) -> None:
    model = small_model(seed=2)
    cfg = ServeConfig(port=0, chunk_candidates=64, batch_candidates=256, max_wait_ms=5.0, dso=dso)
    rng = np.random.default_rng(5)
    sizes = np.exp(rng.normal(4, 1.2, 24)).clip(1, 1500)
    reqs = [(int(u), rng.integers(0, 10**5, int(n)))
            for u, n in zip(rng.choice([1, 2, 3, 4, 5, 77], 24), sizes, strict=True)]
    with Server(cfg, runner=ModelRunner(model, 1), stores=Stores(sequences=store)) as s:
        async def go() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                return list(await asyncio.gather(*(
                    c.post("/rank", json={"user_id": u, "item_ids": it.tolist(), "ts_ms": NOW_MS})
                    for u, it in reqs)))
        got = asyncio.run(go())
        big = sum(np.unique(it).size > 64 for _, it in reqs)
        assert big  # some were split when dso is on
        if dso:
            assert s.orchestrator.batches < len(reqs) + big  # some were packed
        else:
            assert s.orchestrator.batches == len(reqs)  # one call each, whole
    for (u, it), r in zip(reqs, got, strict=True):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["scores"]), direct_scores(model, store, u, it),
                                   rtol=1e-4, atol=1e-6)


def _publish(model_dir: Path, model: STCA) -> int:
    return publish(model_dir, model.state_dict(), fsync=False,
                   model_config={"class": "STCA", **dataclasses.asdict(model.config)})


def test_model_swap_under_load_fails_no_request(tmp_path: Path, store: SequenceStore) -> None:
    old, new = small_model(seed=0), small_model(seed=9)
    _publish(tmp_path, old)
    cfg = ServeConfig(port=0, poll_s=0.05)
    results: list[tuple[int, str, np.ndarray]] = []
    stop = threading.Event()
    items = np.arange(100, 160)

    def load(s: Server) -> None:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/rank", json={"user_id": 1, "item_ids": items.tolist(), "ts_ms": NOW_MS})
                body = r.json()
                scores = np.array(body.get("scores", []))
                results.append((r.status_code, body.get("model_version", ""), scores))

    with Server(cfg, model_dir=tmp_path, stores=Stores(sequences=store)) as s:
        threads = [threading.Thread(target=load, args=(s,)) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        v2 = _publish(tmp_path, new)
        end = time.monotonic() + 20
        while time.monotonic() < end and not any(v == str(v2) for _, v, _ in results[-3:]):
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
        assert s.slot.swaps == 2 and s.watcher is not None and s.watcher.failures == 0
    assert all(code == 200 for code, _, _ in results), [c for c, _, _ in results if c != 200][:5]
    seen = {v for _, v, _ in results}
    assert seen == {"1", "2"}, seen
    want = {"1": direct_scores(old, store, 1, items), "2": direct_scores(new, store, 1, items)}
    assert not np.allclose(want["1"], want["2"])
    for _, v, got in results:  # every answer is wholly one version's
        np.testing.assert_allclose(got, want[v], rtol=1e-4, atol=1e-6)
