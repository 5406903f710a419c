"""The embedded PSClient against a dict model and a directly driven EmbeddingTable; input checks;
and one end-to-end check over TCP to a StorageServer in this process."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from numpy.testing import assert_array_equal

from streamrec import EmbeddingTable
from streamrec.cluster.spec import ClusterSpec, embedded_spec
from streamrec.errors import ConfigError, RemoteError
from streamrec.ps import PSClient, StorageServer
from streamrec.ps.local import loopback_spec
from streamrec.ps.service import MAX_KEYS
from streamrec.transport.frames import Status

SPEC = embedded_spec()  # table "emb": dim 64, float32, adagrad, 2 shards
D = SPEC.tables[0].config.dim
U64_MAX = 2**64 - 1
KEY_POOL = [0, 1, 2, 3, 42, 2**32, 2**32 + 1, 2**63, 0x9E3779B97F4A7C15, U64_MAX - 1, U64_MAX]

# dyadic values of few bits: sums and Adagrad's steps come out bitwise equal whatever the order
dyadic = st.integers(-32, 32).map(lambda i: i / 4)
key_batches = st.lists(st.sampled_from(KEY_POOL), max_size=12)


COLUMNS = np.resize(np.array([1, -0.5, 2, 0.25, 0, -1], np.float32), D)


def matrix(data: st.DataObject, n: int) -> np.ndarray:
    """(n, D) rows of exact dyadic values: one drawn number per row times a fixed column pattern."""
    flat = data.draw(st.lists(dyadic, min_size=n, max_size=n))
    return np.array(flat, dtype=np.float32)[:, None] * COLUMNS


class ClientModel(RuleBasedStateMachine):
    """Random op sequences on an embedded client, mirrored on a dict {key: row} and on one
    EmbeddingTable (the client's shards are tables of the same config, so every row must agree)."""

    def __init__(self) -> None:
        super().__init__()
        self.client = PSClient()
        self.ref = EmbeddingTable.from_config(SPEC.tables[0].config)
        self.model: dict[int, np.ndarray] = {}
        self.calls = 0

    def teardown(self) -> None:
        self.client.close()
        self.ref.close()

    @rule(batch=key_batches)
    def find(self, batch: list[int]) -> None:
        keys = np.array(batch, dtype=np.uint64)
        values, found = self.client.find("emb", keys)
        self.calls += 1
        assert values.shape == (len(batch), D) and values.dtype == np.float32
        assert found.tolist() == [k in self.model for k in batch]
        for i, k in enumerate(batch):
            assert_array_equal(values[i], self.model.get(k, np.zeros(D, np.float32)))

    @rule(batch=key_batches)
    def find_or_insert(self, batch: list[int]) -> None:
        keys = np.array(batch, dtype=np.uint64)
        got = self.client.find_or_insert("emb", keys)
        self.calls += 1
        assert_array_equal(got, self.ref.find_or_insert(keys))
        for i, k in enumerate(batch):
            if k in self.model:
                assert_array_equal(got[i], self.model[k])
            self.model[k] = got[i].copy()

    @rule(batch=key_batches, only_existing=st.booleans(), data=st.data())
    def assign(self, batch: list[int], only_existing: bool, data: st.DataObject) -> None:
        keys = np.array(batch, dtype=np.uint64)
        values = matrix(data, len(batch))
        self.client.assign("emb", keys, values, only_existing=only_existing)
        self.calls += 1
        last = {k: values[i] for i, k in enumerate(batch)}  # the last value of a repeated key wins
        for k, v in last.items():
            if k in self.model or not only_existing:
                self.model[k] = v.copy()
        present = [k for k in last if k in self.model]
        if present:
            self.ref.insert_or_assign(np.array(present, np.uint64), np.array([last[k] for k in present]))

    @rule(batch=key_batches, lr=st.sampled_from([0.125, 0.25, 1.0]), data=st.data())
    def apply_gradients(self, batch: list[int], lr: float, data: st.DataObject) -> None:
        keys = np.array(batch, dtype=np.uint64)
        grads = matrix(data, len(batch))
        found = self.client.apply_gradients("emb", keys, grads, lr)
        self.calls += 1
        assert found.tolist() == [k in self.model for k in batch]
        assert self.ref.apply_gradients(keys, grads, lr).tolist() == found.tolist()
        for k in set(batch) & self.model.keys():
            self.model[k] = self.ref.find(np.array([k], np.uint64))[0][0].copy()

    @rule(batch=key_batches)
    def erase(self, batch: list[int]) -> None:
        n = self.client.erase("emb", np.array(batch, dtype=np.uint64))
        self.calls += 1
        assert n == len(set(batch) & self.model.keys())
        for k in set(batch):
            self.model.pop(k, None)
        if batch:
            self.ref.erase(np.array(batch, np.uint64))

    @precondition(lambda self: self.model)
    @rule()
    def everything_agrees_with_the_reference_table(self) -> None:
        keys = np.array(sorted(self.model), dtype=np.uint64)
        values, found = self.client.find("emb", keys)
        self.calls += 1
        want, want_found = self.ref.find(keys)
        assert found.all() and want_found.all()
        assert_array_equal(values, want)

    @invariant()
    def rows_and_stats(self) -> None:
        stats = self.client.node_stats()["local"]  # node-level: not counted in stats.calls
        assert sum(s["rows"] for s in stats["shards"]) == len(self.model)
        st_ = self.client.stats
        assert st_.calls == self.calls
        assert st_.failed_calls == st_.retries == st_.hedged == 0


TestClientModel = ClientModel.TestCase


@pytest.fixture
def client() -> Iterator[PSClient]:
    with PSClient() as c:
        yield c


def test_initial_values_are_the_initializers_and_deterministic_across_clients() -> None:
    keys = np.array([7, 3, 7, U64_MAX, 0], dtype=np.uint64)
    with PSClient() as a, PSClient() as b:
        va = a.find_or_insert("emb", keys)
        vb = b.find_or_insert("emb", keys[::-1])[::-1]
    ref = EmbeddingTable.from_config(SPEC.tables[0].config)
    assert_array_equal(va, ref.find_or_insert(keys))
    assert_array_equal(va, vb)
    assert_array_equal(va[0], va[2])
    assert not np.array_equal(va[0], va[1])


def test_assign_duplicates_last_wins(client: PSClient) -> None:
    keys = [5, 6, 5, 5, 6]
    values = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, D), np.float32)
    client.assign("emb", keys, values)
    got, found = client.find("emb", [5, 6])
    assert found.all()
    assert got[:, 0].tolist() == [3.0, 4.0]


