"""Smoke test of ``benchmarks/_ps_baselines.py``: each baseline answers with the rows it was filled with.

Tiny sizes, real processes (spawn), real grpcio and redis-server; the Redis
part is skipped with the reason ``redis_server`` gives when there is none.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _ps_baselines as pb
from _common import redis_server

ROWS = 1000
DIM = 8


def _check_find(client: pb.FindClient) -> None:
    keys = np.array([0, 1, 999, 1000, 2**63, 7], dtype=np.uint64)  # 1000 and 2**63 are absent
    values, found = client.find(keys)
    assert found.tolist() == [True, True, True, False, False, True]
    assert values.shape == (6, DIM) and values.dtype == np.float32
    np.testing.assert_array_equal(values[found], pb.fill_values(keys[found], DIM))
    assert not values[~found].any()
    pb.check_reply(keys[found], values[found], found[found])
    with pytest.raises(pb.BadReply):
        pb.check_reply(keys, values, found)


def test_check_reply_cheap_and_full() -> None:
    keys = np.arange(100, 164, dtype=np.uint64)
    good = pb.fill_values(keys, DIM)
    found = np.ones(keys.size, bool)
    pb.check_reply(keys, good, found, full=False)
    neighbour = good.copy()
    neighbour[3] = pb.fill_values(keys[4:5], DIM)  # a neighbour's row: both checks see it
    middle = good.copy()
    middle[5, DIM // 2] += 1  # one inner element: only the full check sees it
    for bad, cheap_sees in ((neighbour, True), (middle, False)):
        with pytest.raises(pb.BadReply):
            pb.check_reply(keys, bad, found, full=True)
        if cheap_sees:
            with pytest.raises(pb.BadReply, match=f"key {int(keys[3])}"):
                pb.check_reply(keys, bad, found, full=False)
        else:
            pb.check_reply(keys, bad, found, full=False)


@pytest.mark.parametrize("target", [pb.serve_grpc_table, pb.serve_conventional])
def test_grpc_servers_answer_filled_rows_and_drive_load(target: Callable[..., None]) -> None:
    with pb.served(target, ROWS, DIM, threads=2) as srv:
        client = pb.GrpcFindClient(srv.address)
        try:
            _check_find(client)
        finally:
            client.close()
        res = pb.run_clients(functools.partial(pb.GrpcFindClient, srv.address), clients=2, seconds=0.3,
                             keys=ROWS, batch=64, warmup_s=0.05, server_pids=(srv.pid,))
    assert res.calls > 0 and res.keys_per_s == pytest.approx(res.round_trips_per_s * 64)
    assert res.by_transport is None  # gRPC clients report no transports
    assert res.check_s > 0 and res.full_checks <= res.calls // 64
    assert 0 < res.p50_ms <= res.p99_ms
    assert len(res.client_cpu_s) == 2 and res.server_cpu_s is not None and res.server_cpu_s > 0


def test_wrong_rows_fail_the_load_driver() -> None:
    with pb.served(pb.serve_grpc_table, ROWS, DIM) as srv, pytest.raises(RuntimeError, match="BadReply"):
        # Keys beyond the filled rows come back absent: a path that loses rows cannot post a number.
        pb.run_clients(functools.partial(pb.GrpcFindClient, srv.address), clients=1, seconds=0.2,
                       keys=2 * ROWS, batch=64, warmup_s=0.0)



def test_inline_driver_checks_replies_and_counts() -> None:
    with pb.served(pb.serve_grpc_table, ROWS, DIM) as srv:
        make = functools.partial(pb.GrpcFindClient, srv.address)
        res = pb.run_clients(make, clients=1, seconds=0.2, keys=ROWS, batch=64, warmup_s=0.0, inline=True,
                             server_pids=(srv.pid,))
        assert res.calls > 0 and res.server_cpu_s is not None and res.by_transport is None
        with pytest.raises(pb.BadReply):  # in this process the check's own exception arrives
            pb.run_clients(make, clients=1, seconds=0.2, keys=2 * ROWS, batch=64, warmup_s=0.0, inline=True)


def test_redis_mget_answers_filled_rows() -> None:
    with redis_server() as srv:
        if isinstance(srv, str):
            pytest.skip(srv)
        import redis

        loader = redis.Redis(host=srv[0], port=srv[1])
        seen: list[int] = []
        pb.load_redis(loader, ROWS, DIM, batch=300, per_pipeline=2, progress=seen.append)
        assert seen[-1] == ROWS and loader.dbsize() == ROWS
        pid = pb.redis_pid(loader)
        loader.close()
        client = pb.RedisFindClient(srv[1], DIM, host=srv[0])
        try:
            _check_find(client)
        finally:
            client.close()
        res = pb.run_clients(functools.partial(pb.RedisFindClient, srv[1], DIM, host=srv[0]), clients=1,
                             seconds=0.2, keys=ROWS, batch=64, warmup_s=0.0, server_pids=(pid,))
        assert res.calls > 0 and res.server_cpu_s is not None


def test_server_cpu_seconds_reads_this_process() -> None:
    assert pb.server_cpu_seconds(os.getpid()) > 0
