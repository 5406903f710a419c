"""streamrec.cluster.spec: loading, defaults, placement, shard hashing, round trips, and errors
that name the file, the line and the field.

References: placement is checked against the rule "every zone holds a full
replica set" computed from the node lists; ``shard_of`` against a pure-Python
murmur3 fmix64 and multiply-shift; ``to_toml`` against the loader.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.cluster import (
    ClusterSpec,
    NodeSpec,
    TableSpec,
    cluster_spec_from_text,
    embedded_spec,
    load_cluster_spec,
)
from streamrec.config import Adagrad, Adam, Initializer, TableConfig
from streamrec.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster.toml"
M64 = (1 << 64) - 1


def check_full_replica_sets(spec: ClusterSpec) -> None:
    """Every shard of every table has >= replicas_per_zone distinct replicas in every zone,
    and ``replicas`` and ``shards_on`` describe the same placement."""
    zone_of = {n.name: n.zone for n in spec.nodes}
    hosted: set[tuple[str, int, int]] = set()
    for t, table in enumerate(spec.tables):
        for s in range(table.shards):
            names = spec.replicas(table.name, s)
            assert names == spec.replicas(t, s)
            assert len(set(names)) == len(names)
            assert names == [n.name for n in spec.nodes if n.name in names]  # node order
            for zone in spec.zones():
                assert sum(zone_of[n] == zone for n in names) >= table.replicas_per_zone
            hosted |= {(n, t, s) for n in names}
    for node in spec.nodes:
        pairs = spec.shards_on(node.name)
        assert pairs == sorted(pairs)
        assert {(node.name, t, s) for t, s in pairs} == {h for h in hosted if h[0] == node.name}


# -- the example and the defaults ----------------------------------------------------------------


def test_example_loads() -> None:
    spec = load_cluster_spec(EXAMPLE)
    assert spec.name == "demo" and spec.source == str(EXAMPLE)
    assert [n.name for n in spec.nodes] == ["a1", "a2", "b1", "b2"]
    assert spec.zones() == ["z1", "z2"]
    assert [n.address for n in spec.nodes] == [f"127.0.0.1:{p}" for p in (7301, 7302, 7303, 7304)]
    assert [n.metrics_port for n in spec.nodes] == [7401, 7402, 7403, 7404]
    assert [n.pod for n in spec.nodes[:2]] == ["p1", "p2"]
    t, table = spec.table("emb")
    assert t == 0 and table.config.dim == 64 and isinstance(table.config.optimizer, Adagrad)
    assert (table.shards, table.replicas_per_zone, table.placement) == (2, 1, None)
    assert spec.replicas("emb", 0) == ["a1", "b1"] and spec.replicas("emb", 1) == ["a2", "b2"]
    assert spec.shards_on("b2") == [(0, 1)]
    check_full_replica_sets(spec)


def test_defaults() -> None:
    spec = cluster_spec_from_text(
        '[cluster]\nname = "c"\n[[node]]\nname = "n"\nport = 1\nzone = "z"\n[[table]]\nname = "t"\ndim = 4\n'
    )
    node = spec.node("n")
    assert (node.host, node.pod, node.metrics_port, node.data_dir) == ("127.0.0.1", "", 0, "")
    assert spec.data_dir("n") == Path("/dev/shm/streamrec/c/n")
    table = spec.tables[0]
    assert (table.shards, table.replicas_per_zone, table.placement) == (1, 1, None)
    assert table.config == TableConfig(dim=4)
    assert (spec.max_frame_bytes, spec.request_timeout_s, spec.source) == (64 << 20, 2.0, "<string>")


def test_embedded_spec() -> None:
    spec = embedded_spec()
    assert [(n.name, n.host, n.zone) for n in spec.nodes] == [("local", "127.0.0.1", "local")]
    _, table = spec.table("emb")
    assert (table.config.dim, table.shards, table.replicas_per_zone) == (64, 2, 1)
    assert isinstance(table.config.optimizer, Adagrad)
    assert spec.shards_on("local") == [(0, 0), (0, 1)]
    assert embedded_spec(dim=8, shards=5, optimizer="adam").tables[0].config.optimizer == Adam()


def test_node_address_and_data_dir() -> None:
    assert NodeSpec("x", host="::1", port=80, zone="z").address == "[::1]:80"
    assert NodeSpec("x", host="ps-0.example.org", port=80, zone="z").address == "ps-0.example.org:80"
    spec = ClusterSpec("c", (NodeSpec("x", port=80, zone="z", data_dir="/data/x"),),
                       (TableSpec("t", TableConfig(dim=2)),))
    assert spec.data_dir("x") == Path("/data/x")


def test_lookups_of_unknown_names() -> None:
    spec = load_cluster_spec(EXAMPLE)
    with pytest.raises(ConfigError, match=r"unknown node 'zz'.*a1, a2, b1, b2"):
        spec.node("zz")
    with pytest.raises(ConfigError, match="unknown node 'zz'"):
        spec.shards_on("zz")
    with pytest.raises(ConfigError, match="unknown table 'nope'"):
        spec.table("nope")
    with pytest.raises(ConfigError, match="unknown table 3"):
        spec.replicas(3, 0)
    with pytest.raises(ValueError, match=r"shard: expected an int in \[0, 2\)"):
        spec.replicas("emb", 2)


# -- placement -----------------------------------------------------------------------------------


def three_zones(replicas_per_zone: int, shards: int, placement: str = "") -> ClusterSpec:
    nodes = "".join(
        f'[[node]]\nname = "{z}{i}"\nport = {7000 + k}\nzone = "{z}"\n'
        for k, (z, i) in enumerate((z, i) for z, n in (("x", 3), ("y", 2), ("w", 4)) for i in range(n))
    )
    return cluster_spec_from_text(
        f'[cluster]\nname = "c"\n{nodes}[[table]]\nname = "t"\ndim = 4\nshards = {shards}\n'
        f"replicas_per_zone = {replicas_per_zone}\n{placement}"
    )


def test_default_placement_spreads_shards_within_each_zone() -> None:
    spec = three_zones(replicas_per_zone=2, shards=3)
    # Zone x = [x0, x1, x2]: shard s takes x[(2s) % 3], x[(2s + 1) % 3].
    assert spec.replicas("t", 0) == ["x0", "x1", "y0", "y1", "w0", "w1"]
    assert spec.replicas("t", 1) == ["x0", "x2", "y0", "y1", "w2", "w3"]
    assert spec.replicas("t", 2) == ["x1", "x2", "y0", "y1", "w0", "w1"]
    assert spec.shards_on("w3") == [(0, 1)]
    check_full_replica_sets(spec)


def test_explicit_placement_is_kept_in_node_order() -> None:
    spec = three_zones(1, 2, 'placement = [["w3", "y1", "x2", "x0"], ["x1", "y0", "w0"]]\n')
    assert spec.tables[0].placement == (("w3", "y1", "x2", "x0"), ("x1", "y0", "w0"))
    assert spec.replicas("t", 0) == ["x0", "x2", "y1", "w3"]  # more than one per zone is allowed
    assert spec.shards_on("x0") == [(0, 0)] and spec.shards_on("x2") == [(0, 0)]
    assert spec.shards_on("w1") == []
    check_full_replica_sets(spec)


# -- shard hashing -------------------------------------------------------------------------------


def fmix64_reference(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & M64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & M64
    return k ^ (k >> 33)


def splitmix64(keys: np.ndarray) -> np.ndarray:
    """The table's bucket hash (streamrec.store._index.hash_key), in numpy."""
    z = keys + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@pytest.mark.parametrize("shards", [1, 2, 3, 7, 64, 65536])
