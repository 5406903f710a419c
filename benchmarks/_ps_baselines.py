"""Baselines for the parameter-server benchmark, and the load driver every path shares.

Owns: the servers the parameter server is compared against, their clients, the
rows they all hold, and the multi-process load driver. The issue asks for
"baselines in the same run", each over the same rows (``fill_values``):

- ``serve_grpc_table``: grpcio unary in front of the same ``EmbeddingTable``,
  with the same payload as our own FIND reply (values then found). It differs
  from our server only in the transport, so its ratio is the transport's worth.
- ``serve_conventional``: "a conventional parameter server (a process holding a
  Python dict of key -> row over a numpy array, answering over grpcio: what a
  team writes first, and the analogue of the seed's old chained-hash engine
  behind TCP)". Its lookup is the idiomatic one (``map(d.get, keys.tolist())``
  into ``np.fromiter``, as in ``benchmarks/store.py``), not a straw man.
- ``load_redis`` and ``RedisFindClient``: "Redis MGET of the same rows (via
  redis-py + hiredis against a local redis-server)"; the server itself comes
  from ``_common.redis_server``, which says why when there is none.

``run_clients`` drives any client with a ``find(keys) -> (values, found)``
method from several processes at once; our own transports use it too, so it
knows nothing of gRPC or Redis. It checks replies against ``fill_values``, so
a path that returns the wrong rows cannot post a fast number: every reply's
shapes, dtype and found mask, and the first and last element of every row
(which together name the row's key: a neighbour's, stale or zeroed row fails);
every element of every row of each warm-up call and of every 64th timed call.
The check runs inside the throughput window but outside the latency clock;
its cost is measured and returned (``LoadResult.check_s``). A client that
reports ``transport_counts()`` (our own) has its requests per transport
counted over the window, so the caller can assert that every timed call went
where the path's label says.

Must not: measure or report anything itself (that is ``benchmarks/ps.py``), or
touch ``streamrec`` beyond the public ``EmbeddingTable``.

Processes: servers and client workers run in ``multiprocessing`` processes of
the 'spawn' context (gRPC's C core and numba's threads do not survive a fork),
so targets and ``make_client`` callables must be picklable: module-level
functions, classes, or ``functools.partial`` of them. Clients are used by one
thread at a time.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import _free_port

__all__ = [
    "FIND_METHOD",
    "BadReply",
    "FindClient",
    "GrpcFindClient",
    "LoadResult",
    "RedisFindClient",
    "Served",
    "check_reply",
    "fill_table",
    "fill_values",
    "load_redis",
    "redis_key_names",
    "redis_pid",
    "run_clients",
    "serve_conventional",
    "serve_grpc_table",
    "served",
    "server_cpu_seconds",
]

_SERVICE, _METHOD = "streamrec.bench.Table", "Find"
FIND_METHOD = f"/{_SERVICE}/{_METHOD}"
_MAX_MESSAGE = 64 << 20  # a 4096-key reply at dim 64 is ~1 MiB; room for batches 64x larger
_GRPC_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    # An http_proxy in the environment must not route loopback calls through a proxy.
    ("grpc.enable_http_proxy", 0),
]
_FILL_BATCH = 1_000_000  # rows per insert: 256 MB of values at dim 64; 5 M rows fill in ~1.5 s here
_VALUE_MOD = 1 << 24  # float32 holds every integer below 2**24 exactly
_VALUE_CHUNK = 4096  # rows of fill_values computed at a time: 1 MiB of int32 temporaries at dim 64
_CHECK_EVERY = 64  # timed calls between full checks (every element); every call gets the cheap check


class BadReply(Exception):
    """A path returned a reply that is not the rows ``fill_values`` put there."""


class FindClient(Protocol):
    """What ``run_clients`` drives: a batch lookup and a close.

    A client may also have ``transport_counts() -> dict[str, int] | None``:
    requests answered so far, per transport (our ``PSClient``'s
    ``stats.by_transport``); ``run_clients`` then reports the window's counts.
    """

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...


# -- the rows every path holds -------------------------------------------------------


def fill_values(keys: np.ndarray, dim: int) -> np.ndarray:
    """(B, D) float32 rows of ``keys``: element d of key k is ``(k + d) % 2**24``.

    Every element is an exact float32 integer, so checks compare with ``==``;
    rows of distinct keys below 2**24 differ, so a reply carrying a neighbour's
    row fails the check.
    """
    k = np.ascontiguousarray(keys, dtype=np.uint64)
    out = np.empty((k.shape[0], dim), dtype=np.float32)
    cols = np.arange(dim, dtype=np.int32)
    # Cache-sized pieces: whole-batch temporaries made filling 5 M rows take 7 s, mostly page faults.
    for lo in range(0, k.shape[0], _VALUE_CHUNK):
        base = np.bitwise_and(k[lo:lo + _VALUE_CHUNK], np.uint64(_VALUE_MOD - 1)).astype(np.int32)
        ints = np.add.outer(base, cols)
        np.bitwise_and(ints, _VALUE_MOD - 1, out=ints)
        out[lo:lo + _VALUE_CHUNK] = ints
    return out


def fill_table(table: Any, rows: int, *, batch: int = _FILL_BATCH) -> None:
    """Insert keys ``0..rows-1`` with ``fill_values`` into an ``EmbeddingTable``."""
    for lo in range(0, rows, batch):
        keys = np.arange(lo, min(lo + batch, rows), dtype=np.uint64)
        table.insert_or_assign(keys, fill_values(keys, table.dim))


def check_reply(keys: np.ndarray, values: np.ndarray, found: np.ndarray, *, full: bool = True) -> None:
    """Raise ``BadReply`` unless every key was found with its ``fill_values`` row.

    Args:
        full: compare every element of every row; else the first and last
            element of every row, which together identify the row's key (about
            a tenth of the full check's time at dim 64).

    Requires: every key in ``keys`` was filled (key space <= rows filled).
    """
    b = keys.shape[0]
    if values.ndim != 2 or values.shape[0] != b or found.shape != (b,) or values.dtype != np.float32:
        raise BadReply(f"reply shapes {values.shape} {values.dtype} and {found.shape} for {b} keys")
    if not found.all():
        raise BadReply(f"{int((~found).sum())} of {b} present keys reported absent, "
                       f"first {int(keys[np.argmin(found)])}")
    dim = values.shape[1]
    if not full:  # two columns of B elements: the common case, kept to a few vector ops
        k = np.ascontiguousarray(keys, dtype=np.uint64)
        mask = np.uint64(_VALUE_MOD - 1)
        if (np.array_equal(values[:, 0], (k & mask).astype(np.float32))
                and np.array_equal(values[:, dim - 1], ((k + np.uint64(dim - 1)) & mask).astype(np.float32))):
            return
    want = fill_values(keys, dim)
    bad = np.flatnonzero((values != want).any(axis=1))
    if bad.size:
        i = bad[0]
        raise BadReply(f"key {int(keys[i])}: got {values[i][:4]}...{values[i][-1]}, "
                       f"want {want[i][:4]}...{want[i][-1]} ({bad.size} of {b} rows wrong)")
    if not full:  # pragma: no cover - the edges differ only where the rows do
        raise BadReply("the first or last column of some row is wrong, yet every row is right")


# -- servers: targets of spawn-context processes -------------------------------------


def serve_grpc_table(port: int, rows: int, dim: int, ready: Any, stop: Any, *, threads: int = 2) -> None:
    """Serve an ``EmbeddingTable`` of keys ``0..rows-1`` over grpcio unary on 127.0.0.1:port.

    The table is what our own server holds (float32, plain SGD, huge pages);
    the reply is our FIND reply's payload: (B, D) float32 values, then (B,) bool found.

    Args:
        port: TCP port on 127.0.0.1 (it must be free: port reuse is off).
        rows, dim: keys ``0..rows-1`` with ``fill_values`` rows of width ``dim``.
        ready, stop: ``multiprocessing`` Events of the spawn context: ``ready`` is
            set once it answers; it returns once ``stop`` is set (or its parent died).
        threads: gRPC handler threads; ``find`` releases the GIL, so two use both cores.
    """
    from streamrec import EmbeddingTable

    table = EmbeddingTable(dim=dim, dtype="float32", capacity=rows, optimizer=None)
    fill_table(table, rows)
    table.find(np.arange(min(rows, 16), dtype=np.uint64))  # compile or load the kernel before timing

    def find(request: bytes, context: Any) -> bytes:
        values, found = table.find(np.frombuffer(request, dtype="<u8"))
        return b"".join((values.data, found.data))

    _serve(port, find, ready, stop, threads)


def serve_conventional(port: int, rows: int, dim: int, ready: Any, stop: Any, *, threads: int = 2) -> None:
    """Serve a Python dict of key -> row over a numpy array, with ``serve_grpc_table``'s method and payload.

    What a team writes first: ``dict.get`` per key (absent: -1), then numpy
    fancy indexing, zero rows where absent. The dict holds the GIL, so
    ``threads`` beyond one mostly overlap gRPC's own work with the lookups.

    Args: as ``serve_grpc_table``.
    """
    index = dict(zip(range(rows), range(rows), strict=True))
    matrix = np.empty((rows, dim), dtype=np.float32)
    for lo in range(0, rows, _FILL_BATCH):
        hi = min(lo + _FILL_BATCH, rows)
        matrix[lo:hi] = fill_values(np.arange(lo, hi, dtype=np.uint64), dim)
    absent = [-1]

    def find(request: bytes, context: Any) -> bytes:
        keys = np.frombuffer(request, dtype="<u8")
        n = keys.shape[0]
        idx = np.fromiter(map(index.get, keys.tolist(), absent * n), dtype=np.int64, count=n)
        found = idx >= 0
        values = matrix[idx]
        if not found.all():
            values[~found] = 0
        return b"".join((values.data, found.data))

    _serve(port, find, ready, stop, threads)


def _serve(port: int, fn: Callable[[bytes, Any], bytes], ready: Any, stop: Any, threads: int) -> None:
    import grpc

    # No serializers: requests and replies stay bytes, as in a hand-written service without protoc.
    methods = {_METHOD: grpc.unary_unary_rpc_method_handler(fn)}
    handler = grpc.method_handlers_generic_handler(_SERVICE, methods)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads),
                         options=[*_GRPC_OPTIONS, ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    ready.set()
    parent = os.getppid()
    # A benchmark killed mid-run never sets ``stop``; a changed parent means it is gone.
    while not stop.wait(0.2) and os.getppid() == parent:
        pass
    server.stop(grace=1.0).wait()


@dataclass(frozen=True)
class Served:
    """A server process started by ``served``: where it listens and its pid (for CPU time)."""

    address: str
    pid: int


@contextmanager
def served(target: Callable[..., None], rows: int, dim: int, *, threads: int = 2,
           start_timeout_s: float = 600.0) -> Iterator[Served]:
    """Run a server target (``serve_grpc_table``, ``serve_conventional``) in a spawn process.

    Yields once it answers; stops it on exit.

    Raises:
        RuntimeError: the process died or was not ready within ``start_timeout_s``.
    """
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    port = _free_port()
    proc = ctx.Process(target=target, args=(port, rows, dim, ready, stop), kwargs={"threads": threads},
                       name=f"{getattr(target, '__name__', 'server')}:{port}", daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not ready.wait(0.1):
            if not proc.is_alive():
                raise RuntimeError(f"{proc.name} exited with code {proc.exitcode} before serving")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name} was not serving after {start_timeout_s:.0f} s")
        assert proc.pid is not None
        yield Served(f"127.0.0.1:{port}", proc.pid)
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


# -- clients -------------------------------------------------------------------------


class GrpcFindClient:
    """A client of ``FIND_METHOD`` on one server (``serve_grpc_table``, ``serve_conventional``).

    Shape contract: ``find`` takes (B,) uint64 keys, B >= 1, and returns (B, D)
    float32 values (zeros where absent) and a (B,) bool mask, both read-only
    views of the reply; D is read from the reply's length.

    Raises (from ``find``):
        ConnectionError: the call failed (carries the gRPC status).
        BadReply: the reply's length does not fit B keys.

    Thread safety: one thread at a time.
    """

    def __init__(self, address: str, *, connect_timeout_s: float = 30.0) -> None:
        import grpc

        self._grpc = grpc
        self._channel = grpc.insecure_channel(address, options=_GRPC_OPTIONS)
        grpc.channel_ready_future(self._channel).result(timeout=connect_timeout_s)
        self._call = self._channel.unary_unary(FIND_METHOD)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = np.ascontiguousarray(keys, dtype="<u8")
        b = k.shape[0]
        if k.ndim != 1 or b == 0:
            raise ValueError(f"keys must be a non-empty (B,) array, got shape {k.shape}")
        try:
            reply: bytes = self._call(k.tobytes())
        except self._grpc.RpcError as exc:
            raise ConnectionError(f"{FIND_METHOD} failed: {exc.code()} {exc.details()}") from exc
        body = len(reply) - b
        if body < 0 or body % (4 * b):
            raise BadReply(f"{len(reply)} reply bytes do not fit {b} keys")
        dim = body // (4 * b)
        values = np.frombuffer(reply, dtype=np.float32, count=b * dim).reshape(b, dim)
        found = np.frombuffer(reply, dtype=np.bool_, count=b, offset=b * dim * 4)
        return values, found

    def close(self) -> None:
        self._channel.close()


def redis_key_names(keys: np.ndarray) -> list[bytes]:
    """Redis key names of ``keys``: their 8 little-endian bytes.

    numpy drops trailing zero bytes (key 0 is ``b""``), which still gives one
    name per key. The cheapest names a client can make: decimal formatting
    would charge Redis ~0.45 ms per 4096 keys of client CPU for nothing.
    """
    return list(np.ascontiguousarray(keys, dtype="<u8").view("S8").tolist())


def load_redis(client: Any, rows: int, dim: int, *, batch: int = 10_000, per_pipeline: int = 8,
               progress: Callable[[int], None] | None = None) -> None:
    """Store keys ``0..rows-1`` with their ``fill_values`` rows (D float32 = 4*D bytes each).

    MSETs of ``batch`` keys, ``per_pipeline`` of them per round trip. About
    3-5 s per million rows on the 2-core dev VM, half of it redis-py packing
    commands: show progress for the issue's 5 M.

    Args:
        client: a ``redis.Redis``.
        progress: called with the number of rows stored so far.
    """
    width = dim * 4
    pipe = client.pipeline(transaction=False)
    queued = 0
    for lo in range(0, rows, batch):
        keys = np.arange(lo, min(lo + batch, rows), dtype=np.uint64)
        raw = fill_values(keys, dim).tobytes()
        pipe.mset({name: raw[i * width:(i + 1) * width] for i, name in enumerate(redis_key_names(keys))})
        queued += 1
        if queued == per_pipeline or lo + batch >= rows:
            pipe.execute()
            queued = 0
            if progress is not None:
                progress(min(lo + batch, rows))


def redis_pid(client: Any) -> int:
    """The redis-server's pid (from ``INFO server``), to read its CPU time."""
    return int(client.info("server")["process_id"])


