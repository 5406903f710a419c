"""The server's configuration: ``ServeConfig``, every field documented with its default and why.

Owns: the frozen dataclass and its TOML loader (a ``[serve]`` table; unknown or ill-typed fields
raise ``ConfigError`` naming the field). It must not start anything.

Thread safety: a frozen value; share freely.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from typing import Any, Literal

from streamrec.errors import ConfigError

__all__ = ["ServeConfig"]

Executor = Literal["auto", "eager", "compile"]


@dataclass(frozen=True)
class ServeConfig:
    """How the server listens, queues, batches, caches and executes.

    Attributes:
        host: address to bind ("127.0.0.1": loopback unless asked; a ranking server has no
            authentication of its own).
        port: TCP port (8000, Triton's and KServe's HTTP port; 0: any free one).
        model_name: the name under ``/v2/models/{name}`` ("stca").
        max_body_bytes: requests with a larger body get 413 (8 MiB: 5,000 candidates as JSON
            take about 60 kB; the cap bounds memory per connection, not the protocol).
        max_candidates: candidates per request, above it 400 (5,000: the issue's largest).
        max_history: newest history events the model sees per request (10,000: STCA
            extrapolates to it from shorter training windows).
        batch_candidates: the orchestrator's candidate budget per model call (2,048: where the
            per-call overhead on CPU stops mattering, measured in benchmarks/serving.py).
        chunk_candidates: a request with more candidates than this is split into chunks of it,
            run in parallel and merged (512).
        max_wait_ms: how long a batch waits for more requests once started (1 ms: a fraction of
            one model call, so packing never costs a whole call).
        queue_candidates: candidates admitted but not answered, above it 429 (20,000: about
            ten budgets; bounds the queue's memory and the latency a queued request can see).
        deadline_ms: a request's budget unless it asks for less (``parameters.timeout_ms``):
            one not started by then is answered 504 (1,000 ms).
        preprocess_threads: CPU workers building features and histories (2).
        model_threads: workers running the model, each on its own batch (2: a split request's
            chunks run in parallel). ``torch`` intra-op threads are set to 1 per worker.
        history_cache_mb: the encoded-history cache's bound (256 MiB: 25 users of 10,000
            events, 250 of 1,000, at 2 layers of D = 64).
        embedding_cache_rows: the hot-embedding cache's bound in rows (262,144: 64 MiB at D = 64).
        pda: use the near-model caches and reused buffers (False only to measure without them).
        dso: pack and split requests (False: no orchestration: one worker takes each request
            through preprocessing and its own model call, then the next).
        executor: "eager", "compile" (``torch.compile`` of the per-token history encoder and the
            scoring head) or "auto" (compile when a compiler is present; the choice is measured in
            BENCHMARKS.md).
        poll_s: how often the version watcher reads ``CURRENT`` (1 s).
        retry_after_s: the ``Retry-After`` of a 429/503 (1 s).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "stca"
    max_body_bytes: int = 8 << 20
    max_candidates: int = 5_000
    max_history: int = 10_000
    batch_candidates: int = 2_048
    chunk_candidates: int = 512
    max_wait_ms: float = 1.0
    queue_candidates: int = 20_000
    deadline_ms: float = 1_000.0
    preprocess_threads: int = 2
    model_threads: int = 2
    history_cache_mb: int = 256
    embedding_cache_rows: int = 1 << 18
    pda: bool = True
    dso: bool = True
    executor: Executor = "eager"
    poll_s: float = 1.0
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.port, int) and not isinstance(self.port, bool) and 0 <= self.port < 65536):
            raise ConfigError(f"expected an int in [0, 65536) (0: any free port), got {self.port!r}",
                              field="serve.port")
        positive = ("max_body_bytes", "max_candidates", "max_history", "batch_candidates",
                    "chunk_candidates", "queue_candidates", "preprocess_threads", "model_threads",
                    "retry_after_s")
        for name in positive:
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ConfigError(f"expected an int > 0, got {v!r}", field=f"serve.{name}")
        for name in ("history_cache_mb", "embedding_cache_rows"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise ConfigError(f"expected an int >= 0, got {v!r}", field=f"serve.{name}")
        for name in ("max_wait_ms", "deadline_ms", "poll_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
                raise ConfigError(f"expected a number >= 0, got {v!r}", field=f"serve.{name}")
        if self.executor not in ("auto", "eager", "compile"):
            raise ConfigError(f"expected 'auto', 'eager' or 'compile', got {self.executor!r}",
                              field="serve.executor")
        for name in ("pda", "dso"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"expected true or false, got {getattr(self, name)!r}",
                                  field=f"serve.{name}")
        if self.queue_candidates < self.max_candidates:
            raise ConfigError(f"must hold one largest request ({self.max_candidates}), got "
                              f"{self.queue_candidates}", field="serve.queue_candidates")

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **overrides: Any) -> ServeConfig:
        """The ``[serve]`` table of a TOML file (a file without one is read whole), then ``overrides``.

        Raises:
            ConfigError: an unreadable file, an unknown field, or a bad value (naming the field).
        """
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        table = raw.get("serve", raw)
        if not isinstance(table, dict):
            raise ConfigError("expected a table", field="serve")
        return cls.from_dict({**table, **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServeConfig:
        """A config from field -> value; ConfigError names an unknown field."""
        known = {f.name for f in dataclasses.fields(cls)}
        for name in values:
            if name not in known:
                raise ConfigError(f"unknown field; known: {sorted(known)}", field=f"serve.{name}")
        return cls(**values)
