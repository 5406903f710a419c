"""Model execution for serving: one loaded model version, split so a user's history is encoded
once and reused, run eagerly or through ``torch.compile``.

Owns: ``ModelRunner`` (a model version in inference mode: ``encode`` a history, ``refresh`` a
cached encoding for a later request time, ``score`` a packed batch of requests) and ``Encoded``
(one request's encoded history). It must not read stores or queues.

Why the split is exact for STCA: a history token's state is a function of that event alone
(item row + action + time-since-action bucket + value, then per layer ``LayerNorm(x + FFN(x))``
and the K/V projection); tokens never attend to each other. So the K/V of each event can be kept
and only events whose time bucket moved since (``time_buckets`` is log-scaled, so old events
rarely move) need encoding again; the targets' attention over the cached K/V is then the model's
own ``ragged_target_attention``. Scores equal ``model(batch)`` up to float rounding of GEMMs of
different row counts (checked in tests/serving/test_executor.py). A model that is not STCA runs
whole (``split`` False): no history encoding to cache.

The compiled path (``executor = "compile"``) compiles the per-token encoder and the scoring MLP
with ``torch.compile(dynamic=True)``: both are dense stacks of GEMMs and pointwise ops that
Inductor fuses (SwiGLU's ``silu * mul``, the residual add + LayerNorm). The ragged attention keeps
data-dependent sizes and runs eagerly. Why not AOTInductor or ONNX Runtime: BENCHMARKS.md.

Thread safety: ``score``/``encode``/``refresh`` may run in several threads at once (inference
mode, no parameter writes); ``Encoded`` values are never changed after they are built.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from streamrec.model._layers import time_buckets
from streamrec.model.batch import RequestBatch
from streamrec.model.stca import STCA, ragged_target_attention

__all__ = ["Encoded", "ModelRunner", "sample_batch"]

log = logging.getLogger("streamrec.serving")


@dataclass(frozen=True)
class Encoded:
    """One request's history, encoded for one model version.

    Shape contract: N events, D = ``dim``, L layers. ``kv[l]`` is (N, 2D) float32 (keys then
    values of layer l); the event columns are (N,). ``buckets`` are the time buckets the tokens
    were encoded with; ``request_ts_ms`` the time they were computed for.
    """

    items: torch.Tensor
    actions: torch.Tensor
    ts_ms: torch.Tensor
    values: torch.Tensor
    buckets: torch.Tensor
    kv: tuple[torch.Tensor, ...]
    request_ts_ms: int

    @property
    def length(self) -> int:
        return int(self.items.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel() * t.element_size()) for t in (self.items, self.actions, self.ts_ms,
                                                               self.values, self.buckets, *self.kv))


class ModelRunner:
    """A model version ready to score requests.

    Args:
        model: a ranking module taking a ``RequestBatch`` and returning logits (T, K); an
            ``STCA`` is split (module doc), anything else runs whole.
        version: the checkpoint version it came from (0 when not from a checkpoint).
        compiled: compile the per-token encoder and the head (``torch.compile``).
        tasks: the task names in logit order (default ``model.config.tasks``).

    Raises:
        ValueError: ``model`` has no ``config.tasks`` and none are given.
    """

    def __init__(self, model: nn.Module, version: int = 0, *, compiled: bool = False,
                 tasks: Sequence[str] | None = None) -> None:
        self.model = model.eval()
        self._m: Any = model  # the STCA's submodules, when split (typed loosely: any ranking module)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.version = version
        cfg = getattr(model, "config", None)
        if tasks is None and cfg is None:
            raise ValueError("tasks: the model has no config.tasks; pass the task names")
        self.tasks: tuple[str, ...] = tuple(tasks if tasks is not None else cfg.tasks)  # type: ignore[union-attr]
        # Split only a model whose scores the split reproduces (checked on a sample batch): a
        # change to STCA's layers that this module does not mirror falls back to whole calls.
        self.split = isinstance(model, STCA) and getattr(model, "window", None) is None
        self.compiled = compiled
        self.dense_features = int(getattr(cfg, "dense_features", 0))
        self.sparse_features = int(getattr(cfg, "sparse_features", 0))
        self._tokens_kv: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = self._tokens_kv_eager
        head: Any = self._m.head if self.split else None
        self._head: Callable[[torch.Tensor], torch.Tensor] = head
        if self.split and not self._split_matches():
            log.warning("the model's scores differ from the split path's; serving whole model calls")
            self.split = False
        if compiled and self.split:
            self._tokens_kv = torch.compile(self._tokens_kv_eager, dynamic=True)
            self._head = torch.compile(head, dynamic=True)

    def _split_matches(self) -> bool:
        batch = sample_batch(self)
        with torch.inference_mode():
            whole = self.model(batch)
        self.split = True
        split = self.score(batch, self._encode_batch(batch))
        return bool(torch.allclose(whole, split, rtol=1e-4, atol=1e-5))

    # -- history ------------------------------------------------------------------------

    def _tokens_kv_eager(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for layer in self._m.layers:
            x = layer.norm(x + layer.ffn(x))
            out.append(layer.kv(x))
        return tuple(out)

    def _tokens(self, items: torch.Tensor, actions: torch.Tensor, buckets: torch.Tensor,
                values: torch.Tensor) -> torch.Tensor:
        m = self._m
        c = m.config
        rows = m.item_embedding(items)
        tokens: torch.Tensor = (rows + m.action(actions.clamp(0, c.num_actions - 1)) + m.time(buckets)
                                 + m.value(torch.log1p(values.clamp_min(0)).unsqueeze(1).to(rows.dtype)))
        return tokens

    def _buckets(self, ts_ms: torch.Tensor, request_ts_ms: int) -> torch.Tensor:
        c = self._m.config
        return time_buckets(request_ts_ms - ts_ms, c.time_buckets, c.time_buckets_per_octave)

    def encode(self, items: np.ndarray, actions: np.ndarray, ts_ms: np.ndarray, values: np.ndarray,
               request_ts_ms: int) -> Encoded:
        """Encode one history (oldest first) for a request at ``request_ts_ms``.

        Requires: ``split``; the four arrays of one length, ids int64.
        """
        it = torch.from_numpy(np.ascontiguousarray(items, dtype=np.int64))
        ac = torch.from_numpy(np.ascontiguousarray(actions, dtype=np.int64))
        ts = torch.from_numpy(np.ascontiguousarray(ts_ms, dtype=np.int64))
        va = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        b = self._buckets(ts, request_ts_ms)
        with torch.inference_mode():
            kv = self._tokens_kv(self._tokens(it, ac, b, va)) if it.shape[0] else tuple(
                torch.zeros(0, 2 * self._m.config.dim) for _ in self._m.layers)
        return Encoded(it, ac, ts, va, b, tuple(kv), request_ts_ms)

    def refresh(self, enc: Encoded, request_ts_ms: int) -> tuple[Encoded, int]:
        """``enc`` valid for a request at ``request_ts_ms``: the events whose time bucket moved are
        encoded again (into new tensors; ``enc`` is not changed). Returns it and how many moved."""
        if request_ts_ms == enc.request_ts_ms or enc.length == 0:
            return enc, 0
        b = self._buckets(enc.ts_ms, request_ts_ms)
        moved = torch.nonzero(b != enc.buckets).reshape(-1)
        if moved.shape[0] == 0:
            return Encoded(enc.items, enc.actions, enc.ts_ms, enc.values, enc.buckets, enc.kv,
                           request_ts_ms), 0
        with torch.inference_mode():
            part = self._tokens_kv(self._tokens(enc.items[moved], enc.actions[moved], b[moved],
                                                enc.values[moved]))
            kv = tuple(whole.index_copy(0, moved, new) for whole, new in zip(enc.kv, part, strict=True))
        fresh = Encoded(enc.items, enc.actions, enc.ts_ms, enc.values, b, kv, request_ts_ms)
        return fresh, int(moved.shape[0])

    def extend(self, prev: Encoded, items: np.ndarray, actions: np.ndarray, ts_ms: np.ndarray,
               values: np.ndarray, request_ts_ms: int) -> tuple[Encoded, int] | None:
        """The encoding of a history whose oldest events are ``prev``'s newest ones, reusing them.

        A user's history moves by appending (and, past the window, dropping the oldest), so the
        new history is ``prev[d:] + new events`` for some d. Those reused events keep their
        tokens (time buckets refreshed); only the new ones are encoded. Returns the encoding and
        how many events were reused, or None when the histories do not line up that way.
        """
        n_old, n = prev.length, int(items.shape[0])
        if n_old == 0 or n == 0:
            return None
        old: list[np.ndarray] = [prev.items.numpy(), prev.actions.numpy(), prev.ts_ms.numpy(),
                                 prev.values.numpy()]
        new: list[np.ndarray] = [np.asarray(items, np.int64), np.asarray(actions, np.int64),
                                 np.asarray(ts_ms, np.int64), np.asarray(values, np.float32)]
        starts = np.flatnonzero((old[2] == new[2][0]) & (old[0] == new[0][0]))
        for d in starts[:4].tolist():  # a repeated (time, item) at the start is rare: a few tries
            k = n_old - d
            if k > n or not all(np.array_equal(o[d:], x[:k]) for o, x in zip(old, new, strict=True)):
                continue
            cur, _ = self.refresh(prev, request_ts_ms)
            if k == n:
                kv = tuple(t[d:] for t in cur.kv)
                buckets = cur.buckets[d:]
            else:
                tail = self.encode(new[0][k:], new[1][k:], new[2][k:], new[3][k:], request_ts_ms)
                kv = tuple(torch.cat([a[d:], b]) for a, b in zip(cur.kv, tail.kv, strict=True))
                buckets = torch.cat([cur.buckets[d:], tail.buckets])
            cols = [torch.from_numpy(np.ascontiguousarray(x)) for x in new]
            return Encoded(cols[0], cols[1], cols[2], cols[3], buckets, kv, request_ts_ms), k
        return None

    # -- scoring ------------------------------------------------------------------------

    def score(self, batch: RequestBatch, encoded: Sequence[Encoded] | None = None) -> torch.Tensor:
        """Logits (T, K) of a packed batch.

        Args:
            batch: the requests' targets and features; its history fields are used when
                ``encoded`` is None (and must then be filled).
            encoded: one ``Encoded`` per request of ``batch`` (``split`` models only), whose
                events stand for the batch's history.
        """
        with torch.inference_mode():
            if encoded is None:
                return self.model(batch)
            return self._score_encoded(batch, encoded)

    def _score_encoded(self, batch: RequestBatch, encoded: Sequence[Encoded]) -> torch.Tensor:
        m = self._m
        c = m.config
        m._check(batch)
        target = m.item_embedding(batch.target_item) + m.category(batch.target_category)
        h, e = c.heads, c.dim // c.heads
        toff = batch.target_offsets.tolist()
        # Attention runs per request: each is then unragged (torch's fused attention, no padding of
        # one request's queries to another's count, which packing requests of 10 and 500
        # candidates would cost); the projections and the MLP run once for the whole batch.
        per_req = [[(kv.view(-1, 2, h, e).unbind(1), torch.tensor([0, enc.length]))
                    for kv in enc.kv] for enc in encoded]
        outs: list[torch.Tensor] = []
        for i, layer in enumerate(m.layers):
            q = layer.q(torch.cat([target, *outs], dim=1)).view(-1, h, e)
            att = torch.cat([
                ragged_target_attention(q[a:b], k, v, hist_off, torch.tensor([0, b - a]), c.attn_chunk)
                for ((k, v), hist_off), a, b in ((req[i], a, b) for req, a, b
                                                  in zip(per_req, toff[:-1], toff[1:], strict=True))])
            outs.append(layer.o(att.reshape(-1, c.dim)))
        parts = [torch.cat([*outs, *(o * target for o in outs)], dim=1), target, *m.features(batch)]
        return self._head(torch.cat(parts, dim=1))

    def _encode_batch(self, batch: RequestBatch) -> list[Encoded]:
        off = batch.hist_offsets.numpy()
        return [self.encode(batch.hist_item.numpy()[a:b], batch.hist_action.numpy()[a:b],
                            batch.hist_ts_ms.numpy()[a:b], batch.hist_value.numpy()[a:b],
                            int(batch.request_ts_ms[r]))
                for r, (a, b) in enumerate(itertools.pairwise(off))]

    def warm_up(self, batch: RequestBatch | None = None) -> None:
        """Run ``batch`` (default a small sample) once through the serving path (compiles the
        compiled path before traffic)."""
        batch = batch if batch is not None else sample_batch(self)
        self.score(batch, self._encode_batch(batch) if self.split else None)


def sample_batch(runner: ModelRunner, history: int = 40, candidates: int = 8) -> RequestBatch:
    """A small synthetic batch of the runner's feature widths: two requests, one with an empty history."""
    rng = np.random.default_rng(0)
    t = 2 * candidates
    now = 1_767_225_600_000
    return RequestBatch.from_numpy(
        hist_offsets=[0, history, history], hist_item=rng.integers(0, 1 << 20, history),
        hist_action=rng.integers(1, 7, history), hist_ts_ms=now - rng.integers(0, 1 << 30, history),
        hist_value=rng.random(history) * 10, request_ts_ms=[now, now], user_id=[3, 4],
        target_offsets=[0, candidates, t], target_item=rng.integers(0, 1 << 20, t),
        target_category=rng.integers(0, 50, t), dense=rng.random((t, runner.dense_features)),
        sparse=rng.integers(0, 20, (t, runner.sparse_features)), tasks=runner.tasks)
