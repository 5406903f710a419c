"""Where every replica of a cluster stands: ``streamrec ps status``.

Owns: ``cluster_status`` (ask every node HELLO, and compute each replica's lag
behind its root) and ``format_status`` (the table the CLI prints). It must not
change anything on the nodes.

A serving replica's *root* is the writable replica whose epoch it holds (the
one whose batches it applies, whichever member it pulls them through). Its lag
is the root's last seq minus its own, in batches, and in seconds the root's
last commit time minus that of the last batch it applied (0 when caught up).
A serving replica whose epoch no writable replica holds (it is re-syncing, or
its root is down) has no lag to state: ``None``.

A strong table's member (Raft) shows its applied log index as its seq, the
leader it knows as its root, its lag in entries behind the leader's applied
index (as each answered) and its staleness in seconds (``None`` when it has
never caught up).

Thread safety: pure functions of what the nodes answered; no shared state.
"""

from __future__ import annotations

import json
from typing import Any

from streamrec.cluster.spec import ClusterSpec
from streamrec.errors import TransportError
from streamrec.transport.frames import Frame, Kind, Status
from streamrec.transport.tcp import TcpConnection

__all__ = ["cluster_status", "format_status"]


def _hello(spec: ClusterSpec, node: str, timeout_s: float) -> dict[str, Any] | None:
    try:
        with TcpConnection(spec.node(node).address, connect_timeout_s=timeout_s) as conn:
            reply = conn.request(Frame(Kind.HELLO, request_id=1), timeout_s)
    except TransportError:
        return None
    if reply.status != Status.OK:
        return None
    info: dict[str, Any] = json.loads(reply.text())
    return info


def cluster_status(spec: ClusterSpec, timeout_s: float = 1.0) -> list[dict[str, Any]]:
    """One row per replica (table, shard, node): role, up, ready, epoch, seq, parent,
    lag_batches and lag_s behind its root (``None`` where unknown; module doc)."""
    hellos = {n.name: _hello(spec, n.name, timeout_s) for n in spec.nodes}
    rows: list[dict[str, Any]] = []
    for t, table in enumerate(spec.tables):
        for s in range(table.shards):
            here = []
            for node in [*spec.replicas(t, s), *table.serving]:
                held = (hellos[node] or {}).get("shards", ())
                shard = next((x for x in held if (x["table"], x["shard"]) == (t, s)), None)
                role = "serving" if node in table.serving else "writable"
                row: dict[str, Any] = {"table": table.name, "shard": s, "node": node, "role": role,
                                       "up": shard is not None, "ready": bool(shard and shard["ready"]),
                                       "epoch": None, "seq": None, "commit_ns": None, "parent": None,
                                       "root": None, "lag_batches": None, "lag_s": None}
                if shard is not None and "epoch" in shard:
                    row.update(epoch=shard["epoch"], seq=shard["seq"], commit_ns=shard["commit_ns"],
                               parent=shard.get("parent") or None)
                if shard is not None and shard.get("mode") == "strong":  # a Raft member: its log index
                    row.update(seq=shard["applied_index"], root=shard["leader"] or None,
                               lag_s=shard["staleness_s"])
                here.append(row)
            applied = {r["node"]: r["seq"] for r in here if r["root"] is not None}
            for r in here:  # strong: batches behind the leader's applied index, as each one answered
                if r["root"] in applied and r["seq"] is not None:
                    r["lag_batches"] = max(applied[r["root"]] - r["seq"], 0)
            roots = {r["epoch"]: r for r in here if r["role"] == "writable" and r["epoch"] is not None}
            for r in here:
                root = roots.get(r["epoch"]) if r["epoch"] is not None else None
                if root is None:
                    continue
                r["root"] = root["node"]
                behind = max(root["seq"] - r["seq"], 0)
                r["lag_batches"] = behind
                r["lag_s"] = max(root["commit_ns"] - r["commit_ns"], 0) / 1e9 if behind else 0.0
            rows += here
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    head = ("TABLE", "SHARD", "NODE", "ROLE", "UP", "READY", "EPOCH", "SEQ", "PARENT", "ROOT", "LAG", "LAG_S")
    out = [head, *((r["table"], str(r["shard"]), r["node"], r["role"], "yes" if r["up"] else "no",
                    "yes" if r["ready"] else "no", f"{r['epoch']:x}" if r["epoch"] else "-",
                    "-" if r["seq"] is None else str(r["seq"]), r["parent"] or "-", r["root"] or "-",
                    "-" if r["lag_batches"] is None else str(r["lag_batches"]),
                    "-" if r["lag_s"] is None else f"{r['lag_s']:.3f}") for r in rows)]
    widths = [max(len(line[i]) for line in out) for i in range(len(head))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in out)
    return "\n".join(lines)