def test_shard_of_matches_reference_and_is_in_range(shards: int) -> None:
    spec = embedded_spec(shards=shards)
    rng = np.random.default_rng(shards)
    keys = np.concatenate([np.array([0, 1, 2, 2**32, 2**63, M64], dtype=np.uint64),
                           rng.integers(0, M64, 500, dtype=np.uint64, endpoint=True)])
    got = spec.shard_of("emb", keys)
    assert got.dtype == np.int64 and got.shape == keys.shape
    assert ((got >= 0) & (got < shards)).all()
    want = [((fmix64_reference(int(k)) >> 32) * shards) >> 32 for k in keys]
    assert got.tolist() == want
    assert spec.shard_of(0, keys).tolist() == want


def test_shard_of_is_pinned() -> None:
    # Fixed values: a change here moves every key of every deployed cluster.
    spec = embedded_spec(shards=7)
    keys = np.array([0, 1, 2, 3, 42, 2**40 + 5, M64], dtype=np.uint64)
    assert spec.shard_of("emb", keys).tolist() == [0, 4, 1, 0, 3, 5, 2]


def test_shard_of_is_roughly_uniform() -> None:
    shards, n = 16, 160_000
    keys = np.arange(n, dtype=np.uint64)  # sequential ids: the hardest common case
    counts = np.bincount(embedded_spec(shards=shards).shard_of("emb", keys), minlength=shards)
    expected = n / shards
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50, counts  # 15 degrees of freedom: p(chi2 > 50) is about 1e-5


