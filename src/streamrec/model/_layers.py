"""Parts every ranking model of this package shares: the config, the embeddings of history
tokens and targets, the feature tower, the task heads and the training objective.

Owns: ``ModelConfig``; ``HashedEmbedding`` (the in-model item table, replaced by the store
bridge of ``embedding.py`` when the rows live in the store); ``time_buckets`` (the
time-since-action encoding: log-bucketed, never an absolute position); ``SwiGLU``;
``SequenceRanker``, the base class that looks up every item row of a batch in ONE call,
builds history tokens and target vectors, and runs [interest, features] through an MLP with
one output per task. Subclasses (STCA and the sequence baselines) supply only the interest
vector per target. It must not read data or know the store.

Thread safety: modules are torch modules: one training thread; inference from several threads
only under ``torch.no_grad`` with no parameter updates in flight.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional

from streamrec.model.batch import DEFAULT_TASKS, RequestBatch

__all__ = ["HashedEmbedding", "ModelConfig", "SequenceRanker", "SwiGLU", "time_buckets"]


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of a ranking model; every model of the package takes one.

    Attributes:
        dim: D, the width of item rows, tokens and queries (64: the field note's
            measured STCA prototype; the store's tables default to it too).
        heads: attention heads; ``dim`` must divide by it (4, as the prototype).
        layers: stacked STCA layers (2, as the prototype).
        ffn_mult: SwiGLU hidden width over ``dim`` (8/3, the LLaMA choice that
            keeps a SwiGLU's weights equal to a 4x GELU FFN's).
        tasks: the task heads, in label order (``batch.DEFAULT_TASKS``).
        num_actions: action-code vocabulary (16; the pipeline uses codes 1-6, 0 = none).
        time_buckets: buckets of the time-since-action encoding (64).
        time_buckets_per_octave: buckets per doubling of the delay in seconds
            (2: bucket b covers delays near 2**(b/2) s, so 64 buckets span 136 years).
        item_buckets: rows of the in-model hashed item table (2**18) when no
            store bridge is given.
        user_buckets: rows of the hashed user-id table (2**16; 0: no user embedding).
        sparse_buckets: rows of the one hashed table all categorical feature
            columns share, each column salted differently (2**16).
        category_buckets: rows of the target-category table (1024).
        dense_features: F, numeric feature columns per target (0); must equal the batch's.
        sparse_features: C, categorical feature columns per target (0); must equal the batch's.
        mlp: hidden widths of the MLP under the task heads ((256, 128)).
        attn_chunk: history tokens per block of the ragged attention (64): each
            history is padded to a multiple of this, never to the longest.
        max_len_din: the DIN baseline's window (100, as the issue asks).
        max_len_sasrec: the SASRec baseline's window (200, as the issue asks).
    """

    dim: int = 64
    heads: int = 4
    layers: int = 2
    ffn_mult: float = 8 / 3
    tasks: tuple[str, ...] = DEFAULT_TASKS
    num_actions: int = 16
    time_buckets: int = 64
    time_buckets_per_octave: int = 2
    item_buckets: int = 1 << 18
    user_buckets: int = 1 << 16
    sparse_buckets: int = 1 << 16
    category_buckets: int = 1024
    dense_features: int = 0
    sparse_features: int = 0
    mlp: tuple[int, ...] = (256, 128)
    attn_chunk: int = 64
    max_len_din: int = 100
    max_len_sasrec: int = 200

    def __post_init__(self) -> None:
        positive = ("dim", "heads", "layers", "num_actions", "time_buckets", "time_buckets_per_octave",
                    "item_buckets", "sparse_buckets", "category_buckets", "attn_chunk", "max_len_din",
                    "max_len_sasrec")
        for name in positive:
            v = getattr(self, name)
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"ModelConfig.{name}: expected an int > 0, got {v!r}")
        for name in ("user_buckets", "dense_features", "sparse_features"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 0):
                raise ValueError(f"ModelConfig.{name}: expected an int >= 0, got {v!r}")
        if self.dim % self.heads:
            raise ValueError(f"ModelConfig.dim: {self.dim} does not divide into {self.heads} heads")
        if not self.ffn_mult > 0:
            raise ValueError(f"ModelConfig.ffn_mult: expected > 0, got {self.ffn_mult!r}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"ModelConfig.tasks: expected distinct task names, got {self.tasks!r}")
        if any(not (isinstance(h, int) and h > 0) for h in self.mlp):
            raise ValueError(f"ModelConfig.mlp: expected widths > 0, got {self.mlp!r}")

    def for_batch(self, batch: RequestBatch) -> ModelConfig:
        """This config with ``tasks``, ``dense_features`` and ``sparse_features`` taken from ``batch``."""
        return replace(self, tasks=batch.tasks, dense_features=int(batch.dense.shape[1]),
                       sparse_features=int(batch.sparse.shape[1]))


def time_buckets(delay_ms: torch.Tensor, buckets: int, per_octave: int) -> torch.Tensor:
    """int64 bucket of each delay: ``floor(per_octave * log2(1 + delay_s))``, clamped to [0, buckets).

    A relative encoding (request time minus action time), so a model trained on
    short windows meets the same values in a 10k history; negative delays (clock
    skew) count as 0.
    """
    s = delay_ms.clamp_min(0).to(torch.float64) / 1000.0
    return torch.floor(torch.log2(1.0 + s) * per_octave).to(torch.int64).clamp_(0, buckets - 1)


class HashedEmbedding(nn.Module):
    """An ``nn.Embedding`` of ``buckets`` rows addressed by ``id mod buckets``.

    Shape: ids int64 (...,) -> (..., D). The in-model stand-in for a store table:
    same call, rows in the module's parameters. Its gradient is sparse (the rows a batch
    touched), so an optimizer step costs the batch's rows, not the table's: the trainer
    steps these weights with ``SparseAdam`` and the rest with ``Adam``. A dense Adam over
    the hashed tables was most of an online step's time (the demo's profile: 0.39 s of
    1.75 s per step in Adam, most of the 0.7 s backward in materialising dense gradients).
    """

    def __init__(self, buckets: int, dim: int, std: float = 0.01) -> None:
        super().__init__()
        self.buckets = buckets
        self.weight = nn.Parameter(torch.randn(buckets, dim) * std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return functional.embedding(torch.remainder(ids, self.buckets), self.weight, sparse=True)


class SwiGLU(nn.Module):
    """``W2 (silu(W1 x) * W3 x)``: the gated FFN of each STCA layer. Shape (..., D) -> (..., D)."""

    def __init__(self, dim: int, mult: float) -> None:
        super().__init__()
        hidden = max(1, round(dim * mult))
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(functional.silu(a) * b)


# Odd 32-bit salts: column c of the categorical features hashes as id * _MUL + c * _SALT.
_MUL = 0x9E3779B1
_SALT = 0x85EBCA77


class SequenceRanker(nn.Module):
    """Base of the sequence models: tokens and targets in, one logit per task out.

    Shape contract: a ``RequestBatch`` of R requests, N events, T targets ->
    logits (T, K). History tokens are (N, D): item row + action embedding +
    time-since-action embedding + a projection of ``log1p(value)``. Target
    vectors are (T, D): item row + category embedding. A subclass maps them to
    an interest vector per target (``interest``, (T, I)); the MLP then sees
    [interest, target, user, categorical features, dense features] and its
    last layer has one output per task.

    Args:
        config: sizes (``ModelConfig``); ``dense_features``/``sparse_features``
            must match the batches (``ModelConfig.for_batch``).
        item_embedding: a module mapping int64 ids (M,) to rows (M, D), called
            once per forward with every history and target id of the batch (the
            store bridge ``embedding.StoreEmbedding`` pushes one optimizer step
            per backward, so a second call would step twice); default a
            ``HashedEmbedding`` of ``config.item_buckets`` rows.
        user_embedding: the same for user ids (R,) -> (R, D), called once per
            forward; default a ``HashedEmbedding`` of ``config.user_buckets``
            rows (none when that is 0 and no module is given).

    Raises:
        ValueError: a batch whose features or tasks do not match the config.
    """

    def __init__(self, config: ModelConfig, item_embedding: nn.Module | None = None,
                 user_embedding: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.item_embedding = item_embedding if item_embedding is not None else HashedEmbedding(
            config.item_buckets, d)
        self.action = nn.Embedding(config.num_actions, d)
        self.time = nn.Embedding(config.time_buckets, d)
        self.value = nn.Linear(1, d, bias=False)
        self.category = HashedEmbedding(config.category_buckets, d)
        self.user = user_embedding if user_embedding is not None else (
            HashedEmbedding(config.user_buckets, d) if config.user_buckets else None)
        self.sparse = HashedEmbedding(config.sparse_buckets, d) if config.sparse_features else None
        self.dense = nn.Linear(config.dense_features, d) if config.dense_features else None
        for emb in (self.action, self.time):
            nn.init.normal_(emb.weight, std=0.01)

    def _mlp(self, interest_width: int) -> nn.Sequential:
        """The MLP over [interest, target, features]; its last layer is one head per task."""
        c = self.config
        width = interest_width + c.dim * (1 + (self.user is not None) + (c.sparse_features > 0)
                                          + (c.dense_features > 0))
        layers: list[nn.Module] = []
        for h in c.mlp:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        layers.append(nn.Linear(width, len(c.tasks)))
        return nn.Sequential(*layers)

    @abstractmethod
    def interest(self, batch: RequestBatch, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(T, I) interest per target from tokens (N, D) and target vectors (T, D)."""

    head: nn.Sequential

    window: int | None = None
    """Newest events a subclass looks at (None: the whole history it is given)."""

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        """Logits (T, K), row t for target t, column k for task ``config.tasks[k]``."""
        self._check(batch)
        if self.window is not None and bool((batch.hist_lengths > self.window).any()):
            batch = batch.truncate(self.window)
        tokens, target = self.embed(batch)
        return self.score(batch, self.interest(batch, tokens, target), target)

    def score(self, batch: RequestBatch, interest: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Logits (T, K) from the interest (T, I) and target vectors (T, D): the MLP and its task heads."""
        return self.head(torch.cat([interest, target, *self.features(batch)], dim=1))

    def embed(self, batch: RequestBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """History tokens (N, D) and target vectors (T, D), from one item lookup."""
        n = batch.num_events
        rows = self.item_embedding(torch.cat([batch.hist_item, batch.target_item]))
        delay = batch.request_ts_ms[batch.event_request] - batch.hist_ts_ms
        c = self.config
        tokens = (rows[:n] + self.action(batch.hist_action.clamp(0, c.num_actions - 1))
                  + self.time(time_buckets(delay, c.time_buckets, c.time_buckets_per_octave))
                  + self.value(torch.log1p(batch.hist_value.clamp_min(0)).unsqueeze(1).to(rows.dtype)))
        target = rows[n:] + self.category(batch.target_category)
        return tokens, target

    def features(self, batch: RequestBatch) -> list[torch.Tensor]:
        """The per-target feature vectors (T, D) each: user, categorical, dense (those configured)."""
        out = []
        if self.user is not None:
            out.append(self.user(batch.user_id)[batch.target_request])
        if self.sparse is not None:
            cols = torch.arange(batch.sparse.shape[1], dtype=torch.int64, device=batch.sparse.device)
            ids = batch.sparse * _MUL + cols * _SALT
            out.append(self.sparse(ids).mean(dim=1))
        if self.dense is not None:
            x = batch.dense.to(self.dense.weight.dtype)
            out.append(self.dense(torch.sign(x) * torch.log1p(x.abs())))
        return out

    def loss(self, batch: RequestBatch, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Binary cross-entropy summed over tasks, averaged over targets.

        The average runs over targets, not requests, so a batch of R requests
        with m targets each has the objective of the same T samples trained
        one by one (request-level batching changes the cost, not the loss).
        """
        return multitask_loss(self(batch) if logits is None else logits, batch.labels)

    def _check(self, batch: RequestBatch) -> None:
        c = self.config
        if batch.tasks != c.tasks:
            raise ValueError(f"batch.tasks: the model has heads {c.tasks}, the batch labels {batch.tasks}")
        if batch.dense.shape[1] != c.dense_features or batch.sparse.shape[1] != c.sparse_features:
            raise ValueError(f"batch features: the model takes {c.dense_features} dense and "
                             f"{c.sparse_features} categorical columns, the batch has "
                             f"{batch.dense.shape[1]} and {batch.sparse.shape[1]} "
                             "(see ModelConfig.for_batch)")


def multitask_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE with logits summed over the K tasks and averaged over the T targets (a scalar)."""
    if logits.shape[0] == 0:
        return logits.sum()
    each = functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    return each.sum(dim=1).mean()


def segment_mean(x: torch.Tensor, offsets: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """(R, D) mean of each ragged run of x (N, D); zeros for an empty run."""
    r = offsets.shape[0] - 1
    total = x.new_zeros(r, x.shape[1]).index_add_(0, owner, x)
    return total / (offsets[1:] - offsets[:-1]).clamp_min(1).unsqueeze(1).to(x.dtype)


def scaled(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(last dim): the attention score scale."""
    return x / math.sqrt(x.shape[-1])