def test_apply_gradients_duplicates_are_summed(client: PSClient) -> None:
    ref = EmbeddingTable.from_config(SPEC.tables[0].config)
    keys = np.array([1, 2, 1, 1], np.uint64)
    client.assign("emb", [1, 2], np.ones((2, D), np.float32))
    ref.insert_or_assign(np.array([1, 2], np.uint64), np.ones((2, D), np.float32))
    g = np.arange(4 * D, dtype=np.float32).reshape(4, D) / 8
    client.apply_gradients("emb", keys, g, 0.5)
    summed = np.stack([g[0] + g[2] + g[3], g[1]])
    ref.apply_gradients(np.array([1, 2], np.uint64), summed, 0.5)  # one step of the summed gradient
    assert_array_equal(client.find("emb", [1, 2])[0], ref.find(np.array([1, 2], np.uint64))[0])


def test_keys_of_any_integer_dtype(client: PSClient) -> None:
    client.assign("emb", np.array([1, 2], np.int32), np.ones((2, D)))
    for k in (np.array([1, 2], np.uint8), np.array([1, 2], np.int64), [1, 2], (1, 2)):
        assert client.find("emb", k)[1].all()
    assert client.find("emb", np.arange(6, dtype=np.uint64)[1:5:3])[1].tolist() == [True, False]


def test_empty_calls(client: PSClient) -> None:
    values, found = client.find("emb", [])
    assert values.shape == (0, D) and found.shape == (0,)
    assert client.find_or_insert("emb", np.zeros(0, np.uint64)).shape == (0, D)
    client.assign("emb", [], np.zeros((0, D)))
    assert client.apply_gradients("emb", [], np.zeros((0, D)), 0.1).shape == (0,)
    assert client.erase("emb", []) == 0


def test_table_by_index(client: PSClient) -> None:
    client.assign(0, [9], np.ones((1, D)))
    assert client.find("emb", [9])[1].all()


