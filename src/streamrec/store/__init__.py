"""streamrec.store: one process's tables and their kernels.

Owns: the embedding table (``EmbeddingTable``) with its lifecycle, files and
snapshots; RAM-over-disk tiers (``TieredTable``); per-user behaviour
sequences (``SequenceStore``). May import numpy, numba, and our
``errors``/``config`` only; never ``ps``, ``transport`` or anything above.

Thread safety: each class states its own rule; tables allow one writer and
many lock-free readers.
"""

from streamrec.store.sequence import SequenceStore
from streamrec.store.table import EmbeddingTable, TableStats
from streamrec.store.tiers import TieredTable, TierStats

__all__ = ["EmbeddingTable", "SequenceStore", "TableStats", "TierStats", "TieredTable"]