def test_shard_is_independent_of_the_tables_bucket_bits() -> None:
    keys = np.arange(1 << 16, dtype=np.uint64)
    shard = embedded_spec(shards=2).shard_of("emb", keys)
    low = splitmix64(keys) & np.uint64(7)  # the bucket index's lowest 3 bits
    for s in range(2):
        counts = np.bincount(low[shard == s].astype(np.int64), minlength=8)
        assert counts.min() > 0.9 * counts.mean(), (s, counts)


def test_shard_of_input_checks() -> None:
    spec = embedded_spec()
    assert spec.shard_of("emb", np.array([5], dtype=np.int64)).tolist() == spec.shard_of(
        "emb", np.array([5], dtype=np.uint64)).tolist()
    assert spec.shard_of("emb", np.empty(0, dtype=np.uint64)).shape == (0,)
    with pytest.raises(TypeError, match="uint64"):
        spec.shard_of("emb", np.array([1.0]))
    with pytest.raises(TypeError, match="uint64"):
        spec.shard_of("emb", [1, 2])
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        spec.shard_of("emb", np.zeros((2, 2), dtype=np.uint64))
    with pytest.raises(ValueError, match="non-negative"):
        spec.shard_of("emb", np.array([-1], dtype=np.int64))
    with pytest.raises(ConfigError, match="unknown table"):
        spec.shard_of("other", np.zeros(1, dtype=np.uint64))


# -- round trips ---------------------------------------------------------------------------------


def test_example_round_trips() -> None:
    spec = load_cluster_spec(EXAMPLE)
    again = cluster_spec_from_text(spec.to_toml())
    assert again == spec and again.to_toml() == spec.to_toml()


names = st.from_regex(r"[a-z0-9_][a-z0-9_.\-]{0,5}", fullmatch=True)
finite = st.floats(-10, 10, allow_nan=False)


@st.composite
def table_configs(draw: st.DrawFn) -> TableConfig:
    lo = draw(finite)
    return TableConfig(
        dim=draw(st.integers(1, 4096)),
        dtype=draw(st.sampled_from(["float32", "float64"])),
        optimizer=draw(st.sampled_from([None, Adagrad(), Adam(beta1=0.5), Adagrad(eps=1e-7,
                                                                                initial_accumulator=0.1)])),
        initializer=Initializer(kind=draw(st.sampled_from(["zeros", "uniform", "normal"])), low=lo,
                                high=lo + draw(st.floats(0, 5)), std=draw(st.floats(0, 1)),
                                seed=draw(st.integers(0, 2**64 - 1))),
        ttl_s=draw(st.integers(0, 10**6)),
        max_live_rows=draw(st.integers(0, 10**6)),
        eviction=draw(st.sampled_from(["lru", "lfu"])),
        huge_pages=draw(st.booleans()),
    )