@pytest.mark.parametrize("keys,exc,match", [
    (np.zeros((2, 2), np.uint64), ValueError, r"keys: expected a 1-D array, got shape \(2, 2\)"),
    (5, ValueError, "keys: expected a 1-D array"),
    (np.array([1.0, 2.0]), TypeError, "keys: expected integers, got float64"),
    (np.array([True]), TypeError, "keys: expected integers, got bool"),
    (np.array(["a"]), TypeError, "keys: expected integers"),
    (np.array([3, -1]), ValueError, "negative keys"),
])
def test_bad_keys(client: PSClient, keys: object, exc: type, match: str) -> None:
    for call in (lambda: client.find("emb", keys), lambda: client.find_or_insert("emb", keys),
                 lambda: client.erase("emb", keys), lambda: client.assign("emb", keys, np.zeros((2, D))),
                 lambda: client.apply_gradients("emb", keys, np.zeros((2, D)), 0.1)):
        with pytest.raises(exc, match=match):
            call()
    assert client.stats.calls == 0


@pytest.mark.parametrize("shape", [(2, D + 1), (3, D), (2,), (D,), (2, D, 1)])
def test_wrong_value_shapes(client: PSClient, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=rf"values: expected \(2, {D}\)"):
        client.assign("emb", [1, 2], np.zeros(shape))
    with pytest.raises(ValueError, match=rf"grads: expected \(2, {D}\)"):
        client.apply_gradients("emb", [1, 2], np.zeros(shape), 0.1)
    assert client.stats.calls == 0


@pytest.mark.parametrize("lr", [-0.1, 0, 0.0, float("nan"), float("inf"), True, "0.1", None, np.array([0.1])])
def test_bad_lr(client: PSClient, lr: object) -> None:
    with pytest.raises(ValueError, match="lr: expected a finite number > 0"):
        client.apply_gradients("emb", [1], np.zeros((1, D)), lr)


@pytest.mark.parametrize("lr", [1, 0.5, np.float32(0.5), np.float64(2.0)])
def test_good_lr(client: PSClient, lr: float) -> None:
    assert client.apply_gradients("emb", [1], np.zeros((1, D)), lr).tolist() == [False]


def test_unknown_table(client: PSClient) -> None:
    for call in (lambda: client.find("nope", [1]), lambda: client.find_or_insert("nope", [1]),
                 lambda: client.assign("nope", [1], np.zeros((1, D))), lambda: client.erase("nope", [1]),
                 lambda: client.apply_gradients("nope", [1], np.zeros((1, D)), 0.1),
                 lambda: client.find(1, [1])):
        with pytest.raises(ConfigError, match="unknown table"):
            call()


@pytest.mark.parametrize("transports", [(), ("udp",), ("tcp", "inproc"), ("TCP",)])
def test_transports_not_in_the_list(transports: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="transports: expected a non-empty subset of"):
        PSClient(transports=transports)


@pytest.mark.parametrize("timeout_s", [0, -1.0, float("nan")])
def test_bad_timeout(timeout_s: float) -> None:
    with pytest.raises(ValueError, match="timeout_s: expected > 0"):
        PSClient(timeout_s=timeout_s)


def test_embedded_client_ignores_transports() -> None:
    with PSClient(transports=("tcp",)) as c:
        c.assign("emb", [1], np.ones((1, D)))
        assert c.find("emb", [1])[1].all()
        assert c.stats.by_transport == {"inproc": 2}


def test_stats_counters_move(client: PSClient) -> None:
    keys = np.array([1, 2, 3, 4, 5, 6, 7, 8], np.uint64)  # both shards of the embedded spec
    shards = len(set(SPEC.shard_of(0, keys).tolist()))
    assert shards == 2
    client.assign("emb", keys, np.zeros((8, D)))
    client.find("emb", keys)
    s = client.stats
    assert s.calls == 2 and s.requests == 2 * shards
    assert s.by_transport == {"inproc": 2 * shards} and s.by_node == {"local": 2 * shards}
    assert s.failed_calls == s.retries == s.retried_calls == s.hedged == s.failed_replica_writes == 0
    client.find("emb", [1])  # one shard only
    assert s.calls == 3 and s.requests == 2 * shards + 1


def test_snapshot_without_a_data_dir_is_a_remote_error(client: PSClient) -> None:
    with pytest.raises(RemoteError, match="no data dir") as info:
        client.snapshot()
    assert info.value.status == Status.BAD_REQUEST


def test_node_stats(client: PSClient) -> None:
    client.assign("emb", [1, 2, 3], np.zeros((3, D)))
    stats = client.node_stats()
    assert list(stats) == ["local"]
    assert sum(s["rows"] for s in stats["local"]["shards"]) == 3


