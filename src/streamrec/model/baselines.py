"""The baselines STCA is measured against, with its input and training interface.

Owns: ``MeanPool`` (the mean of the history tokens), ``DIN`` (target attention over the last
100 events, DIN's activation unit, no softmax), ``SASRec`` (causal self-attention over the
last 200 events, the user state at the newest event; absolute positions within its window,
as SASRec has), ``Popularity`` (a learned monotone map of how often each item was a positive
so far). Each takes a ``RequestBatch`` and returns logits (T, K); ``loss`` is the same
per-sample objective as STCA's. It must not import the training loop.

Thread safety: as any torch module (see ``_layers``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from streamrec.model._layers import ModelConfig, SequenceRanker, SwiGLU, multitask_loss, segment_mean
from streamrec.model.batch import RequestBatch, ragged_gather

__all__ = ["DIN", "MeanPool", "Popularity", "SASRec"]


class MeanPool(SequenceRanker):
    """The mean of the history tokens, shared by a request's targets.

    Shape: ``RequestBatch`` -> logits (T, K); interest [u, u * target], u (R, D) the
    mean token (zeros for an empty history). Args as ``STCA``.
    """

    def __init__(self, config: ModelConfig, item_embedding: nn.Module | None = None,
                 user_embedding: nn.Module | None = None) -> None:
        super().__init__(config, item_embedding, user_embedding)
        self.head = self._mlp(2 * config.dim)

    def interest(self, batch: RequestBatch, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        u = segment_mean(tokens, batch.hist_offsets, batch.event_request)[batch.target_request]
        return torch.cat([u, u * target], dim=1)


class DIN(SequenceRanker):
    """DIN-style target attention over the newest ``config.max_len_din`` events (100).

    Each (target, event) pair gets a weight from DIN's activation unit, an MLP over
    [h, t, h - t, h * t]; the interest is the weighted sum of the events (not
    normalised, as in DIN); interest [u, u * target]. Pairs are flat (targets x
    their history), so cost is m x 100 per request. Args as ``STCA``.
    """

    def __init__(self, config: ModelConfig, item_embedding: nn.Module | None = None,
                 user_embedding: nn.Module | None = None) -> None:
        super().__init__(config, item_embedding, user_embedding)
        d = config.dim
        self.window = config.max_len_din
        self.unit = nn.Sequential(nn.Linear(4 * d, 64), nn.SiLU(), nn.Linear(64, 1))
        self.head = self._mlp(2 * d)

    def interest(self, batch: RequestBatch, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t_req = batch.target_request
        off, idx = ragged_gather(batch.hist_offsets.cpu().numpy(), t_req.cpu().numpy())
        dev = tokens.device
        pair_target = torch.repeat_interleave(torch.arange(batch.num_targets, device=dev),
                                              torch.from_numpy(np.diff(off)).to(dev))
        h = tokens[torch.from_numpy(idx).to(dev)]
        t = target[pair_target]
        w = self.unit(torch.cat([h, t, h - t, h * t], dim=1))
        u = target.new_zeros(batch.num_targets, self.config.dim).index_add_(0, pair_target, w * h)
        return torch.cat([u, u * target], dim=1)


class _Block(nn.Module):
    """A pre-norm causal self-attention block (SASRec's, with a SwiGLU FFN)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.dim
        self.heads = config.heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = SwiGLU(d, config.ffn_mult)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        r, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(r, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.o(att.transpose(1, 2).reshape(r, s, d))
        return x + self.ffn(self.norm2(x))


class SASRec(SequenceRanker):
    """SASRec-style causal self-attention over the newest ``config.max_len_sasrec`` events (200).

    The window is padded on the left to the batch's longest (at most 200, so the
    padding is bounded), with a learned embedding of each event's distance from
    the newest (SASRec's positions, counted from the end); tokens are scaled by
    sqrt(D) before the positions are added, as SASRec does. ``config.layers``
    pre-norm blocks; the user state u is the newest event's output, zeros for
    an empty history; interest [u, u * target]. No final LayerNorm on u: on the
    synthetic category task of the tests (250 steps, three seeds) it held AUC
    at 0.49-0.59, against 0.77-0.91 without it. Args as ``STCA``.
    """

    def __init__(self, config: ModelConfig, item_embedding: nn.Module | None = None,
                 user_embedding: nn.Module | None = None) -> None:
        super().__init__(config, item_embedding, user_embedding)
        d = config.dim
        self.window = config.max_len_sasrec
        self.position = nn.Embedding(config.max_len_sasrec, d)
        nn.init.normal_(self.position.weight, std=0.01)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.layers))
        self.head = self._mlp(2 * d)

    def interest(self, batch: RequestBatch, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        r, d, dev = batch.num_requests, self.config.dim, tokens.device
        lens = batch.hist_lengths
        s = max(int(lens.max()) if r else 0, 1)
        ev_req = batch.event_request
        # Slot of each event, right-aligned: the newest at s - 1.
        from_end = batch.hist_offsets[1:][ev_req] - 1 - torch.arange(batch.num_events, device=dev)
        x = tokens.new_zeros(r, s, d)
        x[ev_req, s - 1 - from_end] = tokens * d**0.5 + self.position(from_end)
        slot = torch.arange(s, device=dev)
        valid = slot.unsqueeze(0) >= (s - lens).unsqueeze(1)  # (R, S)
        # Causal over valid keys; the diagonal always, so a padded query never has an empty row.
        allowed = (slot.unsqueeze(1) >= slot.unsqueeze(0)) & valid.unsqueeze(1)
        allowed = (allowed | torch.eye(s, dtype=torch.bool, device=dev)).unsqueeze(1)
        for block in self.blocks:
            x = block(x, allowed)
        u = x[:, -1] * (lens > 0).unsqueeze(1).to(x.dtype)
        u = u[batch.target_request]
        return torch.cat([u, u * target], dim=1)


class Popularity(nn.Module):
    """How often each item was a positive so far, through a learned monotone map per task.

    Shape: ``RequestBatch`` -> logits (T, K): ``a_k * log1p(count[item]) + b_k``.
    ``count`` (per hashed item bucket, ``config.item_buckets``) counts targets with
    any positive label; in training mode a forward adds its batch's positives
    after scoring it (so the batch is scored on the past only, as progressive
    validation needs). Only ``a`` and ``b`` are parameters.

    Args:
        config: ``item_buckets`` and ``tasks`` are used.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        k = len(config.tasks)
        self.scale = nn.Parameter(torch.ones(k))
        self.bias = nn.Parameter(torch.zeros(k))
        self.register_buffer("counts", torch.zeros(config.item_buckets))

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        bucket = torch.remainder(batch.target_item, self.config.item_buckets)
        counts: torch.Tensor = self.counts  # type: ignore[assignment]
        pop = torch.log1p(counts[bucket]).unsqueeze(1)
        logits = pop * self.scale + self.bias
        if self.training:
            with torch.no_grad():
                counts.index_add_(0, bucket, (batch.labels.sum(dim=1) > 0).to(counts.dtype))
        return logits

    def loss(self, batch: RequestBatch, logits: torch.Tensor | None = None) -> torch.Tensor:
        """As ``SequenceRanker.loss``: BCE summed over tasks, averaged over targets."""
        return multitask_loss(self(batch) if logits is None else logits, batch.labels)
