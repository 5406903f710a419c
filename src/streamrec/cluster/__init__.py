"""streamrec.cluster: pure decisions about the cluster, no I/O.

Owns: the cluster spec (nodes, tables, shard placement, key to shard hash) and,
routing (replica choice, circuit breaking) and the fan-out tree's shape (``tree``).
May import our ``config`` and ``errors`` only; never ``store``, ``transport``
or ``ps``.

Thread safety: specs are frozen and shareable; other classes state their own rule.
"""

from streamrec.cluster.router import Breaker, Place, Router, RouterConfig
from streamrec.cluster.spec import (
    ClusterSpec,
    NodeSpec,
    TableSpec,
    cluster_spec_from_text,
    embedded_spec,
    load_cluster_spec,
)
from streamrec.cluster.tree import FanoutTree, attach, fanout_tree, tree_depth

__all__ = [
    "Breaker",
    "ClusterSpec",
    "FanoutTree",
    "NodeSpec",
    "Place",
    "Router",
    "RouterConfig",
    "TableSpec",
    "attach",
    "cluster_spec_from_text",
    "embedded_spec",
    "fanout_tree",
    "load_cluster_spec",
    "tree_depth",
]
