"""streamrec.store: one process's tables and their kernels.

Owns: the embedding table (``EmbeddingTable``) and, in later parts, the
sequence store, files and snapshots. May import numpy, numba, and our
``errors``/``config`` only; never ``ps``, ``transport`` or anything above.

Thread safety: each class states its own rule; tables allow one writer and
many lock-free readers.
"""

from streamrec.store.table import EmbeddingTable, TableStats

__all__ = ["EmbeddingTable", "TableStats"]