def test_too_many_keys(client: PSClient) -> None:
    with pytest.raises(ValueError, match=f"at most {MAX_KEYS}"):
        client.find("emb", np.arange(MAX_KEYS + 1, dtype=np.uint64))


# -- end to end over TCP ----------------------------------------------------------------------------


@contextlib.contextmanager
def ready_server(spec: ClusterSpec, *, shm: bool) -> Iterator[str]:
    """The spec's first node served in this process, ready; yields its name."""
    node = spec.nodes[0].name
    server = StorageServer(spec, node, shm=shm).start()
    try:
        deadline = time.monotonic() + 10
        while not server.ready and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.ready
        yield node
    finally:
        server.stop()


def test_find_and_assign_over_tcp_to_a_server_in_this_process(tmp_path: Path) -> None:
    spec = loopback_spec("client-e2e", zones=1, nodes_per_zone=1, shards=2, dim=8, metrics=False,
                         data_root=tmp_path)
    with ready_server(spec, shm=False) as node, PSClient(spec, transports=("tcp",)) as client:
        keys = np.array([1, 2, 3, 2**63, U64_MAX, 1], np.uint64)
        values = np.arange(6 * 8, dtype=np.float32).reshape(6, 8)
        client.assign("emb", keys, values)
        got, found = client.find("emb", np.append(keys, np.uint64(77)))
        assert found.tolist() == [True] * 6 + [False]
        assert_array_equal(got[:6][1:5], values[1:5])
        assert_array_equal(got[0], values[5])  # the last of key 1's values
        assert_array_equal(got[5], values[5])
        assert not got[6].any()
        first = client.find_or_insert("emb", [100, 101])
        ref = EmbeddingTable.from_config(spec.tables[0].config)
        assert_array_equal(first, ref.find_or_insert(np.array([100, 101], np.uint64)))
        assert client.erase("emb", [1, 100, 555]) == 2
        assert set(client.stats.by_transport) == {"tcp"}
        assert client.stats.failed_calls == 0
        snap = client.snapshot()[node]
        assert sorted(snap["snapshots"]) == ["emb/0", "emb/1"]


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_one_shard_reads_with_few_repeats_come_back_as_sent_and_stay_valid(tmp_path: Path,
                                                                          transport: str) -> None:
    """A one-shard read with few repeated keys is sent as given and its reply returned as it
    arrived; a reply lent by the transport (shm: views of the ring) must be copied, so the
    rows of one call survive the next calls."""
    spec = loopback_spec(f"client-few-{transport}", zones=1, nodes_per_zone=1, shards=1, dim=8,
                         metrics=False, data_root=tmp_path)
    with ready_server(spec, shm=True) as node, \
            PSClient(spec, local=node, transports=(transport,)) as client:
        keys = np.arange(1000, dtype=np.uint64)
        rows = np.arange(1000 * 8, dtype=np.float32).reshape(1000, 8)
        client.assign("emb", keys, rows)
        few = np.concatenate([keys[::-1], keys[:3], [np.uint64(5000)]])  # 3 repeats: sent as given
        many = np.tile(keys[:10], 50)  # 490 repeats: deduplicated, gathered
        first, first_found = client.find("emb", few)
        for _ in range(5):  # later replies reuse the transport's buffers
            client.find("emb", many)
            client.find("emb", keys[::-1])
        assert_array_equal(first[:1000], rows[::-1])
        assert_array_equal(first[1000:1003], rows[:3])
        assert not first[1003].any() and first_found.tolist() == [True] * 1003 + [False]
        got, found = client.find("emb", many)
        assert_array_equal(got, np.tile(rows[:10], (50, 1)))
        assert found.all()
        assert set(client.stats.by_transport) == {transport}
    with ready_server(spec, shm=True) as node, \
            PSClient(spec, local=node, transports=(transport,)) as client:  # repeats first: gathered
        client.assign("emb", keys, rows)
        for i in range(40):  # the guess is re-measured every few calls, both ways
            ask = many if (i // 20) % 2 == 0 else few
            got, found = client.find("emb", ask)
            want = np.where(ask[:, None] < 1000, rows[np.minimum(ask, 999).astype(np.int64)], 0)
            assert_array_equal(got, want)
            assert_array_equal(found, ask < 1000)
