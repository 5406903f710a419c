"""The serving process: the model slot and its version watcher, the caches, the preprocessor, the
orchestrator and the HTTP app, put together and run under uvicorn.

Owns: ``Server`` (build, ``start``/``stop`` in a background thread for tests and the demo, or
``run`` in the foreground for ``streamrec serve``). It must not hold request logic.

Where the model comes from: a model directory (``--model-dir``: the trainer's ``CURRENT``,
watched for new versions) or a ``ModelRunner`` given directly. Where features come from: the
feature set passed in, else the one in the first checkpoint's manifest (``FeatureSet.to_manifest``),
computed over the given ``Stores`` (fresh, empty counters when none are given). A later version
with a different feature set, or feature widths the serving columns do not give, is refused and
the serving version stays.

Thread safety: one thread calls ``start``/``stop``/``run``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import uvicorn

from streamrec.errors import CheckpointError, ConfigError
from streamrec.model.checkpoint import Checkpoint
from streamrec.pipeline.features import FeatureSet, Stores
from streamrec.serving.app import build_app
from streamrec.serving.cache import HistoryCache
from streamrec.serving.config import ServeConfig
from streamrec.serving.executor import ModelRunner
from streamrec.serving.metrics import ServingMetrics
from streamrec.serving.orchestrator import Orchestrator
from streamrec.serving.preprocess import Preprocessor, feature_columns
from streamrec.serving.versions import ModelSlot, VersionWatcher, embedding_caches, runner_from_checkpoint

__all__ = ["Server", "serve"]

log = logging.getLogger("streamrec.serving")


def _compile_available() -> bool:
    from shutil import which

    return which(os.environ.get("CXX", "g++")) is not None


class _Foreground(uvicorn.Server):
    """uvicorn's server, minus re-raising SIGINT/SIGTERM after its graceful shutdown (it does so to
    end the process with the default handler): ``run`` returns, so the orchestrator and the
    watcher stop too and ``streamrec serve`` exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class Server:
    """One ranking server.

    Args:
        config: ``ServeConfig``.
        model_dir: the trainer's model directory (watched), or None with ``runner``.
        runner: a model to serve (tests, benchmarks), or None with ``model_dir``.
        features: the feature set the model was trained on (default: the checkpoint's).
        stores: what the features and histories read (sequence store, counters, catalog).

    Raises:
        ConfigError: neither or both of ``model_dir`` and ``runner``.
        CheckpointError: ``model_dir`` has a version that cannot be served (at start).

    Example::

        with Server(ServeConfig(port=0), model_dir="models/stca") as s:
            httpx.post(f"{s.url}/rank", json={"user_id": 7, "item_ids": [1, 2, 3]})
    """

    def __init__(self, config: ServeConfig, *, model_dir: str | os.PathLike[str] | None = None,
                 runner: ModelRunner | None = None, features: FeatureSet | None = None,
                 stores: Stores | None = None) -> None:
        if (model_dir is None) == (runner is None):
            raise ConfigError("give exactly one of a model directory and a model", field="serve.model_dir")
        self.config = config
        self.compiled = config.executor == "compile" or (config.executor == "auto" and _compile_available())
        self.metrics = ServingMetrics()
        use_cache = config.pda and config.history_cache_mb > 0
        self.cache = HistoryCache(config.history_cache_mb << 20) if use_cache else None
        if self.cache is not None:
            c = self.cache
            self.metrics.watch_cache("history", lambda: (c.stats.hits, c.stats.lookups))
        for role in ("items", "users"):
            self.metrics.watch_cache(f"embedding_{role}", functools.partial(self._embedding_stats, role))
        self.features = features
        self.stores = stores
        self.slot = ModelSlot()
        self.slot.on_swap(self._swapped)
        self.watcher: VersionWatcher | None = None
        if model_dir is not None:
            self.watcher = VersionWatcher(model_dir, self.slot, poll_s=config.poll_s,
                                          make_runner=self._make_runner)
            if not self.watcher.load_now():
                raise CheckpointError(path=str(Path(model_dir)),
                                      problem=f"nothing servable: {self.watcher.last_error or 'no CURRENT'}")
        else:
            assert runner is not None
            self._check_widths(runner)
            self.slot.swap(runner)
        if self.features is not None and self.stores is None:
            self.stores = self.features.make_stores()
        self.pre = Preprocessor(self.features, self.stores, max_history=config.max_history, cache=self.cache)
        pre = self.pre
        self.metrics.watch_cache("history_events", lambda: (pre.reused_events,
                                                            pre.reused_events + pre.encoded_events))
        self.orchestrator = Orchestrator(config, self.pre, self.slot, self.metrics)
        self.app = build_app(config, self.orchestrator)
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = config.port

    # -- versions -----------------------------------------------------------------------

    def _make_runner(self, ckpt: Checkpoint) -> ModelRunner:
        raw = ckpt.manifest.get("features") or {}
        if raw.get("format"):
            fs = FeatureSet.from_manifest(raw)
            if self.features is None and self.slot.runner is None:
                self.features = fs
            elif self.features is None or fs.fingerprint != self.features.fingerprint:
                raise CheckpointError(path=str(ckpt.path),
                                      problem="its feature set differs from the one served")
        rows = self.config.embedding_cache_rows if self.config.pda else 0
        runner = runner_from_checkpoint(ckpt, compiled=self.compiled, embedding_cache_rows=rows)
        self._check_widths(runner)
        return runner

    def _check_widths(self, runner: ModelRunner) -> None:
        sparse, dense = feature_columns(self.features)
        if self.features is None:
            ok = runner.dense_features == 0 and runner.sparse_features in (0, len(sparse))
        else:
            ok = (runner.sparse_features, runner.dense_features) == (len(sparse), len(dense))
        if not ok:
            raise CheckpointError(path=f"version {runner.version}", problem=(
                f"the model takes {runner.sparse_features} categorical and {runner.dense_features} dense "
                f"columns; serving gives {len(sparse)} ({sparse}) and {len(dense)} ({dense})"))

    def _embedding_stats(self, role: str) -> tuple[int, int]:
        r = self.slot.runner
        cache = embedding_caches(r).get(role) if r is not None else None
        return (cache.stats.hits, cache.stats.lookups) if cache is not None else (0, 0)

    def _swapped(self, runner: ModelRunner) -> None:
        self.metrics.model_version.set(runner.version)
        self.metrics.swaps.inc()
        if self.cache is not None:
            self.cache.drop_version(runner.version)

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def _uvicorn_config(self) -> uvicorn.Config:
        return uvicorn.Config(self.app, host=self.config.host, port=self.port, loop="uvloop",
                              http="httptools",
                              lifespan="off", log_level="warning", access_log=False, limit_concurrency=4096,
                              timeout_keep_alive=30)

    def _threads(self) -> None:
        # The model workers share the cores; more intra-op threads each would oversubscribe them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.config.model_threads))

    def start(self, timeout_s: float = 30.0) -> Server:
        """Serve in a background thread; returns once the socket listens (``url`` is then valid)."""
        self._threads()
        if self.watcher is not None:
            self.watcher.start()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.config.port))
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(self._uvicorn_config())
        self._uvicorn = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="streamrec-http",
                                        daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout_s
        while not server.started:
            if time.monotonic() > end or not self._thread.is_alive():
                raise RuntimeError(f"the HTTP server did not start within {timeout_s} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop listening, then the orchestrator and the watcher."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.orchestrator.close()
        if self.watcher is not None:
            self.watcher.stop()

    def run(self) -> None:
        """Serve in the foreground until SIGINT/SIGTERM (``streamrec serve``)."""
        self._threads()
        if self.watcher is not None:
            self.watcher.start()
        try:
            _Foreground(self._uvicorn_config()).run()
        finally:
            self.orchestrator.close()
            if self.watcher is not None:
                self.watcher.stop()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()



def serve(model_dir: str | os.PathLike[str], config: ServeConfig, *,
          sequences: str | os.PathLike[str] | None = None,
          counters: str | os.PathLike[str] | None = None) -> None:
    """``streamrec serve``: serve ``model_dir`` in the foreground until SIGINT/SIGTERM.

    Args:
        model_dir: the trainer's model directory (watched for new versions).
        config: the server's config.
        sequences: a ``SequenceStore`` snapshot to read histories from (None: every history empty).
        counters: ``Stores.snapshot_counters`` output for the feature set's windowed counts
            (None: zeros).

    Raises:
        CheckpointError: nothing servable in ``model_dir``.
    """
    from streamrec.model.checkpoint import load_current
    from streamrec.store import SequenceStore

    raw = load_current(model_dir, tables=False).manifest.get("features") or {}
    fs = FeatureSet.from_manifest(raw) if raw.get("format") else None
    seq = SequenceStore.open(sequences) if sequences is not None else None
    if fs is None:
        stores = Stores(sequences=seq)
    elif counters is not None:
        stores = fs.open_stores(counters, sequences=seq)
    else:
        stores = fs.make_stores(sequences=seq)
    server = Server(config, model_dir=model_dir, features=fs, stores=stores)
    log.warning("serving %s on %s (version %s)", model_dir, server.url,
                server.slot.runner.version if server.slot.runner else None)
    server.run()
