"""The cluster spec: which nodes exist, which tables they serve, and where each shard lives.

Owns: the frozen records ``NodeSpec``, ``TableSpec`` and ``ClusterSpec``; reading
them from TOML with errors that name the file, the line and the field; writing
them back (``ClusterSpec.to_toml``); default replica placement; and the key to
shard hash (``ClusterSpec.shard_of``). It must not do I/O beyond reading the
spec file, open sockets, or import any package of ours but ``config`` and
``errors``: it is a pure description that servers, clients and routers share.

Thread safety: every record is frozen and every method is a pure function of
it, so a spec may be shared by any number of threads and processes.

The file (every key shown; ``#`` says the default and why)::

    [cluster]
    name = "demo"              # required; names the default data directory
    max_frame_mb = 64          # request/reply size cap in MiB (int or float): 64 MiB holds 16k
                               #   rows of dim 1024 float32; the transport's own default
    request_timeout_s = 2.0    # a client's default deadline per request: long enough for a
                               #   full-size frame over a slow link, short enough to fail over

    [[node]]                   # one per process; at least one
    name = "a1"                # required; unique; letters, digits, '_', '.', '-'
    host = "127.0.0.1"         # IPv4/IPv6 literal or hostname (default: loopback, for one host)
    port = 7301                # required; the TCP RPC port, 1..65535
    zone = "z1"                # required; the availability zone (non-empty)
    pod = "p1"                 # default "": no pod; routers prefer same pod, then same zone
    metrics_port = 7401        # default 0: no metrics/health HTTP server
    data_dir = ""              # default "": /dev/shm/streamrec/<cluster>/<node> (memory-backed,
                               #   so co-located readers can map table files without disk I/O)
    raft_port = 7501           # default 0: none. Base of the node's Raft ports (strong mode): its
                               #   k-th strong shard (``ClusterSpec.raft_address``) uses raft_port + k

    [[table]]                  # one per embedding table; at least one
    name = "emb"               # required; unique
    dim = 64                   # required; and every other field of streamrec.config.TableConfig,
    optimizer = "adagrad"      #   with its defaults: dtype, capacity, max_rows, ttl_s, ttl_slice_s,
    ttl_s = 0                  #   max_live_rows, eviction, eviction_sample, lfu_decay_min,
    eviction = "lru"           #   admit_after, admission_sketch_width, huge_pages,
                               #   [table.adagrad] / [table.adam], [table.initializer]
    shards = 2                 # default 1; at most 65536 (the wire carries a uint16 shard)
    replicas_per_zone = 1      # default 1; copies of every shard in every zone
    placement = [["a1", "b1"], ["a2", "b2"]]   # optional: per shard, the nodes holding it
    serving = ["s1", "s2"]     # default []: read-only fan-out replicas; each holds EVERY shard of
                               #   the table, fed committed updates through a k-ary tree rooted at
                               #   one writable replica of the shard (ps/_follow.py); never written
                               #   by clients, never in ``placement``
    fanout = 4                 # default 4: children per tree node (Ekko's default degree is small
                               #   too: depth log_k(n) hops, k uplinks per parent)
    ring_mb = 64               # default 64: MiB of committed updates each writable replica keeps for
                               #   its fan-out children (only when ``serving`` is non-empty); a child
                               #   further behind re-syncs from an export
    mode = "strong"            # "client" or "strong" (Raft-ordered writes, ps/raftlog.py). Default:
                               #   "strong" when every shard has 3 or more writable replicas, the
                               #   table has no serving members and every holder names a raft_port;
                               #   else "client" (a group of 2 cannot stay writable through one
                               #   failure under Raft). "strong" needs all three (fan-out from a
                               #   Raft group is not wired yet)
    max_staleness_s = 1.0      # default 1.0 (strong): a follower serves a plain read only if it held
                               #   everything the leader had committed at most this long ago
    election_timeout_s = [0.4, 1.4]  # default pysyncobj's (strong): min, max of the randomised
                               #   election timeout; heartbeats every min / 4 (at most 0.1 s).
                               #   Raise it on a loaded host, or leaders flap

Rules: serving nodes of a table hold no writable replica of it and are left out
of its placement (default or given). Each zone (of the other nodes) holds a full
replica set, that is at least ``replicas_per_zone`` replicas of every shard, so
a zone can serve every key alone; hence
``replicas_per_zone`` must not exceed the node count of the smallest zone. Without
``placement``, replica ``r`` of shard ``s`` goes, within each zone, to
``zone_nodes[(s * replicas_per_zone + r) % len(zone_nodes)]`` (the zone's nodes
in file order): deterministic, and it spreads shards evenly. A relative
``data_dir`` is relative to the working directory of the process using it.

Errors are ``ConfigError`` with ``exc.field`` set, e.g.
``cluster.toml:14: table[0].placement[1]: unknown node 'x9'``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import tomllib
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamrec.config import TableConfig, table_config_from_dict, table_config_to_dict
from streamrec.errors import ConfigError

__all__ = [
    "ClusterSpec",
    "NodeSpec",
    "TableSpec",
    "cluster_spec_from_text",
    "embedded_spec",
    "load_cluster_spec",
]

DEFAULT_MAX_FRAME_BYTES = 64 << 20  # equals streamrec.transport.frames.DEFAULT_MAX_FRAME_BYTES
DEFAULT_REQUEST_TIMEOUT_S = 2.0
DEFAULT_DATA_ROOT = Path("/dev/shm/streamrec")  # tmpfs: table files are memory, mappable by neighbours
MIN_FRAME_BYTES = 4096  # one page; a header and its 8 descriptors take 160 bytes
MAX_FRAME_BYTES = 1 << 32  # frames are held whole on both ends; past 4 GiB split the request
MAX_SHARDS = 1 << 16  # the frame header's shard field is a uint16
MAX_TABLES = 1 << 16  # the frame header's table field is a uint16

# Names become directory names and metric labels: no '/', no leading '.'.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")

_CLUSTER_KEYS = ("max_frame_mb", "name", "request_timeout_s")
_NODE_KEYS = ("data_dir", "host", "metrics_port", "name", "pod", "port", "raft_port", "zone")
_TABLE_SPEC_KEYS = ("election_timeout_s", "fanout", "max_staleness_s", "mode", "name", "placement",
                    "replicas_per_zone", "ring_mb", "serving", "shards")
MODES = ("client", "strong")
DEFAULT_ELECTION_TIMEOUT_S = (0.4, 1.4)  # pysyncobj's raftMinTimeout, raftMaxTimeout
DEFAULT_FANOUT = 4
DEFAULT_RING_BYTES = 64 << 20
_TABLE_CONFIG_KEYS = tuple(sorted({f.name for f in dataclasses.fields(TableConfig)} | {"adagrad", "adam"}))


# -- the records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSpec:
    """One server process of the cluster.

    Attributes:
        name: unique node name (letters, digits, ``_``, ``.``, ``-``).
        host: IPv4/IPv6 literal or hostname; default ``"127.0.0.1"`` (one host).
        port: TCP RPC port, 1..65535 (keyword-only, required).
        zone: availability zone, non-empty (keyword-only, required).
        pod: pod label; default ``""`` (none).
        metrics_port: port of the metrics/health HTTP server; 0 (default) = none.
        data_dir: where the node keeps table files; ``""`` (default) =
            ``/dev/shm/streamrec/<cluster>/<node>`` (see ``ClusterSpec.data_dir``).
        raft_port: base of the node's Raft ports, one per strong shard it holds
            (``ClusterSpec.raft_address``); 0 (default) = none: it can hold no
            strong shard. Given explicitly, never derived, so no port is taken
            that the operator did not name.

    Raises:
        ConfigError: a value is out of range; ``field`` is ``node.<attribute>``.

    Example::

        NodeSpec("a1", port=7301, zone="z1").address   # '127.0.0.1:7301'
    """

    name: str
    _: KW_ONLY
    host: str = "127.0.0.1"
    port: int
    zone: str
    pod: str = ""
    metrics_port: int = 0
    data_dir: str = ""
    raft_port: int = 0

    def __post_init__(self) -> None:
        _check_name(self.name, "node.name")
        if not (isinstance(self.host, str) and _valid_host(self.host)):
            raise ConfigError(f"must be an IPv4/IPv6 address or a hostname, got {self.host!r}",
                              field="node.host")
        _check_int(self.port, 1, 65535, "node.port")
        _check_name(self.zone, "node.zone")
        if self.pod != "":
            _check_name(self.pod, "node.pod")
        _check_int(self.metrics_port, 0, 65535, "node.metrics_port")
        if self.metrics_port == self.port:
            raise ConfigError(f"{self.metrics_port} is also the node's RPC port", field="node.metrics_port")
        if not isinstance(self.data_dir, str):
            raise ConfigError(f"must be a string, got {self.data_dir!r}", field="node.data_dir")
        _check_int(self.raft_port, 0, 65535, "node.raft_port")
        if self.raft_port and self.raft_port in (self.port, self.metrics_port):
            raise ConfigError(f"{self.raft_port} is also another port of the node", field="node.raft_port")

    @property
    def address(self) -> str:
        """``host:port`` (``[host]:port`` for an IPv6 literal), what a TCP client connects to."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TableSpec:
    """One embedding table of the cluster, split into shards and replicated per zone.

    Attributes:
        name: unique table name.
        config: the store's settings for every shard (``streamrec.config.TableConfig``).
        shards: 1..65536 (default 1); keys go to shards by ``ClusterSpec.shard_of``.
        replicas_per_zone: copies of every shard in every zone (default 1).
        placement: per shard, the names of the nodes holding it; ``None``
            (default) places replicas as the module docstring describes.
        serving: read-only fan-out replicas (node names), each holding every
            shard; default ``()``: none, and the writable replicas keep no ring.
        fanout: children per node of the fan-out tree, 1..1024 (default 4).
        ring_bytes: committed updates a writable replica keeps for its fan-out
            children, bytes (default 64 MiB; ``ring_mb`` in the file).
        mode: ``"client"`` (the client writes every replica) or ``"strong"``
            (each shard's group orders writes through Raft); ``None`` (default)
            resolves as the module docstring says; ``ClusterSpec.mode`` gives it.
        max_staleness_s: strong mode: the staleness bound of a follower's reads
            (default 1.0 s).
        election_timeout_s: strong mode: (min, max) election timeout, seconds
            (default pysyncobj's (0.4, 1.4)).

    Raises:
        ConfigError: a value is out of range; ``field`` is ``table.<attribute>``.
    """

    name: str
    config: TableConfig
    shards: int = 1
    replicas_per_zone: int = 1
    placement: tuple[tuple[str, ...], ...] | None = None
    serving: tuple[str, ...] = ()
    fanout: int = DEFAULT_FANOUT
    ring_bytes: int = DEFAULT_RING_BYTES
    mode: str | None = None
    max_staleness_s: float = 1.0
    election_timeout_s: tuple[float, float] = DEFAULT_ELECTION_TIMEOUT_S

    def __post_init__(self) -> None:
        _check_name(self.name, "table.name")
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(f"must be one of {', '.join(MODES)}, got {self.mode!r}", field="table.mode")
        _check_positive(self.max_staleness_s, "table.max_staleness_s")
        et = self.election_timeout_s
        if not (isinstance(et, (tuple, list)) and len(et) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in et)
                and 0 < et[0] < et[1] and math.isfinite(et[1])):
            raise ConfigError(f"must be [min, max] seconds with 0 < min < max, got {et!r}",
                              field="table.election_timeout_s")
        object.__setattr__(self, "election_timeout_s", (float(et[0]), float(et[1])))
        if not (isinstance(self.serving, (tuple, list)) and all(isinstance(n, str) for n in self.serving)):
            raise ConfigError(f"must be a list of node names, got {self.serving!r}", field="table.serving")
        object.__setattr__(self, "serving", tuple(self.serving))
        if len(set(self.serving)) != len(self.serving):
            twice = next(n for n in self.serving if self.serving.count(n) > 1)
            raise ConfigError(f"node {twice!r} listed twice", field="table.serving")
        _check_int(self.fanout, 1, 1024, "table.fanout")
        _check_int(self.ring_bytes, 1 << 16, 1 << 40, "table.ring_bytes")
        if not isinstance(self.config, TableConfig):
            raise ConfigError(f"must be a TableConfig, got {type(self.config).__name__}",
                              field="table.config")
        _check_int(self.shards, 1, MAX_SHARDS, "table.shards")
        _check_int(self.replicas_per_zone, 1, 1 << 16, "table.replicas_per_zone")
        if self.placement is None:
            return
        if not isinstance(self.placement, (tuple, list)):
            raise ConfigError(f"must be a list of lists of node names, got {self.placement!r}",
                              field="table.placement")
        placement = tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in self.placement)
        for s, nodes in enumerate(placement):
            if not (isinstance(nodes, tuple) and all(isinstance(n, str) for n in nodes)):
                raise ConfigError(f"must be a list of node names, got {nodes!r}",
                                  field=f"table.placement[{s}]")
        if len(placement) != self.shards:
            raise ConfigError(f"has {len(placement)} entries for {self.shards} shards; give one per shard",
                              field="table.placement")
        object.__setattr__(self, "placement", placement)


