"""Service.handle for every request kind, every refusal, and write deduplication by request id."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from streamrec import EmbeddingTable
from streamrec.cluster.spec import ClusterSpec, TableSpec, embedded_spec
from streamrec.errors import ConfigError
from streamrec.ps.service import FILLING, MAX_KEYS, Service
from streamrec.transport.frames import Flag, Frame, Kind, Status

SPEC = embedded_spec()  # one node "local", table "emb" of dim 64 (float32, adagrad), 2 shards
D = SPEC.tables[0].config.dim


@pytest.fixture(scope="module")
def svc() -> Iterator[Service]:
    s = Service(SPEC, "local")
    yield s
    s.close()


@pytest.fixture
def fresh() -> Iterator[Service]:
    s = Service(SPEC, "local")
    yield s
    s.close()


_ids = iter(range(1_000_000, 2_000_000))


def call(svc: Service, kind: Kind, *bufs: np.ndarray, rid: int | None = None, shard: int = 0, table: int = 0,
         aux: int = 0) -> Frame:
    req = Frame(kind, list(bufs), request_id=next(_ids) if rid is None else rid, table=table, shard=shard,
                aux=aux)
    rep = svc.handle(req)
    assert rep.is_reply and rep.kind == kind and rep.request_id == req.request_id
    assert (rep.table, rep.shard) == (table, shard)
    return rep


def ok(svc: Service, kind: Kind, *bufs: np.ndarray, **kw: int) -> list[np.ndarray]:
    rep = call(svc, kind, *bufs, **kw)
    assert rep.status == Status.OK, rep.text()
    return rep.buffers


def refused(svc: Service, status: Status, match: str, kind: Kind, *bufs: np.ndarray, **kw: int) -> str:
    rep = call(svc, kind, *bufs, **kw)
    assert rep.status == status, (Status(rep.status).name, rep.text())
    assert len(rep.buffers) == 1 and rep.buffers[0].dtype == np.uint8
    text = rep.text()
    assert match in text, text
    return text


def keys(*ks: int) -> np.ndarray:
    return np.array(ks, dtype=np.uint64)


def rows(n: int, base: float = 0.0) -> np.ndarray:
    return (base + np.arange(n * D, dtype=np.float32).reshape(n, D) / 4).astype(np.float32)


def lr(x: float = 0.5) -> np.ndarray:
    return np.array([x], dtype=np.float64)


# -- every kind ------------------------------------------------------------------------------------


def test_find_or_insert_then_find(fresh: Service) -> None:
    k = keys(11, 12, 11)
    (values,) = ok(fresh, Kind.FIND_OR_INSERT, k)
    assert values.shape == (3, D) and values.dtype == np.float32
    assert_array_equal(values[0], values[2])
    ref = EmbeddingTable.from_config(SPEC.tables[0].config)
    assert_array_equal(values, ref.find_or_insert(k))  # the table initializer's rows
    got, found = ok(fresh, Kind.FIND, keys(12, 11, 13))
    assert found.tolist() == [True, True, False]
    assert_array_equal(got[:2], values[[1, 0]])
    assert not got[2].any()


def test_find_empty(svc: Service) -> None:
    values, found = ok(svc, Kind.FIND, keys())
    assert values.shape == (0, D) and found.shape == (0,)


@pytest.mark.parametrize("shard", [0, 1])
def test_assign_inserts_or_assigns(fresh: Service, shard: int) -> None:
    (written,) = ok(fresh, Kind.ASSIGN, keys(1, 2), rows(2), shard=shard)
    assert written.tolist() == [True, True]
    values, found = ok(fresh, Kind.FIND, keys(1, 2), shard=shard)
    assert found.all()
    assert_array_equal(values, rows(2))
    other = 1 - shard
    assert not ok(fresh, Kind.FIND, keys(1, 2), shard=other)[1].any()  # each shard is its own table


def test_assign_only_existing(fresh: Service) -> None:
    ok(fresh, Kind.ASSIGN, keys(1), rows(1))
    (written,) = ok(fresh, Kind.ASSIGN, keys(1, 2), rows(2, 100), aux=1)
    assert written.tolist() == [True, False]
    values, found = ok(fresh, Kind.FIND, keys(1, 2))
    assert found.tolist() == [True, False]
    assert_array_equal(values[0], rows(2, 100)[0])


def test_apply_gradients_matches_the_table(fresh: Service) -> None:
    ref = EmbeddingTable.from_config(SPEC.tables[0].config)
    k = keys(5, 6)
    ok(fresh, Kind.ASSIGN, k, rows(2))
    ref.insert_or_assign(k, rows(2))
    g = rows(3, 1.0)
    (found,) = ok(fresh, Kind.APPLY_GRADIENTS, keys(5, 6, 7), g, lr(0.25))
    assert found.tolist() == [True, True, False]
    ref.apply_gradients(keys(5, 6, 7), g, 0.25)
    assert_array_equal(ok(fresh, Kind.FIND, k)[0], ref.find(k)[0])
    assert not ok(fresh, Kind.FIND, keys(7))[1].any()  # absent keys are not created


def test_erase_counts_present_keys(fresh: Service) -> None:
    ok(fresh, Kind.ASSIGN, keys(1, 2, 3), rows(3))
    (removed,) = ok(fresh, Kind.ERASE, keys(1, 3, 9))
    assert removed.dtype == np.int64 and removed.tolist() == [2]
    assert ok(fresh, Kind.FIND, keys(1, 2, 3))[1].tolist() == [False, True, False]


def test_export_pages_through_the_shard(fresh: Service) -> None:
    k = np.arange(1, 101, dtype=np.uint64)
    ok(fresh, Kind.ASSIGN, k, np.repeat(k.astype(np.float32)[:, None], D, axis=1))
    out: dict[int, np.ndarray] = {}
    start = 0
    while start >= 0:
        ek, ev, nxt = ok(fresh, Kind.EXPORT, np.array([start], np.int64), np.array([7], np.int64))
        assert ev.shape == (ek.shape[0], D + fresh.replicas[(0, 0)].table.state_width)
        assert nxt.dtype == np.int64 and nxt.shape == (1,)
        out.update(zip(ek.tolist(), ev[:, :D], strict=True))
        start = int(nxt[0])
    assert sorted(out) == k.tolist()
    assert all((v == k_).all() for k_, v in out.items())


@pytest.mark.parametrize("bufs,match", [
    ([np.array([0], np.int64)], "two int64 (1,) buffers"),
    ([np.array([0], np.int64), np.array([5], np.int32)], "two int64 (1,) buffers"),
    ([np.array([0, 1], np.int64), np.array([5], np.int64)], "two int64 (1,) buffers"),
    ([np.array([-1], np.int64), np.array([5], np.int64)], "start >= 0"),
    ([np.array([0], np.int64), np.array([0], np.int64)], "1 <= rows <="),
    ([np.array([0], np.int64), np.array([1 << 20], np.int64)], "1 <= rows <="),
])
def test_export_bad_requests(svc: Service, bufs: list[np.ndarray], match: str) -> None:
    refused(svc, Status.BAD_REQUEST, match, Kind.EXPORT, *bufs)


def test_stats(fresh: Service) -> None:
    ok(fresh, Kind.ASSIGN, keys(1, 2, 3), rows(3), shard=1)
    (body,) = ok(fresh, Kind.STATS)
    assert body.dtype == np.uint8
    stats = json.loads(body.tobytes())
    assert stats["node"] == "local"
    by_shard = {s["shard"]: s for s in stats["shards"]}
    assert by_shard[0]["rows"] == 0 and by_shard[1]["rows"] == 3
    assert all(s["table"] == "emb" and s["ready"] for s in stats["shards"])


def test_hello(svc: Service) -> None:
    info = json.loads(ok(svc, Kind.HELLO)[0].tobytes())
    assert info["node"] == "local" and info["incarnation"] == svc.incarnation
    assert [(s["table"], s["shard"], s["ready"], s["live_dir"]) for s in info["shards"]] == [
        (0, 0, True, None), (0, 1, True, None)]


def test_ping(svc: Service) -> None:
    assert ok(svc, Kind.PING) == []


def test_snapshot_without_a_data_dir(svc: Service) -> None:
    refused(svc, Status.BAD_REQUEST, "no data dir", Kind.SNAPSHOT)


def test_snapshot_with_a_data_dir(tmp_path: Path) -> None:
    svc = Service(SPEC, "local", data_dir=tmp_path)
    try:
        info = json.loads(ok(svc, Kind.HELLO)[0].tobytes())
        assert [s["live_dir"] for s in info["shards"]] == [str(tmp_path / "emb-0"), str(tmp_path / "emb-1")]
        ok(svc, Kind.ASSIGN, keys(1, 2), rows(2))
        out = json.loads(ok(svc, Kind.SNAPSHOT)[0].tobytes())
        assert out["node"] == "local" and sorted(out["snapshots"]) == ["emb/0", "emb/1"]
        for path in out["snapshots"].values():
            assert Path(path).exists()
            assert Path(path).is_relative_to(tmp_path / "snapshots")
        restored = EmbeddingTable.open(out["snapshots"]["emb/0"])
        try:
            values, found = restored.find(keys(1, 2))
            assert found.all()
            assert_array_equal(values, rows(2))
        finally:
            restored.close()
    finally:
        svc.close()


def test_unknown_node() -> None:
    with pytest.raises(ConfigError, match="unknown node"):
        Service(SPEC, "nope")


# -- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,bufs,match", [
    (Kind.FIND, [], "FIND takes 1 buffers, got 0"),
    (Kind.FIND, [keys(1), keys(1)], "FIND takes 1 buffers, got 2"),
    (Kind.FIND_OR_INSERT, [], "FIND_OR_INSERT takes 1 buffers, got 0"),
    (Kind.ERASE, [keys(1), keys(2)], "ERASE takes 1 buffers, got 2"),
    (Kind.ASSIGN, [keys(1)], "ASSIGN takes 2 buffers, got 1"),
    (Kind.ASSIGN, [keys(1), rows(1), lr()], "ASSIGN takes 2 buffers, got 3"),
    (Kind.APPLY_GRADIENTS, [keys(1), rows(1)], "APPLY_GRADIENTS takes 3 buffers, got 2"),
    (Kind.FIND, [np.array([1], np.int64)], "buffer 0 (keys): expected uint64 (B,), got int64"),
    (Kind.FIND, [np.array([1.0])], "buffer 0 (keys): expected uint64 (B,), got float64"),
    (Kind.ERASE, [np.zeros((2, 1), np.uint64)], "expected uint64 (B,), got uint64 (2, 1)"),
    (Kind.ASSIGN, [keys(1, 2), rows(3)], f"values: expected (2, {D}), got (3, {D})"),
    (Kind.ASSIGN, [keys(1), np.zeros((1, D + 1), np.float32)], f"values: expected (1, {D})"),
    (Kind.ASSIGN, [keys(1), np.zeros(D, np.float32)], f"values: expected (1, {D}), got ({D},)"),
    (Kind.APPLY_GRADIENTS, [keys(1), rows(2), lr()], f"grads: expected (1, {D}), got (2, {D})"),
    (Kind.APPLY_GRADIENTS, [keys(1), rows(1), np.ones(1, np.float32)], "buffer 2 (lr): expected float64"),
    (Kind.APPLY_GRADIENTS, [keys(1), rows(1), np.array([0.5, 0.5])], "buffer 2 (lr): expected float64 (1,)"),
    (Kind.APPLY_GRADIENTS, [keys(1), rows(1), np.array([[0.5]])], "buffer 2 (lr): expected float64 (1,)"),
    (Kind.APPLY_GRADIENTS, [keys(1), rows(1), lr(-1.0)], "lr: expected a finite number > 0"),
    (Kind.APPLY_GRADIENTS, [keys(1), rows(1), lr(np.nan)], "lr: expected a finite number > 0"),
])
def test_bad_requests(svc: Service, kind: Kind, bufs: list[np.ndarray], match: str) -> None:
    refused(svc, Status.BAD_REQUEST, match, kind, *bufs)


def test_too_many_keys(svc: Service) -> None:
    many = np.arange(MAX_KEYS + 1, dtype=np.uint64)
    refused(svc, Status.BAD_REQUEST, f"at most {MAX_KEYS}", Kind.FIND, many)
    refused(svc, Status.BAD_REQUEST, f"at most {MAX_KEYS}", Kind.ERASE, many)


@pytest.mark.parametrize("kind", [Kind.FIND, Kind.FIND_OR_INSERT, Kind.ERASE, Kind.EXPORT])
def test_unknown_table(svc: Service, kind: Kind) -> None:
    refused(svc, Status.UNKNOWN_TABLE, "table 1: the cluster has 1 tables", kind, keys(1), table=1)


@pytest.mark.parametrize("kind", [Kind.FIND, Kind.ASSIGN, Kind.ERASE])
def test_shard_not_hosted(svc: Service, kind: Kind) -> None:
    refused(svc, Status.NOT_HOSTED, "holds no replica of table 'emb' shard 2", kind, keys(1), shard=2)
    assert Status.NOT_HOSTED.retriable


def test_not_ready_is_unavailable() -> None:
    svc = Service(SPEC, "local", ready=False)
    try:
        refused(svc, Status.UNAVAILABLE, "shard 0 is filling from a peer", Kind.FIND, keys(1))
        refused(svc, Status.UNAVAILABLE, "is filling", Kind.EXPORT, np.array([0], np.int64),
                np.array([8], np.int64), shard=1)
        # A filling replica applies writes (so it misses none while it copies its peer), says
        # so in the reply's aux, and remembers the keys so the copy does not overwrite them.
        w = svc.handle(Frame(Kind.ASSIGN, [keys(1), rows(1)], request_id=5, shard=1))
        assert w.status == Status.OK and w.aux == FILLING
        assert svc.replicas[(0, 1)].touched == {int(keys(1)[0])}
        assert ok(svc, Kind.PING) == []  # node-level requests still answer
        assert not json.loads(ok(svc, Kind.HELLO)[0].tobytes())["shards"][0]["ready"]
        svc.replicas[(0, 0)].ready = True
        ok(svc, Kind.FIND, keys(1))
    finally:
        svc.close()


def test_unknown_kind(svc: Service) -> None:
    rep = svc.handle(Frame(99, [keys(1)], request_id=3))
    assert rep.status == Status.UNKNOWN_KIND and rep.request_id == 3 and "kind 99" in rep.text()


def test_store_error() -> None:
    cfg = replace(SPEC.tables[0].config, capacity=8, max_rows=8)
    spec = ClusterSpec("tiny", SPEC.nodes, (TableSpec("emb", cfg, shards=1),))
    svc = Service(spec, "local")
    try:
        refused(svc, Status.STORE_ERROR, "table full", Kind.FIND_OR_INSERT, np.arange(100, dtype=np.uint64))
    finally:
        svc.close()


# -- writes apply once per request id --------------------------------------------------------------


def test_apply_gradients_dedup(fresh: Service) -> None:
    ok(fresh, Kind.ASSIGN, keys(1), rows(1), rid=1)
    before = ok(fresh, Kind.FIND, keys(1))[0].copy()
    first = ok(fresh, Kind.APPLY_GRADIENTS, keys(1, 2), rows(2, 1.0), lr(), rid=10)
    once = ok(fresh, Kind.FIND, keys(1))[0].copy()
    assert not np.array_equal(before, once)
    again = ok(fresh, Kind.APPLY_GRADIENTS, keys(1, 2), rows(2, 1.0), lr(), rid=10)
    assert again[0].tolist() == first[0].tolist() == [True, False]
    assert_array_equal(ok(fresh, Kind.FIND, keys(1))[0], once)  # not applied again
    ok(fresh, Kind.APPLY_GRADIENTS, keys(1, 2), rows(2, 1.0), lr(), rid=11)  # a new id applies
    assert not np.array_equal(ok(fresh, Kind.FIND, keys(1))[0], once)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_a_replayed_id_does_not_let_a_bad_request_through(fresh: Service, bad: float) -> None:
    """Validation comes before the replay check: a bad request reusing an applied id
    (found by the frame fuzzer) is refused, not answered as the earlier write."""
    ok(fresh, Kind.APPLY_GRADIENTS, keys(1, 2), rows(2, 1.0), lr(), rid=12)
    refused(fresh, Status.BAD_REQUEST, "lr", Kind.APPLY_GRADIENTS, keys(1, 2), rows(2, 1.0), lr(bad), rid=12)
    refused(fresh, Status.BAD_REQUEST, "values", Kind.ASSIGN, keys(1, 2), rows(3), rid=12)


def test_apply_gradients_retry_flag_changes_nothing(fresh: Service) -> None:
    ok(fresh, Kind.ASSIGN, keys(1), rows(1))
    ok(fresh, Kind.APPLY_GRADIENTS, keys(1), rows(1, 1.0), lr(), rid=20)
    once = ok(fresh, Kind.FIND, keys(1))[0].copy()
    req = Frame(Kind.APPLY_GRADIENTS, [keys(1), rows(1, 1.0), lr()], request_id=20, flags=Flag.RETRY)
    assert fresh.handle(req).status == Status.OK
    assert_array_equal(ok(fresh, Kind.FIND, keys(1))[0], once)


def test_erase_dedup(fresh: Service) -> None:
    ok(fresh, Kind.ASSIGN, keys(1, 2), rows(2))
    assert ok(fresh, Kind.ERASE, keys(1, 2), rid=30)[0].tolist() == [2]
    ok(fresh, Kind.ASSIGN, keys(1, 2), rows(2))  # back again
    assert ok(fresh, Kind.ERASE, keys(1, 2), rid=30)[0].tolist() == [0]  # the repeat: nothing removed
    assert ok(fresh, Kind.FIND, keys(1, 2))[1].all()
    assert ok(fresh, Kind.ERASE, keys(1, 2), rid=31)[0].tolist() == [2]


def test_assign_dedup(fresh: Service) -> None:
    ok(fresh, Kind.ASSIGN, keys(1), rows(1, 1.0), rid=40)
    again = ok(fresh, Kind.ASSIGN, keys(1, 2), rows(2, 9.0), rid=40)
    assert again[0].tolist() == [True, False]  # the repeat reports what exists, writes nothing
    values, found = ok(fresh, Kind.FIND, keys(1, 2))
    assert found.tolist() == [True, False]
    assert_array_equal(values[0], rows(1, 1.0)[0])
    ok(fresh, Kind.ASSIGN, keys(1), rows(1, 9.0), rid=41)
    assert_array_equal(ok(fresh, Kind.FIND, keys(1))[0][0], rows(1, 9.0)[0])


def test_find_or_insert_dedup_reads_what_the_first_try_wrote(fresh: Service) -> None:
    (first,) = ok(fresh, Kind.FIND_OR_INSERT, keys(3, 4), rid=50)
    ok(fresh, Kind.ASSIGN, keys(3), rows(1, 7.0))
    (again,) = ok(fresh, Kind.FIND_OR_INSERT, keys(3, 4), rid=50)
    assert_array_equal(again[0], rows(1, 7.0)[0])
    assert_array_equal(again[1], first[1])


def test_id_zero_never_dedups(fresh: Service) -> None:
    ok(fresh, Kind.ASSIGN, keys(1), rows(1))
    seen = [ok(fresh, Kind.FIND, keys(1))[0].copy()]
    for _ in range(3):
        ok(fresh, Kind.APPLY_GRADIENTS, keys(1), rows(1, 1.0), lr(), rid=0)
        seen.append(ok(fresh, Kind.FIND, keys(1))[0].copy())
    assert all(not np.array_equal(a, b) for a, b in itertools.pairwise(seen))
    ok(fresh, Kind.ASSIGN, keys(1, 2), rows(2), rid=0)
    assert ok(fresh, Kind.ERASE, keys(1, 2), rid=0)[0].tolist() == [2]
    ok(fresh, Kind.ASSIGN, keys(1, 2), rows(2), rid=0)
    assert ok(fresh, Kind.ERASE, keys(1, 2), rid=0)[0].tolist() == [2]


def test_ids_are_per_replica(fresh: Service) -> None:
    # The client sends one id to every replica of one shard; different shards get different ids,
    # but a replica must not confuse its id with another replica's.
    ok(fresh, Kind.ASSIGN, keys(1), rows(1), rid=60, shard=0)
    ok(fresh, Kind.ASSIGN, keys(1), rows(1), rid=60, shard=1)
    assert ok(fresh, Kind.FIND, keys(1), shard=1)[1].all()


def test_a_failed_write_does_not_record_its_id(fresh: Service) -> None:
    ok(fresh, Kind.ASSIGN, keys(1), rows(1))
    before = ok(fresh, Kind.FIND, keys(1))[0].copy()
    refused(fresh, Status.BAD_REQUEST, "buffer 2 (lr)", Kind.APPLY_GRADIENTS, keys(1), rows(1, 1.0),
            np.array([0.5], np.float32), rid=70)
    refused(fresh, Status.BAD_REQUEST, "lr: expected", Kind.APPLY_GRADIENTS, keys(1), rows(1, 1.0),
            lr(-1.0), rid=70)
    assert_array_equal(ok(fresh, Kind.FIND, keys(1))[0], before)
    ok(fresh, Kind.APPLY_GRADIENTS, keys(1), rows(1, 1.0), lr(), rid=70)  # the corrected retry applies
    assert not np.array_equal(ok(fresh, Kind.FIND, keys(1))[0], before)
    refused(fresh, Status.BAD_REQUEST, "values: expected", Kind.ASSIGN, keys(2), rows(2), rid=71)
    ok(fresh, Kind.ASSIGN, keys(2), rows(1), rid=71)
    assert ok(fresh, Kind.FIND, keys(2))[1].all()


def test_reads_are_not_deduplicated(fresh: Service) -> None:
    ok(fresh, Kind.ASSIGN, keys(1), rows(1))
    assert ok(fresh, Kind.FIND, keys(1), rid=80)[1].all()
    ok(fresh, Kind.ERASE, keys(1))
    assert not ok(fresh, Kind.FIND, keys(1), rid=80)[1].any()