class RedisFindClient:
    """``find`` as ``MGET`` of the keys' rows stored by ``load_redis``, through redis-py and hiredis.

    Shape contract: (B,) uint64 keys -> (B, D) float32 values (zeros where
    absent) and (B,) bool found; values are a read-only view when all are found.

    Raises:
        RuntimeError: hiredis is not installed (redis-py's pure-Python parser
            would make Redis look slower than it is).

    Thread safety: one thread at a time.
    """

    def __init__(self, port: int, dim: int = 64, *, host: str = "127.0.0.1") -> None:
        import redis
        from redis.utils import HIREDIS_AVAILABLE

        if not HIREDIS_AVAILABLE:
            raise RuntimeError("hiredis is not installed; the Redis baseline needs it (pip install hiredis)")
        self._dim = dim
        self._zero = bytes(4 * dim)
        self._client = redis.Redis(host=host, port=port, socket_timeout=60)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        got: list[bytes | None] = self._client.mget(redis_key_names(keys))  # type: ignore[assignment]
        b = len(got)
        if None in got:
            found = np.fromiter((v is not None for v in got), dtype=np.bool_, count=b)
            raw = b"".join(self._zero if v is None else v for v in got)
        else:  # the common case: join the list as MGET returned it, no per-key Python
            found = np.ones(b, dtype=np.bool_)
            raw = b"".join(got)  # type: ignore[arg-type]
        values = np.frombuffer(raw, dtype=np.float32)
        if values.shape[0] != b * self._dim:
            raise BadReply(f"MGET returned {values.nbytes} value bytes for {b} keys of dim {self._dim}")
        return values.reshape(b, self._dim), found

    def close(self) -> None:
        self._client.close()


