"""streamrec: real-time recommendation infrastructure.

Packages (see ``DESIGN.md``): ``store`` (tables), and, as they arrive,
``transport``, ``cluster``, ``ps``, ``pipeline``, ``model``, ``serving``.
"""

from streamrec.config import Adagrad, Adam, Initializer, TableConfig
from streamrec.errors import ConfigError, StoreError, StreamrecError, TableBusy, TableFull
from streamrec.store import EmbeddingTable

__all__ = [
    "Adagrad",
    "Adam",
    "ConfigError",
    "EmbeddingTable",
    "Initializer",
    "StoreError",
    "StreamrecError",
    "TableBusy",
    "TableConfig",
    "TableFull",
]

__version__ = "0.1.0"