@dataclass(frozen=True)
class ClusterSpec:
    """The whole cluster: nodes, tables, and where every shard's replicas live.

    Construction checks every rule of the module docstring and resolves placement.

    Attributes:
        name: cluster name (names the default data directory).
        nodes: the nodes, in file order (which orders zones and replica lists).
        tables: the tables; a table's index is its position here (the wire's table id).
        max_frame_bytes: request/reply size cap (default 64 MiB).
        request_timeout_s: a client's default deadline per request (default 2 s).
        source: where the spec came from, for messages; not compared.

    Raises:
        ConfigError: a rule is broken; ``field`` names it (``node[2].port``,
            ``table[0].placement[1]``, ...).

    Example::

        spec = embedded_spec()
        spec.replicas("emb", 1)                              # ['local']
        spec.shard_of("emb", np.arange(4, dtype=np.uint64))  # (4,) int64 in [0, 2)
    """

    name: str
    nodes: tuple[NodeSpec, ...]
    tables: tuple[TableSpec, ...]
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    source: str = field(default="<string>", compare=False)
    _node_by_name: dict[str, NodeSpec] = field(init=False, repr=False, compare=False)
    _table_by_name: dict[str, int] = field(init=False, repr=False, compare=False)
    _placement: tuple[tuple[tuple[str, ...], ...], ...] = field(init=False, repr=False, compare=False)
    _modes: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_name(self.name, "cluster.name")
        _check_int(self.max_frame_bytes, MIN_FRAME_BYTES, MAX_FRAME_BYTES, "cluster.max_frame_bytes")
        _check_positive(self.request_timeout_s, "cluster.request_timeout_s")
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "tables", tuple(self.tables))
        if not self.nodes:
            raise ConfigError("at least one [[node]] is required", field="node")
        if not self.tables:
            raise ConfigError("at least one [[table]] is required", field="table")
        if len(self.tables) > MAX_TABLES:
            raise ConfigError(f"{len(self.tables)} tables; at most {MAX_TABLES}", field="table")
        by_name: dict[str, int] = {}
        endpoints: dict[tuple[str, int], str] = {}
        for i, node in enumerate(self.nodes):
            if not isinstance(node, NodeSpec):
                raise ConfigError(f"must be a NodeSpec, got {type(node).__name__}", field=f"node[{i}]")
            if node.name in by_name:
                raise ConfigError(f"duplicate node name {node.name!r} (also node[{by_name[node.name]}])",
                                  field=f"node[{i}].name")
            by_name[node.name] = i
            for key, port in (("port", node.port), ("metrics_port", node.metrics_port)):
                if port == 0:
                    continue
                if (node.host, port) in endpoints:
                    raise ConfigError(f"{node.host}:{port} is already taken by {endpoints[node.host, port]}",
                                      field=f"node[{i}].{key}")
                endpoints[node.host, port] = f"node[{i}] {key}"
        tables: dict[str, int] = {}
        for t, table in enumerate(self.tables):
            if not isinstance(table, TableSpec):
                raise ConfigError(f"must be a TableSpec, got {type(table).__name__}", field=f"table[{t}]")
            if table.name in tables:
                raise ConfigError(f"duplicate table name {table.name!r} (also table[{tables[table.name]}])",
                                  field=f"table[{t}].name")
            tables[table.name] = t
        object.__setattr__(self, "_node_by_name", {n.name: n for n in self.nodes})
        object.__setattr__(self, "_table_by_name", tables)
        placement = tuple(self._place(t, table) for t, table in enumerate(self.tables))
        object.__setattr__(self, "_placement", placement)
        object.__setattr__(self, "_modes", tuple(self._mode(t, table) for t, table in enumerate(self.tables)))
        raft: dict[tuple[str, int], str] = {}
        for node in self.nodes:
            for k in range(len(self.strong_shards_on(node.name))):
                port = node.raft_port + k
                where = f"node[{by_name[node.name]}].raft_port"
                if port > 65535:
                    raise ConfigError(f"{node.raft_port} + {k} strong shards passes 65535", field=where)
                if (node.host, port) in endpoints or (node.host, port) in raft:
                    taken = endpoints.get((node.host, port)) or raft[node.host, port]
                    raise ConfigError(f"{node.host}:{port} (Raft port of its strong shard {k}) is already "
                                      f"taken by {taken}", field=where)
                raft[node.host, port] = f"{where} + {k}"

    def _mode(self, t: int, table: TableSpec) -> str:
        """The table's replication mode, resolved (see the module docstring); checks strong's needs."""
        groups = self._placement[t]
        holders = {n for g in groups for n in g}
        ported = all(self._node_by_name[n].raft_port for n in holders)
        if table.mode is None:
            return "strong" if min(map(len, groups)) >= 3 and not table.serving and ported else "client"
        if table.mode == "strong":
            where = f"table[{t}].mode"
            small = min(range(len(groups)), key=lambda s: len(groups[s]))
            if len(groups[small]) < 3:
                raise ConfigError(f"strong mode needs 3 or more writable replicas per shard; shard {small} "
                                  f"has {len(groups[small])} (a group of 2 cannot stay writable through one "
                                  "failure under Raft: use mode = \"client\")", field=where)
            if table.serving:
                raise ConfigError("strong mode with serving (fan-out) members is not supported yet",
                                  field=where)
            if not ported:
                missing = sorted(n for n in holders if not self._node_by_name[n].raft_port)
                raise ConfigError(f"strong mode needs a raft_port on every node holding the table; missing "
                                  f"on {', '.join(missing)}", field=where)
        return table.mode

    def _place(self, t: int, table: TableSpec) -> tuple[tuple[str, ...], ...]:
        """The table's replicas per shard, each list in node order; checks the replica rules."""
        for name in table.serving:
            if name not in self._node_by_name:
                raise ConfigError(f"unknown node {name!r}; nodes: {', '.join(self._node_by_name)}",
                                  field=f"table[{t}].serving")
        # Serving nodes take no writable replica of the table: zones are those of the other nodes.
        writable = [n for n in self.nodes if n.name not in table.serving]
        if not writable:
            raise ConfigError(f"every node serves table {table.name!r} read-only; it needs a writable one",
                              field=f"table[{t}].serving")
        zones = {z: [n.name for n in writable if n.zone == z]
                 for z in dict.fromkeys(n.zone for n in writable)}
        rpz = table.replicas_per_zone
        small = min(zones, key=lambda z: len(zones[z]))
        if rpz > len(zones[small]):
            raise ConfigError(
                f"{rpz} replicas per zone need {rpz} nodes in every zone, but zone {small!r} has "
                f"{len(zones[small])} ({', '.join(zones[small])}); "
                "a node cannot hold two replicas of a shard",
                field=f"table[{t}].replicas_per_zone")
        if table.placement is None:
            chosen = [{zn[(s * rpz + r) % len(zn)] for zn in zones.values() for r in range(rpz)}
                      for s in range(table.shards)]
        else:
            chosen = []
            for s, names in enumerate(table.placement):
                where = f"table[{t}].placement[{s}]"
                for name in names:
                    if name not in self._node_by_name:
                        raise ConfigError(f"unknown node {name!r}; nodes: {', '.join(self._node_by_name)}",
                                          field=where)
                    if name in table.serving:
                        raise ConfigError(f"node {name!r} serves table {table.name!r} read-only (serving); "
                                          "it cannot also hold a writable replica", field=where)
                seen = set()
                for name in names:
                    if name in seen:
                        raise ConfigError(f"node {name!r} listed twice for shard {s}", field=where)
                    seen.add(name)
                for z, zn in zones.items():
                    held = [n for n in zn if n in seen]
                    if len(held) < rpz:
                        raise ConfigError(
                            f"zone {z!r} holds {len(held)} of the {rpz} replica(s) of table {table.name!r} "
                            f"shard {s}; every zone must hold a full replica set "
                            f"(zone nodes: {', '.join(zn)})",
                            field=where)
                chosen.append(seen)
        return tuple(tuple(n.name for n in self.nodes if n.name in c) for c in chosen)

    # -- lookups: pure; an unknown node or table name raises ConfigError ---------------------------

    def node(self, name: str) -> NodeSpec:
        """The node called ``name``.

        Raises:
            ConfigError: no such node (the message lists the known ones).
        """
        try:
            return self._node_by_name[name]
        except (KeyError, TypeError):
            raise ConfigError(f"unknown node {name!r}; nodes: {', '.join(self._node_by_name)}",
                              field="node") from None

    def table(self, name: str | int) -> tuple[int, TableSpec]:
        """``(index, spec)`` of the table called ``name`` (or at index ``name``).

        Raises:
            ConfigError: no such table.
        """
        if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
            if 0 <= name < len(self.tables):
                return int(name), self.tables[name]
        elif name in self._table_by_name:
            t = self._table_by_name[name]
            return t, self.tables[t]
        raise ConfigError(f"unknown table {name!r}; tables: {', '.join(self._table_by_name)}", field="table")

    def zones(self) -> list[str]:
        """Zone names in the order they first appear among the nodes."""
        return list(dict.fromkeys(n.zone for n in self.nodes))

    def replicas(self, table: str | int, shard: int) -> list[str]:
        """Names of the nodes holding ``shard`` of ``table``, all zones, in node order.

        Raises:
            ConfigError: unknown table.
            ValueError: ``shard`` is not in ``[0, shards)``.
        """
        t, spec = self.table(table)
        if not (isinstance(shard, (int, np.integer)) and 0 <= shard < spec.shards):
            raise ValueError(f"shard: expected an int in [0, {spec.shards}) for table {spec.name!r}, "
                             f"got {shard!r}")
        return list(self._placement[t][shard])

    def serving(self, table: str | int) -> tuple[str, ...]:
        """The table's read-only fan-out replicas (each holds every shard), as given.

        Raises:
            ConfigError: unknown table.
        """
        return self.table(table)[1].serving

    def serving_on(self, node: str) -> list[tuple[int, int]]:
        """``(table index, shard)`` pairs that ``node`` holds read-only (fan-out), sorted.

        Raises:
            ConfigError: unknown node.
        """
        self.node(node)
        return [(t, s) for t, table in enumerate(self.tables) if node in table.serving
                for s in range(table.shards)]

    def shards_on(self, node: str) -> list[tuple[int, int]]:
        """``(table index, shard)`` pairs that ``node`` holds writable, sorted.

        Raises:
            ConfigError: unknown node.
        """
        self.node(node)
        return [(t, s) for t, per_shard in enumerate(self._placement)
                for s, names in enumerate(per_shard) if node in names]

    def mode(self, table: str | int) -> str:
        """The table's replication mode, ``"client"`` or ``"strong"``, its default resolved.

        Raises:
            ConfigError: unknown table.
        """
        return self._modes[self.table(table)[0]]

    def strong_shards_on(self, node: str) -> list[tuple[int, int]]:
        """``(table index, shard)`` pairs of strong tables that ``node`` holds, sorted: the k-th
        one's Raft member listens on the node's ``raft_port + k``.

        Raises:
            ConfigError: unknown node.
        """
        return [(t, s) for t, s in self.shards_on(node) if self._modes[t] == "strong"]

    def raft_address(self, node: str, table: str | int, shard: int) -> str:
        """``host:port`` of ``node``'s Raft member for a strong shard it holds.

        Raises:
            ConfigError: unknown node or table.
            ValueError: the node holds no strong replica of that shard.
        """
        t, _ = self.table(table)
        spec = self.node(node)
        held = self.strong_shards_on(node)
        if (t, shard) not in held:
            raise ValueError(f"node {node!r} holds no strong replica of table {t} shard {shard}")
        port = spec.raft_port + held.index((t, shard))
        return f"[{spec.host}]:{port}" if ":" in spec.host else f"{spec.host}:{port}"

    def data_dir(self, node: str) -> Path:
        """Where ``node`` keeps its table files: its ``data_dir``, else
        ``/dev/shm/streamrec/<cluster>/<node>``. Pure: creates nothing.

        Raises:
            ConfigError: unknown node.
        """
        spec = self.node(node)
        return Path(spec.data_dir) if spec.data_dir else DEFAULT_DATA_ROOT / self.name / spec.name

    def shard_of(self, table: str | int, keys: np.ndarray) -> np.ndarray:
        """The shard of each key: ``keys (B,) uint64 -> (B,) int64`` in ``[0, shards)``.

        The key is mixed by murmur3's ``fmix64`` and the HIGH 32 bits are scaled
        to the shard count by multiply-shift, ``((h >> 32) * shards) >> 32``. The
        table hashes keys with splitmix64 and indexes buckets by LOW bits; a
        different mixer and the other end of the word keep shard and bucket
        independent, so every shard still uses all of its buckets. Only
        wrapping uint64 arithmetic: the same on every platform and process, and
        a key maps to the same shard index in every table of equal shard count.

        Args:
            table: table name or index.
            keys: 1-D array of unsigned or non-negative signed integers.

        Raises:
            ConfigError: unknown table.
            TypeError: ``keys`` is not an integer ndarray.
            ValueError: ``keys`` is not 1-D or holds negative values.
        """
        _, spec = self.table(table)
        if not isinstance(keys, np.ndarray) or keys.dtype.kind not in "ui":
            got = keys.dtype if isinstance(keys, np.ndarray) else type(keys).__name__
            raise TypeError(f"keys: expected a uint64 ndarray, got {got}")
        if keys.ndim != 1:
            raise ValueError(f"keys: expected a 1-D array of shape (B,), got shape {keys.shape}")
        if keys.dtype.kind == "i" and keys.size and int(keys.min()) < 0:
            raise ValueError(f"keys: expected non-negative keys (they are uint64), got {int(keys.min())}")
        h = _fmix64(keys.astype(np.uint64, copy=False))
        h >>= _S32
        h *= np.uint64(spec.shards)
        h >>= _S32
        return h.astype(np.int64)

    # -- writing -----------------------------------------------------------------------------------

    def to_toml(self) -> str:
        """The spec as TOML that ``cluster_spec_from_text`` reads back to an equal spec."""
        mb = self.max_frame_bytes / (1 << 20)
        out = ["[cluster]", f"name = {_toml(self.name)}",
               f"max_frame_mb = {_toml(int(mb) if mb.is_integer() else mb)}",
               f"request_timeout_s = {_toml(float(self.request_timeout_s))}"]
        for n in self.nodes:
            out += ["", "[[node]]"]
            out += [f"{f.name} = {_toml(getattr(n, f.name))}" for f in dataclasses.fields(n)]
        for t in self.tables:
            raw = table_config_to_dict(t.config)
            subs = {k: raw.pop(k) for k in ("adagrad", "adam", "initializer") if k in raw}
            out += ["", "[[table]]", f"name = {_toml(t.name)}", f"shards = {t.shards}",
                    f"replicas_per_zone = {t.replicas_per_zone}"]
            if t.placement is not None:
                out.append(f"placement = {_toml([list(p) for p in t.placement])}")
            if t.serving:
                out += [f"serving = {_toml(list(t.serving))}", f"fanout = {t.fanout}",
                        f"ring_mb = {_toml(_mb(t.ring_bytes))}"]
            if t.mode is not None:
                out.append(f"mode = {_toml(t.mode)}")
            if t.max_staleness_s != 1.0 or t.election_timeout_s != DEFAULT_ELECTION_TIMEOUT_S:
                out += [f"max_staleness_s = {_toml(float(t.max_staleness_s))}",
                        f"election_timeout_s = {_toml(list(t.election_timeout_s))}"]
            out += [f"{k} = {_toml(v)}" for k, v in raw.items()]
            for k, sub in subs.items():
                out += [f"[table.{k}]"] + [f"{sk} = {_toml(sv)}" for sk, sv in sub.items()]
        return "\n".join(out) + "\n"


