"""NaN, infinity, float32 overflow and bad learning rates through real storage processes.

One cluster serves the module: two zones of one node each, one shard of two
tables (dim 4, Adagrad), ``emb`` with the default policy ("raise") and
``lenient`` with ``nonfinite = "skip"``, so each node holds a full replica of
both. Every refusal must come back as a clear status (NON_FINITE with the row
count and first key, or BAD_REQUEST for a learning rate), leave both replicas as
they were, not be retried on the other replica, and leave both processes serving.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator

import numpy as np
import pytest

from streamrec.cluster.spec import TableSpec
from streamrec.errors import NonFiniteValues
from streamrec.ps.client import PSClient
from streamrec.ps.local import LocalCluster, loopback_spec
from streamrec.transport.frames import Frame, Kind, Status
from streamrec.transport.tcp import TcpConnection

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

D = 4
_NODES = ("z1n1", "z2n1")
_KEYS = np.arange(1, 65, dtype=np.uint64)


def _rows(keys: np.ndarray) -> np.ndarray:
    return (keys[:, None] + np.arange(D) / 8).astype(np.float32)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    spec = loopback_spec(f"nonfinite-{os.getpid()}", zones=2, nodes_per_zone=1, shards=1, dim=D,
                         metrics=False)
    emb = spec.tables[0]
    lenient = TableSpec("lenient", dataclasses.replace(emb.config, nonfinite="skip"), shards=1,
                        replicas_per_zone=emb.replicas_per_zone)
    spec = dataclasses.replace(spec, tables=(emb, lenient))
    with LocalCluster(spec) as c:
        c.start()
        with PSClient(spec, transports=("tcp",)) as loader:
            for name in ("emb", "lenient"):
                loader.assign(name, _KEYS, _rows(_KEYS))
        yield c


@pytest.fixture()
def client(cluster: LocalCluster) -> Iterator[PSClient]:
    with PSClient(cluster.spec, transports=("tcp",)) as c:
        yield c


def _replicas(client: PSClient, table: str, keys: np.ndarray) -> list[np.ndarray]:
    """Each node's rows of ``keys`` (all must be present)."""
    out = []
    for node in _NODES:
        values, found = client.find(table, keys, node=node)
        assert found.all()
        out.append(values)
    return out


def _serving(cluster: LocalCluster) -> None:
    for node in _NODES:
        assert cluster.pid(node) is not None, cluster.log_tail(node)
        assert cluster.hello(node) is not None


def _raw(cluster: LocalCluster, node: str, frame: Frame) -> Frame:
    with TcpConnection(cluster.spec.node(node).address) as conn:
        return conn.request(frame, 5.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e40])
def test_values_refused_whole_on_every_replica(cluster: LocalCluster, client: PSClient, bad: float) -> None:
    keys = np.array([3, 900, 5, 7], dtype=np.uint64)
    vals = np.ones((4, D))
    vals[2, 0] = bad
    vals[3, 3] = bad
    with pytest.raises(NonFiniteValues) as err:
        client.assign("emb", keys, vals)
    assert (err.value.rows, err.value.first_key) == (2, 5)
    assert client.stats.retries == 0  # the data's fault: no replica was asked twice
    for got in _replicas(client, "emb", _KEYS):
        np.testing.assert_array_equal(got, _rows(_KEYS))
    assert not client.find("emb", [900])[1].any()
    _serving(cluster)
    client.assign("emb", [900], np.ones((1, D)))  # the same client and servers go on
    client.erase("emb", [900])


@pytest.mark.parametrize("case", ["nan", "inf", "overflow"])
def test_gradient_steps_refused_whole(cluster: LocalCluster, client: PSClient, case: str) -> None:
    keys = _KEYS[:8]
    g = np.full((8, D), 0.5, dtype=np.float32)
    lr = 0.1
    if case == "nan":
        g[6, 1] = np.nan
    elif case == "inf":
        g[6, 1] = np.inf
    else:  # finite gradients whose step overflows float32
        g[6:] = 1e30
        lr = 1e20
    before = _replicas(client, "emb", keys)
    with pytest.raises(NonFiniteValues, match="first key 7") as err:
        client.apply_gradients("emb", keys, g, lr)
    assert err.value.rows == (1 if case != "overflow" else 2)
    assert client.stats.retries == 0
    for was, now in zip(before, _replicas(client, "emb", keys), strict=True):
        np.testing.assert_array_equal(was, now)
    _serving(cluster)


def test_the_reply_names_rows_and_first_key(cluster: LocalCluster) -> None:
    vals = np.ones((3, D), dtype=np.float32)
    vals[1:, 2] = np.inf
    reply = _raw(cluster, "z1n1", Frame(Kind.ASSIGN, [np.array([11, 12, 13], np.uint64), vals],
                                        request_id=0xF00D, table=0, shard=0))
    assert reply.status == Status.NON_FINITE
    assert "2 row(s)" in reply.text() and "first key 12" in reply.text()
    assert reply.buffers[1].tolist() == [2, 12]
    assert Status.NON_FINITE.retriable is False


@pytest.mark.parametrize("lr", [0.0, -1.0, math.nan, math.inf])
def test_learning_rate_refused(cluster: LocalCluster, client: PSClient, lr: float) -> None:
    with pytest.raises(ValueError, match="lr"):
        client.apply_gradients("emb", _KEYS[:2], np.ones((2, D)), lr)
    # Past the client's own check, the service refuses it too.
    frame = Frame(Kind.APPLY_GRADIENTS, [_KEYS[:2].copy(), np.ones((2, D), np.float32), np.array([lr])],
                  request_id=0xBEEF, table=0, shard=0)
    for node in _NODES:
        reply = _raw(cluster, node, frame)
        assert reply.status == Status.BAD_REQUEST, reply.text()
        assert "lr: expected a finite number > 0" in reply.text()
    for got in _replicas(client, "emb", _KEYS[:2]):
        np.testing.assert_array_equal(got, _rows(_KEYS[:2]))
    _serving(cluster)


def test_skip_policy_writes_the_rest_on_every_replica(cluster: LocalCluster, client: PSClient) -> None:
    def skipped() -> list[int]:
        stats = client.node_stats()
        return [next(s["nonfinite_skipped"] for s in stats[n]["shards"] if s["table"] == "lenient")
                for n in _NODES]

    start = skipped()
    keys = np.array([21, 22, 23], dtype=np.uint64)
    vals = np.full((3, D), 7.0)
    vals[1, 0] = math.nan
    client.assign("lenient", keys, vals)
    g = np.full((3, D), 1.0, dtype=np.float32)
    g[2, 3] = np.inf
    found = client.apply_gradients("lenient", keys, g, 0.5)
    assert found.tolist() == [True, True, False]  # key 23's step was dropped
    rows = _replicas(client, "lenient", keys)
    np.testing.assert_array_equal(rows[0], rows[1])
    np.testing.assert_array_equal(rows[0][1], _rows(keys[1:2])[0] - 0.5)  # its assign dropped, its step kept
    np.testing.assert_array_equal(rows[0][2], np.full(D, 7.0))  # its assign kept, its step dropped
    assert rows[0][0, 0] < 7.0  # assigned and stepped
    assert [b - a for a, b in zip(start, skipped(), strict=True)] == [2, 2]
    _serving(cluster)