# -- the load driver -----------------------------------------------------------------


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # Fields after the parenthesised command name (which may hold spaces); utime, stime are 14, 15.
    fields = stat[stat.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class LoadResult:
    """What ``run_clients`` measured over one window, all client processes together.

    Attributes:
        clients, batch: processes and keys per call.
        seconds: the timed window (mean over processes).
        calls: round trips completed in it.
        round_trips_per_s, keys_per_s: sums of the processes' rates.
        p50_ms, p99_ms: latency percentiles over every call of every process.
        client_cpu_s: CPU seconds of each client process over its window.
        server_cpu_s: CPU seconds of the ``server_pids`` over the window (None: none given).
        check_s: seconds the processes spent checking replies inside their windows (summed).
        full_checks: timed calls whose every element was checked (the rest: shapes, mask, edges).
        by_transport: requests answered per transport over the windows, all processes
            together (None: the client does not report them).
    """

    clients: int
    batch: int
    seconds: float
    calls: int
    round_trips_per_s: float
    keys_per_s: float
    p50_ms: float
    p99_ms: float
    client_cpu_s: tuple[float, ...]
    server_cpu_s: float | None
    check_s: float = 0.0
    full_checks: int = 0
    by_transport: dict[str, int] | None = None

    @property
    def client_cpu_s_per_million_keys(self) -> float:
        return sum(self.client_cpu_s) / (self.calls * self.batch / 1e6)

    @property
    def server_cpu_s_per_million_keys(self) -> float | None:
        if self.server_cpu_s is None:
            return None
        return self.server_cpu_s / (self.calls * self.batch / 1e6)


def run_clients(make_client: Callable[[], FindClient], *, clients: int, seconds: float, keys: int,
                batch: int = 4096, seed: int = 0, warmup_s: float = 0.3,
                check: Callable[..., None] | None = check_reply, server_pids: tuple[int, ...] = (),
                setup_timeout_s: float = 120.0, inline: bool = False) -> LoadResult:
    """Drive ``clients`` processes, each calling ``find`` on uniform random keys for ``seconds``.

    Each process builds its own client with ``make_client()``, warms up for
    ``warmup_s`` (at least 3 calls, each checked in full), then all start their
    window together. Inside it, every call is checked with ``check(..., full=False)``
    and every 64th with ``full=True``, outside the latency clock (see the module
    docstring); the time the checks take is returned as ``check_s``.

    Args:
        make_client: picklable (module-level or ``functools.partial``); runs in the worker.
        keys: the key space: keys are drawn uniformly from ``0..keys-1``.
        seed: worker i draws from ``np.random.default_rng(seed + i)``.
        check: ``check(keys, values, found, full=...)``; None skips checks
            (for key spaces larger than what was filled).
        server_pids: processes whose CPU time is read at the window's start and end.
        inline: run the one client (``clients`` must be 1) in this process instead
            of a spawned one: the same loop and checks, without a process start
            (smoke runs); ``make_client`` then runs here.

    Raises:
        RuntimeError: a worker failed (its traceback is in the message) or hung.
        ValueError: ``inline`` with more than one client.
        BadReply: ``inline``, and a reply was wrong.
    """
    if inline:
        if clients != 1:
            raise ValueError(f"inline runs one client, not {clients}")
        cpu: list[float] = []
        window_start = threading.Barrier(1, action=lambda: cpu.append(
            sum(server_cpu_seconds(pid) for pid in server_pids)))
        inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        _client_worker(make_client, seconds, keys, batch, seed, warmup_s, check, window_start, inbox)
        cpu.append(sum(server_cpu_seconds(pid) for pid in server_pids))
        return _result([inbox.get_nowait()], clients, batch, (cpu[1] - cpu[0]) if server_pids else None)
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(clients + 1)
    results: Any = ctx.Queue()
    procs = [
        ctx.Process(target=_client_worker, name=f"load-client-{i}", daemon=True,
                    args=(make_client, seconds, keys, batch, seed + i, warmup_s, check, start, results))
        for i in range(clients)
    ]
    for p in procs:
        p.start()
    try:
        try:
            start.wait(timeout=setup_timeout_s)
        except threading.BrokenBarrierError:
            got = _collect(results, procs, 10.0)
            errors = [r["error"] for r in got if "error" in r]
            raise RuntimeError("a load client failed before its window:\n" + "\n".join(errors)) from None
        cpu0 = sum(server_cpu_seconds(pid) for pid in server_pids)
        time.sleep(seconds)
        cpu1 = sum(server_cpu_seconds(pid) for pid in server_pids)
        got = _collect(results, procs, seconds + 60.0)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [r["error"] for r in got if "error" in r]
    if errors or len(got) < clients:
        raise RuntimeError(f"{len(errors)} load clients failed, {clients - len(got)} sent nothing:\n"
                           + "\n".join(errors))
    return _result(got, clients, batch, (cpu1 - cpu0) if server_pids else None)


def _result(got: list[dict[str, Any]], clients: int, batch: int, server_cpu_s: float | None) -> LoadResult:
    """One ``LoadResult`` from the workers' result dicts."""
    lat = np.concatenate([r["latencies"] for r in got])
    calls = int(lat.size)
    by_transport: dict[str, int] | None = None
    if all(r["by_transport"] is not None for r in got):
        by_transport = {}
        for r in got:
            for name, count in r["by_transport"].items():
                by_transport[name] = by_transport.get(name, 0) + count
    rt = sum(r["latencies"].size / r["elapsed"] for r in got)
    return LoadResult(
        clients=clients, batch=batch, seconds=float(np.mean([r["elapsed"] for r in got])), calls=calls,
        round_trips_per_s=rt, keys_per_s=rt * batch,
        p50_ms=float(np.percentile(lat, 50) * 1e3), p99_ms=float(np.percentile(lat, 99) * 1e3),
        client_cpu_s=tuple(r["cpu"] for r in got),
        server_cpu_s=server_cpu_s,
        check_s=sum(r["check_s"] for r in got), full_checks=sum(r["full_checks"] for r in got),
        by_transport=by_transport,
    )


def _collect(results: Any, procs: list[Any], timeout_s: float) -> list[dict[str, Any]]:
    """Every worker's result dict, waiting at most ``timeout_s`` or until all have exited."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < len(procs) and time.monotonic() < deadline:
        try:
            got.append(results.get(timeout=0.2))
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
    return got


def _client_worker(make_client: Callable[[], FindClient], seconds: float, key_space: int, batch: int,
                   seed: int, warmup_s: float, check: Callable[..., None] | None, start: Any,
                   results: Any) -> None:
    try:
        rng = np.random.default_rng(seed)
        client = make_client()
        try:
            t0 = time.perf_counter()
            calls = 0
            while calls < 3 or time.perf_counter() - t0 < warmup_s:
                k = rng.integers(0, key_space, batch, dtype=np.uint64)
                values, found = client.find(k)
                if check is not None:
                    check(k, values, found)
                calls += 1
            start.wait()
            counts = getattr(client, "transport_counts", lambda: None)
            before = counts()
            latencies: list[float] = []
            check_s = 0.0
            full_checks = 0
            cpu0 = time.process_time()
            t_start = now = time.perf_counter()
            while now - t_start < seconds:
                # Keys are drawn outside the latency clock; a real caller has them already.
                k = rng.integers(0, key_space, batch, dtype=np.uint64)
                t = time.perf_counter()
                values, found = client.find(k)
                now = time.perf_counter()
                latencies.append(now - t)
                if check is not None:
                    full = len(latencies) % _CHECK_EVERY == 0
                    check(k, values, found, full=full)
                    full_checks += full
                    check_s += time.perf_counter() - now
                    now = time.perf_counter()
            elapsed = time.perf_counter() - t_start
            cpu = time.process_time() - cpu0
            after = counts()
        finally:
            client.close()
        window = None
        if before is not None and after is not None:
            window = {name: n - before.get(name, 0) for name, n in after.items() if n != before.get(name, 0)}
        results.put({"latencies": np.asarray(latencies), "elapsed": elapsed, "cpu": cpu, "check_s": check_s,
                     "full_checks": full_checks, "by_transport": window})
    except BaseException as exc:
        start.abort()  # release the driver and the other workers instead of leaving them at the barrier
        results.put({"error": f"pid {os.getpid()}: {exc!r}\n{traceback.format_exc()}"})
        raise
