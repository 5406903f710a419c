"""Router and Breaker: locality, P2C, failure accrual, transports, hedging; a fake clock and seeded rngs."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamrec.cluster.router import Breaker, Place, Router, RouterConfig
from streamrec.errors import ConfigError


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def make(names: list[str], config: RouterConfig | None = None, local: Place | None = None,
         places: dict[str, Place] | None = None, seed: int = 0) -> tuple[Router, Clock]:
    clock = Clock()
    nodes = places if places is not None else {n: Place("z") for n in names}
    return Router(nodes, local, config, clock=clock, rng=random.Random(seed)), clock


def call(r: Router, clock: Clock, node: str, latency: float = 0.001, ok: bool = True) -> None:
    r.start(node)
    clock.advance(latency)
    r.finish(node, latency, ok)


def states(r: Router) -> dict[str, str]:
    return {n: s["state"] for n, s in r.snapshot().items()}


# ---- Config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("consecutive_failures", 0),
        ("consecutive_failures", True),
        ("success_rate_min", 1.5),
        ("success_window_s", 0.0),
        ("backoff_base_s", math.inf),
        ("max_ejected_fraction", -0.1),
        ("hedge_quantile", 1.0),
        ("transport_latency_ratio", 0.5),
        ("hedge_min_samples", 0),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as e:
        RouterConfig(**{field: value})
    assert e.value.field == f"router.{field}"


def test_config_rejects_max_below_base() -> None:
    with pytest.raises(ConfigError, match="backoff_max_s"):
        RouterConfig(backoff_base_s=10.0, backoff_max_s=5.0)
    with pytest.raises(ConfigError, match="transport_backoff_max_s"):
        RouterConfig(transport_backoff_s=2.0, transport_backoff_max_s=1.0)


def test_bad_arguments_raise_value_error() -> None:
    r, _ = make(["a", "b"])
    with pytest.raises(ValueError, match="unknown node"):
        r.order(["a", "x"])
    with pytest.raises(ValueError, match="distinct"):
        r.order(["a", "a"])
    with pytest.raises(ValueError, match="without a start"):
        r.finish("a", 0.001, True)
    with pytest.raises(ValueError, match="without a start"):
        r.cancel("a")
    r.start("a")
    with pytest.raises(ValueError, match="latency_s"):
        r.finish("a", math.nan, True)
    with pytest.raises(ValueError, match="latency_s"):
        r.attempt("a", "tcp", -1.0, True)
    with pytest.raises(ValueError, match="at least one"):
        Router({})
    with pytest.raises(TypeError):
        Router({"a": ("z", "p")})
    assert r.order([]) == []


# ---- Locality and P2C --------------------------------------------------------------------------


def test_locality_orders_pod_then_zone_then_rest_whatever_the_cost() -> None:
    places = {
        "pod": Place("z1", "p1"),
        "zone": Place("z1", "p2"),
        "far": Place("z2", "p1"),  # same pod name in another zone is not the same pod
    }
    r, clock = make([], local=Place("z1", "p1"), places=places)
    call(r, clock, "pod", 0.050)
    call(r, clock, "zone", 0.001)
    call(r, clock, "far", 0.001)
    for _ in range(20):
        assert r.order(["far", "zone", "pod"]) == ["pod", "zone", "far"]
    assert [r.snapshot()[n]["tier"] for n in ("pod", "zone", "far")] == [0, 1, 2]


def test_no_local_place_is_one_tier_and_empty_pod_is_zone_only() -> None:
    places = {"a": Place("z1", ""), "b": Place("z2", "")}
    r, _ = make([], places=places)
    assert {r.order(["a", "b"])[0] for _ in range(50)} == {"a", "b"}
    r2, _ = make([], local=Place("z1"), places=places)
    assert r2.snapshot()["a"]["tier"] == 1
    assert r2.order(["b", "a"]) == ["a", "b"]


def test_p2c_prefers_the_faster_but_the_slower_is_not_starved() -> None:
    r, clock = make(["fast", "slow"])
    call(r, clock, "fast", 0.001)
    call(r, clock, "slow", 0.010)
    picks = {"fast": 0, "slow": 0}
    for _ in range(3000):
        first = r.order(["fast", "slow"])[0]
        picks[first] += 1
        call(r, clock, first, 0.001 if first == "fast" else 0.010)
        clock.advance(0.004)
    # Sequential calls: the slow node's idle latency decays until it wins a draw,
    # about once per log2(10) half-lives (6.6 s of the run's 15 s).
    assert 1 <= picks["slow"] <= 0.01 * 3000


def test_p2c_spreads_concurrent_load_by_in_flight_count() -> None:
    r, clock = make(["fast", "slow"])
    lat = {"fast": 0.001, "slow": 0.002}
    call(r, clock, "fast", lat["fast"])
    call(r, clock, "slow", lat["slow"])
    pending: list[tuple[float, str]] = []
    picks = {"fast": 0, "slow": 0}
    for _ in range(4000):
        while len(pending) < 16:  # 16 calls always in flight
            node = r.order(["fast", "slow"])[0]
            picks[node] += 1
            r.start(node)
            pending.append((clock.t + lat[node], node))
        pending.sort()
        done, node = pending.pop(0)
        clock.t = max(clock.t, done)
        r.finish(node, lat[node], True)
    # Cost 1 ms x (1 + kf) against 2 ms x (1 + ks) with kf + ks = 16 settles near
    # kf = 10.3, ks = 4.7: the slow node serves about 4.7/2 of every 10.3/1 + 4.7/2.
    share = picks["slow"] / sum(picks.values())
    assert 0.12 < share < 0.25, picks


def test_traffic_shifts_away_from_a_replica_that_turns_slow() -> None:
    names = ["a", "b", "c"]
    r, clock = make(names)
    lat = dict.fromkeys(names, 0.001)

    def run(n: int) -> dict[str, int]:
        picks = dict.fromkeys(names, 0)
        for _ in range(n):
            first = r.order(names)[0]
            picks[first] += 1
            call(r, clock, first, lat[first])
            clock.advance(0.009)
        return picks

    before = run(600)
    assert all(v > 120 for v in before.values()), before
    lat["c"] = 0.020
    run(100)
    after = run(600)
    assert after["c"] < 0.05 * 600, after


def test_new_node_is_tried_once_but_not_flooded() -> None:
    r, clock = make(["old", "new"])
    call(r, clock, "old", 0.001)
    assert r.order(["old", "new"])[0] == "new"  # unmeasured and idle: cost 0
    r.start("new")
    assert r.order(["old", "new"])[0] == "old"  # unmeasured with a call out: penalized
    clock.advance(0.001)
    r.finish("new", 0.001, True)


# ---- Breaker -----------------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures() -> None:
    b = Breaker(RouterConfig(consecutive_failures=5, success_min_requests=100), random.Random(0))
    for i in range(4):
        assert not b.on_failure(float(i))
    b.on_success(4.0)  # a success resets the run
    for i in range(4):
        assert not b.on_failure(5.0 + i)
    assert b.on_failure(9.0)
    b.eject(9.0)
    assert b.state == "open" and b.ejections == 1
    assert 14.0 <= b.open_until <= 19.0


def test_breaker_opens_on_low_success_rate_with_enough_requests() -> None:
    b = Breaker(RouterConfig(consecutive_failures=100, success_rate_min=0.8, success_min_requests=5))
    for t in range(3):
        b.on_success(float(t))
    assert not b.on_failure(3.0)  # 3/4, but only 4 calls
    assert b.on_failure(4.0)  # 3/5 = 60 % < 80 %


def test_breaker_stays_closed_below_min_requests_and_forgets_old_calls() -> None:
    b = Breaker(RouterConfig(consecutive_failures=100, success_min_requests=10))
    b.on_success(0.0)
    assert not any(b.on_failure(float(t)) for t in range(1, 9))  # 9 calls, 11 % success
    b2 = Breaker(RouterConfig(consecutive_failures=100, success_min_requests=5, success_window_s=30.0))
    for t in range(4):
        b2.on_failure(float(t))
    assert not b2.on_failure(40.0)  # the first four fell out of the window


def test_half_open_lets_exactly_one_probe_and_success_closes() -> None:
    b = Breaker(RouterConfig(), random.Random(1))
    b.eject(0.0)
    assert not b.allow(b.open_until - 0.001)
    assert b.available(b.open_until) and b.state == "open"
    assert b.allow(b.open_until)
    assert b.state == "half_open"
    assert not b.allow(b.open_until + 100) and not b.available(b.open_until + 100)
    b.on_success(b.open_until + 1)
    assert b.state == "closed" and b.allow(b.open_until + 2)


def test_released_probe_may_be_sent_again() -> None:
    b = Breaker(RouterConfig(), random.Random(1))
    b.eject(0.0)
    t = b.open_until
    assert b.allow(t)
    b.release()
    assert b.state == "open" and b.allow(t)


def test_failed_probes_back_off_longer_jittered_and_capped() -> None:
    cfg = RouterConfig(backoff_base_s=5.0, backoff_max_s=60.0)
    delays: list[list[float]] = []
    for seed in range(3):
        b = Breaker(cfg, random.Random(seed))
        now = 0.0
        b.eject(now)
        ds = []
        for k in range(7):
            d = b.open_until - now
            low, high = min(60.0, 5.0 * 2**k), min(60.0, 10.0 * 2**k)
            assert low - 1e-9 <= d <= high + 1e-9, (k, d)
            assert b.backoff_bounds(k) == (low, high)
            ds.append(d)
            now = b.open_until
            assert b.allow(now)
            assert not b.on_failure(now)  # the failed probe re-opens; nothing for the owner
            assert b.state == "open"
        assert ds[-1] == pytest.approx(60.0)
        assert b.ejections == 8
        delays.append(ds)
    assert len({ds[0] for ds in delays}) == 3  # jittered: seeds differ


def test_flapping_node_keeps_its_backoff_until_healthy_for_backoff_max() -> None:
    cfg = RouterConfig(backoff_base_s=5.0, backoff_max_s=60.0)
    b = Breaker(cfg, random.Random(0))
    b.eject(0.0)
    now = b.open_until
    b.allow(now)
    b.on_success(now)
    b.eject(now + 1)  # back and failing at once: the second ejection is longer
    assert b.open_until - (now + 1) >= 10.0
    now = b.open_until
    b.allow(now)
    b.on_success(now)
    b.eject(now + 60.0)  # healthy a full backoff_max: from the base again
    assert b.open_until - (now + 60.0) <= 10.0


def test_success_while_open_closes() -> None:
    b = Breaker(RouterConfig())
    b.eject(0.0)
    assert not b.on_failure(1.0) and b.state == "open"
    b.on_success(1.0)
    assert b.state == "closed"


# ---- Router and breakers -----------------------------------------------------------------------


def test_router_ejects_a_node_after_consecutive_call_failures() -> None:
    r, clock = make(["a", "b", "c"])
    for _ in range(4):
        call(r, clock, "a", ok=False)
    assert states(r)["a"] == "closed"
    call(r, clock, "a", ok=False)
    assert states(r)["a"] == "open"
    assert all(r.order(["a", "b", "c"])[0] != "a" for _ in range(20))
    assert r.order(["a", "b", "c"])[-1] == "a"  # ejected: the last resort, not left out


def test_transport_failure_is_not_a_node_failure() -> None:
    r, clock = make(["a", "b"])
    for _ in range(20):
        r.start("a")
        r.attempt("a", "shm", 0.0001, False)
        r.attempt("a", "tcp", 0.001, True)
        clock.advance(0.001)
        r.finish("a", 0.0011, True)
    assert states(r)["a"] == "closed"
    assert r.snapshot()["a"]["transports"]["shm"]["success"] < 1.0


def test_max_ejected_fraction_keeps_the_third_failing_node_of_four() -> None:
    r, clock = make(["n0", "n1", "n2", "n3"], RouterConfig(max_ejected_fraction=0.5))
    for node in ("n0", "n1", "n2"):
        for _ in range(8):
            call(r, clock, node, ok=False)
    assert states(r) == {"n0": "open", "n1": "open", "n2": "closed", "n3": "closed"}
    assert sorted(r.order(["n0", "n1", "n2", "n3"])[:2]) == ["n2", "n3"]


def test_one_of_two_may_be_ejected_and_zero_fraction_ejects_none() -> None:
    r, clock = make(["a", "b"], RouterConfig(max_ejected_fraction=0.5))
    for node in ("a", "b"):
        for _ in range(5):
            call(r, clock, node, ok=False)
    assert states(r) == {"a": "open", "b": "closed"}
    r0, clock0 = make(["a", "b"], RouterConfig(max_ejected_fraction=0.0))
    for _ in range(10):
        call(r0, clock0, "a", ok=False)
    assert states(r0)["a"] == "closed"


def test_all_replicas_ejected_still_returns_them_soonest_due_first() -> None:
    r, clock = make(["a", "b", "c"], RouterConfig(max_ejected_fraction=1.0))
    for node in ("a", "b"):
        for _ in range(5):
            call(r, clock, node, ok=False)
        clock.advance(1.0)
    assert states(r) == {"a": "open", "b": "open", "c": "closed"}
    assert r.order(["a", "b"]) == ["a", "b"]
    assert r.order(["b", "a"]) == ["a", "b"]
    r.start("a")  # forced, not a probe: allowed and counted
    assert r.snapshot()["a"]["in_flight"] == 1
    r.cancel("a")


def test_an_ejected_replica_is_tried_when_the_closed_one_is_down() -> None:
    # Issue 10 (breaker): b came back and was ejected; a, still closed, dies. A read must
    # reach b after a fails rather than fail while b holds the data (panic threshold).
    r, clock = make(["a", "b"])
    for _ in range(5):
        call(r, clock, "b", ok=False)
    assert states(r) == {"a": "closed", "b": "open"}
    assert r.order(["a", "b"]) == ["a", "b"]
    assert r.order(["b", "a"]) == ["a", "b"]


def test_probe_goes_first_once_then_success_brings_the_node_back() -> None:
    r, clock = make(["a", "b", "c"])
    for _ in range(5):
        call(r, clock, "a", ok=False)
    clock.advance(r.snapshot()["a"]["retry_in_s"])
    assert r.order(["a", "b", "c"])[0] == "a"  # due: the next call is its probe
    r.start("a")
    assert states(r)["a"] == "half_open"
    assert r.order(["a", "b", "c"])[-1] == "a"  # one probe only: others try it last
    r.cancel("a")  # never sent: the next call may probe
    assert r.order(["a", "b", "c"])[0] == "a"
    call(r, clock, "a", 0.001, ok=True)
    assert states(r)["a"] == "closed"
    assert "a" in r.order(["a", "b", "c"])


def test_failed_probe_reejects_for_longer() -> None:
    r, clock = make(["a", "b", "c"])
    for _ in range(5):
        call(r, clock, "a", ok=False)
    first = r.snapshot()["a"]["retry_in_s"]
    clock.advance(first)
    call(r, clock, "a", 0.001, ok=False)
    snap = r.snapshot()["a"]
    assert snap["state"] == "open" and snap["ejections"] == 2
    assert snap["retry_in_s"] >= 10.0 - 0.001


def test_one_probe_per_call_others_go_last() -> None:
    r, clock = make(["a", "b", "c", "d"], RouterConfig(max_ejected_fraction=0.75))
    for node in ("a", "b"):
        for _ in range(5):
            call(r, clock, node, ok=False)
    clock.advance(1000.0)
    order = r.order(["a", "b", "c", "d"])
    assert order[0] in ("a", "b") and order[-1] in ("a", "b") and set(order[1:3]) == {"c", "d"}


# ---- Transports --------------------------------------------------------------------------------


def test_transport_order_demotes_a_failed_transport_and_restores_it() -> None:
    r, clock = make(["a"])
    offered = ["shm", "tcp"]
    assert r.transport_order("a", offered) == offered
    r.attempt("a", "shm", 0.0001, True)
    r.attempt("a", "tcp", 0.0002, True)
    r.attempt("a", "shm", 0.0001, False)
    assert r.transport_order("a", offered) == ["tcp", "shm"]
    clock.advance(0.999)
    assert r.transport_order("a", offered) == ["tcp", "shm"]
    clock.advance(0.001)
    assert r.transport_order("a", offered) == ["shm", "tcp"]
    r.attempt("a", "shm", 0.0001, False)  # a second failure in a row: 2 s
    clock.advance(1.5)
    assert r.transport_order("a", offered) == ["tcp", "shm"]
    clock.advance(0.5)
    r.attempt("a", "shm", 0.0001, True)  # a success ends the run
    r.attempt("a", "shm", 0.0001, False)
    clock.advance(1.0)
    assert r.transport_order("a", offered) == ["shm", "tcp"]


def test_transport_far_slower_than_a_later_one_yields_its_place() -> None:
    r, clock = make(["a"])
    offered = ["rdma", "shm", "tcp"]
    r.attempt("a", "shm", 0.005, True)
    r.attempt("a", "tcp", 0.001, True)
    assert r.transport_order("a", offered) == ["rdma", "tcp", "shm"]  # unmeasured keeps its place
    r2, _ = make(["a"])
    r2.attempt("a", "shm", 0.003, True)
    r2.attempt("a", "tcp", 0.001, True)
    assert r2.transport_order("a", offered) == offered  # 3x: preference holds
    # Left idle, the demoted transport's latency decays and it is tried again.
    for _ in range(500):
        clock.advance(0.01)
        r.attempt("a", "tcp", 0.001, True)
    assert r.transport_order("a", ["shm", "tcp"]) == ["shm", "tcp"]
    with pytest.raises(ValueError, match="distinct"):
        r.transport_order("a", ["tcp", "tcp"])


# ---- Hedging and snapshot ----------------------------------------------------------------------


def test_hedge_delay_is_the_quantile_of_recent_successes() -> None:
    r0, clock0 = make(["a"])
    for _ in range(100):
        call(r0, clock0, "a")
    assert r0.hedge_delay() is None  # off by default
    r, clock = make(["a"], RouterConfig(hedge_quantile=0.95, hedge_min_samples=50))
    lats = [i / 1000 for i in range(1, 101)]
    random.Random(3).shuffle(lats)
    for lat in lats[:49]:
        call(r, clock, "a", lat)
    assert r.hedge_delay() is None
    for lat in lats[49:]:
        call(r, clock, "a", lat)
    for _ in range(20):
        call(r, clock, "a", 5.0, ok=False)  # failures are not latencies to hedge on
        clock.advance(10.0)
    assert r.hedge_delay() == pytest.approx(0.095)


def test_snapshot_reports_each_node() -> None:
    r, clock = make(["a", "b"])
    r.start("a")
    r.attempt("a", "tcp", 0.002, True)
    clock.advance(0.002)
    r.finish("a", 0.002, True)
    r.start("b")
    s = r.snapshot()
    assert s["a"]["state"] == "closed" and s["a"]["latency_ms"] == pytest.approx(2.0)
    assert s["a"]["transports"]["tcp"]["latency_ms"] == pytest.approx(2.0)
    assert s["b"]["in_flight"] == 1 and s["b"]["latency_ms"] is None
    assert set(s["a"]) == {"state", "ejections", "retry_in_s", "in_flight", "latency_ms", "success",
                           "cost", "tier", "transports"}


# ---- Properties --------------------------------------------------------------------------------

_op = st.tuples(
    st.sampled_from(["call", "call", "call", "start", "cancel", "advance"]),
    st.integers(0, 5),  # node
    st.integers(1, 63),  # replica subset, as a bit mask
    st.booleans(),  # ok
    st.floats(0.0, 2.0),  # latency or time step
)


@given(
    n=st.integers(1, 6),
    fraction=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    consecutive=st.integers(1, 3),
    ops=st.lists(_op, max_size=80),
    seed=st.integers(0, 2**16),
)
def test_any_event_sequence_keeps_the_invariants(
    n: int, fraction: float, consecutive: int, ops: list[tuple[str, int, int, bool, float]], seed: int
) -> None:
    names = [f"n{i}" for i in range(n)]
    zones = ["z0", "z1"]
    places = {name: Place(zones[i % 2], f"p{i % 3}") for i, name in enumerate(names)}
    cfg = RouterConfig(max_ejected_fraction=fraction, consecutive_failures=consecutive,
                       backoff_base_s=1.0, backoff_max_s=8.0, success_min_requests=2)
    r, clock = make([], cfg, Place("z0", "p0"), places, seed)
    out: dict[str, int] = dict.fromkeys(names, 0)
    allowed = math.ceil(fraction * n)
    for kind, node_i, mask, ok, x in ops:
        node = names[node_i % n]
        replicas = [names[i] for i in range(n) if mask >> i & 1] or [node]
        if kind == "advance":
            clock.advance(x * 10)
        elif kind == "start":
            r.start(node)
            out[node] += 1
        elif kind == "cancel" and out[node]:
            r.cancel(node)
            out[node] -= 1
        elif kind == "call":
            order = r.order(replicas)
            assert order, replicas
            assert len(set(order)) == len(order) and set(order) <= set(replicas)
            r.start(order[0])
            r.attempt(order[0], "tcp", x, ok)
            clock.advance(x)
            r.finish(order[0], x, ok)
        snap = r.snapshot()
        assert sum(s["state"] != "closed" for s in snap.values()) <= allowed
        assert all(snap[k]["in_flight"] == v for k, v in out.items())
        assert all(s["cost"] >= 0 and math.isfinite(s["cost"]) for s in snap.values())
        assert r.transport_order(node, ["shm", "tcp"]) in (["shm", "tcp"], ["tcp", "shm"])
