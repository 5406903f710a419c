"""The request orchestrator (FLAME's DSO): admission, deadlines, CPU preprocessing, packing small
requests and splitting large ones into model calls, and merging the answers.

Owns: ``Orchestrator`` and its threads: ``preprocess_threads`` workers running
``Preprocessor.prepare``, one batcher forming model calls, and ``model_threads`` workers running
them. It must not parse HTTP or load models.

The path of a request::

    rank() --admit--> preprocess pool --prepared--> batcher --batch--> model worker --> future
           429/503        (features,       (pack up to the     (one ModelRunner.score;
           if full        history cache)    candidate budget;   pieces written back;
                                            split the large)    the last piece answers)

- **Admission.** Candidates admitted and not yet answered are bounded by ``queue_candidates``:
  past it a request gets ``Overloaded`` (429 with Retry-After) at once, so memory never grows
  with the offered load; with no model loaded, 503.
- **Deadlines.** Each request has ``min(deadline_ms, its own timeout)``. One whose deadline has
  passed when its preprocessing or its model call would start is answered ``DeadlineMissed``
  (504) without running.
- **Packing and splitting.** A request's unique candidates above ``chunk_candidates`` are cut
  into chunks; a model call takes pieces in arrival order up to ``batch_candidates``, at most
  one chunk of each split request (so the chunks of one request run on different model workers
  at once), and only pieces prepared with the same model version. A call that is not full waits
  up to ``max_wait_ms`` for more. With ``dso`` off there is no orchestration: one worker takes
  each request through preprocessing and its own model call before it takes the next.

Thread safety: ``rank`` is called from the event loop thread; everything else runs in the
orchestrator's own threads. ``close`` stops them and fails what is still queued with 503.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from streamrec.errors import DeadlineMissed, Overloaded, ServingError
from streamrec.model.batch import RequestBatch
from streamrec.serving.cache import Buffers
from streamrec.serving.codec import RankRequest
from streamrec.serving.config import ServeConfig
from streamrec.serving.metrics import ServingMetrics
from streamrec.serving.preprocess import History, Prepared, Preprocessor
from streamrec.serving.versions import ModelSlot

__all__ = ["Orchestrator", "Ranked"]

_NO_HISTORY = History(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                      np.zeros(0, np.float32))


@dataclass(frozen=True)
class Ranked:
    """A request's answer: float32 (M, K) probabilities in request order, the version that made them."""

    scores: np.ndarray
    version: int
    tasks: tuple[str, ...]


@dataclass
class _Work:
    prepared: Prepared
    future: cf.Future[Ranked]
    deadline: float
    t_admit: float
    t_ready: float = 0.0
    out: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    remaining: int = 0
    failed: bool = False


@dataclass(frozen=True)
class _Piece:
    work: _Work
    lo: int
    hi: int

    @property
    def size(self) -> int:
        return self.hi - self.lo


