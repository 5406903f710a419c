"""Every malformed request gets its 4xx with a message, random mutations of valid bodies never get a 5xx,
and the server answers a good request after all of them."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from streamrec.serving import ModelRunner, ServeConfig, Server

INFER = "/v2/models/stca/infer"


def _body(items: list | tuple = (1, 2, 3), user: list | tuple = (7,), dtype: str = "INT64",
          **extra: object) -> dict:
    return {"inputs": [{"name": "user_id", "shape": [len(user)], "datatype": "INT64", "data": list(user)},
                       {"name": "item_ids", "shape": [len(items)], "datatype": dtype, "data": list(items)}],
            **extra}


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    from tests.serving.conftest import small_model

    cfg = ServeConfig(port=0, max_candidates=100, max_body_bytes=64 << 10)
    with Server(cfg, runner=ModelRunner(small_model(), version=1)) as s, httpx.Client(base_url=s.url) as c:
        yield c


def _raw(c: httpx.Client, path: str, content: bytes, **headers: str) -> httpx.Response:
    return c.post(path, content=content, headers={"content-type": "application/json", **headers})


CASES = [
    ("malformed JSON", INFER, b'{"inputs": [', {}, 400, "malformed JSON"),
    ("not an object", INFER, b"[1, 2]", {}, 400, "JSON object"),
    ("no inputs", INFER, b"{}", {}, 400, "inputs"),
    ("unknown input", INFER, json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "INT64",
                                                     "data": [1]}]}).encode(), {}, 400, "unknown input"),
    ("float ids", INFER, json.dumps(_body(items=[1.5, 2.0], dtype="FP32")).encode(), {}, 400, "integer ids"),
    ("string data", INFER, json.dumps(_body(items=["a", "b"])).encode(), {}, 400, "expected numbers"),
    ("BYTES datatype", INFER, json.dumps(_body(dtype="BYTES")).encode(), {}, 400, "datatype"),
    ("shape mismatch", INFER, json.dumps({"inputs": [
        {"name": "user_id", "shape": [1], "datatype": "INT64", "data": [1]},
        {"name": "item_ids", "shape": [5], "datatype": "INT64", "data": [1, 2]}]}).encode(),
     {}, 400, "shape"),
    ("too many candidates", INFER, json.dumps(_body(items=list(range(101)))).encode(),
     {}, 400, "at most 100"),
    ("no candidates", INFER, json.dumps(_body(items=[])).encode(), {}, 400, "at least one"),
    ("negative id", INFER, json.dumps(_body(items=[1, -2])).encode(), {}, 400, "[0, 2**53)"),
    ("huge id", INFER, json.dumps(_body(items=[1 << 60])).encode(), {}, 400, "[0, 2**53)"),
    ("two users", INFER, json.dumps(_body(user=[1, 2])).encode(), {}, 400, "one value"),
    ("missing user", INFER, json.dumps({"inputs": [_body()["inputs"][1]]}).encode(), {}, 400, "user_id"),
    ("unknown output", INFER, json.dumps(_body(outputs=[{"name": "nope"}])).encode(),
     {}, 400, "unknown output"),
    ("bad timeout", INFER, json.dumps(_body(parameters={"timeout_ms": -1})).encode(), {}, 400, "timeout"),
    ("oversize body", INFER, b" " * (65 << 10), {}, 413, "at most"),
    ("header length past body", INFER, json.dumps(_body()).encode(),
     {"inference-header-content-length": "99999"}, 400, "outside the body"),
    ("header length not a number", INFER, json.dumps(_body()).encode(),
     {"inference-header-content-length": "x"}, 400, "integer"),
    ("binary size past body", INFER, json.dumps({"inputs": [
        {"name": "user_id", "shape": [1], "datatype": "INT64", "data": [1]},
        {"name": "item_ids", "shape": [2], "datatype": "INT64",
         "parameters": {"binary_data_size": 16}}]}).encode(),
     {}, 400, "binary_data_size"),
    ("bad gzip", INFER, b"not gzip", {"content-encoding": "gzip"}, 400, "gzip"),
    ("gzip bomb", INFER, gzip.compress(b" " * (1 << 20)), {"content-encoding": "gzip"}, 413, "decompressed"),
    ("unknown encoding", INFER, b"{}", {"content-encoding": "br"}, 415, "not supported"),
    ("unknown model", "/v2/models/other/infer", json.dumps(_body()).encode(), {}, 404, "unknown model"),
    ("unknown version", "/v2/models/stca/versions/9/infer", json.dumps(_body()).encode(), {}, 404, "version"),
    ("rank: string user", "/rank", b'{"user_id": "a", "item_ids": [1]}', {}, 400, "user_id"),
    ("rank: bool item", "/rank", b'{"user_id": 1, "item_ids": [true]}', {}, 400, "item_ids"),
    ("rank: unknown field", "/rank", b'{"user_id": 1, "item_ids": [1], "x": 1}', {}, 400, "unknown field"),
    ("rank: bad context", "/rank", b'{"user_id": 1, "item_ids": [1], "context": {"zone": 1}}',
     {}, 400, "zone"),
    ("rank: context length", "/rank", b'{"user_id": 1, "item_ids": [1, 2, 3], "context": {"device": [1, 2]}}',
     {}, 400, "device"),
    ("rank: nested list", "/rank", b'{"user_id": 1, "item_ids": [[1, [2]]]}', {}, 400, "item_ids"),
    ("rank: float time", "/rank", b'{"user_id": 1, "item_ids": [1], "ts_ms": 1.5e12}', {}, 400, "ts_ms"),
    ("rank: infinite number", "/rank", b'{"user_id": 1, "item_ids": [1], "ts_ms": 1e400}',
     {}, 400, "malformed"),
]


@pytest.mark.parametrize(("what", "path", "content", "headers", "status", "says"), CASES,
                         ids=[c[0] for c in CASES])
def test_each_malformed_request_gets_its_4xx(client: httpx.Client, what: str, path: str, content: bytes,
                                              headers: dict[str, str], status: int, says: str) -> None:
    r = _raw(client, path, content, **headers)
    assert r.status_code == status, (what, r.status_code, r.text)
    assert says in r.json()["error"], (what, r.json())


def test_mutated_bodies_never_get_a_5xx_and_the_server_stays_up(client: httpx.Client) -> None:
    rng = np.random.default_rng(0)
    good = json.dumps(_body(items=list(range(20)))).encode()
    statuses = set()
    for _ in range(300):
        b = bytearray(good)
        for _ in range(int(rng.integers(1, 6))):
            op = rng.integers(0, 3)
            i = int(rng.integers(0, len(b)))
            if op == 0:
                b[i] = int(rng.integers(0, 256))
            elif op == 1:
                del b[i:i + int(rng.integers(1, 8))]
            else:
                b[i:i] = bytes(rng.choice(list(b'{}[]",:0123456789-e.'), int(rng.integers(1, 5))).tolist())
        r = _raw(client, INFER, bytes(b))
        statuses.add(r.status_code)
        assert r.status_code in (200, 400, 404, 413), (bytes(b), r.status_code, r.text)
    assert 400 in statuses
    r = _raw(client, INFER, good)
    assert r.status_code == 200 and len(r.json()["outputs"][0]["data"]) == 60