# -- loading -------------------------------------------------------------------------------------


def load_cluster_spec(path: str | Path) -> ClusterSpec:
    """Read a cluster spec file (format in the module docstring).

    Raises:
        ConfigError: the file cannot be read, is not TOML, or breaks a rule; the
            message starts ``<path>:<line>: <field>:``.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read cluster spec {p}: {exc}") from exc
    return cluster_spec_from_text(text, source=str(p))


def cluster_spec_from_text(text: str, source: str = "<string>") -> ClusterSpec:
    """Parse a cluster spec from TOML text; ``source`` names it in messages.

    Raises:
        ConfigError: as ``load_cluster_spec``.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"at line (\d+)", str(exc))
        where = f"{source}:{m.group(1)}" if m else source
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    try:
        return _spec_from_doc(doc, source)
    except ConfigError as exc:
        line = _Locator(text).line_of(exc.field)
        where = f"{source}:{line}" if line else source
        message = str(exc).split(": ", 1)[1] if exc.field else str(exc)
        located = ConfigError(f"{where}: {exc.field}: {message}" if exc.field else f"{where}: {message}")
        located.field = exc.field
        raise located from exc


def embedded_spec(dim: int = 64, shards: int = 2, *, optimizer: str = "adagrad", table: str = "emb",
                  port: int = 7300) -> ClusterSpec:
    """The in-process default: everything on one node, for tests, demos and single-host use.

    Cluster ``"local"`` with one node ``"local"`` on ``127.0.0.1:port`` in zone
    ``"local"`` (no pod, no metrics server), and one table ``table`` of width
    ``dim`` with ``optimizer`` and the other ``TableConfig`` defaults, ``shards``
    shards (2 by default, so sharding code paths run even here), one replica.

    Raises:
        ConfigError: a value is out of range.
    """
    config = table_config_from_dict({"dim": dim, "optimizer": optimizer})
    return ClusterSpec("local", (NodeSpec("local", port=port, zone="local"),),
                       (TableSpec(table, config, shards=shards),), source="embedded_spec()")


