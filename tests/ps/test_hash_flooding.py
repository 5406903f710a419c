"""Hash flooding through the parameter server: a storage process refuses crafted keys and stays up.

The storage node runs as its own process (``streamrec ps serve``); the table's
hash key is fixed by the spec (``hash_seed``) so the test can craft keys
against it, as an attacker who learned the key could.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from streamrec.cluster.spec import TableSpec
from streamrec.errors import RemoteError
from streamrec.ps import PSClient
from streamrec.ps.local import LocalCluster, loopback_spec
from streamrec.store._index import hash_key_of_seed, hash_keys
from streamrec.transport.frames import Status

SEED = 4242
BUCKETS = 128  # the index of a table of the default capacity (1024 keys)
DIM = 8


def _crafted(n: int) -> np.ndarray:
    """n keys with one first bucket and one tag under the spec's hash key (found by search)."""
    k0, k1 = hash_key_of_seed(SEED)
    cand = np.random.default_rng(11).integers(0, 2**64 - 1, 1 << 23, dtype=np.uint64, endpoint=True)
    h = np.empty_like(cand)
    hash_keys(cand, np.uint64(k0), np.uint64(k1), h)
    sig = (h & np.uint64(BUCKETS - 1)) | ((h >> np.uint64(56)) << np.uint64(32))
    picked = cand[sig == sig[0]]
    assert picked.size >= n
    return picked[:n]


def test_storage_process_refuses_crafted_keys_and_stays_up(tmp_path: Path) -> None:
    spec = loopback_spec("flood", zones=1, nodes_per_zone=1, shards=1, dim=DIM, metrics=False,
                         data_root=tmp_path)
    t = spec.tables[0]
    spec = dataclasses.replace(spec, tables=(TableSpec(t.name, dataclasses.replace(t.config, hash_seed=SEED),
                                                       shards=1, replicas_per_zone=1),))
    bad = _crafted(40)
    good = np.arange(1, 31, dtype=np.uint64)  # few: the crafted keys must fail below the floor
    with LocalCluster(spec) as cluster:
        cluster.start()
        pid = cluster.pid(spec.nodes[0].name)
        with PSClient(spec, transports=("tcp",)) as client:
            client.assign("emb", good, np.ones((good.size, DIM), np.float32))
            for write in (lambda: client.assign("emb", bad, np.ones((bad.size, DIM), np.float32)),
                          lambda: client.find_or_insert("emb", np.concatenate([good[:5], bad]))):
                with pytest.raises(RemoteError) as info:
                    write()
                assert info.value.status == Status.STORE_ERROR
                text = str(info.value)
                assert "hash flooding" in text and "'emb/0 on z1n1'" in text
                assert "nothing of the batch" in text
            # Still up, same process, nothing of the refused batches written, memory small.
            assert cluster.pid(spec.nodes[0].name) == pid
            values, found = client.find("emb", np.concatenate([good, bad]))
            assert found[:good.size].all() and not found[good.size:].any()
            assert (values[:good.size] == 1).all()
            (shard,) = client.node_stats()[spec.nodes[0].name]["shards"]
            assert shard["rows"] == good.size and shard["memory_bytes"] < 1 << 20
            client.assign("emb", bad[:16], np.zeros((16, DIM), np.float32))  # the ones that fit
            assert client.find("emb", bad[:16])[1].all()
