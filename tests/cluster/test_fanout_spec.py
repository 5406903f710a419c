"""Fan-out in the cluster spec (``TableSpec.serving``, ``fanout``, ``ring_mb``) and
``cluster.tree.attach``: defaults, validation, placement, round trips, and the
property that members with different beliefs about who is dead never pull in a cycle."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.cluster import ClusterSpec, NodeSpec, TableSpec, attach, cluster_spec_from_text, fanout_tree
from streamrec.config import TableConfig
from streamrec.errors import ConfigError

_TEXT = """
[cluster]
name = "c"
[[node]]
name = "w1"
port = 7001
zone = "z1"
[[node]]
name = "w2"
port = 7002
zone = "z2"
[[node]]
name = "s1"
port = 7003
zone = "z1"
[[node]]
name = "s2"
port = 7004
zone = "z2"
[[table]]
name = "emb"
dim = 8
"""


def test_old_spec_has_no_serving_and_the_defaults() -> None:
    spec = cluster_spec_from_text(_TEXT)
    t = spec.tables[0]
    assert (t.serving, t.fanout, t.ring_bytes) == ((), 4, 64 << 20)
    assert spec.serving("emb") == () and spec.serving_on("s1") == []
    assert spec.replicas("emb", 0) == ["w1", "w2"]  # default placement: the first node of each zone


def test_serving_nodes_are_left_out_of_placement() -> None:
    spec = cluster_spec_from_text(_TEXT + 'serving = ["w1", "s2"]\nfanout = 3\nring_mb = 0.5\nshards = 2\n')
    t = spec.tables[0]
    assert (t.serving, t.fanout, t.ring_bytes) == (("w1", "s2"), 3, 1 << 19)
    for s in range(2):
        assert not set(spec.replicas("emb", s)) & {"w1", "s2"}
        assert sorted(spec.replicas("emb", s)) == ["s1", "w2"]
    assert spec.serving_on("w1") == [(0, 0), (0, 1)] and spec.shards_on("w1") == []
    again = cluster_spec_from_text(spec.to_toml())
    assert again == spec and again.tables[0].ring_bytes == 1 << 19


@pytest.mark.parametrize(("extra", "field"), [
    ('serving = ["nope"]', "table[0].serving"),
    ('serving = ["s1", "s1"]', "table[0].serving"),
    ('serving = ["s1"]\nplacement = [["w1", "s1", "w2"]]', "table[0].placement[0]"),
    ('serving = ["w1", "w2", "s1", "s2"]', "table[0].serving"),
    ("fanout = 0", "table[0].fanout"),
    ("ring_mb = -1", "table[0].ring_mb"),
    ("serving = 3", "table[0].serving"),
])
def test_bad_fanout_fields_are_named(extra: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        cluster_spec_from_text(_TEXT + extra + "\n")
    assert err.value.field == field, str(err.value)


def test_table_spec_checks_fanout_directly() -> None:
    cfg = TableConfig(dim=4)
    with pytest.raises(ConfigError, match="fanout"):
        TableSpec("t", cfg, serving=("a",), fanout=2000)
    nodes = (NodeSpec("a", port=1, zone="z"), NodeSpec("b", port=2, zone="z"))
    spec = ClusterSpec("c", nodes, (TableSpec("t", cfg, serving=["b"]),))  # type: ignore[arg-type]  # a list, as TOML gives
    assert spec.serving(0) == ("b",) and spec.replicas(0, 0) == ["a"]


def test_attach_follows_the_tree_and_skips_the_dead() -> None:
    members = [f"m{i}" for i in range(7)]
    tree = fanout_tree("w1", members, 2)
    for m in members:
        assert attach(["w1", "w2"], members, 2, m) == ("w1", tree.parent(m))
    # m1's children (m3, m4) re-attach when m1 is dead; a dead root moves everyone to w2
    assert attach(["w1", "w2"], members, 2, "m3", {"m1"}) == ("w1", fanout_tree("w1", ["m0", *members[2:]], 2)
                                                                .parent("m3"))
    assert attach(["w1", "w2"], members, 2, "m0", {"w1"}) == ("w2", "w2")
    with pytest.raises(ValueError, match="every source"):
        attach(["w1"], members, 2, "m0", {"w1"})


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 5), data=st.data())
def test_attach_never_forms_a_cycle_whatever_members_believe(n: int, k: int, data: st.DataObject) -> None:
    """Each member believes its own set of members dead; following parents from any
    member still reaches a source (a parent always sorts before its child)."""
    members = [f"m{i:02d}" for i in range(n)]
    sources = ["w1", "w2"]
    beliefs = {m: data.draw(st.sets(st.sampled_from([*members, "w1"]), max_size=n)) for m in members}
    parent = {m: attach(sources, members, k, m, beliefs[m])[1] for m in members}
    for m in members:
        seen, x = set(), m
        while x not in sources:
            assert x not in seen, f"cycle through {x}"
            seen.add(x)
            x = parent[x]
