"""The HTTP surface: the Open Inference Protocol v2 REST routes, ``/rank`` and ``/metrics``.

Owns: ``build_app`` (a Starlette app over an ``Orchestrator``): reading bodies within the size
cap (413 past it; gzip/deflate bodies as ``tritonclient`` may send them, decompressed within the
same cap), the routes, and turning every error into a clear JSON answer. It must not batch,
cache or run models.

Routes (OIP v2 as Triton and KServe serve them):

====================================================  ======================================
``GET  /v2/health/live``, ``/v2/health/ready``         200, or 503 before a model is loaded
``GET  /v2``                                           server metadata
``GET  /v2/models/{name}[/versions/{v}]``              model metadata (inputs, outputs, tasks)
``GET  /v2/models/{name}[/versions/{v}]/ready``        200 when that version serves
``POST /v2/models/{name}[/versions/{v}]/infer``        JSON or binary tensor extension
``POST /rank``                                         ``codec.parse_rank``'s body
``GET  /metrics``                                      Prometheus text format
====================================================  ======================================

Errors: ``{"error": "..."}`` with 400 (malformed or ill-typed), 404 (unknown model or version),
413 (body too large), 429/503 with ``Retry-After`` (full, or no model), 504 (deadline), 500 (a
fault of ours, logged). No input reaches an unhandled exception.

Thread safety: handlers run on the event loop; all work crosses to the orchestrator's threads.
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from streamrec.errors import BadRequest, Overloaded, ServingError
from streamrec.serving.codec import HEADER_LENGTH, encode_infer, encode_rank, parse_infer, parse_rank
from streamrec.serving.config import ServeConfig
from streamrec.serving.orchestrator import Orchestrator

__all__ = ["build_app"]

log = logging.getLogger("streamrec.serving")

_INPUTS = [{"name": "user_id", "datatype": "INT64", "shape": [1]},
           {"name": "item_ids", "datatype": "INT64", "shape": [-1]},
           {"name": "device", "datatype": "INT64", "shape": [-1], "optional": True},
           {"name": "hour", "datatype": "INT64", "shape": [-1], "optional": True},
           {"name": "position", "datatype": "INT64", "shape": [-1], "optional": True},
           {"name": "category", "datatype": "INT64", "shape": [-1], "optional": True},
           {"name": "ts_ms", "datatype": "INT64", "shape": [1], "optional": True}]


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json", headers=headers)


def _error(exc: ServingError) -> Response:
    headers = {"retry-after": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else None
    return _json({"error": exc.message}, exc.status, headers)


async def _read_body(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > cap:
                raise BadRequest(f"body of {declared} bytes; at most {cap}", status=413)
        except ValueError:
            raise BadRequest(f"Content-Length: expected an integer, got {declared!r}") from None
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise BadRequest(f"body over {cap} bytes", status=413)
        parts.append(chunk)
    body = b"".join(parts)
    enc = request.headers.get("content-encoding", "identity").lower()
    if enc in ("gzip", "deflate"):
        d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
        try:
            body = d.decompress(body, cap + 1)
        except zlib.error as exc:
            raise BadRequest(f"Content-Encoding {enc}: {exc}") from None
        if len(body) > cap or d.unconsumed_tail:
            raise BadRequest(f"decompressed body over {cap} bytes", status=413)
    elif enc != "identity":
        raise BadRequest(f"Content-Encoding {enc!r} is not supported (gzip, deflate)", status=415)
    return body


def build_app(config: ServeConfig, orchestrator: Orchestrator) -> Starlette:
    """The Starlette app of one server (routes: module doc)."""
    orch = orchestrator
    metrics = orch.metrics
    name = config.model_name

    def version() -> str | None:
        r = orch.slot.runner
        return str(r.version) if r is not None else None

    def check_model(request: Request) -> None:
        if request.path_params["name"] != name:
            raise BadRequest(f"unknown model {request.path_params['name']!r}; this server has {name!r}",
                             status=404)
        v = request.path_params.get("version")
        if v is not None and v != version():
            raise BadRequest(f"model {name!r} has no version {v!r} ready (serving {version()})", status=404)

    def answer(fn: Any) -> Any:
        async def handler(request: Request) -> Response:
            try:
                return await fn(request)
            except ServingError as exc:
                metrics.requests.labels(str(exc.status)).inc()
                return _error(exc)
            except ClientDisconnect:
                return Response(status_code=499)
            except Exception as exc:  # a fault of ours: answered, logged, the server stays up
                log.exception("unhandled error in %s", request.url.path)
                metrics.requests.labels("500").inc()
                return _json({"error": f"internal error: {type(exc).__name__}"}, 500)
        return handler

    async def live(request: Request) -> Response:
        return _json({"live": True})

    async def ready(request: Request) -> Response:
        ok = orch.slot.runner is not None
        return _json({"ready": ok}, 200 if ok else 503)

    async def server_meta(request: Request) -> Response:
        return _json({"name": "streamrec", "version": "1", "extensions": ["binary_tensor_data"]})

    async def model_meta(request: Request) -> Response:
        check_model(request)
        r = orch.slot.runner
        if r is None:
            raise Overloaded("no model version is loaded yet", status=503, retry_after_s=config.retry_after_s)
        outputs = [{"name": "scores", "datatype": "FP32", "shape": [-1, len(r.tasks)]},
                   *({"name": f"scores_{t}", "datatype": "FP32", "shape": [-1]} for t in r.tasks)]
        return _json({"name": name, "versions": [str(r.version)], "platform": "pytorch_stca",
                      "inputs": _INPUTS, "outputs": outputs,
                      "parameters": {"tasks": list(r.tasks), "max_candidates": config.max_candidates}})

    async def model_ready(request: Request) -> Response:
        check_model(request)
        ok = orch.slot.runner is not None
        return _json({"name": name, "ready": ok}, 200 if ok else 503)

    async def infer(request: Request) -> Response:
        check_model(request)
        body = await _read_body(request, config.max_body_bytes)
        req = parse_infer(body, request.headers.get(HEADER_LENGTH), max_candidates=config.max_candidates)
        got = await orch.rank(req)
        t0 = time.monotonic()
        payload, headers = encode_infer(req, got.scores, got.tasks, name, str(got.version))
        metrics.stage.labels("response").observe(time.monotonic() - t0)
        metrics.requests.labels("200").inc()
        return Response(payload, headers=headers)

    async def rank(request: Request) -> Response:
        body = await _read_body(request, config.max_body_bytes)
        req = parse_rank(body, max_candidates=config.max_candidates)
        got = await orch.rank(req)
        t0 = time.monotonic()
        payload = encode_rank(req, got.scores, got.tasks, str(got.version))
        metrics.stage.labels("response").observe(time.monotonic() - t0)
        metrics.requests.labels("200").inc()
        return Response(payload, media_type="application/json")

    async def prometheus(request: Request) -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    routes = [
        Route("/v2/health/live", answer(live)),
        Route("/v2/health/ready", answer(ready)),
        Route("/v2", answer(server_meta)),
        Route("/v2/models/{name}", answer(model_meta)),
        Route("/v2/models/{name}/ready", answer(model_ready)),
        Route("/v2/models/{name}/versions/{version}", answer(model_meta)),
        Route("/v2/models/{name}/versions/{version}/ready", answer(model_ready)),
        Route("/v2/models/{name}/infer", answer(infer), methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", answer(infer), methods=["POST"]),
        Route("/rank", answer(rank), methods=["POST"]),
        Route("/metrics", answer(prometheus)),
    ]
    return Starlette(routes=routes)