def _spec_from_doc(doc: dict[str, Any], source: str) -> ClusterSpec:
    _check_keys(doc, ("cluster", "node", "table"), "")
    cluster = doc.get("cluster")
    if cluster is None:
        raise ConfigError("a [cluster] section with a name is required", field="cluster")
    if not isinstance(cluster, dict):
        raise ConfigError("must be a [cluster] section", field="cluster")
    _check_keys(cluster, _CLUSTER_KEYS, "cluster")
    _require(cluster, "name", "cluster")
    mb = cluster.get("max_frame_mb", DEFAULT_MAX_FRAME_BYTES / (1 << 20))
    _check_positive(mb, "cluster.max_frame_mb")
    if not MIN_FRAME_BYTES <= mb * (1 << 20) <= MAX_FRAME_BYTES:
        raise ConfigError(f"must be in [{MIN_FRAME_BYTES / (1 << 20)}, {MAX_FRAME_BYTES >> 20}], got {mb}",
                          field="cluster.max_frame_mb")
    timeout = cluster.get("request_timeout_s", DEFAULT_REQUEST_TIMEOUT_S)
    _check_positive(timeout, "cluster.request_timeout_s")
    nodes = [_node_from(raw, i) for i, raw in enumerate(_array(doc, "node"))]
    tables = [_table_from(raw, i) for i, raw in enumerate(_array(doc, "table"))]
    return ClusterSpec(cluster["name"], tuple(nodes), tuple(tables), int(mb * (1 << 20)), float(timeout),
                       source=source)


