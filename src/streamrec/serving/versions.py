"""Model versions: building a runnable model from a checkpoint, and swapping in each new version
the trainer publishes.

Owns: ``runner_from_checkpoint`` (a ``Checkpoint`` -> ``ModelRunner``, the model class and config
rebuilt from the manifest), ``ModelSlot`` (the version serving now: one reference, replaced
whole) and ``VersionWatcher`` (a thread polling the model directory's ``CURRENT``, loading and
warming a new version in the background, then swapping it into the slot). It must not touch
requests.

Why no request fails during a swap: a request takes the slot's runner once, when it is
prepared, and keeps it to the end (its features, history encoding and model call all come from
that version); the orchestrator never packs requests of two versions into one model call. The
old runner is freed when its last request is answered. A version that fails to load or to warm
up is logged and skipped; the one serving stays.

Thread safety: ``ModelSlot.runner`` is read from any thread (a reference read) and written by
the watcher only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from streamrec.errors import CheckpointError
from streamrec.model.checkpoint import Checkpoint, current_version, load_current
from streamrec.model.stca import STCA, ModelConfig
from streamrec.serving.cache import CachedEmbedding, EmbeddingCache
from streamrec.serving.executor import ModelRunner

if TYPE_CHECKING:
    from streamrec.store.table import EmbeddingTable

__all__ = ["ModelSlot", "VersionWatcher", "embedding_caches", "model_from_checkpoint",
           "runner_from_checkpoint"]

log = logging.getLogger("streamrec.serving")


def model_from_checkpoint(ckpt: Checkpoint, *, embedding_cache_rows: int = 0) -> torch.nn.Module:
    """The module a checkpoint's manifest names (``model.class``: ``STCA`` or a baseline of
    ``streamrec.model.baselines``), with its dense weights loaded.

    Sparse rows the trainer kept in the store (the version's ``items`` and ``users`` tables, as
    ``model.train`` names them) are read through an ``EmbeddingCache`` of ``embedding_cache_rows``
    rows each (``cache.CachedEmbedding``); ids absent from them get zeros.

    Raises:
        CheckpointError: an unknown class, a config that does not build, or weights that do not fit.
    """
    raw = dict(ckpt.model_config)
    name = raw.pop("class", "STCA")
    cls: Any = STCA if name == "STCA" else None
    if cls is None:
        try:
            from streamrec.model import baselines

            cls = getattr(baselines, name)
        except (ImportError, AttributeError):
            raise CheckpointError(path=str(ckpt.path), problem=f"unknown model class {name!r}") from None
    known = {f.name: f for f in dataclasses.fields(ModelConfig)}
    kw: dict[str, Any] = {}
    for table, arg in (("items", "item_embedding"), ("users", "user_embedding")):
        if table in ckpt.tables:
            t = ckpt.tables[table]
            kw[arg] = CachedEmbedding(EmbeddingCache(_finder(t), int(t.dim), embedding_cache_rows))
    try:
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in raw.items() if k in known}
        model: torch.nn.Module = cls(ModelConfig(**kwargs), **kw)
        model.load_state_dict(ckpt.dense)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(path=str(ckpt.path), problem=f"cannot rebuild {name}: {exc}") from exc
    return model


def _finder(table: EmbeddingTable) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    return lambda ids: table.find(ids.astype(np.uint64))


def embedding_caches(runner: ModelRunner) -> dict[str, EmbeddingCache]:
    """The runner's hot-embedding caches by role (``items``, ``users``); empty for in-model tables."""
    m = runner.model
    out = {}
    for role, attr in (("items", "item_embedding"), ("users", "user")):
        mod = getattr(m, attr, None)
        if isinstance(mod, CachedEmbedding):
            out[role] = mod.cache
    return out


def runner_from_checkpoint(ckpt: Checkpoint, *, compiled: bool = False, embedding_cache_rows: int = 0
                           ) -> ModelRunner:
    """A ``ModelRunner`` of the checkpoint's model (``model_from_checkpoint``), version attached."""
    return ModelRunner(model_from_checkpoint(ckpt, embedding_cache_rows=embedding_cache_rows), ckpt.version,
                       compiled=compiled)


class ModelSlot:
    """The model version serving now (None before the first one loads)."""

    def __init__(self, runner: ModelRunner | None = None) -> None:
        self.runner = runner
        self.swaps = 0
        self._listeners: list[Callable[[ModelRunner], None]] = []

    def on_swap(self, fn: Callable[[ModelRunner], None]) -> None:
        """Call ``fn(new_runner)`` after each swap (in the swapping thread)."""
        self._listeners.append(fn)

    def swap(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.swaps += 1
        for fn in self._listeners:
            fn(runner)


class VersionWatcher:
    """Polls ``model_dir/CURRENT`` every ``poll_s`` and swaps new versions into ``slot``.

    Args:
        model_dir: the trainer's model directory (``checkpoint.publish``).
        slot: where the serving version lives.
        poll_s: seconds between polls.
        make_runner: ``Checkpoint -> ModelRunner`` (``runner_from_checkpoint`` by default); it may
            raise ``CheckpointError`` to refuse a version (e.g. a different feature set).

    ``load_now()`` loads the current version in the caller's thread (the server's start);
    ``start()``/``stop()`` run the polling thread.
    """

    def __init__(self, model_dir: str | os.PathLike[str], slot: ModelSlot, *, poll_s: float = 1.0,
                 make_runner: Callable[[Checkpoint], ModelRunner] | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.slot = slot
        self.poll_s = poll_s
        self.make_runner = make_runner or runner_from_checkpoint
        self.failures = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def load_now(self) -> bool:
        """Load and swap in the version ``CURRENT`` names if it is not the one serving.

        Returns True if a new version was swapped in; False if nothing new, or it failed (counted
        in ``failures``, the reason in ``last_error``).
        """
        try:
            v = current_version(self.model_dir)
        except CheckpointError as exc:
            return self._failed(str(exc))
        cur = self.slot.runner
        if v is None or (cur is not None and cur.version == v):
            return False
        try:
            ckpt = load_current(self.model_dir)
            runner = self.make_runner(ckpt)
            runner.warm_up()
        except (CheckpointError, ValueError, RuntimeError) as exc:
            return self._failed(f"version {v}: {exc}")
        self.slot.swap(runner)
        log.info("serving model version %d", runner.version)
        return True

    def _failed(self, why: str) -> bool:
        self.failures += 1
        self.last_error = why
        log.warning("model version not loaded: %s", why)
        return False

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.load_now()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="streamrec-version-watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
