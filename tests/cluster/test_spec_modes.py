"""Replication modes in the cluster spec: defaults, validation, Raft addresses, TOML round trip."""

from __future__ import annotations

import pytest

from streamrec.cluster.spec import cluster_spec_from_text
from streamrec.errors import ConfigError


def _spec(zones: int, table: str = "", raft: bool = True, serving: bool = False) -> str:
    nodes = "".join(f'[[node]]\nname = "n{i}"\nport = {7000 + i}\nzone = "z{i}"\n'
                    + (f"raft_port = {7100 + 10 * i}\n" if raft else "") for i in range(zones))
    if serving:
        nodes += '[[node]]\nname = "s0"\nport = 7900\nzone = "zs"\n'
        table += '\nserving = ["s0"]'
    return f'[cluster]\nname = "c"\n{nodes}[[table]]\nname = "t"\ndim = 4\nshards = 2\n{table}\n'


def test_defaults_strong_for_groups_of_three_with_raft_ports_else_client() -> None:
    assert cluster_spec_from_text(_spec(3)).mode("t") == "strong"
    assert cluster_spec_from_text(_spec(2)).mode("t") == "client"  # a group of 2: client-replicated
    assert cluster_spec_from_text(_spec(3, raft=False)).mode("t") == "client"  # no Raft ports named
    assert cluster_spec_from_text(_spec(3, serving=True)).mode("t") == "client"  # fan-out: client mode
    assert cluster_spec_from_text(_spec(3, 'mode = "client"')).mode("t") == "client"


def test_raft_addresses_are_the_nodes_base_plus_the_shards_rank() -> None:
    spec = cluster_spec_from_text(_spec(3))
    assert spec.strong_shards_on("n1") == [(0, 0), (0, 1)]
    assert spec.raft_address("n1", "t", 0) == "127.0.0.1:7110"
    assert spec.raft_address("n1", "t", 1) == "127.0.0.1:7111"
    with pytest.raises(ValueError, match="no strong replica"):
        cluster_spec_from_text(_spec(2)).raft_address("n0", "t", 0)


@pytest.mark.parametrize(("zones", "table", "raft", "serving", "field", "words"), [
    (2, 'mode = "strong"', True, False, "table[0].mode", "3 or more writable replicas"),
    (3, 'mode = "strong"', False, False, "table[0].mode", "raft_port"),
    (3, 'mode = "strong"', True, True, "table[0].mode", "serving"),
    (3, 'mode = "raft"', True, False, "table[0].mode", "client, strong"),
    (3, "max_staleness_s = 0", True, False, "table[0].max_staleness_s", "> 0"),
    (3, "election_timeout_s = [2.0, 1.0]", True, False, "table[0].election_timeout_s", "min < max"),
])
def test_bad_modes_name_the_field(zones: int, table: str, raft: bool, serving: bool, field: str,
                                  words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        cluster_spec_from_text(_spec(zones, table, raft, serving))
    assert info.value.field == field


def test_raft_ports_may_not_collide() -> None:
    text = _spec(3).replace("raft_port = 7110", "raft_port = 7101")  # n0's second shard is 7101
    with pytest.raises(ConfigError, match="already taken") as info:
        cluster_spec_from_text(text)
    assert info.value.field == "node[1].raft_port"
    with pytest.raises(ConfigError, match="another port"):
        cluster_spec_from_text(_spec(3).replace("raft_port = 7100", "raft_port = 7000"))


def test_toml_round_trip_keeps_mode_and_raft_settings() -> None:
    spec = cluster_spec_from_text(_spec(3, 'mode = "strong"\nmax_staleness_s = 2.5\n'
                                           "election_timeout_s = [1.5, 4.0]"))
    again = cluster_spec_from_text(spec.to_toml())
    assert again == spec
    assert again.tables[0].election_timeout_s == (1.5, 4.0) and again.mode("t") == "strong"