class Orchestrator:
    """Admits, prepares, batches and scores ranking requests (module doc).

    Args:
        config: ``ServeConfig`` (queue, deadline, batching and thread settings).
        preprocessor: builds features and histories.
        slot: the model version serving now.
        metrics: where stage latencies, batch sizes and the queue depth go.

    Raises (from ``rank``): ``Overloaded`` (429/503), ``DeadlineMissed`` (504), ``BadRequest`` from
    preprocessing, ``ServingError`` (500) if the model call fails.
    """

    def __init__(self, config: ServeConfig, preprocessor: Preprocessor, slot: ModelSlot,
                 metrics: ServingMetrics) -> None:
        self.config = config
        self.pre = preprocessor
        self.slot = slot
        self.metrics = metrics
        self.pending_candidates = 0
        self.pending_requests = 0
        self.batches = 0
        self.answered = 0
        self._lock = threading.Lock()
        self._closed = False
        self._ready: queue.Queue[_Work | None] = queue.Queue()
        pre = config.preprocess_threads if config.dso else 1
        self._pre_pool = cf.ThreadPoolExecutor(pre, thread_name_prefix="streamrec-pre")
        workers = config.model_threads if config.dso else 1
        self._model_pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="streamrec-model")
        self._in_flight = threading.Semaphore(workers)
        self._buffers = threading.local()
        self._batcher = threading.Thread(target=self._batch_loop, name="streamrec-batcher", daemon=True)
        self._batcher.start()

    # -- the public edge ----------------------------------------------------------------

    async def rank(self, req: RankRequest) -> Ranked:
        """Score one request; see the class doc for what it raises."""
        fut = self.submit(req)
        return await asyncio.wrap_future(fut)

    def submit(self, req: RankRequest) -> cf.Future[Ranked]:
        """Admit ``req`` and return a future of its answer (raises ``Overloaded`` at once if full)."""
        c = self.config
        if self.slot.runner is None or self._closed:
            raise Overloaded("no model version is loaded yet" if not self._closed else "shutting down",
                             status=503, retry_after_s=c.retry_after_s)
        m = int(req.items.shape[0])
        with self._lock:
            if self.pending_candidates + m > c.queue_candidates:
                raise Overloaded(f"queue full: {self.pending_candidates} candidates waiting (limit "
                                 f"{c.queue_candidates})", status=429, retry_after_s=c.retry_after_s)
            self.pending_candidates += m
            self.pending_requests += 1
        self.metrics.queue_candidates.set(self.pending_candidates)
        self.metrics.queue_requests.set(self.pending_requests)
        now = time.monotonic()
        budget = c.deadline_ms if req.timeout_ms is None else min(c.deadline_ms, req.timeout_ms)
        fut: cf.Future[Ranked] = cf.Future()
        fut.add_done_callback(lambda _f: self._release(m, now))
        try:
            job = self._pre_pool.submit(self._prepare, req, fut, now + budget / 1e3, now, budget)
        except RuntimeError:  # the pool is shut down
            fut.set_exception(Overloaded("shutting down", status=503, retry_after_s=c.retry_after_s))
            return fut

        def cancelled(j: cf.Future[None]) -> None:
            if j.cancelled() and not fut.done():
                fut.set_exception(Overloaded("shutting down", status=503, retry_after_s=c.retry_after_s))

        job.add_done_callback(cancelled)
        return fut

    def _release(self, m: int, t_admit: float) -> None:
        with self._lock:
            self.pending_candidates -= m
            self.pending_requests -= 1
        self.metrics.queue_candidates.set(self.pending_candidates)
        self.metrics.queue_requests.set(self.pending_requests)
        self.metrics.stage.labels("total").observe(time.monotonic() - t_admit)

    # -- preprocessing ------------------------------------------------------------------

    def _prepare(self, req: RankRequest, fut: cf.Future[Ranked], deadline: float, t_admit: float,
                 budget_ms: float) -> None:
        t0 = time.monotonic()
        self.metrics.stage.labels("queue").observe(t0 - t_admit)
        if t0 > deadline:
            fut.set_exception(DeadlineMissed(f"deadline of {budget_ms:g} ms passed in the queue",
                                             deadline_ms=budget_ms))
            return
        runner = self.slot.runner
        assert runner is not None
        try:
            p = self.pre.prepare(req, runner)
        except ServingError as exc:
            fut.set_exception(exc)
            return
        except Exception as exc:  # a bug must answer 500, never hang the request
            fut.set_exception(ServingError(f"preprocessing failed: {type(exc).__name__}: {exc}", status=500))
            return
        t1 = time.monotonic()
        self.metrics.stage.labels("preprocess").observe(t1 - t0)
        w = _Work(p, fut, deadline, t_admit, t_ready=t1,
                  out=np.empty((p.num_candidates, len(runner.tasks)), np.float32))
        if self.config.dso:
            self._ready.put(w)
        else:
            self._in_flight.acquire()
            self._run_batch(self._pieces(w))

    # -- batching -----------------------------------------------------------------------

    def _pieces(self, w: _Work) -> list[_Piece]:
        u = w.prepared.num_candidates
        step = self.config.chunk_candidates if self.config.dso else max(u, 1)
        pieces = [_Piece(w, lo, min(lo + step, u)) for lo in range(0, u, step)]
        w.remaining = len(pieces)
        return pieces

    def _batch_loop(self) -> None:
        c = self.config
        waiting: deque[_Piece] = deque()
        wait_s = c.max_wait_ms / 1e3
        while True:
            if not waiting:
                w = self._ready.get()
                if w is None:
                    return
                waiting.extend(self._pieces(w))
            self._drain(waiting)
            batch = self._take(waiting)
            if sum(p.size for p in batch) < c.batch_candidates and not waiting:
                end = time.monotonic() + wait_s
                while (left := end - time.monotonic()) > 0:
                    try:
                        w = self._ready.get(timeout=left)
                    except queue.Empty:
                        break
                    if w is None:
                        self._ready.put(None)
                        break
                    waiting.extend(self._pieces(w))
                    more = self._take(waiting, batch)
                    batch += more
                    if sum(p.size for p in batch) >= c.batch_candidates:
                        break
            if batch:
                self._in_flight.acquire()
                self._model_pool.submit(self._run_batch, batch)

    def _drain(self, waiting: deque[_Piece]) -> None:
        while True:
            try:
                w = self._ready.get_nowait()
            except queue.Empty:
                return
            if w is None:
                self._ready.put(None)
                return
            waiting.extend(self._pieces(w))

    def _take(self, waiting: deque[_Piece], batch: list[_Piece] | None = None) -> list[_Piece]:
        """Pieces for one model call from ``waiting`` (module doc's rules); the rest stay, in order."""
        c = self.config
        got: list[_Piece] = []
        have = list(batch or [])
        size = sum(p.size for p in have)
        runner = have[0].work.prepared.runner if have else None
        works = {id(p.work) for p in have}
        skipped: list[_Piece] = []
        while waiting and size < c.batch_candidates:
            p = waiting.popleft()
            if runner is None:
                runner = p.work.prepared.runner
            if (p.work.prepared.runner is not runner or id(p.work) in works
                    or (size and size + p.size > c.batch_candidates)):
                skipped.append(p)
                if len(skipped) > 64:  # do not scan a long queue for small fits
                    break
                continue
            got.append(p)
            works.add(id(p.work))
            size += p.size
        waiting.extendleft(reversed(skipped))
        return got

    # -- model calls --------------------------------------------------------------------

    def _run_batch(self, batch: list[_Piece]) -> None:
        try:
            now = time.monotonic()
            live = []
            for p in batch:
                w = p.work
                if w.failed:
                    continue
                if now > w.deadline:
                    self._fail(w, DeadlineMissed("deadline passed before the model call",
                                                 deadline_ms=(w.deadline - w.t_admit) * 1e3))
                    continue
                self.metrics.stage.labels("batch_wait").observe(now - w.t_ready)
                live.append(p)
            if not live:
                return
            runner = live[0].work.prepared.runner
            rb, encoded = self._assemble(live)
            t0 = time.monotonic()
            try:
                logits = runner.score(rb, encoded)
            except Exception as exc:
                for p in live:
                    self._fail(p.work, ServingError(f"model call failed: {type(exc).__name__}: {exc}",
                                                    status=500))
                return
            probs = torch.sigmoid(logits).numpy()
            t1 = time.monotonic()
            self.metrics.stage.labels("model").observe(t1 - t0)
            self.metrics.batch_candidates.observe(rb.num_targets)
            self.metrics.batch_requests.observe(len(live))
            self.batches += 1
            at = 0
            for p in live:
                w = p.work
                w.out[p.lo:p.hi] = probs[at:at + p.size]
                at += p.size
                with self._lock:
                    w.remaining -= 1
                    last = w.remaining == 0 and not w.failed
                    self.answered += last
                if last:
                    pr = w.prepared
                    w.future.set_result(Ranked(w.out[pr.inverse], pr.runner.version, pr.runner.tasks))
        finally:
            self._in_flight.release()

    def _fail(self, w: _Work, exc: ServingError) -> None:
        with self._lock:
            first = not w.failed
            w.failed = True
        if first:
            w.future.set_exception(exc)

    def _assemble(self, live: list[_Piece]) -> tuple[RequestBatch, list | None]:
        """The ``RequestBatch`` of the pieces (one request each), from reused buffers."""
        buf: Buffers | None = getattr(self._buffers, "b", None)
        if buf is None:
            buf = self._buffers.b = Buffers(enabled=self.pre.cache is not None)
        r = len(live)
        t = sum(p.size for p in live)
        first = live[0].work.prepared
        f, cdim = first.dense.shape[1], first.sparse.shape[1]
        toff = buf.take("toff", (r + 1,), np.int64)
        items = buf.take("items", (t,), np.int64)
        cat = buf.take("cat", (t,), np.int64)
        dense = buf.take("dense", (t, f), np.float32)
        sparse = buf.take("sparse", (t, cdim), np.int64)
        users = buf.take("users", (r,), np.int64)
        req_ts = buf.take("req_ts", (r,), np.int64)
        toff[0] = 0
        at = 0
        for i, p in enumerate(live):
            pr = p.work.prepared
            sl = slice(at, at + p.size)
            items[sl] = pr.items[p.lo:p.hi]
            cat[sl] = pr.category[p.lo:p.hi]
            dense[sl] = pr.dense[p.lo:p.hi]
            sparse[sl] = pr.sparse[p.lo:p.hi]
            users[i] = pr.request.user_id
            req_ts[i] = pr.now_ms
            at += p.size
            toff[i + 1] = at
        encoded = [p.work.prepared.encoded for p in live] if first.encoded is not None else None
        if encoded is not None:
            hist = dict(hist_offsets=np.zeros(r + 1, np.int64), hist_item=np.zeros(0, np.int64),
                        hist_action=np.zeros(0, np.int64), hist_ts_ms=np.zeros(0, np.int64),
                        hist_value=np.zeros(0, np.float32))
        else:
            hs = [h for p in live if (h := p.work.prepared.history) is not None] or [_NO_HISTORY]
            lens = np.array([h.length for h in hs], np.int64)
            hist = dict(hist_offsets=np.r_[0, np.cumsum(lens)].astype(np.int64),
                        hist_item=np.concatenate([h.items for h in hs]),
                        hist_action=np.concatenate([h.actions for h in hs]),
                        hist_ts_ms=np.concatenate([h.ts_ms for h in hs]),
                        hist_value=np.concatenate([h.values for h in hs]))
        rb = RequestBatch(
            **{k: torch.from_numpy(v) for k, v in hist.items()}, request_ts_ms=torch.from_numpy(req_ts),
            user_id=torch.from_numpy(users), target_offsets=torch.from_numpy(toff),
            target_item=torch.from_numpy(items), target_category=torch.from_numpy(cat),
            dense=torch.from_numpy(dense), sparse=torch.from_numpy(sparse),
            labels=torch.zeros(t, len(first.runner.tasks)), tasks=first.runner.tasks)
        return rb, encoded

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop the threads; requests still queued are answered 503."""
        self._closed = True
        self._pre_pool.shutdown(wait=True, cancel_futures=True)
        self._ready.put(None)
        self._batcher.join(timeout=30)
        self._model_pool.shutdown(wait=True)
        while True:
            try:
                w = self._ready.get_nowait()
            except queue.Empty:
                break
            if w is not None and not w.future.done():
                w.future.set_exception(Overloaded("shutting down", status=503))
