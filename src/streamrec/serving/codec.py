"""The wire format: Open Inference Protocol v2 infer requests and responses, in JSON and in the
binary tensor extension, and the ``/rank`` JSON body.

Owns: parsing a request body into a ``RankRequest`` (checked: sizes, datatypes, shapes, id
ranges) and encoding scores back. Every problem with the input becomes ``BadRequest`` with the
status to answer (400 malformed or ill-typed, 413 too large) and a message naming the input; no
other exception escapes ``parse_infer``/``parse_rank`` for any bytes. It must not know the model.

Inputs of an infer request (OIP names; any integer datatype for ids):

==============  ==========  ==========================================================
name            shape       meaning
==============  ==========  ==========================================================
``user_id``     [1]         the requesting user (required)
``item_ids``    [M]         candidate items, 1 <= M <= max_candidates (required)
``device``      [1] or [M]  context, integer (optional, 0)
``hour``        [1] or [M]  context, local hour 0-23 (optional: from ``ts_ms``, UTC)
``position``    [1] or [M]  context, integer (optional, 0)
``category``    [M]         the candidates' categories (optional: the catalog's, else 0)
``ts_ms``       [1]         the request's event time (optional: the server's clock)
==============  ==========  ==========================================================

Outputs: ``scores`` FP32 [M, K] (sigmoid of each task's logit, candidates in request order,
tasks in the model's order) and ``scores_<task>`` FP32 [M] per task. Request parameters:
``timeout_ms`` (ours) or ``timeout`` (Triton's, microseconds) shorten the deadline.

Thread safety: pure functions over their arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from streamrec.errors import BadRequest

__all__ = ["HEADER_LENGTH", "RankRequest", "encode_infer", "encode_rank", "parse_infer", "parse_rank"]

HEADER_LENGTH = "inference-header-content-length"
_MAX_ID = 1 << 53  # the pipeline's ids are below 2**53 (contract); the model hashes int64
_INT_TYPES = {"INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
              "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64}
_ALL_TYPES = {**_INT_TYPES, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BOOL": np.bool_}
_CONTEXT = ("device", "hour", "position", "category")
_KNOWN = frozenset({"user_id", "item_ids", "ts_ms", *_CONTEXT})
_MAX_INPUTS = 16


@dataclass
class RankRequest:
    """One checked ranking request.

    Attributes:
        user_id: the user (0 <= id < 2**53).
        items: int64 (M,) candidate ids in request order (repeats allowed).
        context: column -> int64 scalar array or (M,) array (``device``, ``hour``, ``position``,
            ``category``) as given.
        ts_ms: the request's time, or None for the server's clock.
        timeout_ms: the client's own deadline, or None.
        request_id: the client's ``id``, echoed back.
        outputs: output names asked for (None: all), and whether each is binary.
        binary: answer in the binary extension.
    """

    user_id: int
    items: np.ndarray
    context: dict[str, np.ndarray] = field(default_factory=dict)
    ts_ms: int | None = None
    timeout_ms: float | None = None
    request_id: str = ""
    outputs: dict[str, bool] | None = None
    binary: bool = False


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None


def _ids(name: str, a: np.ndarray) -> np.ndarray:
    if a.dtype.kind not in "iu":
        raise BadRequest(f"input {name!r}: expected integer ids, got {a.dtype}")
    if a.size and (int(a.min()) < 0 or int(a.max()) >= _MAX_ID):
        raise BadRequest(f"input {name!r}: ids must be in [0, 2**53)")
    return a.astype(np.int64, copy=False)


def _from_list(name: str, data: Any, dtype: Any) -> np.ndarray:
    """A flat array from OIP JSON ``data`` (flat or nested row-major lists)."""
    if not isinstance(data, list):
        raise BadRequest(f"input {name!r}: 'data' must be a list")
    if data and isinstance(data[0], list):
        data = _flatten(name, data)
    if not data:
        return np.zeros(0, dtype)
    kinds = set(map(type, data))
    if not kinds <= ({bool} if np.dtype(dtype).kind == "b" else {int, float}):
        bad = sorted(k.__name__ for k in kinds - {int, float})
        raise BadRequest(f"input {name!r}: expected numbers of its datatype, got {', '.join(bad)}")
    try:
        a = np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"input {name!r}: {exc}") from None
    if a.dtype.kind not in "iufb" or a.ndim != 1:
        raise BadRequest(f"input {name!r}: expected a flat list of numbers, got {a.dtype} {a.shape}")
    if a.dtype.kind == "f" and np.dtype(dtype).kind in "iu":
        raise BadRequest(f"input {name!r}: datatype is integer but the data holds non-integers")
    try:
        return a.astype(dtype)
    except (OverflowError, ValueError) as exc:
        raise BadRequest(f"input {name!r}: {exc}") from None


def _flatten(name: str, data: list[Any]) -> list[Any]:
    """Row-major values of a list of rows (OIP allows nested ``data`` for a 2-D shape)."""
    out: list[Any] = []
    for row in data:
        if not isinstance(row, list) or any(isinstance(x, list) for x in row):
            raise BadRequest(f"input {name!r}: 'data' nests deeper than the 2-D shapes accepted")
        out.extend(row)
    return out


def parse_infer(body: bytes, header_length: str | None, *, max_candidates: int) -> RankRequest:
    """An OIP v2 infer request body (JSON, or JSON + binary tensors) as a checked ``RankRequest``.

    Args:
        body: the whole HTTP body.
        header_length: the ``Inference-Header-Content-Length`` header, if any (binary extension).
        max_candidates: above it, 400.

    Raises:
        BadRequest: naming the input and what was expected.
    """
    binary_tail = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest(f"Inference-Header-Content-Length: expected an integer, got "
                             f"{header_length!r}") from None
        if not 0 <= n <= len(body):
            raise BadRequest(f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes")
        body, binary_tail = body[:n], body[n:]
    req = _json(body)
    if not isinstance(req, dict):
        raise BadRequest("expected a JSON object with 'inputs'")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs': expected a non-empty list of tensors")
    if len(inputs) > _MAX_INPUTS:
        raise BadRequest(f"'inputs': at most {_MAX_INPUTS} tensors, got {len(inputs)}")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters': expected an object")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for i, t in enumerate(inputs):
        if not isinstance(t, dict):
            raise BadRequest(f"inputs[{i}]: expected an object")
        name, dtype_name, shape = t.get("name"), t.get("datatype"), t.get("shape")
        if not isinstance(name, str) or name not in _KNOWN:
            raise BadRequest(f"inputs[{i}]: unknown input {name!r}; expected some of {sorted(_KNOWN)}")
        if name in tensors:
            raise BadRequest(f"input {name!r} given twice")
        if dtype_name not in _ALL_TYPES:
            raise BadRequest(f"input {name!r}: unsupported datatype {dtype_name!r}")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                     for s in shape) or len(shape) > 2):
            raise BadRequest(f"input {name!r}: 'shape' must be a list of at most 2 non-negative ints")
        count = int(np.prod(shape)) if shape else 1
        if count > max_candidates:
            raise BadRequest(f"input {name!r}: {count} values; at most {max_candidates} candidates a request")
        dtype = _ALL_TYPES[dtype_name]
        tp = t.get("parameters") or {}
        size = tp.get("binary_data_size") if isinstance(tp, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary_tail):
                raise BadRequest(f"input {name!r}: binary_data_size {size!r} runs past the body")
            if size != count * np.dtype(dtype).itemsize:
                raise BadRequest(f"input {name!r}: {size} bytes do not hold shape {shape} of {dtype_name}")
            a: np.ndarray = np.frombuffer(binary_tail, dtype=dtype, count=count, offset=offset)
            offset += size
        else:
            if "data" not in t:
                raise BadRequest(f"input {name!r}: no 'data' and no binary_data_size")
            a = _from_list(name, t["data"], dtype)
            if a.size != count:
                raise BadRequest(f"input {name!r}: shape {shape} holds {count} values, 'data' has {a.size}")
        tensors[name] = a.reshape(-1)
    if offset != len(binary_tail):
        raise BadRequest(f"{len(binary_tail) - offset} bytes of binary data belong to no input")
    rid = req.get("id", "")
    timeout_ms = params.get("timeout_ms")
    if timeout_ms is None and params.get("timeout") is not None:
        t = params["timeout"]  # Triton's, in microseconds
        timeout_ms = t / 1000.0 if isinstance(t, (int, float)) and not isinstance(t, bool) else t
    outputs, binary = _outputs(req.get("outputs"), bool(params.get("binary_data_output", False)))
    return _build(tensors, rid if isinstance(rid, str) else str(rid), timeout_ms, outputs, binary,
                  max_candidates)


def _outputs(raw: Any, binary_all: bool) -> tuple[dict[str, bool] | None, bool]:
    if raw is None:
        return None, binary_all
    if not isinstance(raw, list):
        raise BadRequest("'outputs': expected a list")
    out: dict[str, bool] = {}
    for i, o in enumerate(raw):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise BadRequest(f"outputs[{i}]: expected an object with a 'name'")
        p = o.get("parameters") or {}
        out[o["name"]] = bool(p.get("binary_data", binary_all)) if isinstance(p, dict) else binary_all
    return out, any(out.values())


def _build(tensors: dict[str, np.ndarray], rid: str, timeout_ms: Any, outputs: dict[str, bool] | None,
           binary: bool, max_candidates: int) -> RankRequest:
    for need in ("user_id", "item_ids"):
        if need not in tensors:
            raise BadRequest(f"missing input {need!r}")
    user = _ids("user_id", tensors["user_id"])
    if user.size != 1:
        raise BadRequest(f"input 'user_id': expected one value, got {user.size}")
    items = _ids("item_ids", tensors["item_ids"])
    m = items.size
    if m == 0:
        raise BadRequest("input 'item_ids': expected at least one candidate")
    if m > max_candidates:
        raise BadRequest(f"input 'item_ids': {m} candidates; at most {max_candidates} per request")
    context: dict[str, np.ndarray] = {}
    for name in _CONTEXT:
        if name in tensors:
            a = tensors[name]
            if a.dtype.kind not in "iu":
                raise BadRequest(f"input {name!r}: expected integers, got {a.dtype}")
            if a.size not in (1, m) or (name == "category" and a.size != m and m != 1):
                raise BadRequest(f"input {name!r}: expected 1 or {m} values, got {a.size}")
            if a.size and (int(a.min()) < 0 or int(a.max()) >= _MAX_ID):
                raise BadRequest(f"input {name!r}: values must be in [0, 2**53)")
            a = a.astype(np.int64, copy=False)
            context[name] = a.reshape(()) if a.size == 1 and m != 1 else a
    ts = None
    if "ts_ms" in tensors:
        t = tensors["ts_ms"]
        if t.dtype.kind not in "iu" or t.size != 1 or int(t[0]) < 0:
            raise BadRequest("input 'ts_ms': expected one non-negative integer (ms since the epoch)")
        ts = int(t[0])
    if timeout_ms is not None and (not isinstance(timeout_ms, (int, float)) or isinstance(timeout_ms, bool)
                                   or not timeout_ms > 0):
        raise BadRequest(f"parameter timeout: expected a number > 0, got {timeout_ms!r}")
    return RankRequest(int(user[0]), np.ascontiguousarray(items), context, ts,
                       float(timeout_ms) if timeout_ms is not None else None, rid, outputs, binary)


def parse_rank(body: bytes, *, max_candidates: int) -> RankRequest:
    """A ``/rank`` body: ``{"user_id": 7, "item_ids": [...], "context": {...}, "ts_ms": t, "timeout_ms": x}``.

    Raises:
        BadRequest: naming the field and what was expected.
    """
    req = _json(body)
    if not isinstance(req, dict):
        raise BadRequest("expected a JSON object with 'user_id' and 'item_ids'")
    unknown = set(req) - {"user_id", "item_ids", "context", "ts_ms", "timeout_ms", "id"}
    if unknown:
        raise BadRequest(f"unknown field(s) {sorted(unknown)}")
    ctx = req.get("context") or {}
    if not isinstance(ctx, dict):
        raise BadRequest("'context': expected an object")
    bad = set(ctx) - set(_CONTEXT)
    if bad:
        raise BadRequest(f"context: unknown field(s) {sorted(bad)}; known: {list(_CONTEXT)}")
    tensors: dict[str, np.ndarray] = {}
    for name, v in (("user_id", req.get("user_id")), ("item_ids", req.get("item_ids")),
                    ("ts_ms", req.get("ts_ms")), *ctx.items()):
        if v is None:
            continue
        if isinstance(v, list):
            if len(v) > max_candidates:
                raise BadRequest(f"{name!r}: {len(v)} values; at most {max_candidates} candidates a request")
            tensors[name] = _from_list(name, v, np.int64) if v else np.zeros(0, np.int64)
        elif isinstance(v, int) and not isinstance(v, bool):
            if not -(1 << 63) <= v < 1 << 63:
                raise BadRequest(f"{name!r}: out of range")
            tensors[name] = np.array([v], dtype=np.int64)
        else:
            raise BadRequest(f"{name!r}: expected an integer or a list of integers, got {type(v).__name__}")
    return _build(tensors, str(req.get("id", "")), req.get("timeout_ms"), None, False, max_candidates)


def _output_tensors(scores: np.ndarray, tasks: Sequence[str], wanted: dict[str, bool] | None
                    ) -> list[tuple[str, np.ndarray]]:
    names = {"scores": scores,
             **{f"scores_{t}": np.ascontiguousarray(scores[:, k]) for k, t in enumerate(tasks)}}
    if wanted is None:
        return list(names.items())
    missing = [n for n in wanted if n not in names]
    if missing:
        raise BadRequest(f"unknown output(s) {missing}; known: {list(names)}")
    return [(n, names[n]) for n in wanted]


def encode_infer(req: RankRequest, scores: np.ndarray, tasks: Sequence[str], model_name: str,
                 version: str) -> tuple[bytes, dict[str, str]]:
    """The infer response body and its extra headers (float32 scores (M, K)).

    Raises:
        BadRequest: an output name that does not exist.
    """
    outs = _output_tensors(np.ascontiguousarray(scores, dtype=np.float32), tasks, req.outputs)
    head: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": []}
    if req.request_id:
        head["id"] = req.request_id
    tails: list[bytes] = []
    for name, a in outs:
        binary = req.binary if req.outputs is None else req.outputs[name]
        t: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(a.shape)}
        if binary:
            raw = a.tobytes()
            t["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        else:
            t["data"] = a.reshape(-1)
        head["outputs"].append(t)
    js = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if not tails:
        return js, {"content-type": "application/json"}
    return b"".join([js, *tails]), {"content-type": "application/octet-stream",
                                    HEADER_LENGTH: str(len(js))}


def encode_rank(req: RankRequest, scores: np.ndarray, tasks: Sequence[str], version: str) -> bytes:
    """``/rank``'s answer: ``{"model_version": v, "tasks": [...], "scores": [[...], ...]}`` (M rows of K)."""
    out = {"model_version": version, "tasks": list(tasks), "scores": np.asarray(scores, dtype=np.float32)}
    if req.request_id:
        out["id"] = req.request_id
    return orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)
