"""Choosing the replica, and the transport, that serves a call.

Owns: each node's scores (a peak-EWMA latency, a time-decayed success score,
its in-flight count) and the same scores per (node, transport); each node's
circuit breaker (:class:`Breaker`, failure accrual in Finagle's manner); the
candidate order for one call (locality tiers, then power of two choices on
cost); the transport order for one node; and the delay after which a read is
hedged to a second replica.

Must not: open sockets, start threads, sleep, or read time except through the
injected ``clock``; nor import the cluster spec (it takes plain :class:`Place`
records), so the whole module is logic that tests drive with a fake clock and a
seeded ``random.Random``.

One call, as a client makes it::

    for node in router.order(replicas):            # best first, fallbacks after
        router.start(node)
        for t in router.transport_order(node, offered):
            ...                                     # try t, then:
            router.attempt(node, t, latency_s, ok)
        router.finish(node, latency_s, ok)          # ok=False: every transport failed
        if ok:
            break

A hedged read also starts the next candidate once ``hedge_delay()`` has passed,
and calls ``cancel`` on the one that loses.

Thread safety: none. A Router (with its Breakers) belongs to one thread, the
client's calling thread, which also issues its hedged reads; to share one
between threads, guard every call with one lock of your own.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from streamrec.errors import ConfigError

__all__ = ["Breaker", "BreakerState", "Place", "Router", "RouterConfig"]

BreakerState = Literal["closed", "open", "half_open"]

# A success score under this counts as this: the cost of a node that fails every
# call is then 100x its latency, high enough to lose every P2C draw against a
# working node, yet finite so costs still order the failing nodes among themselves.
_SUCCESS_FLOOR = 0.01
# Cost of a node with no latency sample and a call already out to it (Finagle's
# PeakEwma "Penalty"): an unmeasured idle node costs 0, so new nodes get tried at
# once, but only one call at a time until the first answer measures it.
_UNMEASURED_BUSY_COST = 1e5
# The success-rate window is kept as this many time buckets, so its memory is
# bounded at any call rate; the window then spans between 9/10 and all of
# success_window_s.
_WINDOW_BUCKETS = 10
# Recent successful latencies kept for the hedge quantile; 1024 gives the 99th
# percentile ten samples above it, and at 10k calls/s covers the last 0.1 s.
_HEDGE_RING = 1024
# The hedge quantile is re-sorted after this many new samples, not on each call
# (sorting 1024 floats costs tens of microseconds; 64 new samples of 1024 move a
# quantile little).
_HEDGE_REFRESH = 64


# ---- Configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """Where a node, or the client, sits.

    Attributes:
        zone: failure domain sharing a network (an availability zone, a rack row).
        pod: a smaller group inside the zone (a host, a rack); ``""`` when unknown.
            Two places share a pod only when both zone and a non-empty pod match.
    """

    zone: str
    pod: str = ""


@dataclass(frozen=True)
class RouterConfig:
    """How the router scores, ejects, hedges and moves between transports.

    Attributes:
        consecutive_failures: node failures in a row that eject it; 5 as Finagle's
            ``FailureAccrualFactory`` and Envoy's ``consecutive_5xx``.
        success_rate_min: a node whose success rate over ``success_window_s`` falls
            under this is ejected; 0.8 as Finagle's ``successRateWithinDuration``.
        success_window_s: that window; 30 s as Finagle's.
        success_min_requests: calls the window must hold before its rate counts;
            5 as Finagle's ``minRequestThreshold`` (one failure in two calls says
            little).
        backoff_base_s: the first ejection lasts between this and twice this; each
            further ejection in a row doubles both bounds (equal jitter, as Finagle's
            ``Backoff.equalJittered(5.seconds, 300.seconds)``; gRPC A50 likewise grows
            ejection time with the number of ejections).
        backoff_max_s: cap on any ejection; 300 s as Finagle and gRPC A50. A node that
            stays healthy this long after its return starts again from the base.
        max_ejected_fraction: never eject a node while this fraction of all known
            nodes or more is ejected (gRPC A50's ``max_ejection_percent`` check, so
            with 2 nodes and 0.5 one may go, with 4 two). A50's default is 10 %; 0.5
            here because replica groups are 2-3 nodes, and half still lets a zone of
            two fail over while a client-side fault that fails every call cannot
            empty the cluster. 0 turns ejection off.
        latency_halflife_s: half-life of the latency average, decayed by elapsed time
            (Finagle's peak EWMA; its default decay is 10 s, 2 s here since calls are
            sub-millisecond and a replica stalled by GC or compaction should lose its
            traffic within seconds). A sample above the average replaces it at once.
            An idle node's average also decays, so a replica left alone for being
            slow is tried again after a few half-lives and cannot starve.
        success_halflife_s: half-life of the success score; slower than latency so
            one failure does not swing load, faster than the 30 s breaker window so
            traffic leaves a failing node before the breaker has a verdict.
        hedge_quantile: hedge a read to a second replica once it has waited this
            quantile of recent successful latencies ("The Tail at Scale" hedged at the
            95th percentile); ``None`` (default) is off, since a hedge adds load at
            the tail and only pays with spare capacity.
        hedge_min_samples: successes needed before hedging; 50, below which the 95th
            percentile is only the largest of a few samples.
        transport_backoff_s: a transport that failed on a node goes last in that
            node's transport order for this long, doubling for each failure in a row;
            1 s: transports fail over within one call, so this only saves the next
            calls a failed attempt.
        transport_backoff_max_s: cap on that backoff; 30 s, so a transport that comes
            back (an RDMA link reset, a shm segment recreated) is in use within that.
        transport_latency_ratio: a healthy transport keeps its preferred place unless
            its cost is more than this many times a later one's; 4: transports differ
            by design (tcp is several times shm), so only a clear sign overrides it.
    """

    consecutive_failures: int = 5
    success_rate_min: float = 0.8
    success_window_s: float = 30.0
    success_min_requests: int = 5
    backoff_base_s: float = 5.0
    backoff_max_s: float = 300.0
    max_ejected_fraction: float = 0.5
    latency_halflife_s: float = 2.0
    success_halflife_s: float = 5.0
    hedge_quantile: float | None = None
    hedge_min_samples: int = 50
    transport_backoff_s: float = 1.0
    transport_backoff_max_s: float = 30.0
    transport_latency_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("consecutive_failures", "success_min_requests", "hedge_min_samples"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ConfigError(f"must be an integer >= 1, got {v!r}", field=f"router.{name}")
        for name in ("success_window_s", "backoff_base_s", "backoff_max_s", "latency_halflife_s",
                     "success_halflife_s", "transport_backoff_s", "transport_backoff_max_s"):
            _check_positive(name, getattr(self, name))
        _check_unit("success_rate_min", self.success_rate_min)
        _check_unit("max_ejected_fraction", self.max_ejected_fraction)
        if self.backoff_max_s < self.backoff_base_s:
            raise ConfigError(f"must be >= backoff_base_s, got {self.backoff_max_s!r}",
                              field="router.backoff_max_s")
        if self.transport_backoff_max_s < self.transport_backoff_s:
            raise ConfigError(f"must be >= transport_backoff_s, got {self.transport_backoff_max_s!r}",
                              field="router.transport_backoff_max_s")
        r = self.transport_latency_ratio
        if not (_is_number(r) and math.isfinite(r) and r >= 1):
            raise ConfigError(f"must be a finite number >= 1, got {r!r}",
                              field="router.transport_latency_ratio")
        q = self.hedge_quantile
        if q is not None and not (_is_number(q) and 0 < q < 1):
            raise ConfigError(f"must be None or in (0, 1), got {q!r}", field="router.hedge_quantile")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_positive(name: str, v: Any) -> None:
    if not (_is_number(v) and math.isfinite(v) and v > 0):
        raise ConfigError(f"must be a finite number > 0, got {v!r}", field=f"router.{name}")


def _check_unit(name: str, v: Any) -> None:
    if not (_is_number(v) and 0 <= v <= 1):
        raise ConfigError(f"must be in [0, 1], got {v!r}", field=f"router.{name}")


# ---- Scores ------------------------------------------------------------------------------------


class _PeakEwma:
    """A latency average decayed by elapsed time; a sample above it replaces it (Finagle's PeakEwma).

    Weighting by elapsed time, not by sample count, makes the half-life mean the
    same at 10 and at 100k calls/s; the cost is that a sample at the same clock
    reading as the previous one moves the average only if it is a peak.
    """

    __slots__ = ("stamp", "tau", "value")

    def __init__(self, halflife_s: float) -> None:
        self.tau = halflife_s / math.log(2)
        self.value: float | None = None
        self.stamp = 0.0

    def observe(self, x: float, now: float) -> None:
        if self.value is None or x > self.value:
            self.value = x
        else:
            w = math.exp(-max(now - self.stamp, 0.0) / self.tau)
            self.value = self.value * w + x * (1.0 - w)
        self.stamp = now

    def raise_to(self, x: float, now: float) -> None:
        # For failed calls: a timeout is real cost, but a fast refusal is no
        # evidence of speed, so a failure may only raise an existing estimate.
        if self.value is not None and x > self.value:
            self.value = x
            self.stamp = now

    def read(self, now: float) -> float | None:
        # Decays toward 0 while no samples come (Finagle's, too): a node left alone
        # for being slow looks cheaper as time passes, gets a call, and is re-measured.
        if self.value is None:
            return None
        return self.value * math.exp(-max(now - self.stamp, 0.0) / self.tau)


class _Score:
    """Fraction of calls that succeeded, as an average decayed by elapsed time; starts at 1."""

    __slots__ = ("stamp", "tau", "value")

    def __init__(self, halflife_s: float, now: float) -> None:
        self.tau = halflife_s / math.log(2)
        # A new node is presumed healthy; the prior is stamped now so it fades at
        # the score's own pace, and one early failure cannot zero it.
        self.value = 1.0
        self.stamp = now

    def observe(self, ok: bool, now: float) -> None:
        w = math.exp(-max(now - self.stamp, 0.0) / self.tau)
        self.value = self.value * w + (1.0 if ok else 0.0) * (1.0 - w)
        self.stamp = now


class _Window:
    """Successes and calls over the last ``window_s``, in fixed time buckets (bounded memory)."""

    __slots__ = ("epoch", "n", "ok", "width")

    def __init__(self, window_s: float) -> None:
        self.width = window_s / _WINDOW_BUCKETS
        self.epoch = [-(2**62)] * _WINDOW_BUCKETS
        self.ok = [0] * _WINDOW_BUCKETS
        self.n = [0] * _WINDOW_BUCKETS

    def record(self, ok: bool, now: float) -> None:
        e = math.floor(now / self.width)
        i = e % _WINDOW_BUCKETS
        if self.epoch[i] != e:
            self.epoch[i], self.ok[i], self.n[i] = e, 0, 0
        self.ok[i] += ok
        self.n[i] += 1

    def counts(self, now: float) -> tuple[int, int]:
        """(successes, calls) in the buckets of the last window."""
        e = math.floor(now / self.width)
        ok = n = 0
        for i in range(_WINDOW_BUCKETS):
            if e - _WINDOW_BUCKETS < self.epoch[i] <= e:
                ok += self.ok[i]
                n += self.n[i]
        return ok, n

    def clear(self) -> None:
        self.epoch = [-(2**62)] * _WINDOW_BUCKETS


# ---- Breaker -----------------------------------------------------------------------------------


class Breaker:
    """One node's failure accrual: closed, open (ejected), or half_open (one probe out).

    Finagle's ``FailureAccrualFactory``: ``consecutive_failures`` failures in a row,
    or a success rate under ``success_rate_min`` over ``success_window_s`` with at
    least ``success_min_requests`` calls, earn an ejection. The breaker does not
    eject by itself (it cannot see the other nodes): ``on_failure`` says the node
    has earned it and the owner calls ``eject`` if its ejection budget allows; if
    not, the node stays closed and asks again on its next failure.

    Once the ejection's backoff has passed, ``allow`` lets exactly one probe through
    (half_open) and refuses everything else until that probe reports: success
    closes the breaker, failure ejects again for longer. A success reported while
    open (a call forced onto an ejected node because every replica was ejected)
    closes it too: any answer is as good as a probe's.

    Args:
        config: the thresholds and backoffs used (see :class:`RouterConfig`).
        rng: source of the backoff jitter; a fresh ``random.Random()`` if None.

    Attributes:
        state: ``"closed"``, ``"open"`` or ``"half_open"``.
        ejections: ejections so far (including re-ejections after a failed probe).
        open_until: clock reading at which an open breaker may probe; meaningless
            when closed.

    Thread safety: none; owned by one Router or one thread.

    Example::

        b = Breaker(RouterConfig(), random.Random(1))
        if b.on_failure(now):
            b.eject(now)          # b.state == "open" until b.open_until
    """

    def __init__(self, config: RouterConfig, rng: random.Random | None = None) -> None:
        self._config = config
        self._rng = rng if rng is not None else random.Random()
        self._window = _Window(config.success_window_s)
        self._consecutive = 0
        self._streak = 0  # ejections in a row, for the backoff's exponent
        self._closed_since = -math.inf
        self.state: BreakerState = "closed"
        self.ejections = 0
        self.open_until = -math.inf

    def available(self, now: float) -> bool:
        """Whether ``allow(now)`` would say yes; changes nothing."""
        if self.state == "closed":
            return True
        return self.state == "open" and now >= self.open_until

    def allow(self, now: float) -> bool:
        """Whether a call may go to the node now; when open and due, claims the one probe.

        Returns True when closed, or when open with its backoff passed (the state
        becomes half_open and the caller's call is the probe); False otherwise.
        """
        if self.state == "closed":
            return True
        if self.state == "open" and now >= self.open_until:
            self.state = "half_open"
            return True
        return False

    def release(self) -> None:
        """The claimed probe was never sent or will never report: the next ``allow`` may probe."""
        if self.state == "half_open":
            self.state = "open"

    def on_success(self, now: float) -> None:
        """A call to the node succeeded."""
        if self.state != "closed":
            self._close(now)
            return
        self._consecutive = 0
        self._window.record(True, now)

    def on_failure(self, now: float) -> bool:
        """A call to the node failed.

        Returns True when the node, still closed, has earned an ejection: the owner
        should call ``eject(now)`` if its budget allows. A failed probe re-ejects
        at once (the node is ejected already) and returns False; so does a failure
        while open, which changes nothing (the probe schedule decides the return).
        """
        if self.state == "half_open":
            self._open(now)
            return False
        if self.state == "open":
            return False
        self._consecutive += 1
        self._window.record(False, now)
        if self._consecutive >= self._config.consecutive_failures:
            return True
        ok, n = self._window.counts(now)
        return n >= self._config.success_min_requests and ok < self._config.success_rate_min * n

    def eject(self, now: float) -> None:
        """Open the breaker for the next backoff. Requires: state is ``"closed"``."""
        if now - self._closed_since >= self._config.backoff_max_s:
            self._streak = 0  # healthy a full max backoff: a new incident, not a flap
        self._open(now)

    def backoff_bounds(self, streak: int) -> tuple[float, float]:
        """The [low, high] of the ejection after ``streak`` ejections in a row (0 for the first)."""
        c = self._config
        low = min(c.backoff_max_s, c.backoff_base_s * 2.0 ** min(streak, 62))
        return low, min(c.backoff_max_s, 2.0 * low)

    def _open(self, now: float) -> None:
        # Equal jitter (half fixed, half random) as Finagle's equalJittered, but on
        # the first ejection too (Finagle's first is a flat `start`), so clients that
        # eject a node at the same moment do not all probe it at the same moment.
        low, high = self.backoff_bounds(self._streak)
        self.open_until = now + low + self._rng.uniform(0.0, high - low)
        self._streak += 1
        self.ejections += 1
        self.state = "open"
        self._consecutive = 0
        self._window.clear()

    def _close(self, now: float) -> None:
        self.state = "closed"
        self._consecutive = 0
        self._window.clear()
        self._closed_since = now


# ---- Router ------------------------------------------------------------------------------------


class _Transport:
    __slots__ = ("latency", "retry_at", "streak", "success")

    def __init__(self, config: RouterConfig, now: float) -> None:
        self.latency = _PeakEwma(config.latency_halflife_s)
        self.success = _Score(config.success_halflife_s, now)
        self.retry_at = -math.inf
        self.streak = 0


class _Node:
    __slots__ = ("breaker", "in_flight", "latency", "name", "success", "tier", "transports")

    def __init__(self, name: str, tier: int, config: RouterConfig, rng: random.Random, now: float) -> None:
        self.name = name
        self.tier = tier
        self.breaker = Breaker(config, rng)
        self.latency = _PeakEwma(config.latency_halflife_s)
        self.success = _Score(config.success_halflife_s, now)
        self.in_flight = 0
        self.transports: dict[str, _Transport] = {}


def _tier(place: Place, local: Place | None) -> int:
    if local is None:
        return 0
    if place.zone == local.zone:
        return 0 if (local.pod and place.pod == local.pod) else 1
    return 2


class Router:
    """Orders replicas and transports for a stateless client, and keeps the scores that decide it.

    Replicas are grouped in locality tiers: same pod, same zone, the rest (all one
    tier when ``local`` is None). Locality is strict: only the breaker moves
    traffic out of a tier, never cost, so a pod keeps its traffic at home.
    Within the best tier holding a usable node, the first pick is by power of two
    choices (P2C) on

        cost = EWMA latency * (1 + in-flight calls) / max(success score, 0.01)

    (Finagle's P2C over peak EWMA, with a success term so a node failing half its
    calls costs twice as much). P2C rather than "always the cheapest" because it
    spreads load while scores are stale and many clients share them.

    Args:
        nodes: every node the client may call, by name, with its place.
        local: where the client sits; None: no locality preference.
        config: see :class:`RouterConfig`; defaults when None.
        clock: seconds, monotonic; injectable for tests.
        rng: random source for P2C and backoff jitter; a fresh ``random.Random()``
            if None. Seed it for reproducible runs.

    Raises:
        ValueError: ``nodes`` is empty.
        TypeError: a node name is not a str, or a place not a Place.

    Thread safety: none; one thread (see the module docstring).

    Example::

        r = Router({"a": Place("z1", "p1"), "b": Place("z2")}, local=Place("z1", "p1"))
        first, *fallbacks = r.order(["a", "b"])
    """

    # ---- Construction ---------------------------------------------------------------------------

    def __init__(
        self,
        nodes: Mapping[str, Place],
        local: Place | None = None,
        config: RouterConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not nodes:
            raise ValueError("nodes must name at least one node, got none")
        if local is not None and not isinstance(local, Place):
            raise TypeError(f"local must be a Place or None, got {type(local).__name__}")
        self._config = config if config is not None else RouterConfig()
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        now = clock()
        self._nodes: dict[str, _Node] = {}
        for name, place in nodes.items():
            if not isinstance(name, str) or not isinstance(place, Place):
                raise TypeError(f"nodes must map str to Place, got {name!r}: {place!r}")
            self._nodes[name] = _Node(name, _tier(place, local), self._config, self._rng, now)
        self._hedge_ring: deque[float] = deque(maxlen=_HEDGE_RING)
        self._hedge_fresh = 0  # samples since the cached quantile was computed
        self._hedge_cached: float | None = None

    @property
    def config(self) -> RouterConfig:
        return self._config

    # ---- Choosing: what to call next; changes no score (P2C draws from the rng) ---------------

    def order(self, replicas: Sequence[str]) -> list[str]:
        """Candidates for one call, best first; try them in order until one answers.

        Closed nodes come by tier; the first is the P2C pick of the best non-empty
        tier, the rest of each tier follow by cost. A node whose ejection has run out
        goes first, once, as its probe (recovery is seen at the next call, and
        a failed probe costs that call one fallback); further due nodes go last, so
        one call never chains through several probes. Nodes still ejected come last,
        soonest due first: a replica that is closed may be down without having been
        ejected yet, and when every replica is ejected or down a call must still go
        somewhere (the panic threshold of Finagle's and Envoy's balancers), so an
        ejected replica that holds the data is tried before the call fails.

        Args:
            replicas: node names holding the data, each known to the router.

        Returns:
            a subset of ``replicas`` in calling order; empty only if ``replicas`` is.

        Raises:
            ValueError: a name is unknown or repeated.
        """
        nodes = self._lookup(replicas)
        if len(nodes) < 2:  # whatever its state, a lone replica is the only place to go
            return [n.name for n in nodes]
        now = self._clock()
        live: list[_Node] = []
        due: list[_Node] = []
        held: list[_Node] = []
        for n in nodes:
            if n.breaker.state == "closed":
                live.append(n)
            elif n.breaker.available(now):
                due.append(n)
            else:
                held.append(n)
        held.sort(key=lambda n: n.breaker.open_until)
        if not live and not due:
            return [n.name for n in held]
        due.sort(key=lambda n: n.breaker.open_until)
        out = [n.name for n in due[:1]]
        costs = {n.name: self._cost(n, now) for n in live}
        first = True
        for tier in range(3):
            members = [n for n in live if n.tier == tier]
            if not members:
                continue
            ranked = sorted(members, key=lambda n: costs[n.name])
            if first and len(members) >= 2:
                i, j = self._rng.sample(range(len(members)), 2)
                # Ties go to the first draw, which is itself random.
                pick = members[i] if costs[members[i].name] <= costs[members[j].name] else members[j]
                ranked.remove(pick)
                ranked.insert(0, pick)
            first = False
            out.extend(n.name for n in ranked)
        out.extend(n.name for n in due[1:])
        out.extend(n.name for n in held)
        return out

    def transport_order(self, node: str, offered: Sequence[str]) -> list[str]:
        """The transports to try on ``node``, best first.

        ``offered`` is in preference order (``["one_sided", "shm", "rdma", "tcp"]``).
        Transports in backoff after a recent failure go last, in preference order.
        The healthy ones keep preference order, except that a transport whose cost
        (latency / success score, both measured on this node) is more than
        ``transport_latency_ratio`` times a later one's yields its place to it;
        unmeasured transports keep their place. A demoted transport's latency
        decays while idle, so it is tried again within a few half-lives.

        Raises:
            ValueError: ``node`` is unknown, or ``offered`` repeats a name.
        """
        n = self._node(node)
        if len(offered) < 2:
            return list(offered)
        if len(set(offered)) != len(offered):
            raise ValueError(f"offered transports must be distinct, got {list(offered)!r}")
        now = self._clock()
        healthy: list[str] = []
        backed: list[str] = []
        for t in offered:
            ts = n.transports.get(t)
            (backed if ts is not None and now < ts.retry_at else healthy).append(t)
        ratio = self._config.transport_latency_ratio
        costs = {t: self._transport_cost(n.transports.get(t), now) for t in healthy}
        out: list[str] = []
        while healthy:
            pick = 0
            for j in range(1, len(healthy)):
                cp, cj = costs[healthy[pick]], costs[healthy[j]]
                if cp is not None and cj is not None and cp > ratio * cj:
                    pick = j
            out.append(healthy.pop(pick))
        return out + backed

    def hedge_delay(self) -> float | None:
        """Seconds after which to send a read to the next candidate too, or None for no hedge.

        The ``hedge_quantile`` of the last 1024 successful call latencies (nearest
        rank), refreshed every 64 new samples; None when hedging is off or fewer
        than ``hedge_min_samples`` successes were seen.
        """
        q = self._config.hedge_quantile
        if q is None or len(self._hedge_ring) < self._config.hedge_min_samples:
            return None
        if self._hedge_cached is None or self._hedge_fresh >= _HEDGE_REFRESH:
            ranked = sorted(self._hedge_ring)
            self._hedge_cached = ranked[max(math.ceil(q * len(ranked)) - 1, 0)]
            self._hedge_fresh = 0
        return self._hedge_cached

    # ---- Reporting: what happened; each start is matched by one finish or cancel -----------------

    def start(self, node: str) -> None:
        """A call to ``node`` begins: counts it in flight; if the node is due a probe, this is it.

        A call to a node that is still ejected (the all-ejected fallback) is allowed
        and counted, but is not a probe.

        Raises:
            ValueError: ``node`` is unknown.
        """
        n = self._node(node)
        n.in_flight += 1
        n.breaker.allow(self._clock())

    def attempt(self, node: str, transport: str, latency_s: float, ok: bool) -> None:
        """One try of the call on one transport ended; scores that transport on that node.

        Never touches the node's breaker: a node reachable on some transport is up.
        A failure puts the transport in backoff (``transport_backoff_s``, doubling per
        failure in a row, at most ``transport_backoff_max_s``); a success ends it.

        Raises:
            ValueError: ``node`` is unknown, or ``latency_s`` is not finite and >= 0.
        """
        n = self._node(node)
        _check_latency(latency_s)
        now = self._clock()
        ts = n.transports.get(transport)
        if ts is None:
            ts = n.transports[transport] = _Transport(self._config, now)
        ts.success.observe(ok, now)
        if ok:
            ts.latency.observe(latency_s, now)
            ts.streak = 0
            ts.retry_at = -math.inf
        else:
            ts.latency.raise_to(latency_s, now)
            c = self._config
            backoff = c.transport_backoff_s * 2.0 ** min(ts.streak, 62)
            ts.retry_at = now + min(c.transport_backoff_max_s, backoff)
            ts.streak += 1

    def finish(self, node: str, latency_s: float, ok: bool) -> None:
        """The call on ``node`` is over; scores the node and feeds its breaker.

        Args:
            node: as given to ``start``.
            latency_s: the call's whole time on this node, all transports tried.
            ok: True if the node answered on some transport (an error the node
                answered with is still an answer); False if it failed on every
                transport tried, or the deadline passed: only that is a node failure.

        Raises:
            ValueError: ``node`` is unknown, has no call in flight, or ``latency_s``
                is not finite and >= 0.
        """
        n = self._node(node)
        _check_latency(latency_s)
        if n.in_flight == 0:
            raise ValueError(f"finish({node!r}) without a start: no call is in flight there")
        now = self._clock()
        n.in_flight -= 1
        n.success.observe(ok, now)
        if ok:
            n.latency.observe(latency_s, now)
            self._hedge_ring.append(latency_s)
            self._hedge_fresh += 1
            n.breaker.on_success(now)
        else:
            n.latency.raise_to(latency_s, now)
            if n.breaker.on_failure(now) and self._may_eject():
                n.breaker.eject(now)

    def cancel(self, node: str) -> None:
        """A started call was abandoned (a hedge's loser): no longer in flight, and not scored.

        If the node was half open, its probe is released so the next call may probe.
        (The router does not track which call was the probe; cancelling a forced
        call to a half-open node also releases it, at worst letting a second probe out.)

        Raises:
            ValueError: ``node`` is unknown or has no call in flight.
        """
        n = self._node(node)
        if n.in_flight == 0:
            raise ValueError(f"cancel({node!r}) without a start: no call is in flight there")
        n.in_flight -= 1
        n.breaker.release()

    # ---- Observing: a copy of the state, for a live display and metrics ---------------------------

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per node: its breaker and scores, as plain values.

        Keys: ``state``, ``ejections``, ``retry_in_s`` (seconds until an open breaker
        may probe, else 0), ``in_flight``, ``latency_ms`` (the average as last
        updated, None before any sample), ``success`` (the score), ``cost`` (as
        P2C sees it now), ``tier`` (0 same pod, 1 same zone, 2 other), and
        ``transports``: per transport ``latency_ms``, ``success``, ``retry_in_s``.
        """
        now = self._clock()
        out: dict[str, dict[str, Any]] = {}
        for name, n in self._nodes.items():
            b = n.breaker
            out[name] = {
                "state": b.state,
                "ejections": b.ejections,
                "retry_in_s": max(b.open_until - now, 0.0) if b.state != "closed" else 0.0,
                "in_flight": n.in_flight,
                "latency_ms": None if n.latency.value is None else n.latency.value * 1e3,
                "success": n.success.value,
                "cost": self._cost(n, now),
                "tier": n.tier,
                "transports": {
                    t: {
                        "latency_ms": None if ts.latency.value is None else ts.latency.value * 1e3,
                        "success": ts.success.value,
                        "retry_in_s": max(ts.retry_at - now, 0.0),
                    }
                    for t, ts in n.transports.items()
                },
            }
        return out

    # ---- Internals ------------------------------------------------------------------------------

    def _node(self, name: str) -> _Node:
        n = self._nodes.get(name)
        if n is None:
            raise ValueError(f"unknown node {name!r}; the router knows {sorted(self._nodes)!r}")
        return n

    def _lookup(self, replicas: Sequence[str]) -> list[_Node]:
        if len(set(replicas)) != len(replicas):
            raise ValueError(f"replicas must be distinct, got {list(replicas)!r}")
        return [self._node(r) for r in replicas]

    def _cost(self, n: _Node, now: float) -> float:
        lat = n.latency.read(now)
        if lat is None:
            return 0.0 if n.in_flight == 0 else _UNMEASURED_BUSY_COST * n.in_flight
        return lat * (1 + n.in_flight) / max(n.success.value, _SUCCESS_FLOOR)

    @staticmethod
    def _transport_cost(ts: _Transport | None, now: float) -> float | None:
        if ts is None:
            return None
        lat = ts.latency.read(now)
        return None if lat is None else lat / max(ts.success.value, _SUCCESS_FLOOR)

    def _may_eject(self) -> bool:
        # gRPC A50's rule, checked before each ejection: the ejected share must be
        # under the cap, so with any cap > 0 at least one node may go.
        ejected = sum(1 for n in self._nodes.values() if n.breaker.state != "closed")
        return ejected < self._config.max_ejected_fraction * len(self._nodes)


def _check_latency(latency_s: float) -> None:
    if not (_is_number(latency_s) and math.isfinite(latency_s) and latency_s >= 0):
        raise ValueError(f"latency_s must be a finite number >= 0, got {latency_s!r}")
