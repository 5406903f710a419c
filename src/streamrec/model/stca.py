"""STCA: stacked target-to-history cross attention with request-level batching (seed 002).

Owns: ``STCA`` and ``ragged_target_attention``, the single-query multi-head attention of
each target over its request's ragged history. It must not pad histories to the longest
one, encode absolute positions (they cannot extrapolate from the trained window to 10k
events), or do history work per target.

The model, per layer l = 1..L:

- history tokens ``H_l = LayerNorm(H_{l-1} + SwiGLU_l(H_{l-1}))``, with ``H_0`` the item row
  plus action plus time-since-action embeddings (``_layers.SequenceRanker.embed``); tokens
  are never updated by attention, so this is done once per request, whatever its number
  of targets (request-level batching: RLB);
- a query per target, ``q_l = W_q,l [target, o_1, ..., o_{l-1}]`` (the "highway": the
  target fused with every earlier layer's output), attends over ``H_l`` with H heads, one
  1 x L score row per head: ``o_l = W_o,l Attn(q_l, W_k,l H_l, W_v,l H_l)``;
- the interest vector is ``[o_1, ..., o_L, o_1 * target, ..., o_L * target]`` (the products
  let the MLP compare what the target found with the target itself: without them a
  synthetic "does the history share the target's category" task stayed at AUC 0.60 after
  400 steps, with them 0.98); the MLP sees it with the target, user and feature vectors
  and has one output per task.

Attention cost is linear in L: per request, m targets x L tokens x D.

Thread safety: as any torch module (see ``_layers``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from streamrec.model._layers import ModelConfig, SequenceRanker, SwiGLU, scaled
from streamrec.model.batch import RequestBatch

__all__ = ["STCA", "ModelConfig", "ragged_target_attention"]


def ragged_target_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hist_offsets: torch.Tensor,
                            target_offsets: torch.Tensor, chunk: int = 64, *,
                            fused: bool = True) -> torch.Tensor:
    """Each target's query attends over its own request's history only.

    Shapes: R requests, N tokens, T targets, H heads, E per head.
    q (T, H, E); k, v (N, H, E); hist_offsets, target_offsets int64 (R + 1,).
    Returns (T, H, E); a target whose request has no history gets zeros.

    Ragged batches: the history is cut into blocks of ``chunk`` tokens that
    never cross a request (so each history is padded by under ``chunk`` tokens,
    never to the longest), and each request's queries are padded to the batch's
    most targets per request, M. Scores are one batched matmul over the blocks
    ((blocks, H, M, chunk)); the softmax runs over all blocks of a request (a
    segment softmax: a per-request maximum from ``scatter_reduce``, sums with
    ``index_add``), so the result equals a dense softmax over the request's L
    tokens.

    ``fused``: when every request has the same history length and the same
    number of targets (one serving request; a batch with the history copied per
    target), nothing is ragged and torch's fused ``scaled_dot_product_attention``
    runs on plain views (3-5x faster on CPU than the blocks, measured at L=10k:
    it never materialises the scores). Both paths compute the same function
    (``test_stca``).
    """
    r = hist_offsets.shape[0] - 1
    t, h, e = q.shape
    dev = q.device
    lens = hist_offsets[1:] - hist_offsets[:-1]
    m_per = target_offsets[1:] - target_offsets[:-1]
    m = int(m_per.max()) if r and t else 0
    out = q.new_zeros(t, h, e)
    if m == 0 or k.shape[0] == 0:
        return out
    if fused and bool((lens == lens[0]).all()) and bool((m_per == m).all()):
        big_l = int(lens[0])
        qd = q.view(r, m, h, e).transpose(1, 2)
        kd, vd = (x.view(r, big_l, h, e).transpose(1, 2) for x in (k, v))
        return functional.scaled_dot_product_attention(qd, kd, vd).transpose(1, 2).reshape(t, h, e)
    # Blocks: request of each, first token, valid tokens.
    nblk = (lens + chunk - 1) // chunk
    blk_req = torch.repeat_interleave(torch.arange(r, device=dev), nblk)
    first_blk = torch.cumsum(nblk, 0) - nblk
    blk_in_req = torch.arange(blk_req.shape[0], device=dev) - first_blk[blk_req]
    blk_start = hist_offsets[:-1][blk_req] + blk_in_req * chunk
    blk_valid = torch.minimum(hist_offsets[1:][blk_req] - blk_start, torch.full_like(blk_start, chunk))
    pos = torch.arange(chunk, device=dev)
    valid = pos.unsqueeze(0) < blk_valid.unsqueeze(1)  # (B, C)
    tok = torch.where(valid, blk_start.unsqueeze(1) + pos, blk_start.unsqueeze(1))
    kb = k[tok]  # (B, C, H, E)
    # A column of ones after v: the softmax's denominator comes out of the same matmul.
    vb = torch.cat([v, v.new_ones(v.shape[0], h, 1)], dim=2)[tok]  # (B, C, H, E + 1)
    # Queries padded per request: (R, M, H, E).
    t_req = torch.repeat_interleave(torch.arange(r, device=dev), m_per)
    t_slot = torch.arange(t, device=dev) - target_offsets[:-1][t_req]
    qpad = q.new_zeros(r, m, h, e)
    qpad[t_req, t_slot] = scaled(q)
    s = torch.einsum("bmhe,bche->bhmc", qpad[blk_req], kb)
    # Only a request's last block can be partial: mask those few, not every block.
    part = torch.nonzero(blk_valid < chunk).squeeze(1)
    if part.numel():
        s = s.index_put((part,), s[part].masked_fill(~valid[part][:, None, None, :], float("-inf")))
    # Segment softmax over each request's blocks; the shift is a constant for autograd.
    with torch.no_grad():
        top = q.new_full((r, h, m), float("-inf")).scatter_reduce_(
            0, blk_req[:, None, None].expand(-1, h, m), s.amax(dim=3), reduce="amax", include_self=True)
        top = torch.nan_to_num(top, neginf=0.0)
    p = (s - top[blk_req].unsqueeze(3)).exp_()
    num = q.new_zeros(r, m, h, e + 1).index_add_(0, blk_req, torch.einsum("bhmc,bche->bmhe", p, vb))
    att = num[..., :e] / num[..., e:].clamp_min(1e-30)
    return att[t_req, t_slot]


class _Layer(nn.Module):
    """One STCA layer: the token FFN and the target-to-history attention."""

    def __init__(self, config: ModelConfig, query_in: int) -> None:
        super().__init__()
        d = config.dim
        self.ffn = SwiGLU(d, config.ffn_mult)
        self.norm = nn.LayerNorm(d)
        self.q = nn.Linear(query_in, d)
        self.kv = nn.Linear(d, 2 * d)
        self.o = nn.Linear(d, d)


class STCA(SequenceRanker):
    """Stacked target-to-history cross attention, with request-level batching.

    Shape contract: ``RequestBatch`` (R requests, N history events, T targets) ->
    logits (T, K). Memory and time are linear in N and in (targets x history) per request.

    Args:
        config: sizes (``ModelConfig``: ``dim``, ``heads``, ``layers``, ``ffn_mult``,
            ``attn_chunk``; feature and task counts from ``ModelConfig.for_batch``).
        item_embedding: the item rows (``_layers.SequenceRanker``): a
            ``HashedEmbedding`` by default, ``embedding.StoreEmbedding`` to keep
            them and their optimizer state in the store.
        user_embedding: the user rows, likewise (default a ``HashedEmbedding``).

    Raises:
        ValueError: a bad config; at forward, a batch that does not match it.

    Example::

        cfg = ModelConfig().for_batch(batch)
        model = STCA(cfg)
        loss = model.loss(batch)          # per-sample objective, history encoded once per request
        loss.backward()
        scores = torch.sigmoid(model(batch.truncate(10_000)))  # (T, K)
    """

    def __init__(self, config: ModelConfig, item_embedding: nn.Module | None = None,
                 user_embedding: nn.Module | None = None) -> None:
        super().__init__(config, item_embedding, user_embedding)
        d = config.dim
        self.layers = nn.ModuleList(_Layer(config, d * (1 + i)) for i in range(config.layers))
        self.head = self._mlp(2 * d * config.layers)

    def interest(self, batch: RequestBatch, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.attend(self.history_kv(tokens), target, batch.hist_offsets, batch.target_offsets)

    def history_kv(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """The request side: per layer, keys then values of every history token, (N, 2D) each.

        Done once per request whatever its number of targets. A token's rows depend
        only on its own event and the request time (through the time-since-action
        bucket), so a server may cache them per event and recompute only tokens
        whose bucket moved.
        """
        out: list[torch.Tensor] = []
        x = tokens
        layer: _Layer
        for layer in self.layers:  # type: ignore[assignment]
            x = layer.norm(x + layer.ffn(x))
            out.append(layer.kv(x))
        return out

    def attend(self, kvs: list[torch.Tensor], target: torch.Tensor, hist_offsets: torch.Tensor,
               target_offsets: torch.Tensor) -> torch.Tensor:
        """The target side: (T, I) interest per target from ``history_kv``'s rows and target vectors (T, D).

        ``hist_offsets`` delimit each request's rows in ``kvs``; ``target_offsets`` its targets.
        """
        c = self.config
        h, e = c.heads, c.dim // c.heads
        outs: list[torch.Tensor] = []
        layer: _Layer
        for layer, kv in zip(self.layers, kvs, strict=True):  # type: ignore[assignment]
            k, v = kv.view(-1, 2, h, e).unbind(1)
            q = layer.q(torch.cat([target, *outs], dim=1)).view(-1, h, e)
            att = ragged_target_attention(q, k, v, hist_offsets, target_offsets, c.attn_chunk)
            outs.append(layer.o(att.reshape(-1, c.dim)))
        return torch.cat([*outs, *(o * target for o in outs)], dim=1)