def _node_from(raw: dict[str, Any], i: int) -> NodeSpec:
    where = f"node[{i}]"
    _check_keys(raw, _NODE_KEYS, where)
    for key in ("name", "port", "zone"):
        _require(raw, key, where)
    raw = dict(raw)
    return _indexed(lambda: NodeSpec(raw.pop("name"), **raw), "node", where)


def _table_from(raw: dict[str, Any], i: int) -> TableSpec:
    where = f"table[{i}]"
    _check_keys(raw, _TABLE_SPEC_KEYS + _TABLE_CONFIG_KEYS, where)
    for key in ("name", "dim"):
        _require(raw, key, where)
    raw = dict(raw)
    spec = {k: raw.pop(k) for k in _TABLE_SPEC_KEYS if k in raw}
    if "ring_mb" in spec:
        mb = spec.pop("ring_mb")
        _check_positive(mb, f"{where}.ring_mb")
        spec["ring_bytes"] = int(mb * (1 << 20))
    config = table_config_from_dict(raw, where=where)
    return _indexed(lambda: TableSpec(spec.pop("name"), config, **spec), "table", where)


def _indexed(build: Any, prefix: str, where: str) -> Any:
    """``build()``, with a record's ``node.port``-style error field renamed to ``node[3].port``."""
    try:
        return build()
    except ConfigError as exc:
        if exc.field.startswith(prefix + ".") or exc.field == prefix:
            message = str(exc).split(": ", 1)[1]
            raise ConfigError(message, field=where + exc.field[len(prefix):]) from None
        raise


