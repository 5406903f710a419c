"""Our own parameter-server paths as load-driver clients (``_ps_baselines.run_clients``).

Owns: ``make_ps_client``, a picklable factory the driver's spawn workers call to
build a ``PSClient`` restricted to one transport. It lives apart from
``benchmarks/ps.py`` because spawn workers must import it by module name.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamrec.cluster.spec import load_cluster_spec
from streamrec.ps import PSClient

__all__ = ["make_ps_client"]


class _PSFind:
    def __init__(self, spec_path: str, transport: str, node: str) -> None:
        self.client = PSClient(load_cluster_spec(spec_path), local=node, transports=(transport,))

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.client.find("emb", keys)

    def close(self) -> None:
        self.client.close()


def make_ps_client(spec_path: str, transport: str, node: str) -> Any:
    return _PSFind(spec_path, transport, node)