@st.composite
def cluster_specs(draw: st.DrawFn) -> ClusterSpec:
    zones = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    sizes = [draw(st.integers(1, 3)) for _ in zones]
    nodes: list[NodeSpec] = []
    for z, size in zip(zones, sizes, strict=True):
        for i in range(size):
            k = len(nodes)
            nodes.append(NodeSpec(f"n{k}", host=draw(st.sampled_from(["127.0.0.1", "::1", "h.example"])),
                                  port=1000 + k, zone=z, pod=draw(st.sampled_from(["", f"p{i % 2}"])),
                                  metrics_port=draw(st.sampled_from([0, 2000 + k])),
                                  data_dir=draw(st.sampled_from(["", 'd "q" \\ é'])) ))
    tables = []
    for t in range(draw(st.integers(1, 3))):
        shards = draw(st.integers(1, 4))
        rpz = draw(st.integers(1, min(sizes)))
        placement = None
        if draw(st.booleans()):  # an explicit placement: rpz nodes of every zone per shard, shuffled
            placement = tuple(
                tuple(draw(st.permutations([
                    n.name for z in zones
                    for n in draw(st.permutations([n for n in nodes if n.zone == z]))[:rpz]])))
                for _ in range(shards))
        tables.append(TableSpec(f"t{t}", draw(table_configs()), shards, rpz, placement))
    return ClusterSpec(draw(names), tuple(nodes), tuple(tables),
                       max_frame_bytes=draw(st.integers(4096, 1 << 32)),
                       request_timeout_s=draw(st.floats(0.001, 100)))


@settings(max_examples=60, deadline=None)
@given(cluster_specs())
def test_to_toml_round_trips(spec: ClusterSpec) -> None:
    again = cluster_spec_from_text(spec.to_toml())
    assert again == spec
    assert [again.replicas(t.name, s) for t in spec.tables for s in range(t.shards)] == [
        spec.replicas(t.name, s) for t in spec.tables for s in range(t.shards)]
    check_full_replica_sets(again)


# -- errors name the file, the line and the field ------------------------------------------------

BASE = """\
[cluster]
name = "t"

[[node]]
name = "a1"
port = 7301
zone = "z1"

[[node]]
name = "b1"
port = 7302
zone = "z2"

[[table]]
name = "emb"
dim = 8
shards = 2
"""
# Lines of BASE: 1 [cluster], 2 cluster.name, 4 node[0], 5-7 its name/port/zone,
# 9 node[1], 10-12 its name/port/zone, 14 table[0], 15 name, 16 dim, 17 shards.


def edit(*pairs: str) -> str:
    """BASE with each (old, new) pair replaced once; old must occur."""
    text = BASE
    for old, new in zip(pairs[::2], pairs[1::2], strict=True):
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


