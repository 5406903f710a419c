"""The parameter-server client: sharded, replicated lookups and updates.

Owns: ``PSClient``, the API training and serving processes use, and the call
engine under it: deduplicate keys, split them by shard, send every shard's
request before waiting for any, and put the answers back in the caller's
order; pick a replica per shard by locality and score (``cluster.router``); on
any failure or timeout try the node's next transport, then the next replica,
so the caller sees one answer or one error. For a read, a kept TCP connection
found broken before a frame left on it (its node restarted since it was last
used) is replaced once before its transport counts as failed; a read whose replicas
all failed tries, for real, the transports it passed over for having failed a
moment ago, since the only ready replica may be one of those. It must not
interpret table contents (the service does) or encode bytes (the transports do).

Reads go to one replica of each shard (hedged to a second when hedging is on);
writes go to every replica of each shard that is up, ready or filling. A write
is acknowledged once every ready replica that answered applied it, and at least
one ready replica of every shard did; a write that reached no ready replica of
some shard fails (it may still have been applied on some replicas). A retried
write carries the same request id on every transport and replica, so a replica
applies it once. Each write also carries this client's sequence number for its
shard, so a replica that missed one (it was paused, or unreachable while its
peer acknowledged) sees the gap on the next and refills from its peer
(``ps.service``). ``assign`` returns a ``WriteAck`` naming the replicas that
did not confirm; ``failed_replica_writes`` counts them.

Strong tables (``ClusterSpec.mode`` "strong"): a write goes to the shard's
leader only, as one call per shard; the client caches each group's leader,
follows a ``NOT_LEADER`` reply to the node it names, and while no leader
answers (an election, a dead or paused leader) tries the group again every
50 ms until the call's deadline, under the same request id and sequence
number, so a batch committed by an attempt whose reply was lost applies once.
The write is acknowledged when the leader replies (a majority committed it).
``find(..., consistency="linearizable")`` goes to the leader the same way;
plain reads go to any replica within the table's staleness bound.

Without a spec the client is the embedded default: it hosts the embedded
spec's shards in its own process and calls them through the same engine.

Thread safety: a client is used by one thread at a time (its connections are
single-threaded); give each thread its own client.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from streamrec.cluster.router import Place, Router, RouterConfig
from streamrec.cluster.spec import ClusterSpec, embedded_spec
from streamrec.errors import (
    DeadlineExceeded,
    NonFiniteValues,
    PeerUnavailable,
    RemoteError,
    StoreError,
    TransportError,
)
from streamrec.ps._plan import Plan, make_plan, sum_rows
from streamrec.ps._strong import LINEARIZABLE
from streamrec.ps.channel import PREFERENCE, NodeLink
from streamrec.ps.service import EXPORT_EXPIRY, FILLING, MAX_KEYS, SEQ_MOD, Service
from streamrec.transport.base import Connection
from streamrec.transport.frames import Flag, Frame, Kind, Status

__all__ = ["ClientStats", "PSClient", "WriteAck"]

_ATTEMPT_S = 0.5  # one attempt's patience before the next transport or replica is tried
_SLICE_S = 0.02  # longest wait for replies between two checks of attempt timeouts and hedges
_FEW_REPEATS = 64  # a one-shard read with at most 1/64 repeated keys is sent as it is (see find)
_RECHECK = 16  # calls between two measurements of a one-shard table's repeats
_LEADER_RETRY_S = 0.05  # strong mode: pause before asking a group again while it has no leader
_REDIRECTS = 4  # NOT_LEADER redirects one attempt round follows (two stale members could point at each other)


@dataclass
class ClientStats:
    """What the client did: calls, retries, and failures the caller saw."""

    calls: int = 0
    requests: int = 0
    retried_calls: int = 0  # calls that needed at least one retry (other transport or replica)
    retries: int = 0
    failed_calls: int = 0
    hedged: int = 0
    failed_replica_writes: int = 0
    by_transport: dict[str, int] = field(default_factory=dict)  # requests answered OK, per transport
    by_node: dict[str, int] = field(default_factory=dict)  # requests answered OK, per node


@dataclass(frozen=True)
class WriteAck:
    """What a write reached.

    Attributes:
        ready_replicas: the fewest ready replicas that applied it, over the shards it touched.
        missed: replicas (node names) that did not confirm it: down, paused, or too
            slow. Each refills from its peer before it serves again (it is not ready,
            or sees the gap in this client's sequence on its next write).

    Strong tables: ``ready_replicas`` is the group's majority (the leader replied
    once that many members committed the batch) and ``missed`` is empty: the
    log brings every other member the batch.
    """

    ready_replicas: int
    missed: tuple[str, ...] = ()


@dataclass(slots=True)
class _Call:
    """One shard request: to one replica at a time (reads) or one fixed replica (writes)."""

    frame: Frame
    candidates: list[str]  # nodes still to try, best first
    read: bool
    node: str = ""
    transports: list[str] = field(default_factory=list)
    transport: str = ""
    conn: Connection | None = None
    sent_at: float = 0.0
    reply: Frame | None = None
    error: Exception | None = None  # set on the primary when the call failed for good
    last_error: Exception | None = None
    terminal: bool = False  # this call (primary or hedge) has no attempt left
    in_node: bool = False  # the router counts this call in flight at ``node``
    node_started: float = 0.0
    retried: bool = False
    passed: list[str] = field(default_factory=list)  # a read's nodes left with transports held back
    forced: bool = False  # a read back at its passed nodes, trying their held-back transports for real
    reconnected: bool = False  # a kept TCP connection to this node, found broken, was replaced
    hedge: _Call | None = None
    primary: _Call | None = None
    group: list[_Call] | None = None  # a write: the calls to every replica of its shard
    redirects: int = 0  # NOT_LEADER replies followed (strong mode)
    strong: bool = False  # to a strong shard's leader: a silent last candidate ends the round

    @property
    def done(self) -> bool:
        return self.reply is not None or self.error is not None


_Pending = dict[int, list[_Call]]  # request id -> calls in flight with it (writes: one per replica)


class PSClient:
    """Look up and update sharded, replicated embedding tables.

    Args:
        spec: the cluster to talk to; None for the embedded default (shards
            hosted in this process, no servers).
        local: where this client runs (zone and pod), or the name of the node it
            runs beside; used to prefer near replicas.
        transports: transports this client may use, from
            ``("one_sided", "shm", "rdma", "tcp")``.
        router: routing and breaker settings.
        timeout_s: a call's deadline; default the spec's ``request_timeout_s``.

    Shapes: B keys (any integer dtype, duplicates allowed), D the table's dim.

    Example::

        ps = PSClient()                        # embedded: no servers
        ps.assign("emb", keys, rows)
        values, found = ps.find("emb", keys)   # (B, D), (B,)
    """

    def __init__(self, spec: ClusterSpec | None = None, *, local: Place | str | None = None,
                 transports: tuple[str, ...] = PREFERENCE, router: RouterConfig | None = None,
                 timeout_s: float | None = None, seed: int | None = None) -> None:
        bad = [t for t in transports if t not in PREFERENCE]
        if bad or not transports:
            raise ValueError(f"transports: expected a non-empty subset of {PREFERENCE}, got {transports!r}")
        self._embedded = spec is None
        self.spec = spec if spec is not None else embedded_spec()
        self.timeout_s = float(timeout_s if timeout_s is not None else self.spec.request_timeout_s)
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: expected > 0, got {timeout_s!r}")
        if isinstance(local, str):
            n = self.spec.node(local)
            local = Place(n.zone, n.pod)
        self.router = Router({n.name: Place(n.zone, n.pod) for n in self.spec.nodes}, local,
                             router or RouterConfig(), rng=random.Random(seed))
        self._services: list[Service] = []
        self.links: dict[str, NodeLink] = {}
        for n in self.spec.nodes:
            handler = None
            if self._embedded:
                svc = Service(self.spec, n.name)
                self._services.append(svc)
                handler = svc.handle
            self.links[n.name] = NodeLink(self.spec, n, allowed=transports, handler=handler,
                                          timeout_s=min(self.timeout_s, 1.0))
        self.stats = ClientStats()
        # ids unique across clients and restarts: a random 32-bit prefix and a counter
        self._ids = itertools.count((random.SystemRandom().getrandbits(31) << 32) | 1)
        self._poller = zmq.Poller()
        self._registered: set[Any] = set()
        self._few_repeats: dict[int, tuple[int, bool]] = {}  # table -> (calls until re-measured, few?)
        self._seqs: dict[tuple[int, int], int] = {}  # (table, shard) -> the last write's sequence number
        self.leaders: dict[tuple[int, int], str] = {}  # strong (table, shard) -> its leader, as last heard
        self.last_ack = WriteAck(0)  # what the last write reached

    # -- public API ------------------------------------------------------------------------

    def find(self, table: str, keys: Any, *, node: str | None = None,
             consistency: str = "bounded") -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``keys``: ``(values (B, D), found (B,))``, zeros where absent.

        ``node``: read from that node's replicas only, with no failover (to verify
        replicas one by one, read-only serving replicas included); every shard the
        keys fall in must have one there.
        ``consistency``: ``"bounded"`` (default): any ready replica; on a strong
        table one within the table's ``max_staleness_s``. ``"linearizable"``
        (strong tables only): the leader answers after a barrier commits, so
        the read sees every write acknowledged before it was called.

        Raises:
            DeadlineExceeded, PeerUnavailable: no replica of some shard answered in time.
            RemoteError: a replica refused the request (bad input, table full).
        """
        t, spec = self.spec.table(table)
        k = _keys(keys)
        b = k.shape[0]
        plan: Plan | None = None
        if consistency not in ("bounded", "linearizable"):
            raise ValueError(f"consistency: expected 'bounded' or 'linearizable', got {consistency!r}")
        strict = consistency == "linearizable"
        if strict and (self.spec.mode(t) != "strong" or node is not None):
            raise ValueError(f"consistency='linearizable' needs a strong table and no node (table {table!r} "
                             f"is {self.spec.mode(t)})")
        if node is not None:
            self.spec.node(node)  # a ConfigError for an unknown name
        if spec.shards == 1 and b and node is None and not strict:
            # One shard: when a table's reads carry few repeats, asking for the keys as given
            # costs a few rows on the wire and saves the planning and the gather: the reply's
            # rows are in the caller's order and are returned as they arrived (measured: about
            # +7 % keys/s at saturation on uniform keys). Whether they do is re-measured with a
            # full plan every _RECHECK calls; a wrong guess costs bytes, never correctness.
            left, few = self._few_repeats.get(t, (0, False))
            if left == 0:
                plan = self._plan(t, k)
                few = (b - plan.keys.shape[0]) * _FEW_REPEATS <= b
            self._few_repeats[t] = (left - 1 if left else _RECHECK, few)
            if few:
                one = np.array([0, b], np.int64)
                ((sl, reply),) = self._fan_out(Kind.FIND, t, one, lambda sl: [k], read=True)
                got, got_found = _checked(reply, 2, sl, spec.config.dim, np.dtype(spec.config.dtype))
                return (got.copy(), got_found.copy()) if reply.borrowed else (got, got_found)
        if plan is None:
            plan = self._plan(t, k)
        values = np.empty((b, spec.config.dim), dtype=np.dtype(spec.config.dtype))
        found = np.empty(b, dtype=np.bool_)
        for sl, reply in self._fan_out(Kind.FIND, t, plan.bounds, lambda sl: [plan.keys[sl]], read=not strict,
                                       node=node, aux=LINEARIZABLE if strict else 0):
            got, got_found = _checked(reply, 2, sl, spec.config.dim, values.dtype)
            plan.scatter(sl, got, got_found, values, found)
        return values, found

    def find_or_insert(self, table: str, keys: Any) -> np.ndarray:
        """Rows of ``keys`` (B, D), creating absent ones from the table's initializer on every replica."""
        t, spec = self.spec.table(table)
        plan = self._plan(t, _keys(keys))
        values = np.empty((plan.inverse.shape[0], spec.config.dim), dtype=np.dtype(spec.config.dtype))
        for sl, reply in self._fan_out(Kind.FIND_OR_INSERT, t, plan.bounds, lambda sl: [plan.keys[sl]],
                                       read=False):
            plan.scatter(sl, _checked(reply, 1, sl, spec.config.dim, values.dtype)[0], None, values, None)
        return values

    def assign(self, table: str, keys: Any, values: Any, *, only_existing: bool = False) -> WriteAck:
        """Write ``values`` (B, D) to ``keys`` on every replica (inserting absent keys
        unless ``only_existing``). Of a key repeated in the batch, the last value wins.

        Returns: which replicas confirmed it (see ``WriteAck``).

        Raises:
            PeerUnavailable, DeadlineExceeded: no ready replica of some shard applied it.
            RemoteError: a replica refused it (bad input, table full).
            NonFiniteValues: a shard's table (policy "raise") refused NaN or inf
                values; that shard wrote nothing (others may have written theirs).
        """
        t, spec = self.spec.table(table)
        plan = self._plan(t, _keys(keys))
        v = np.asarray(values)
        if v.shape != (plan.inverse.shape[0], spec.config.dim):
            raise ValueError(f"values: expected ({plan.inverse.shape[0]}, {spec.config.dim}), got {v.shape}")
        vals = np.ascontiguousarray(np.take(v, plan.last, axis=0), dtype=np.dtype(spec.config.dtype))
        self._fan_out(Kind.ASSIGN, t, plan.bounds, lambda sl: [plan.keys[sl], vals[sl]], read=False,
                      aux=int(only_existing))
        return self.last_ack

    def apply_gradients(self, table: str, keys: Any, grads: Any, lr: float) -> np.ndarray:
        """One optimizer step on every replica; gradients of repeated keys are summed.

        Returns: (B,) mask of the keys found.

        Raises:
            NonFiniteValues: a shard's table (policy "raise") refused steps that
                would not be finite; that shard wrote nothing, but other shards
                of the call may have applied theirs (the check is per shard).
        """
        t, spec = self.spec.table(table)
        plan = self._plan(t, _keys(keys))
        g = np.ascontiguousarray(grads, dtype=np.float32 if spec.config.dtype == "float32" else np.float64)
        if g.shape != (plan.inverse.shape[0], spec.config.dim):
            raise ValueError(f"grads: expected ({plan.inverse.shape[0]}, {spec.config.dim}), got {g.shape}")
        real = isinstance(lr, (int, float, np.floating)) and not isinstance(lr, bool)
        if not (real and np.isfinite(lr) and lr > 0):
            raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")
        summed = sum_rows(g, plan)
        lr_buf = np.array([lr], dtype=np.float64)
        found = np.empty(plan.keys.shape[0], dtype=np.bool_)
        for sl, reply in self._fan_out(Kind.APPLY_GRADIENTS, t, plan.bounds,
                                       lambda sl: [plan.keys[sl], summed[sl], lr_buf], read=False):
            found[sl] = reply.buffers[0]
        return found[plan.inverse]

    def erase(self, table: str, keys: Any) -> int:
        """Remove ``keys`` from every replica; the number of distinct keys that were present."""
        t, _ = self.spec.table(table)
        plan = self._plan(t, _keys(keys))
        replies = self._fan_out(Kind.ERASE, t, plan.bounds, lambda sl: [plan.keys[sl]], read=False)
        return int(sum(int(r.buffers[0][0]) for _, r in replies))

    def export(self, table: str, node: str, *, chunk_rows: int = 32_768
               ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Every row of ``node``'s replicas of ``table``, read from that node alone (no
        failover), for verification and operations (``streamrec ps dump``).

        Yields ``(shard, keys (n,), values (n, D + state), expires_at (n,) int64)``
        chunks; ``expires_at`` is 0 for rows that never expire. A row written while
        the export runs may appear once, or not at all.

        Raises:
            ConfigError: unknown table or node.
            RemoteError: the replica is not ready (filling), or refused.
            TransportError: the node did not answer.
        """
        t, spec = self.spec.table(table)
        self.spec.node(node)
        rows = np.array([min(max(int(chunk_rows), 1), 1 << 16)], np.int64)
        for s in range(spec.shards):
            if node not in self.spec.replicas(t, s) and node not in spec.serving:
                continue
            start = 0
            while start >= 0:
                reply = self._one(node, Frame(Kind.EXPORT, [np.array([start], np.int64), rows], table=t,
                                              shard=s, aux=EXPORT_EXPIRY))
                keys, values, nxt, expires_at = reply.buffers
                if keys.size:
                    yield s, keys.copy(), values.copy(), expires_at.copy()
                start = int(nxt[0])

    def node_stats(self) -> dict[str, Any]:
        """Each node's STATS reply (None for nodes that did not answer)."""
        out: dict[str, Any] = {}
        for name in self.links:
            try:
                reply = self._one(name, Frame(Kind.STATS))
                out[name] = json.loads(reply.text())
            except TransportError:
                out[name] = None
        return out

    def snapshot(self) -> dict[str, Any]:
        """Ask every node to snapshot its replicas; each node's answer."""
        return {name: json.loads(self._one(name, Frame(Kind.SNAPSHOT), timeout_s=600.0).text())
                for name in self.links}

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        for svc in self._services:
            svc.close()

    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- splitting and joining ----------------------------------------------------------------

    def _plan(self, t: int, keys: np.ndarray) -> Plan:
        """Plan checked keys (``_keys``) for table ``t``'s shards."""
        nshards = self.spec.tables[t].shards
        return make_plan(keys, nshards, lambda u: self.spec.shard_of(t, u))

    def _fan_out(self, kind: Kind, t: int, bounds: np.ndarray, bufs: Callable[[slice], list[np.ndarray]],
                 *, read: bool, aux: int = 0, node: str | None = None) -> list[tuple[slice, Frame]]:
        """One call per shard (reads) or shard replica (writes); (slice of the keys, reply) per shard.

        Shard s's keys are ``bounds[s]:bounds[s + 1]`` of the keys sent (a plan's, or the
        caller's as given); ``bufs(sl)`` builds the request buffers for one shard's slice.
        ``node``: a read from that node only.
        """
        groups: list[tuple[slice, list[_Call]]] = []
        strong = self.spec.mode(t) == "strong"
        for s in range(self.spec.tables[t].shards):
            sl = slice(int(bounds[s]), int(bounds[s + 1]))
            if sl.start == sl.stop:
                continue
            replicas = self.spec.replicas(t, s)
            if read:
                if node is not None and node not in replicas and node not in self.spec.tables[t].serving:
                    raise ValueError(f"node {node!r} holds no replica of table {t} shard {s}")
                frame = Frame(kind, bufs(sl), request_id=next(self._ids), table=t, shard=s, aux=aux)
                calls = [_Call(frame, [node] if node is not None else self.router.order(replicas), read=True)]
            elif strong and kind == Kind.FIND:  # linearizable: the leader, as a write goes
                frame = Frame(kind, bufs(sl), request_id=next(self._ids), table=t, shard=s, aux=aux)
                calls = [_Call(frame, self._leader_first(t, s), read=False, strong=True)]
            else:  # every replica gets the same id, so a retried write applies once per replica
                seq = self._seqs.get((t, s), 0) % (SEQ_MOD - 1) + 1  # 1 .. SEQ_MOD - 1: 0 means none
                self._seqs[(t, s)] = seq
                frame = Frame(kind, bufs(sl), request_id=next(self._ids), table=t, shard=s,
                              aux=aux | seq << 1)
                if strong:  # one call, to the leader: the group's log replicates it
                    groups.append((sl, [_Call(frame, self._leader_first(t, s), read=False, strong=True)]))
                    continue
                calls = [_Call(frame, [n], read=False) for n in replicas]
                for c in calls:
                    c.group = calls
            groups.append((sl, calls))
        self.stats.calls += 1
        if strong and not read:
            return self._run_strong(t, groups)
        self._run([c for _, cs in groups for c in cs])
        out = []
        fewest, missed = len(self.spec.nodes), []
        for sl, calls in groups:
            ok = [c.reply for c in calls if c.reply is not None]
            ready = [r for r in ok if read or not r.aux & FILLING]
            if not ready:
                self.stats.failed_calls += 1
                raise next((c.error for c in calls if c.error is not None and not _retriable(c.error)),
                           next((c.error for c in calls if c.error is not None), PeerUnavailable(
                               f"no ready replica of table {t} shard {calls[0].frame.shard} applied it")))
            if not read:
                bad = next((c.error for c in calls if c.error is not None and not _retriable(c.error)), None)
                if bad is not None:  # a replica refused what another applied: the caller must know
                    self.stats.failed_calls += 1
                    raise bad
                fewest = min(fewest, len(ready))
                missed += [c.node for c in calls if c.reply is None]
                self.stats.failed_replica_writes += len(calls) - len(ok)
            out.append((sl, ready[0]))
        if not read:
            self.last_ack = WriteAck(fewest if groups else 0, tuple(missed))
        return out

    def _leader_first(self, t: int, s: int) -> list[str]:
        """A strong shard's replicas to try, the leader last heard of first."""
        order = self.router.order(self.spec.replicas(t, s))
        leader = self.leaders.get((t, s))
        return [leader, *(n for n in order if n != leader)] if leader in order else order

    def _run_strong(self, t: int, groups: list[tuple[slice, list[_Call]]]) -> list[tuple[slice, Frame]]:
        """Drive one call per shard of a strong table to its leader's reply, trying the group
        again while no member leads (same frame: the batch applies once), within the deadline."""
        deadline = time.monotonic() + self.timeout_s
        todo = [cs[0] for _, cs in groups]
        while True:
            self._run(todo, max(deadline - time.monotonic(), 1e-3))
            for c in todo:
                if c.reply is not None:
                    self.leaders[(t, c.frame.shard)] = c.node
            again = [c for c in todo if c.error is not None and _retriable(c.error)]
            if not again or time.monotonic() + _LEADER_RETRY_S >= deadline:
                break
            time.sleep(_LEADER_RETRY_S)
            for c in again:  # a fresh attempt round: every member is a candidate again
                c.error, c.terminal, c.conn, c.passed, c.forced = None, False, None, [], False
                c.candidates, c.transports, c.redirects = self._leader_first(t, c.frame.shard), [], 0
                c.frame.flags |= Flag.RETRY
            todo = again
        out = []
        for sl, (c,) in groups:
            if c.reply is None:
                self.stats.failed_calls += 1
                err = c.error or c.last_error or PeerUnavailable("no leader answered")
                if _retriable(err):
                    raise DeadlineExceeded(
                        f"table {t} shard {c.frame.shard}: no leader acknowledged it within "
                        f"{self.timeout_s:.3f} s (last: {err}); it may still commit",
                        deadline_s=self.timeout_s, peer=c.node, transport=c.transport) from err
                raise err
            out.append((sl, c.reply))
        if groups and groups[0][1][0].frame.kind != Kind.FIND:
            self.last_ack = WriteAck(len(self.spec.replicas(t, groups[0][1][0].frame.shard)) // 2 + 1)
        return out

    def _one(self, node: str, frame: Frame, timeout_s: float | None = None) -> Frame:
        frame.request_id = next(self._ids)
        call = _Call(frame, [node], read=False)
        self._run([call], timeout_s)
        if call.error is not None:
            raise call.error
        assert call.reply is not None
        return call.reply

    # -- the engine --------------------------------------------------------------------------
    #
    # A call moves through (node, transport) attempts: a failed transport sends it
    # to the node's next transport; a node with none left (or one that answered
    # with a retriable error) sends it to its next candidate node. A call settles
    # with a reply or, when every candidate failed, an error. A hedge is a second
    # call for the same read on another replica; the first reply settles both.

    def _run(self, calls: list[_Call], timeout_s: float | None = None) -> None:
        """Drive ``calls`` to a reply or an error each, within the deadline."""
        budget = timeout_s if timeout_s is not None else self.timeout_s
        deadline = time.monotonic() + budget
        attempt_s = min(max(_ATTEMPT_S, budget / 4), budget)  # a long budget (bulk loads) is patient
        pending: _Pending = {}
        one_sided: list[_Call] = []
        for c in calls:
            if not self._next_node(c, pending, one_sided, deadline):
                self._settle(c, None, c.last_error, pending)
        self._run_one_sided(one_sided, pending, deadline)
        hedge_after = self.router.hedge_delay()
        while any(not c.done for c in calls):
            now = time.monotonic()
            if now >= deadline:
                for c in [c for cs in pending.values() for c in cs] + one_sided:
                    self._leave(c, ok=False)
                for c in calls:
                    if not c.done:
                        c.error = DeadlineExceeded(f"no replica answered within {budget:.3f} s",
                                                   deadline_s=budget, peer=c.node, transport=c.transport)
                break
            live = [c for cs in pending.values() for c in cs if not c.terminal and c.conn is not None]
            conns = {id(c.conn): c.conn for c in live if c.conn is not None}
            wait = min(deadline - now, _SLICE_S)
            if hedge_after is not None:  # wake when the first unhedged read is due its hedge
                for c in live:
                    if c.read and c.primary is None and c.hedge is None and c.candidates:
                        wait = min(wait, max(c.sent_at + hedge_after - now, 0.0))
            if len(conns) == 1:  # the common read: wait in the connection's own receive, not a poll
                self._drain(next(iter(conns.values())), pending, one_sided, deadline, wait)
            else:
                self._poll(list(conns.values()), wait)
                for conn in conns.values():
                    self._drain(conn, pending, one_sided, deadline)
            now = time.monotonic()
            for c in [c for cs in pending.values() for c in cs]:
                if c.terminal or c.reply is not None or c.conn is None:
                    continue
                # Give up on an attempt early only when there is somewhere else to go;
                # the last option waits for the call's deadline (a slow reply beats none),
                # except a write's copy to a replica slower than its answered siblings: that
                # replica sees the gap in this client's sequence later and refills.
                answered = c.group is not None and any(x.reply is not None for x in c.group)
                if (now - c.sent_at > attempt_s and not c.read and not (c.transports or c.candidates)
                        and (c.strong or answered)):
                    self._leave(c, ok=False)
                    self._settle(c, None, DeadlineExceeded(
                        f"no reply in {attempt_s:.3f} s", deadline_s=attempt_s, peer=c.node,
                        transport=c.transport), pending)
                elif now - c.sent_at > attempt_s and (c.transports or c.candidates):
                    self._attempt_failed(c, DeadlineExceeded(
                        f"no reply in {attempt_s:.3f} s", deadline_s=attempt_s, peer=c.node,
                        transport=c.transport), pending, one_sided, deadline)
                elif (hedge_after is not None and c.read and c.primary is None and c.hedge is None
                      and c.candidates and now - c.sent_at > hedge_after):
                    self._hedge(c, pending, one_sided, deadline)
            self._run_one_sided(one_sided, pending, deadline)

    def _poll(self, conns: list[Connection], timeout_s: float) -> None:
        want = {c.pollable for c in conns}
        for p in self._registered - want:
            self._poller.unregister(p)
        for p in want - self._registered:
            self._poller.register(p, zmq.POLLIN)
        self._registered = want
        if want:
            self._poller.poll(max(0, int(timeout_s * 1000)))
        elif timeout_s > 0:
            time.sleep(min(timeout_s, 0.001))

    def _drain(self, conn: Connection, pending: _Pending, one_sided: list[_Call],
               deadline: float, wait: float = 0.0) -> None:
        """Take every reply ``conn`` holds, the first waiting at most ``wait`` seconds."""
        while True:
            try:
                reply = conn.recv(wait)
                wait = 0.0
            except TransportError as exc:
                for c in [c for cs in pending.values() for c in cs]:
                    if c.conn is conn:
                        self._attempt_failed(c, exc, pending, one_sided, deadline)
                return
            if reply is None:
                return
            for c in list(pending.get(reply.request_id, ())):
                if c.conn is conn:
                    self._complete(c, reply, pending, one_sided, deadline)
            if not any(c.conn is conn for cs in pending.values() for c in cs):
                return  # nothing more is owed on this connection: do not ask it again

    def _send(self, c: _Call, pending: _Pending, one_sided: list[_Call], deadline: float) -> bool:
        """Send ``c`` on its node's next usable transport; False when none is left."""
        link = self.links[c.node]
        while c.transports:
            c.transport = c.transports.pop(0)
            c.sent_at = time.monotonic()
            if c.transport == "one_sided":
                one_sided.append(c)
                return True
            if link.blocked(c.transport) and not c.forced:
                # Failed a moment ago: skip it, and do not renew its block (a renewed block would
                # keep a restarted node from seeing writes for as long as writes keep coming; a
                # replica that misses a write this way sees the gap and refills). A read comes
                # back to it for real if every other option fails (``_next_node``): the only
                # ready replica may be the one whose link failed a moment ago.
                c.last_error = PeerUnavailable("recently failed", peer=c.node, transport=c.transport)
                self._count_retry(c)
                continue
            kept = c.read and c.transport == "tcp" and link.has("tcp")
            try:
                c.conn = link.connection(c.transport, force=c.forced)
                c.frame.deadline_us = max(1, int(max(deadline - c.sent_at, 0) * 1e6))
                c.conn.send(c.frame)
            except (TransportError, ValueError) as exc:
                c.last_error = exc
                c.conn = None
                if kept and isinstance(exc, PeerUnavailable) and not c.reconnected:
                    # A TCP connection kept from earlier calls found its peer gone before the frame
                    # left: the node may have restarted since this client last used it (reads
                    # that went to its peer meanwhile would not have noticed), at the same address.
                    # One new connection tells a restarted node from a dead one (refused at once).
                    # Writes keep the old way: a replica a write missed sees the gap and refills.
                    c.reconnected = True
                    link.drop(c.transport)
                    c.transports.insert(0, c.transport)
                    continue
                self._transport_failed(c)
                continue
            pending.setdefault(c.frame.request_id, []).append(c)
            self.stats.requests += 1
            return True
        return False

    def _next_node(self, c: _Call, pending: _Pending, one_sided: list[_Call],
                   deadline: float) -> bool:
        """Move ``c`` to its next candidate node and send it; False when no candidate is left.

        A read whose candidates all failed goes back to those with transports held back
        (failed a moment ago, so not tried) and tries those for real before it fails: the
        only ready replica may be one whose link failed a moment ago.
        """
        while c.candidates or (c.passed and not c.forced):
            if not c.candidates:
                c.candidates, c.passed, c.forced = c.passed, [], True
            c.node, c.reconnected = c.candidates.pop(0), False
            self.router.start(c.node)
            c.in_node, c.node_started = True, time.monotonic()
            link = self.links[c.node]
            c.transports = self.router.transport_order(
                c.node, link.transports(c.frame.table, c.frame.shard, read=c.read, held_back=c.forced))
            if self._send(c, pending, one_sided, deadline):
                return True
            self._node_failed(c)
        if c.last_error is None:
            c.last_error = PeerUnavailable(
                f"no replica of table {c.frame.table} shard {c.frame.shard} is reachable",
                peer=c.node, transport=c.transport)
        return False

    def _node_failed(self, c: _Call) -> None:
        """``c`` has no transport left to try on its node now: a node failure (also when its
        transports were passed over as recently failed, so its breaker opens while it stays down)."""
        if c.read and not c.forced and c.node not in c.passed and self.links[c.node].held_back():
            c.passed.append(c.node)
        self._leave(c, ok=False)

    def _run_one_sided(self, calls: list[_Call], pending: _Pending, deadline: float) -> None:
        """Serve the queued one-sided reads in this thread, after every remote request went out."""
        while calls:
            c = calls.pop(0)
            if c.terminal or c.reply is not None:
                continue
            try:
                reader = self.links[c.node].reader(c.frame.table, c.frame.shard)
                values, found = reader.find(c.frame.buffers[0])
            except (TransportError, StoreError, OSError) as exc:
                if not isinstance(exc, TransportError):
                    exc = PeerUnavailable(str(exc), peer=c.node, transport="one_sided")
                self._attempt_failed(c, exc, pending, calls, deadline)
                continue
            self.stats.requests += 1
            self._complete(c, Frame(c.frame.kind, [values, found], c.frame.request_id, flags=Flag.REPLY),
                           pending, calls, deadline)

    def _complete(self, c: _Call, reply: Frame, pending: _Pending, one_sided: list[_Call],
                  deadline: float) -> None:
        self.router.attempt(c.node, c.transport, time.monotonic() - c.sent_at, ok=True)
        self._leave(c, ok=True)  # the node answered, even if with an error
        if reply.status == Status.OK:
            self.stats.by_transport[c.transport] = self.stats.by_transport.get(c.transport, 0) + 1
            self.stats.by_node[c.node] = self.stats.by_node.get(c.node, 0) + 1
            self._settle(c, reply, None, pending)
            return
        status = Status(reply.status) if reply.status in Status._value2member_map_ else Status.INTERNAL
        err = RemoteError(reply.text() or status.name, status=int(status), peer=c.node, transport=c.transport)
        if status == Status.TOO_LARGE and c.transports:  # over this transport's cap (a shm ring): next one
            _unpend(c, pending)
            c.conn, c.last_error = None, err
            self._count_retry(c)
            self.router.start(c.node)  # back on the same node, on its next transport
            c.in_node, c.node_started = True, time.monotonic()
            if self._send(c, pending, one_sided, deadline):
                return
            self._leave(c, ok=True)
            if not self._next_node(c, pending, one_sided, deadline):
                self._settle(c, None, err, pending)
            return
        if status == Status.NOT_LEADER:  # strong: go where it points (else on to the next member)
            leader = reply.text()
            if leader and leader != c.node and leader in self.spec.replicas(c.frame.table, c.frame.shard):
                self.leaders[(c.frame.table, c.frame.shard)] = leader
                if c.redirects < _REDIRECTS:
                    c.redirects += 1
                    c.candidates = [leader, *(n for n in c.candidates if n != leader)]
                    c.forced = True  # its link may be held back after an attempt that timed out
        if status.retriable:  # it cannot serve now (filling, overloaded): its other transports would not help
            _unpend(c, pending)
            c.conn, c.last_error = None, err
            self._count_retry(c)
            if not self._next_node(c, pending, one_sided, deadline):
                self._settle(c, None, err, pending)
        else:  # the request itself is wrong: every replica would say the same
            self._settle(c, None, _non_finite(reply, err) if status == Status.NON_FINITE else err, pending)

    def _leave(self, c: _Call, *, ok: bool) -> None:
        """The call's time on its node is over: score the node (and feed its breaker)."""
        if c.in_node:
            c.in_node = False
            self.router.finish(c.node, time.monotonic() - c.node_started, ok)

    def _settle(self, c: _Call, reply: Frame | None, err: Exception | None,
                pending: _Pending) -> None:
        """``c`` is over: with a reply (settles its hedge pair too) or for good with ``err``."""
        p = c.primary or c
        pair = [x for x in (p, p.hedge) if x is not None]
        if reply is not None:
            for x in pair:
                x.reply = reply
                _unpend(x, pending)
                if x.in_node:  # the hedge's loser: abandoned, not scored
                    x.in_node = False
                    self.router.cancel(x.node)
            return
        c.terminal = True
        _unpend(c, pending)
        if all(x.terminal for x in pair):  # nobody left who might still answer
            p.error = err or c.last_error or PeerUnavailable("no replica answered")

    def _transport_failed(self, c: _Call) -> None:
        self.links[c.node].failed(c.transport)
        self.router.attempt(c.node, c.transport, time.monotonic() - c.sent_at, ok=False)
        self._count_retry(c)

    def _count_retry(self, c: _Call) -> None:
        if not c.retried:
            c.retried = True
            self.stats.retried_calls += 1
        self.stats.retries += 1

    def _attempt_failed(self, c: _Call, exc: Exception, pending: _Pending, one_sided: list[_Call],
                        deadline: float) -> None:
        """A transport failed or timed out: the node's next transport, else the next replica."""
        _unpend(c, pending)
        c.conn = None
        c.last_error = exc
        self._transport_failed(c)
        c.frame.flags |= Flag.RETRY
        if self._send(c, pending, one_sided, deadline):
            return
        self._node_failed(c)
        if not self._next_node(c, pending, one_sided, deadline):
            self._settle(c, None, exc, pending)

    def _hedge(self, c: _Call, pending: _Pending, one_sided: list[_Call], deadline: float) -> None:
        frame = Frame(c.frame.kind, c.frame.buffers, next(self._ids), c.frame.table, c.frame.shard)
        h = _Call(frame, [c.candidates.pop(0)], read=True, primary=c)
        c.hedge = h
        self.stats.hedged += 1
        if not self._next_node(h, pending, one_sided, deadline):
            self._settle(h, None, h.last_error, pending)


def _retriable(exc: Exception) -> bool:
    """Whether another replica, or the same one later, might take what failed with ``exc``."""
    if not isinstance(exc, RemoteError):
        return not isinstance(exc, NonFiniteValues)  # the data, which no replica takes
    return exc.status in Status._value2member_map_ and Status(exc.status).retriable


def _unpend(c: _Call, pending: _Pending) -> None:
    cs = pending.get(c.frame.request_id)
    if cs and c in cs:
        cs.remove(c)
        if not cs:
            del pending[c.frame.request_id]


def _non_finite(reply: Frame, err: RemoteError) -> Exception:
    """The ``NonFiniteValues`` a NON_FINITE reply stands for, as the table raised it
    (rows and first key from the reply's second buffer), raised from ``err``."""
    b = reply.buffers
    if len(b) != 2 or b[1].dtype != np.uint64 or b[1].shape != (2,):
        return err  # not the service's form: left as the RemoteError it is
    what = "gradient steps" if reply.kind == Kind.APPLY_GRADIENTS else "values"
    exc = NonFiniteValues(rows=int(b[1][0]), first_key=int(b[1][1]), what=what)
    exc.__cause__ = err
    return exc


def _checked(reply: Frame, nbufs: int, sl: slice, dim: int, dtype: np.dtype) -> list[np.ndarray]:
    """A reply's values (and found mask) after checking they fit the request: a peer's
    bytes are never trusted to have the shape we asked for."""
    n = sl.stop - sl.start
    bufs = reply.buffers
    if len(bufs) != nbufs or bufs[0].shape != (n, dim) or bufs[0].dtype != dtype or (
            nbufs == 2 and (bufs[1].shape != (n,) or bufs[1].dtype != np.bool_)):
        raise RemoteError(f"reply does not fit the request: {[(b.dtype.str, b.shape) for b in bufs]} "
                          f"for {n} keys of dim {dim}", status=int(Status.BAD_FRAME))
    return bufs


def _keys(keys: Any) -> np.ndarray:
    k = np.asarray(keys)
    if k.ndim != 1:
        raise ValueError(f"keys: expected a 1-D array, got shape {k.shape}")
    if k.size and k.dtype.kind not in "iu":
        raise TypeError(f"keys: expected integers, got {k.dtype}")
    if k.dtype.kind == "i" and k.size and k.min() < 0:
        raise ValueError("keys: negative keys are not valid (keys are uint64)")
    if k.shape[0] > MAX_KEYS:
        raise ValueError(f"keys: {k.shape[0]} keys in one call, at most {MAX_KEYS}")
    return np.ascontiguousarray(k, dtype=np.uint64)


