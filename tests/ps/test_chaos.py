"""Chaos: random SIGKILL and SIGSTOP of single replicas under a writer and a verifying reader.

Four ``streamrec ps serve`` processes (2 shards x 2 zones: each shard has one
replica per zone). One node at a time is SIGKILLed and restarted, or paused
with SIGSTOP for up to 1.5 s; the next fault waits until every replica is ready
again, so the two replicas of a shard are never down or filling at once. A
writer assigns new keys (each once, its value derived from the key) and
records what was acknowledged; a reader reads acknowledged keys back. At the
end every replica is read directly. Targets: 0 acknowledged writes lost, 0
wrong rows, 0 failed calls (a ready replica of every shard exists throughout).

About 30 s in the default suite (12 s of faults, the rest start-up and recovery);
``-m slow`` runs 120 s of faults.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import numpy as np
import pytest

from streamrec.cluster.router import RouterConfig
from streamrec.errors import TransportError
from streamrec.ps.client import PSClient
from streamrec.ps.local import LocalCluster, loopback_spec

_DIM = 8
_ROUTER = RouterConfig(backoff_base_s=0.5, backoff_max_s=2.0)


def _rows(keys: np.ndarray) -> np.ndarray:
    v = np.empty((keys.size, _DIM), dtype=np.float32)
    v[:] = (keys % 1000).astype(np.float32)[:, None]
    v[:, 0] = keys // 1000
    return v


class _Load:
    def __init__(self, cluster: LocalCluster, seed: int) -> None:
        self.spec = cluster.spec
        self.stop = threading.Event()
        self.acked: list[np.ndarray] = []
        self.acked_n = 0
        self.write_failed: list[str] = []
        self.read_failed: list[str] = []
        self.wrong = 0
        self.missing = 0  # acknowledged rows a read did not find (a replica serving before it caught up)
        self.reads = 0
        self.errors: list[BaseException] = []
        self.seed = seed
        self.started = time.monotonic()
        self.fault = "none"  # the fault in progress (from its start until every replica is ready again)

    def _failure(self, exc: TransportError) -> str:
        return f"{time.monotonic() - self.started:.2f} s, fault {self.fault}: {exc!r}"

    def write(self) -> None:
        try:
            with PSClient(self.spec, router=_ROUTER, seed=self.seed) as c:
                key = 1
                while not self.stop.is_set():
                    keys = np.arange(key, key + 64, dtype=np.uint64)
                    key += 64
                    try:
                        c.assign("emb", keys, _rows(keys))
                    except TransportError as exc:
                        self.write_failed.append(self._failure(exc))
                    else:
                        self.acked.append(keys)
                        self.acked_n += 1
                    time.sleep(0.01)
        except BaseException as exc:
            self.errors.append(exc)

    def read(self) -> None:
        rng = np.random.default_rng(self.seed)
        try:
            with PSClient(self.spec, router=_ROUTER, seed=self.seed + 1) as c:
                while not self.stop.is_set():
                    n = self.acked_n
                    if n == 0:
                        time.sleep(0.01)
                        continue
                    keys = np.concatenate([self.acked[i] for i in rng.integers(0, n, 4)])
                    try:
                        values, found = c.find("emb", keys)
                    except TransportError as exc:
                        self.read_failed.append(self._failure(exc))
                    else:
                        self.reads += 1
                        self.missing += int(np.count_nonzero(~found))
                        self.wrong += int(np.count_nonzero(found & (values != _rows(keys)).any(axis=1)))
                    time.sleep(0.005)
        except BaseException as exc:
            self.errors.append(exc)


def _all_ready(cluster: LocalCluster, timeout_s: float = 60.0) -> None:
    for n in cluster.spec.nodes:
        if cluster.pid(n.name) is None:
            cluster.start([n.name], wait=False)
    for n in cluster.spec.nodes:
        cluster.wait_ready(n.name, timeout_s)


def _chaos(duration_s: float, seed: int) -> None:
    rng = random.Random(seed)
    spec = loopback_spec(f"chaos-{os.getpid()}-{seed}", zones=2, nodes_per_zone=2, shards=2, dim=_DIM)
    names = [n.name for n in spec.nodes]
    faults: list[str] = []
    with LocalCluster(spec) as cluster:
        cluster.start(timeout_s=300)  # a cold numba cache compiles in each server at first
        load = _Load(cluster, seed)
        threads = [threading.Thread(target=load.write, daemon=True),
                   threading.Thread(target=load.read, daemon=True)]
        for t in threads:
            t.start()
        end = time.monotonic() + duration_s
        try:
            while time.monotonic() < end:
                time.sleep(rng.uniform(0.3, 1.5))
                victim = rng.choice(names)
                load.fault = f"{'kill' if rng.random() < 0.5 else 'stop'} {victim}"
                faults.append(load.fault)
                if load.fault.startswith("kill"):
                    cluster.kill(victim)
                    time.sleep(rng.uniform(0.1, 1.0))
                    cluster.start([victim], wait=False)
                else:
                    pid = cluster.pid(victim)
                    assert pid is not None
                    os.kill(pid, signal.SIGSTOP)
                    time.sleep(rng.uniform(0.2, 1.5))
                    os.kill(pid, signal.SIGCONT)
                    time.sleep(0.3)  # the next write shows it what it missed
                _all_ready(cluster)
                load.fault = "none"
        finally:
            time.sleep(0.5)
            load.stop.set()
            for t in threads:
                t.join(30)
        _all_ready(cluster)
        assert not load.errors, load.errors
        keys = np.concatenate(load.acked)
        lost = {}
        shard = spec.shard_of(0, keys)
        with PSClient(spec, transports=("tcp",), timeout_s=30.0) as c:
            for name in names:
                got = np.zeros(keys.size, np.bool_)
                wrong = 0
                for s in range(2):
                    mine = shard == s
                    if name not in spec.replicas(0, s):
                        got[mine] = True
                        continue
                    values, found = c.find("emb", keys[mine], node=name)
                    got[mine] = found
                    wrong += int(np.count_nonzero(found & (values != _rows(keys[mine])).any(axis=1)))
                lost[name] = (int(np.count_nonzero(~got)), wrong)
    summary = (f"faults={faults} acked_writes={load.acked_n} reads={load.reads} "
               f"write_failed={len(load.write_failed)} read_failed={len(load.read_failed)} "
               f"wrong={load.wrong} missing_on_read={load.missing} lost/wrong per replica={lost} "
               f"first failures={(load.write_failed + load.read_failed)[:3]}")
    print(summary)
    assert all(v == (0, 0) for v in lost.values()), summary
    assert load.wrong == 0, summary
    assert not load.write_failed and not load.read_failed, summary
    assert len(faults) >= 3, summary


def test_chaos_single_replica_faults_lose_nothing() -> None:
    _chaos(12.0, seed=1)  # plus start-up and the waits for readiness: about 30 s in all


@pytest.mark.slow
def test_chaos_single_replica_faults_lose_nothing_long() -> None:
    _chaos(120.0, seed=2)
