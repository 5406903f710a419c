"""The storage process: a polling master, worker threads, endpoints, metrics.

Owns: ``StorageServer``, which hosts one node's shard replicas (a
``Service``), listens on every transport the node offers (TCP always; shared
memory and RDMA where available), fills restarted (or stale) replicas from a peer, and
serves Prometheus metrics and health on HTTP. It must not implement request
semantics (that is ``Service``) or transports (that is ``transport``).

The request path: one master thread polls every endpoint and an eventfd; it
decodes what arrived, answers cheap requests (PING, HELLO, STATS) itself, and
hands the rest to a pool of worker threads, which run the table's ``nogil``
kernels in parallel and post replies back through the eventfd; the master
sends them, because a transport endpoint belongs to one thread. A malformed
frame is answered with an error frame by the master without reaching a worker.
A request that waited past its deadline is answered DEADLINE without being run;
a full queue answers OVERLOADED, so a burst cannot grow memory without bound.

Fan-out: a PULL with nothing to return yet is *parked* on the master (no
worker waits), and answered when the replica's ring grows (the ring's
``on_append`` wakes the master through the eventfd) or its wait (at most 50
ms) is over. Serving (read-only) replicas are fed by a ``ps._follow.Follower``
thread each instead of filling from a peer.

Health (``/healthz``: the master loop is alive; ``/readyz``: every replica is
filled) and metrics (``/metrics``) are served on ``metrics_port`` by a small
HTTP thread, bound to the node's host (127.0.0.1 unless told otherwise).

Strong replicas (``ps._strong``) neither fill nor refill: their Raft members
join their groups when the service is built and catch up from the log.

Thread safety: ``start``/``stop`` from one controlling thread; everything else
runs on the server's own threads.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import zmq
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from streamrec.cluster.spec import ClusterSpec
from streamrec.errors import FrameError, TransportError
from streamrec.ps._follow import Follower
from streamrec.ps.service import (
    EXPORT_CHANGES,
    EXPORT_END,
    EXPORT_EXPIRY,
    EXPORT_TRACK,
    SERVING,
    Service,
    ShardReplica,
)
from streamrec.transport.base import Endpoint, Token
from streamrec.transport.frames import Frame, Kind, Status, error_reply, reply_to
from streamrec.transport.tcp import TcpConnection, TcpEndpoint

__all__ = ["StorageServer"]

log = logging.getLogger("streamrec.ps")

_INLINE = frozenset({Kind.PING, Kind.HELLO, Kind.STATS})
_KIND_NAMES = {int(k): k.name for k in Kind}  # metric labels; Kind(x).name costs an enum call per request
# A small read with no worker busy runs on the master: the lookup is about as long as the two
# thread hand-offs it saves, and on a machine whose cores the clients share, the hand-offs are
# pure cost. Writes, big reads and reads arriving while workers are busy go to the workers.
_INLINE_KEYS = 16_384
_MAX_QUEUE = 1024  # requests handed to workers and not yet answered; beyond it: OVERLOADED
_SYNC_ROWS = 32_768  # rows per EXPORT chunk when filling from a peer (16 MiB at dim 64 + Adagrad)
_FILL_TIMEOUT_S = 5.0  # one EXPORT's patience; a paused peer is waited for, then asked again
# A master loop that did not run this long (its poll waits at most 0.1 s) was frozen (SIGSTOP,
# a paused VM) past the point where a client gives up on a request (0.5 s) and acknowledges a
# write without it. A writer's next write shows the gap anyway; this catches a pause after a
# writer's last write. Set well above 0.5 s: on a starved host a false alarm costs a refill.
_FROZEN_S = 1.0
_FROZEN_CPU = 0.1  # ... and the process ran for less than this share of that time
_FILL_RETRY_S = 0.2  # pause between two tries at filling (no peer reachable, or all filling)


class _Metrics:
    def __init__(self, node: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("streamrec_ps_requests", "Requests answered, by kind and status",
                                ["kind", "status"], registry=r)
        self.keys = Counter("streamrec_ps_keys", "Keys in requests answered OK, by kind", ["kind"],
                            registry=r)
        self.seconds = Histogram("streamrec_ps_request_seconds", "Arrival to reply, by kind", ["kind"],
                                 registry=r, buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                                                      0.1, 0.5))
        self.bad_frames = Counter("streamrec_ps_bad_frames", "Frames refused as malformed", ["transport"],
                                  registry=r)
        self.queue = Gauge("streamrec_ps_queue_depth", "Requests waiting for or in a worker", registry=r)
        self.rows = Gauge("streamrec_ps_shard_rows", "Live rows per replica", ["table", "shard"], registry=r)
        self.ready = Gauge("streamrec_ps_shard_ready", "1 when the replica serves", ["table", "shard"],
                           registry=r)
        self.info = Gauge("streamrec_ps_up", "1 while the master loop runs", ["node"], registry=r)
        self.node = node
        self._children: dict[tuple[str, str, int], Any] = {}  # labels() takes a lock and a dict walk per call

    def _child(self, metric: Any, key: tuple[str, str, int], *labels: str) -> Any:
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def requests_child(self, kind: str, status: int) -> Any:
        c = self._children.get(("r", kind, status))
        if c is None:
            name = Status(status).name if status in Status._value2member_map_ else str(status)
            c = self._child(self.requests, ("r", kind, status), kind, name)
        return c

    def seconds_child(self, kind: str) -> Any:
        return self._child(self.seconds, ("s", kind, 0), kind)

    def keys_child(self, kind: str) -> Any:
        return self._child(self.keys, ("k", kind, 0), kind)


class StorageServer:
    """Serve one node of a cluster spec.

    Args:
        spec: the cluster.
        node: this node's name.
        workers: worker threads running requests (the tables' kernels drop the GIL).
        shm: also offer the shared-memory transport to clients on this host.
        rdma: also offer UCX (if ``ucxx`` imports).
        data_dir: where replicas keep live files; default the spec's for the node.
        fill_from_peers: on start, fill each replica from a ready peer replica.

    Example::

        server = StorageServer(spec, "a1").start()
        ...
        server.stop()
    """

    def __init__(self, spec: ClusterSpec, node: str, *, workers: int = 2, shm: bool = True,
                 rdma: bool = False, data_dir: str | os.PathLike[str] | None = None,
                 fill_from_peers: bool = True) -> None:
        self.spec = spec
        self.node = spec.node(node)
        self._fill = fill_from_peers
        self.service = Service(spec, node, data_dir=data_dir if data_dir is not None else spec.data_dir(node),
                               ready=not fill_from_peers,
                               on_stale=self._on_stale if fill_from_peers else None)
        self._fills: set[tuple[int, int]] = set()  # replicas with a fill thread running
        self._fills_lock = threading.Lock()  # taken after a replica's lock, never before
        self.metrics = _Metrics(node)
        self._want_shm, self._want_rdma = shm, rdma
        self._endpoints: list[Endpoint] = []
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"ps-{node}")
        self._done: collections.deque[tuple[Endpoint, Token, Frame, str, float, int]] = collections.deque()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._inflight = 0
        self._stop = threading.Event()
        self._master: threading.Thread | None = None
        self._http: ThreadingHTTPServer | None = None
        self._beat = time.monotonic()
        self._beat_cpu = time.process_time()
        self._parked: list[tuple[Endpoint, Token, Frame, str, float, float]] = []  # PULLs waiting: + expiry
        self.followers: list[Follower] = []
        for (t, s), rep in self.service.replicas.items():
            if rep.ring is not None:
                rep.ring.on_append = self._wake
            name = spec.tables[t].name
            self.metrics.rows.labels(name, str(s)).set_function(functools.partial(_rows, rep))
            self.metrics.ready.labels(name, str(s)).set_function(functools.partial(_ready, rep))

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> StorageServer:
        """Bind every endpoint, start the master, the HTTP server and the peer fill."""
        mfb = self.spec.max_frame_bytes
        self._endpoints.append(TcpEndpoint(self.node.host, self.node.port, max_frame_bytes=mfb))
        if self._want_shm:
            try:
                from streamrec.transport.shm import ShmEndpoint

                self._endpoints.append(ShmEndpoint(max_frame_bytes=mfb))
            except (ImportError, OSError) as exc:
                log.warning("shared memory transport unavailable: %s", exc)
        if self._want_rdma:
            try:
                from streamrec.transport.rdma import RdmaEndpoint

                self._endpoints.append(RdmaEndpoint(self.node.host, max_frame_bytes=mfb))
            except (ImportError, OSError, TransportError) as exc:
                log.warning("rdma transport unavailable: %s", exc)
        if self.node.metrics_port:
            self._http = _http_server(self, self.node.host, self.node.metrics_port)
            threading.Thread(target=self._http.serve_forever, name="ps-http", daemon=True).start()
        self._master = threading.Thread(target=self._run, name="ps-master", daemon=True)
        self._master.start()
        for rep in self.service.replicas.values():
            if rep.role == SERVING:
                self.followers.append(Follower(self.spec, self.node.name, rep, self._stop).start())
            elif self._fill and rep.log is None:  # a strong replica catches up through its Raft log
                self._on_stale(rep)
        return self

    def stop(self) -> None:
        """Stop serving, close the endpoints and the tables (live files closed cleanly)."""
        self._stop.set()
        if self._master is not None:
            self._master.join(5)
        for f in self.followers:
            f.thread.join(5)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self._pool.shutdown(wait=True)
        for ep in self._endpoints:
            ep.close()
        self.service.close()
        with contextlib.suppress(OSError):
            os.close(self._efd)

    def wait(self) -> None:
        """Block until ``stop`` (from another thread or a signal handler)."""
        while not self._stop.wait(0.5):
            pass

    @property
    def ready(self) -> bool:
        return all(r.ready for r in self.service.replicas.values())

    def offers(self) -> dict[str, Any]:
        return {ep.name: ep.offer() for ep in self._endpoints}

    # -- the master loop -----------------------------------------------------------------

    def _run(self) -> None:
        self.metrics.info.labels(self.node.name).set(1)
        poller = zmq.Poller()
        poller.register(self._efd, zmq.POLLIN)
        owner: dict[Any, Endpoint] = {}
        try:
            while not self._stop.is_set():
                self._beat, self._beat_cpu = time.monotonic(), time.process_time()
                current = {p: ep for ep in self._endpoints for p in ep.pollables()}
                for p in owner.keys() - current.keys():
                    poller.unregister(p)
                for p in current.keys() - owner.keys():
                    poller.register(p, zmq.POLLIN)
                owner = current
                wait_ms = 100
                if self._parked:  # wake for the first parked PULL's expiry
                    first = min(p[5] for p in self._parked)
                    wait_ms = max(0, min(wait_ms, int((first - time.monotonic()) * 1000) + 1))
                events = poller.poll(wait_ms)
                gap = time.monotonic() - self._beat
                # Stopped, not busy: a thread holding the GIL (numba compiling a kernel on first
                # use) also keeps the master from running, but the process spends CPU meanwhile.
                if gap > _FROZEN_S and time.process_time() - self._beat_cpu < _FROZEN_CPU * gap:
                    self._frozen(gap)
                for p, _ in events:
                    if p == self._efd:
                        self._send_done()
                        continue
                    ep = owner.get(p)
                    if ep is not None:
                        for token, req in ep.handle(p):
                            self._dispatch(ep, token, req)
                if self._parked:
                    self._unpark()
        except Exception:  # the loop must report, not vanish
            log.exception("master loop failed")
            raise
        finally:
            self.metrics.info.labels(self.node.name).set(0)

    def _frozen(self, seconds: float) -> None:
        """The process did not run for ``seconds`` (SIGSTOP, a frozen VM): clients gave up on it
        and their peers acknowledged writes it never saw, so its ready replicas fill again
        before they answer another read."""
        if not self._fill:
            return
        log.warning("the master loop did not run for %.2f s: filling every replica again", seconds)
        for rep in self.service.replicas.values():
            with rep.lock:
                if rep.ready and rep.has_peers and rep.log is None:  # Raft tells a strong one it lags
                    rep.ready = False
                    self._on_stale(rep)

    def _wake(self) -> None:
        """A ring grew (any thread): wake the master if a PULL is parked. Unlocked: a wake
        missed in a race costs that PULL its wait (at most 50 ms), never its answer."""
        if self._parked:
            with contextlib.suppress(OSError):
                os.eventfd_write(self._efd, 1)

    def _unpark(self) -> None:
        """Answer the parked PULLs that now have batches (or a re-sync to tell), or waited enough."""
        now = time.monotonic()
        keep = []
        for ep, token, req, kind, arrived, expires in self._parked:
            reply = self.service.pull(req, park=now < expires)  # past its wait: what there is (nothing)
            if reply is None:
                keep.append((ep, token, req, kind, arrived, expires))
                continue
            self._answer(ep, token, reply, kind, arrived, 0)
        self._parked = keep

    def _dispatch(self, ep: Endpoint, token: Token, req: Frame | FrameError) -> None:
        arrived = time.monotonic()
        if isinstance(req, FrameError):
            self.metrics.bad_frames.labels(ep.name).inc()
            bad = Frame(Kind.PING, request_id=req.request_id)
            self._answer(ep, token, error_reply(bad, req.status, str(req)), "BAD_FRAME", arrived, 0)
            return
        kind = _KIND_NAMES.get(req.kind) or str(req.kind)
        if req.is_reply:
            self._answer(ep, token, error_reply(req, Status.BAD_FRAME, "a reply sent as a request"), kind,
                         arrived, 0)
            return
        # A linearizable FIND (aux set) waits for a Raft barrier: never on the master.
        if req.kind in _INLINE or (req.kind == Kind.FIND and not req.aux and self._inflight == 0
                                   and req.buffers and req.buffers[0].shape[0] <= _INLINE_KEYS):
            reply = self.service.handle(req)
            if req.kind == Kind.HELLO and reply.status == Status.OK:
                reply = self._hello_reply(req, reply)
            nkeys = req.buffers[0].shape[0] if req.kind == Kind.FIND else 0
            self._answer(ep, token, reply, kind, arrived, nkeys)
            return
        if req.kind == Kind.PULL:  # cheap (a ring read, a few arrays joined): on the master, or parked
            # TCP replies may trail later frames; past _MAX_QUEUE parked, answer at once (bounded memory)
            pulled = self.service.pull(req, park=ep.name == "tcp" and len(self._parked) < _MAX_QUEUE)
            if pulled is not None:
                self._answer(ep, token, pulled, kind, arrived, 0)
            else:
                wait_s = int(req.buffers[0][3]) / 1000
                if req.borrowed:  # a transport's ring slot: parked past the next recv, so copied
                    req = Frame(req.kind, [b.copy() for b in req.buffers], req.request_id, req.table,
                                req.shard, req.deadline_us, req.flags, req.status, req.aux)
                self._parked.append((ep, token, req, kind, arrived, arrived + wait_s))
            return
        if self._inflight >= _MAX_QUEUE:
            self._answer(ep, token, error_reply(req, Status.OVERLOADED, f"{self._inflight} requests queued"),
                         kind, arrived, 0)
            return
        self._inflight += 1
        self.metrics.queue.set(self._inflight)
        self._pool.submit(self._work, ep, token, req, kind, arrived)

    def _hello_reply(self, req: Frame, reply: Frame) -> Frame:
        info = json.loads(reply.text())
        info["offers"] = self.offers()
        info["host"] = _host_id()
        return reply_to(req, [np.frombuffer(json.dumps(info).encode(), dtype=np.uint8)])

    def _work(self, ep: Endpoint, token: Token, req: Frame, kind: str, arrived: float) -> None:
        try:
            if req.deadline_us and (time.monotonic() - arrived) * 1e6 > req.deadline_us:
                reply = error_reply(req, Status.DEADLINE, f"waited past its {req.deadline_us} us deadline")
            else:
                reply = self.service.handle(req)
        except BaseException as exc:  # handle() does not raise; this guards the guard
            reply = error_reply(req, Status.INTERNAL, repr(exc))
        nkeys = req.buffers[0].shape[0] if req.buffers and req.buffers[0].dtype == np.uint64 else 0
        self._done.append((ep, token, reply, kind, arrived, nkeys))
        os.eventfd_write(self._efd, 1)

    def _send_done(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        while self._done:
            ep, token, reply, kind, arrived, nkeys = self._done.popleft()
            self._inflight -= 1
            self._answer(ep, token, reply, kind, arrived, nkeys)
        self.metrics.queue.set(self._inflight)

    def _answer(self, ep: Endpoint, token: Token, reply: Frame, kind: str, arrived: float,
                nkeys: int) -> None:
        ep.reply(token, reply)
        m = self.metrics
        m.requests_child(kind, reply.status).inc()
        m.seconds_child(kind).observe(time.monotonic() - arrived)
        if nkeys and reply.status == Status.OK:
            m.keys_child(kind).inc(nkeys)

    # -- filling a replica from its peer ------------------------------------------------
    #
    # A replica fills when it starts, and again when it finds it missed a write
    # (``Service.on_stale``). While it fills it applies clients' writes (and keeps
    # the keys it wrote out of the copy) but serves no reads. The peer records the
    # keys written from the copy's start; once the scan is done the filler copies
    # those again until none is left, and only then, under the replica's lock,
    # reports ready. It never reports ready without a copy: with its peer paused or
    # gone it keeps trying, except when every peer answers that it is filling too
    # and none holds data (a new cluster), or it held data itself and no peer does.

    def _on_stale(self, rep: ShardReplica) -> None:
        key = (rep.table_index, rep.shard)
        with self._fills_lock:
            if key in self._fills:
                return
            self._fills.add(key)
        threading.Thread(target=self._fill_loop, args=(rep,), name=f"ps-fill-{key[0]}-{key[1]}",
                         daemon=True).start()

    def _fill_loop(self, rep: ShardReplica) -> None:
        t, s = rep.table_index, rep.shard
        key = (t, s)
        while not self._stop.is_set():
            try:
                done = self._fill_one(t, s, rep)
            except Exception:
                log.exception("filling table %d shard %d failed; trying again", t, s)
                done = False
            if done:
                with rep.lock, self._fills_lock:
                    rep.became_ready()
                    rep.touched.clear()
                    self._fills.discard(key)
                return
            self._stop.wait(_FILL_RETRY_S)
        with self._fills_lock:
            self._fills.discard(key)

    def _fill_one(self, t: int, s: int, rep: ShardReplica) -> bool:
        """One try at filling from a ready peer; True when the replica may report ready."""
        peers = [p for p in self.spec.replicas(t, s) if p != self.node.name]
        answered, held = 0, []
        for peer in peers:
            try:
                conn = TcpConnection(self.spec.node(peer).address, max_frame_bytes=self.spec.max_frame_bytes,
                                     connect_timeout_s=0.5)
            except (ValueError, TransportError):
                continue
            try:
                state = self._copy_from(conn, peer, t, s, rep)
            except TransportError as exc:
                log.info("table %d shard %d: peer %s cannot fill it (%s)", t, s, peer, exc)
                continue
            finally:
                conn.close()
            if state == "filled":
                return True
            answered += 1
            if state == "held":
                held.append(peer)
        # Every peer is filling too. With none holding data (a new cluster) every replica may
        # start empty; a replica that held data goes first, the first by name among several.
        if answered == len(peers) and (not held or (rep.held and self.node.name < min(held))):
            log.warning("table %d shard %d: no peer holds data (%d answered, all filling): serving what "
                        "this replica holds (%d rows)", t, s, answered, len(rep.table))
            return True
        return False

    def _copy_from(self, conn: TcpConnection, peer: str, t: int, s: int, rep: ShardReplica) -> str:
        """Copy the shard from ``peer``: "filled", or "empty"/"held" if the peer is filling itself."""
        ids = itertools.count(1)

        def ask(aux: int, start: int = 0) -> Frame:
            req = Frame(Kind.EXPORT, [np.array([start], np.int64), np.array([_SYNC_ROWS], np.int64)],
                        request_id=next(ids), table=t, shard=s, aux=aux)
            return conn.request(req, _FILL_TIMEOUT_S)

        start, rows = 0, 0
        aux = EXPORT_TRACK | EXPORT_EXPIRY
        had_rows = len(rep.table) > 0  # filling again after it missed writes: some may be gone on the peer
        seen: list[np.ndarray] = []
        while start >= 0:
            reply = ask(aux, start)
            if reply.status == Status.UNAVAILABLE and start == 0:
                return "held" if reply.aux else "empty"
            _check(reply)
            keys, values, nxt, expires_at = reply.buffers
            rows += self._import(rep, keys, values, expires_at)
            if had_rows:
                seen.append(keys.copy())
            start, aux = int(nxt[0]), EXPORT_EXPIRY
        rounds = 0
        while True:  # the keys written on the peer since the copy began, until none is left
            reply = ask(EXPORT_CHANGES)
            _check(reply)
            keys, values, erased, left = reply.buffers
            if had_rows:
                seen.append(keys.copy())
            with rep.lock:
                fresh = _untouched(rep, keys)
                if fresh.any():
                    rep.table.import_chunks([(keys[fresh].copy(), values[fresh].copy())])
                gone = _untouched(rep, erased)
                if gone.any():
                    rep.table.erase(erased[gone].copy())
                if int(left[0]) == 0 and keys.size + erased.size == 0:
                    break
            rounds += 1
        with contextlib.suppress(TransportError):
            ask(EXPORT_END)
        if had_rows:
            _drop_unseen(rep, np.concatenate(seen) if seen else np.empty(0, np.uint64))
        log.info("table %d shard %d: filled %d rows from %s, then %d rounds of changes", t, s, rows, peer,
                 rounds)
        return "filled"

    @staticmethod
    def _import(rep: ShardReplica, keys: np.ndarray, values: np.ndarray, expires_at: np.ndarray) -> int:
        with rep.lock:  # against live writes: a key they wrote keeps their value
            keep = _untouched(rep, keys)
            if keep.any():
                rep.table.import_chunks([(keys[keep].copy(), values[keep].copy(), expires_at[keep])],
                                        include_state=True)
            return int(np.count_nonzero(keep))


def _drop_unseen(rep: ShardReplica, seen: np.ndarray) -> None:
    """Erase the rows the peer did not send (erased there while this replica lagged),
    except those live writes wrote since the fill began."""
    gone = rep.keys_not_in(seen)
    with rep.lock:
        gone = gone[_untouched(rep, gone)]
        if gone.size:
            rep.table.erase(gone)
            log.info("table %d shard %d: %d rows the peer no longer holds erased", rep.table_index, rep.shard,
                     gone.size)


def _untouched(rep: ShardReplica, keys: np.ndarray) -> np.ndarray:
    if not rep.touched or not keys.size:
        return np.ones(keys.shape[0], np.bool_)
    return ~np.isin(keys, np.fromiter(rep.touched, np.uint64, len(rep.touched)))


def _check(reply: Frame) -> None:
    if reply.status != Status.OK:
        raise TransportError(f"peer answered {Status(reply.status).name}: {reply.text()}")


def _rows(rep: ShardReplica) -> float:
    return float(len(rep.table))


def _ready(rep: ShardReplica) -> float:
    return float(rep.ready)


def _host_id() -> str:
    try:
        from streamrec.transport.shm import host_id

        return host_id()
    except ImportError:
        return ""


def _http_server(server: StorageServer, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, ctype, code = generate_latest(server.metrics.registry), CONTENT_TYPE_LATEST, 200
            elif self.path == "/healthz":
                alive = time.monotonic() - server._beat < 2.0
                body = json.dumps({"node": server.node.name, "alive": alive}).encode()
                ctype, code = "application/json", 200 if alive else 503
            elif self.path == "/readyz":
                shards = {f"{server.spec.tables[t].name}/{s}": r.ready
                          for (t, s), r in server.service.replicas.items()}
                body = json.dumps({"node": server.node.name, "ready": server.ready,
                                   "shards": shards}).encode()
                ctype, code = "application/json", 200 if server.ready else 503
            else:
                body, ctype, code = b"not found: try /metrics, /healthz, /readyz\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: metrics are scraped often
            pass

    return ThreadingHTTPServer((host, port), Handler)


def serve(spec: ClusterSpec, node: str, **kwargs: Any) -> None:
    """Run a node until SIGTERM or SIGINT (``streamrec ps serve``)."""
    import signal

    server = StorageServer(spec, node, **kwargs).start()
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("node %s serving on %s", node, server.offers())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