ERRORS = [
    # (TOML text, "line: field" the message starts with, a phrase it contains)
    (edit('name = "t"', "name = "), "2", "not valid TOML"),
    (BASE + "[tables]\nx = 1\n", "18: tables", "unknown section"),
    (edit("zone = \"z1\"", "zone = \"z1\"\nprot = 7"), "8: node[0].prot", "unknown key"),
    (edit('name = "t"', 'name = "t"\ntimeout = 3'), "3: cluster.timeout", "unknown key"),
    (edit("dim = 8", "dimm = 8"), "16: table[0].dimm", "unknown key"),
    (edit('zone = "z2"\n', ""), "9: node[1].zone", "is required"),
    (edit('name = "t"\n', ""), "1: cluster.name", "is required"),
    (edit("[cluster]\n", "", 'name = "t"\n', ""), "cluster", "[cluster] section"),
    (edit("dim = 8\n", ""), "14: table[0].dim", "is required"),
    (edit('name = "b1"', 'name = "a1"'), "10: node[1].name", "duplicate node name 'a1'"),
    (BASE + '\n[[table]]\nname = "emb"\ndim = 4\n', "20: table[1].name", "duplicate table name 'emb'"),
    (edit("port = 7302", "port = 7301"), "11: node[1].port", "127.0.0.1:7301 is already taken"),
    (edit('zone = "z1"', 'zone = "z1"\nmetrics_port = 7302'), "12: node[1].port", "node[0] metrics_port"),
    (edit('zone = "z1"', 'zone = "z1"\nmetrics_port = 7301'), "8: node[0].metrics_port", "RPC port"),
    (edit("port = 7301", "port = 0"), "6: node[0].port", "[1, 65535]"),
    (edit("port = 7302", "port = 65536"), "11: node[1].port", "[1, 65535]"),
    (edit("port = 7301", "port = true"), "6: node[0].port", "got True"),
    (edit('zone = "z2"', 'zone = ""'), "12: node[1].zone", "got ''"),
    (edit('name = "a1"', 'name = "a1"\nhost = "bad host!"'), "6: node[0].host", "hostname"),
    (edit("dim = 8", "dim = 0"), "16: table[0].dim", "int >= 1"),
    (edit("dim = 8", "dim = -3"), "16: table[0].dim", "got -3"),
    (edit("dim = 8", 'dim = "64"'), "16: table[0].dim", "got '64'"),
    (edit("shards = 2", "shards = 0"), "17: table[0].shards", "[1, 65536]"),
    (edit("shards = 2", "shards = 2\nreplicas_per_zone = 2"), "18: table[0].replicas_per_zone",
     "zone 'z1' has 1 (a1)"),
    (edit("shards = 2", 'shards = 2\nplacement = [["a1", "b1"]]'), "18: table[0].placement",
     "1 entries for 2 shards"),
    (edit("shards = 2", 'shards = 2\nplacement = [\n  ["a1", "b1"],\n  ["a1", "x9"],\n]'),
     "20: table[0].placement[1]", "unknown node 'x9'"),
    (edit("shards = 2", 'shards = 2\nplacement = [["a1", "b1"], ["b1", "a1", "b1"]]'),
     "18: table[0].placement[1]", "node 'b1' listed twice"),
    (edit("shards = 2", 'shards = 2\nplacement = [\n  ["a1", "b1"],\n  ["a1"],\n]'),
     "20: table[0].placement[1]", "zone 'z2' holds 0 of the 1 replica(s) of table 'emb' shard 1"),
    (edit("shards = 2", "shards = 2\n[table.adagrad]\neps = -1.0"), "18: table[0].adagrad",
     "optimizer is 'none'"),
    (edit("shards = 2", 'shards = 2\noptimizer = "adagrad"\n[table.adagrad]\neps = -1.0'),
     "20: table[0].adagrad.eps", "> 0"),
    (edit("shards = 2", "shards = 2\n[table.initializer]\nkind = \"normal\"\nstd = -1.0"),
     "20: table[0].initializer.std", ">= 0"),
    (edit("[[node]]", "[node]", "[[node]]\n", "", 'name = "b1"\n', "", "port = 7302\n", "",
          'zone = "z2"\n', ""), "4: node", "[[node]]"),
    ('[cluster]\nname = "t"\n[[table]]\nname = "emb"\ndim = 8\n', "node", "at least one [[node]]"),
    (BASE.split("[[table]]")[0], "table", "at least one [[table]]"),
    (edit('name = "t"', 'name = "t"\nmax_frame_mb = 0'), "3: cluster.max_frame_mb", "> 0"),
    (edit('name = "t"', 'name = "t/x"'), "2: cluster.name", "letters, digits"),
]


@pytest.mark.parametrize(("text", "where", "phrase"), ERRORS, ids=[e[1] for e in ERRORS])
def test_errors_name_file_line_and_field(text: str, where: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as info:
        cluster_spec_from_text(text, source="cluster.toml")
    message = str(info.value)
    line, _, field = where.partition(": ") if where[0].isdigit() else ("", "", where)
    if line:
        assert message.startswith(f"cluster.toml:{line}: {field}"), message
    else:
        assert message.startswith(f"cluster.toml: {field}: "), message
    if field:
        assert info.value.field == field
    assert phrase in message, message


def test_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(edit("dim = 8", "dim = 0"))
    with pytest.raises(ConfigError, match=rf"^{path}:16: table\[0\]\.dim: "):
        load_cluster_spec(path)
    with pytest.raises(ConfigError, match="cannot read cluster spec"):
        load_cluster_spec(tmp_path / "missing.toml")


def test_records_check_themselves() -> None:
    with pytest.raises(ConfigError) as info:
        NodeSpec("a", port=70000, zone="z")
    assert info.value.field == "node.port"
    with pytest.raises(ConfigError, match=r"table\.placement: has 1 entries"):
        TableSpec("t", TableConfig(dim=2), shards=2, placement=(("a",),))
    node = NodeSpec("a", port=1, zone="z")
    with pytest.raises(ConfigError, match=r"table\[0\].placement\[0\]: unknown node 'b'"):
        ClusterSpec("c", (node,), (TableSpec("t", TableConfig(dim=2), placement=(("b",),)),))
    with pytest.raises(ConfigError, match=r"node\[1\].name: duplicate"):
        ClusterSpec("c", (node, dataclasses.replace(node, port=2)), (TableSpec("t", TableConfig(dim=2)),))
