"""A client's link to a replica it has not used since that replica restarted.

Two nodes, one shard, a reader placed beside A so every read goes to A. B is
killed and restarted behind the reader's back: its kept TCP connection (and its
one-sided mapping of the old process's files) now points at a dead process.
When A then dies, B is the only ready replica, and every read must reach it:
the broken kept connection is replaced at once rather than failing the read and
holding B back as "recently failed" (issue: 39-149 failed reads per 120 s
chaos run, all in the half second after such a kill).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest

from streamrec.errors import TransportError
from streamrec.ps.channel import PREFERENCE
from streamrec.ps.client import PSClient
from streamrec.ps.local import LocalCluster, loopback_spec

_A, _B = "z1n1", "z2n1"
_KEYS = np.arange(1, 2049, dtype=np.uint64)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    spec = loopback_spec(f"stale-{os.getpid()}", zones=2, nodes_per_zone=1, shards=1, dim=8)
    with LocalCluster(spec) as c:
        c.start(timeout_s=300)  # a cold numba cache compiles in each server at first
        with PSClient(spec, transports=("tcp",)) as w:
            w.assign("emb", _KEYS, np.ones((_KEYS.size, 8), np.float32))
        yield c


@pytest.mark.parametrize("transports", [("tcp",), PREFERENCE], ids=["tcp", "all"])
def test_reads_reach_a_replica_restarted_since_its_link_was_used(cluster: LocalCluster,
                                                                  transports: tuple[str, ...]) -> None:
    for name in (_A, _B):
        if cluster.pid(name) is None:
            cluster.start([name])
    with PSClient(cluster.spec, local=_A, transports=transports) as c:
        assert c.find("emb", _KEYS, node=_B)[1].all()  # the link to B is open
        assert c.find("emb", _KEYS)[1].all()
        cluster.kill(_B)
        cluster.start([_B])  # ready again, filled from A; the reader has not noticed
        for _ in range(5):
            assert c.find("emb", _KEYS)[1].all()
        assert c.stats.by_node.get(_B, 0) == 1, "reads went to B: the test would prove nothing"
        cluster.kill(_A)
        failed = 0
        for _ in range(20):
            try:
                assert c.find("emb", _KEYS)[1].all()
            except TransportError:
                failed += 1
        assert failed == 0
    cluster.start([_A])