def _array(doc: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items = doc.get(key, [])
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise ConfigError(f"must be an array of tables: write [[{key}]] sections", field=key)
    return items


def _check_keys(raw: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in raw:
        if key not in known:
            what = "key" if where else "section or key"
            raise ConfigError(f"unknown {what}; known: {', '.join(known)}",
                              field=f"{where}.{key}" if where else key)


def _require(raw: dict[str, Any], key: str, where: str) -> None:
    if key not in raw:
        raise ConfigError("is required", field=f"{where}.{key}")


# -- checks and helpers --------------------------------------------------------------------------


def _check_name(v: Any, name: str) -> None:
    if not (isinstance(v, str) and _NAME.fullmatch(v)):
        raise ConfigError(f"must be 1-128 of letters, digits, '_', '.', '-' (not starting with '.'), "
                          f"got {v!r}", field=name)


def _check_int(v: Any, lo: int, hi: int, name: str) -> None:
    if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
        raise ConfigError(f"must be an int in [{lo}, {hi}], got {v!r}", field=name)


def _check_positive(v: Any, name: str) -> None:
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
        raise ConfigError(f"must be a finite number > 0, got {v!r}", field=name)


def _mb(n: int) -> int | float:
    mb = n / (1 << 20)
    return int(mb) if mb.is_integer() else mb


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME.fullmatch(host))


_S32, _S33 = np.uint64(32), np.uint64(33)
_FMIX_C1, _FMIX_C2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)


