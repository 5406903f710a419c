"""Our own parameter-server paths as load-driver clients (``_ps_baselines.run_clients``).

Owns: ``make_ps_client``, a picklable factory the driver's spawn workers call to
build a ``PSClient`` restricted to one transport (which reports its requests
per transport, so the driver can show that none fell back to another), and ``load_rows``, which fills
a storage process with the rows every path is checked against. It lives apart
from ``benchmarks/ps.py`` because spawn workers must import it by module name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from _common import progress
from _ps_baselines import fill_values

from streamrec.cluster.spec import ClusterSpec, load_cluster_spec
from streamrec.ps import PSClient

__all__ = ["load_rows", "make_ps_client"]


class _PSFind:
    def __init__(self, spec_path: str, transport: str, node: str) -> None:
        self.client = PSClient(load_cluster_spec(spec_path), local=node, transports=(transport,))

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.client.find("emb", keys)

    def transport_counts(self) -> dict[str, int] | None:
        """Requests answered OK per transport so far (None where the client's revision has no such count)."""
        counts = getattr(self.client.stats, "by_transport", None)
        return None if counts is None else dict(counts)

    def close(self) -> None:
        self.client.close()


def make_ps_client(spec_path: str, transport: str, node: str) -> Any:
    return _PSFind(spec_path, transport, node)


def load_rows(spec: ClusterSpec, node: str, rows: int, dim: int, *, label: str = "the storage process",
              transports: tuple[str, ...] = ("shm", "tcp")) -> None:
    """Assign keys ``0..rows-1`` their ``fill_values`` rows (width ``dim``) in table ``emb``."""
    loader = PSClient(spec, local=node, transports=transports, timeout_s=60.0)
    chunk = 131_072
    try:
        with progress() as bar:
            task = bar.add_task(f"loading {rows:,} rows into {label}", total=rows)
            for lo in range(0, rows, chunk):
                keys = np.arange(lo, min(lo + chunk, rows), dtype=np.uint64)
                loader.assign("emb", keys, fill_values(keys, dim))
                bar.update(task, advance=keys.size)
    finally:
        loader.close()
