"""``streamrec demo ps``: the parameter server at work on loopback (also a phase of ``streamrec demo``).

Owns: the demo's script: start a small cluster (two zones, two nodes per zone,
two shards, one replica of each shard per zone), load rows, look them up
through each transport with a live display, kill a replica and show the
traffic move and its breaker open, restart it and show it come back, and end
with a summary table. It must not reach into the servers: it is a client and
an operator, like any other.

Thread safety: runs once, on the main thread (the restart waits on a helper
thread so the lookup load never stops).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from streamrec.cluster.router import RouterConfig
from streamrec.cluster.spec import ClusterSpec
from streamrec.errors import TransportError
from streamrec.ps.client import PSClient
from streamrec.ps.local import LocalCluster, loopback_spec

__all__ = ["PsDemoResult", "run_demo"]

_BATCH = 4096
_LOCAL = "z1n1"  # the client sits beside this node: same host, same pod
_VICTIM = "z1n1"  # the replica the demo kills: the client's favourite, so the move is visible
# The demo shortens Finagle's 5-300 s ejection so a restart is seen within seconds.
_ROUTER = RouterConfig(backoff_base_s=1.0, backoff_max_s=4.0, consecutive_failures=3)


@dataclass
class _Run:
    """One load phase's tally."""

    calls: int = 0
    keys: int = 0
    failed: int = 0
    wrong: int = 0
    seconds: float = 0.0
    lat: list[float] = field(default_factory=list)

    def row(self) -> tuple[str, str, str, str, str]:
        p50, p99 = (np.percentile(self.lat, [50, 99]) * 1e3) if self.lat else (float("nan"),) * 2
        rate = self.keys / self.seconds if self.seconds else 0.0
        bad = self.failed + self.wrong
        return f"{rate / 1e6:.2f} M", f"{p50:.2f}", f"{p99:.2f}", f"{self.calls:,}", f"{bad}"


def _lookups(client: PSClient, rows: int, run: _Run, rng: np.random.Generator) -> None:
    """One lookup call of a batch of random loaded keys, checked and tallied."""
    keys = rng.integers(0, rows, _BATCH, dtype=np.uint64)
    t0 = time.perf_counter()
    try:
        values, found = client.find("emb", keys)
    except TransportError:
        run.failed += 1
        return
    dt = time.perf_counter() - t0
    run.calls += 1
    run.keys += _BATCH
    run.lat.append(dt)
    # every loaded row holds its key in element 0: a wrong or missing row is counted, never hidden
    if not found.all() or not np.array_equal(values[:, 0], keys.astype(np.float32)):
        run.wrong += 1


def _transports() -> list[str]:
    out = ["one_sided", "shm"]
    try:
        import ucxx  # noqa: F401

        out.append("rdma")
    except ImportError:
        pass
    return [*out, "tcp"]


