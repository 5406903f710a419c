"""Moving frames between processes: the wire format and the transports.

See ``frames`` for the format and ``base`` for the interface each transport
(``tcp``, ``shm``, ``rdma``) implements.
"""

from streamrec.transport.base import Connection, Endpoint
from streamrec.transport.frames import Flag, Frame, Kind, Status

__all__ = ["Connection", "Endpoint", "Flag", "Frame", "Kind", "Status"]
