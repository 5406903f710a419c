"""streamrec.ps: the parameter server.

Owns: the storage service (``service``), the storage process around it
(``server``), a client's links to nodes (``channel``), one-sided reads of a
co-located replica's files (``onesided``), and the client (``client``). It may
import ``store``, ``transport`` and ``cluster``; nothing below imports it.

Thread safety: each class states its own rule; a ``PSClient`` is one thread's.
"""

from streamrec.ps.client import PSClient
from streamrec.ps.server import StorageServer

__all__ = ["PSClient", "StorageServer"]