def _load_rows(console: Console, client: PSClient, rows: int, dim: int) -> None:
    chunk = 65_536
    with Progress(TextColumn("loading rows"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        task = bar.add_task("load", total=rows)
        for lo in range(0, rows, chunk):
            keys = np.arange(lo, min(lo + chunk, rows), dtype=np.uint64)
            values = np.zeros((keys.size, dim), dtype=np.float32)
            values[:, 0] = keys
            values[:, 1:] = 0.01
            client.assign("emb", keys, values)
            bar.update(task, advance=keys.size)


def _phase_table(title: str, results: dict[str, _Run]) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("path", "keys/s", "p50 ms", "p99 ms", "calls", "failed"):
        t.add_column(col, justify="right" if col != "path" else "left")
    for name, run in results.items():
        t.add_row(name, *run.row())
    return t


def _node_table(client: PSClient, shares: dict[str, int], spec: ClusterSpec) -> Table:
    snap = client.router.snapshot()
    t = Table(title="replicas as the client sees them", title_justify="left")
    for col in ("node", "zone/pod", "shard", "breaker", "ejections", "share of calls", "latency ms"):
        t.add_column(col)
    total = sum(shares.values()) or 1
    style = {"closed": "green", "open": "red", "half_open": "yellow"}
    for n in spec.nodes:
        s = snap[n.name]
        shards = ",".join(str(sh) for _, sh in spec.shards_on(n.name))
        lat = s["latency_ms"]
        t.add_row(n.name, f"{n.zone}/{n.pod}", shards, Text(s["state"], style=style.get(s["state"], "")),
                  str(s["ejections"]), f"{100 * shares.get(n.name, 0) / total:5.1f} %",
                  f"{lat:.2f}" if lat is not None else "-")
    return t


def _failover(console: Console, cluster: LocalCluster, spec: ClusterSpec, rows: int, seconds: float,
              rng: np.random.Generator) -> tuple[_Run, PSClient]:
    client = PSClient(spec, local=_LOCAL, router=_ROUTER, seed=1)
    run = _Run()
    events: list[str] = []
    t0 = time.monotonic()
    kill_at, restart_at, end_at = seconds, 2.5 * seconds, 60.0
    killed = restarted = False
    restart_done = threading.Event()
    window: list[dict[str, int]] = []
    last = dict(client.stats.by_node)
    seen_open = seen_back = False

    def restart() -> None:
        cluster.restart(_VICTIM)
        restart_done.set()

    with Live(console=console, refresh_per_second=4, transient=False) as live:
        while True:
            now = time.monotonic() - t0
            _lookups(client, rows, run, rng)
            if not killed and now >= kill_at:
                cluster.kill(_VICTIM)
                killed = True
                events.append(f"{now:5.1f} s  SIGKILL {_VICTIM} (shard 0's replica in the client's pod)")
            if killed and not restarted and now >= restart_at:
                threading.Thread(target=restart, daemon=True).start()
                restarted = True
                events.append(f"{now:5.1f} s  restarting {_VICTIM}; it refills shard 0 from its peer")
            state = client.router.snapshot()[_VICTIM]["state"]
            if killed and not seen_open and state == "open":
                seen_open = True
                events.append(f"{now:5.1f} s  breaker for {_VICTIM} opened; "
                              "its traffic went to the other zone")
            if restart_done.is_set() and not seen_back and state == "closed" and \
                    client.stats.by_node.get(_VICTIM, 0) > last.get(_VICTIM, 0):
                seen_back = True
                events.append(f"{now:5.1f} s  {_VICTIM} is back: breaker closed, local traffic returned")
                end_at = now + seconds / 2
            if run.calls % 25 == 0:
                cur = dict(client.stats.by_node)
                window.append({k: cur.get(k, 0) - last.get(k, 0) for k in cur})
                window = window[-8:]
                last = cur
                shares: dict[str, int] = {}
                for w in window:
                    for k, v in w.items():
                        shares[k] = shares.get(k, 0) + v
                live.update(Group(_node_table(client, shares, spec),
                                  Text("\n".join(events) or "steady state: every lookup served in zone z1")))
            if now >= end_at:
                break
    run.seconds = time.monotonic() - t0
    console.print()
    return run, client


@dataclass(frozen=True)
class PsDemoResult:
    """What the PS demo measured: the failover phase's calls, failures, wrong rows and retried calls,
    and the failed calls and wrong rows of every phase."""

    failover_calls: int
    failover_failed: int
    failover_wrong: int
    retried_calls: int
    failed: int
    wrong: int

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.wrong == 0


def run_demo(*, seconds_per_phase: float = 4.0, rows: int = 1_000_000,
             console: Console | None = None) -> PsDemoResult:
    """Run the demo and return what it measured (``ok``: every lookup succeeded with the right rows)."""
    if rows < _BATCH or seconds_per_phase <= 0:
        raise ValueError(f"rows >= {_BATCH} and seconds > 0 required, got {rows}, {seconds_per_phase}")
    console = console or Console()
    started = time.monotonic()
    spec = loopback_spec(f"demo-{os.getpid()}")
    args = ("--rdma",) if "rdma" in _transports() else ()
    console.rule("streamrec demo: a parameter server on loopback")
    console.print(f"{len(spec.nodes)} storage processes in 2 zones; table 'emb' (dim 64, Adagrad) in "
                  f"2 shards, one replica of each shard per zone; the client runs beside {_LOCAL}.")
    with LocalCluster(spec, args=args) as cluster:
        with console.status("starting storage processes"):
            cluster.start()
        for n in spec.nodes:
            console.print(f"  {n.name}  zone {n.zone} pod {n.pod}  tcp {n.address}  "
                          f"metrics http://{n.host}:{n.metrics_port}/metrics  "
                          f"shards {[s for _, s in spec.shards_on(n.name)]}")
        loader = PSClient(spec, local=_LOCAL, transports=("shm", "tcp"), timeout_s=60.0)
        _load_rows(console, loader, rows, spec.tables[0].config.dim)
        loader.close()
        rng = np.random.default_rng(0)
        results: dict[str, _Run] = {}
        console.print(f"\nlookups of {_BATCH} random keys per call, {seconds_per_phase:g} s per path:")
        for name in _transports():
            client = PSClient(spec, local=_LOCAL, transports=(name,), router=_ROUTER, seed=0)
            run = results[name] = _Run()
            for _ in range(3):  # connect and warm up outside the measurement
                _lookups(client, rows, _Run(), rng)
            t0 = time.monotonic()
            with Live(_phase_table("by transport", results), console=console, refresh_per_second=4,
                      transient=True) as live:
                while time.monotonic() - t0 < seconds_per_phase:
                    _lookups(client, rows, run, rng)
                    run.seconds = time.monotonic() - t0
                    if run.calls % 20 == 0:
                        live.update(_phase_table("by transport", results))
            client.close()
        console.print(_phase_table("by transport (single client, one call in flight)", results))
        console.print("\nfailover: the client uses every transport; a replica dies and comes back")
        fo, client = _failover(console, cluster, spec, rows, seconds_per_phase, rng)
        results["failover (all paths)"] = fo
        st = client.stats
        client.close()
    summary = _phase_table("summary", results)
    console.print(summary)
    ok = all(r.failed == 0 and r.wrong == 0 for r in results.values())
    console.print(f"failover: {fo.calls:,} calls, {st.retried_calls} needed a retry "
                  f"({st.retries} retries), failed calls: {fo.failed}, wrong rows: {fo.wrong}; "
                  f"served by transport: {st.by_transport}")
    console.print(f"[{'green' if ok else 'red'}]failed calls: {sum(r.failed for r in results.values())}"
                  f"[/] · total time {time.monotonic() - started:.0f} s")
    return PsDemoResult(failover_calls=fo.calls, failover_failed=fo.failed, failover_wrong=fo.wrong,
                        retried_calls=st.retried_calls, failed=sum(r.failed for r in results.values()),
                        wrong=sum(r.wrong for r in results.values()))