def _fmix64(keys: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser on a uint64 array (a new array; numpy arrays wrap, never raise)."""
    h = keys ^ (keys >> _S33)
    h *= _FMIX_C1
    h ^= h >> _S33
    h *= _FMIX_C2
    h ^= h >> _S33
    return h


def _toml(v: Any) -> str:
    """A TOML literal for the simple values a spec holds (str, bool, int, float, lists of them)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        out = ['"']
        for c in v:
            if c in '"\\':
                out.append("\\" + c)
            elif ord(c) < 0x20 or ord(c) == 0x7F:
                out.append(f"\\u{ord(c):04x}")
            else:
                out.append(c)
        return "".join(out) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")


# -- locating a field in the text ----------------------------------------------------------------

_SEG = r'(?:[A-Za-z0-9_\-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED = rf"{_SEG}(?:\s*\.\s*{_SEG})*"
_ARRAY_HEADER = re.compile(rf"\[\[\s*({_DOTTED})\s*\]\]")
_HEADER = re.compile(rf"\[\s*({_DOTTED})\s*\]")
_KEY = re.compile(rf"({_DOTTED})\s*=")


def _segments(dotted: str) -> list[str]:
    return [s.strip("\"'") for s in re.findall(_SEG, dotted)]


class _Locator:
    """Best-effort map from a field path (``table[0].placement[1]``) to its 1-based line.

    tomllib keeps no positions, so this scans the text for headers, ``key =``
    lines, and the elements of multi-line arrays. REQUIRES: text that tomllib
    accepted (strings are terminated, brackets balance).
    """

    def __init__(self, text: str) -> None:
        self._lines: dict[str, int] = {}
        self._arrays: dict[str, int] = {}  # path of an array of tables -> index of its last element
        prefix = ""
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            s = lines[i].strip()
            if m := _ARRAY_HEADER.match(s):
                segs = _segments(m.group(1))
                path = self._join(self._resolve(segs[:-1]), segs[-1])
                self._arrays[path] = self._arrays.get(path, -1) + 1
                prefix = f"{path}[{self._arrays[path]}]"
                self._lines.setdefault(prefix, i + 1)
            elif m := _HEADER.match(s):
                prefix = self._resolve(_segments(m.group(1)))
                self._lines.setdefault(prefix, i + 1)
            elif m := _KEY.match(s):
                key = self._join(prefix, ".".join(_segments(m.group(1))))
                self._lines.setdefault(key, i + 1)
                i = self._scan_value(lines, i, lines[i].index("=") + 1, key)
                continue
            i += 1

    def line_of(self, field_path: str) -> int | None:
        """The line of ``field_path``, else of its nearest enclosing element or section."""
        path = field_path
        while path:
            if path in self._lines:
                return self._lines[path]
            path = re.sub(r"(\[\d+\]|\.[^.\[\]]+|^[^.\[\]]+)$", "", path)
        return None

    @staticmethod
    def _join(prefix: str, key: str) -> str:
        return f"{prefix}.{key}" if prefix else key

    def _resolve(self, segs: list[str]) -> str:
        path = ""
        for seg in segs:
            path = self._join(path, seg)
            if path in self._arrays:
                path = f"{path}[{self._arrays[path]}]"
        return path

    def _scan_value(self, lines: list[str], i: int, j: int, key: str) -> int:
        """Skip the value starting at ``lines[i][j]``, noting where each element of an
        array opens (``key[n]``); returns the index of the line after the value."""
        depth, elem, expect, quote = 0, 0, False, ""
        while i < len(lines):
            s = lines[i]
            while j < len(s):
                c = s[j]
                if quote:
                    if c == "\\" and quote[0] == '"':
                        j += 2
                        continue
                    if s.startswith(quote, j):
                        j += len(quote)
                        quote = ""
                        continue
                    j += 1
                    continue
                if c == "#":
                    break
                if depth == 1 and expect and not c.isspace() and c not in ",]":
                    self._lines.setdefault(f"{key}[{elem}]", i + 1)
                    elem, expect = elem + 1, False
                if c in "\"'":
                    quote = s[j:j + 3] if s[j:j + 3] in ('"""', "'''") else c
                    j += len(quote)
                    continue
                if c in "[{":
                    depth += 1
                    expect = depth == 1 and c == "["
                elif c in "]}":
                    depth -= 1
                elif c == "," and depth == 1:
                    expect = True
                j += 1
            i, j = i + 1, 0
            if depth == 0 and not quote:
                return i
        return i
