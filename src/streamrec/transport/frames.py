"""The wire format: a fixed header, buffer descriptors, then raw numpy buffers.

Owns: the byte layout of every message between streamrec processes, its
validation, and the codes in it (``Kind``, ``Status``, ``Flag``). It must not
know any transport (they move the bytes) or any table (the service reads the
buffers). Payloads are never pickled: a buffer is its dtype code, its shape
and its bytes, so a receiver views them in place.

A frame::

    header      32 bytes  magic "SRPC", version, kind, flags, request id,
                          deadline (µs of budget left when sent, 0 = none),
                          table, shard, buffer count, status, aux
    descriptors 16 bytes  per buffer: dtype code, ndim (1 or 2), columns, bytes
    buffers               each starting at a 64-byte boundary of the frame when
                          the frame is one contiguous block (``pack``); as
                          separate parts on message transports (``encode``)

A reply can be written in place: ``in_place`` gives a frame whose buffers are
views into one block laid out as ``pack`` lays it out, the service fills them
(a lookup writes its rows straight into the block), and ``pack`` then only
writes the header and hands the block over: the rows are never copied between
the table and the socket.

Why these sizes: the header holds every field a server needs to route and
refuse a request before it touches a buffer; 64-byte buffer alignment keeps
rows on cache lines so received embeddings copy at full speed; at most
``MAX_BUFFERS`` buffers keeps the descriptor block within one more cache line
pair and bounds what a hostile header can ask a receiver to expect.

Every decode path checks the header and descriptors against the bytes that
actually arrived and against a size cap before any buffer is viewed, and
raises ``FrameError`` carrying the ``Status`` to answer with. A server answers
such a frame with an error frame (``error_reply``) and carries on.

Thread safety: everything here is a pure function of its arguments.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any

import numpy as np

from streamrec.errors import FrameError

__all__ = [
    "ALIGN",
    "DEFAULT_MAX_FRAME_BYTES",
    "HEADER_BYTES",
    "MAGIC",
    "MAX_BUFFERS",
    "VERSION",
    "Flag",
    "Frame",
    "Kind",
    "Status",
    "decode_message",
    "decode_parts",
    "encode",
    "error_reply",
    "in_place",
    "pack",
    "packed_size",
    "parse_head",
    "reply_to",
    "unpack",
]

MAGIC = 0x43505253  # b"SRPC" read as a little-endian uint32
VERSION = 1
MAX_BUFFERS = 8
ALIGN = 64
DEFAULT_MAX_FRAME_BYTES = 64 << 20  # 64 MiB: 16k rows of dim 1024 float32, or 64 batches of 4096 x 64

_HEAD = struct.Struct("<IBBHQIHHHHI")  # magic version kind flags id deadline table shard nbufs status aux
_DESC = struct.Struct("<BBHIQ")  # dtype ndim reserved cols nbytes
HEADER_BYTES = _HEAD.size
assert HEADER_BYTES == 32 and _DESC.size == 16


class Kind(IntEnum):
    """What a frame asks for (a reply carries its request's kind and ``Flag.REPLY``)."""

    HELLO = 1  # who are you: node name, hosted shards, shared-memory and one-sided offers
    PING = 2  # liveness; empty reply
    FIND = 10  # keys (B,) u64 -> values (B, D), found (B,) bool
    FIND_OR_INSERT = 11  # keys -> values (B, D)
    APPLY_GRADIENTS = 12  # keys (B,), grads (B, D) [, lr (1,) f64]
    ASSIGN = 13  # keys (B,), values (B, D)
    ERASE = 14  # keys (B,) -> removed (1,) i64
    STATS = 15  # -> JSON (uint8)
    SNAPSHOT = 16  # -> path (uint8 UTF-8)
    EXPORT = 17  # start (1,) i64, rows (1,) i64 -> keys (N,), rows (N, W), next (1,) i64 (-1 when done)
    PULL = 18  # fan-out: committed update batches after a sequence number (ps/_ring.py has the layout)


class Flag(IntFlag):
    NONE = 0
    REPLY = 1  # this frame answers the request with the same id
    RETRY = 2  # a resend of a request id already sent (maybe on another transport)


_REPLY_BIT = int(Flag.REPLY)  # a plain int: IntFlag's operators run in Python, on every frame

class Status(IntEnum):
    """A reply's outcome. ``retriable`` ones may succeed on another replica."""

    OK = 0
    BAD_FRAME = 1  # header or descriptors malformed, or buffers do not match them
    TOO_LARGE = 2  # the frame is over the receiver's cap
    BAD_VERSION = 3
    UNKNOWN_KIND = 4
    UNKNOWN_TABLE = 5
    NOT_HOSTED = 6  # this node holds no replica of that shard
    BAD_REQUEST = 7  # well-formed frame, wrong arguments (dtype, shape, counts)
    DEADLINE = 8  # the budget ran out before the work started
    OVERLOADED = 9  # the server's queue is full
    UNAVAILABLE = 10  # the shard is loading or syncing
    STORE_ERROR = 11  # the table refused (full, busy)
    INTERNAL = 12
    NON_FINITE = 13  # values or gradient steps not finite in the table's dtype: nothing written
    READ_ONLY = 14  # a write sent to a read-only (fan-out serving) replica: nothing written
    NOT_LEADER = 15  # strong mode: this replica is not its group's leader; the text names it ("" if unknown)

    @property
    def retriable(self) -> bool:
        return self in _RETRIABLE


_RETRIABLE = frozenset({Status.DEADLINE, Status.OVERLOADED, Status.UNAVAILABLE, Status.NOT_HOSTED,
                        Status.INTERNAL, Status.NOT_LEADER})

_DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.bool_), 3: np.dtype(np.int32), 4: np.dtype(np.uint32),
    5: np.dtype(np.int64), 6: np.dtype(np.uint64), 7: np.dtype(np.float16), 8: np.dtype(np.float32),
    9: np.dtype(np.float64),
}
_CODES = {dt: code for code, dt in _DTYPES.items()}
_KINDS = frozenset(int(k) for k in Kind)


@dataclass(slots=True)
class Frame:
    """One message: a kind, routing fields, and up to ``MAX_BUFFERS`` arrays.

    Buffers are 1-D or 2-D C-contiguous arrays of a dtype in the wire table
    (u8, bool, i32, u32, i64, u64, f16, f32, f64). A decoded frame's buffers
    are views of the received bytes: they may be kept unless ``borrowed``.
    """

    kind: int
    buffers: list[np.ndarray] = field(default_factory=list)
    request_id: int = 0
    table: int = 0
    shard: int = 0
    deadline_us: int = 0
    flags: int = 0
    status: int = 0
    aux: int = 0
    # The packed block the buffers view (``in_place``); None for frames built from separate arrays.
    block: np.ndarray | None = field(default=None, repr=False, compare=False)
    # True when a transport lent the buffers (views of a ring it reuses after its next recv):
    # copy them before keeping them. Otherwise they are the frame's own and may be kept.
    borrowed: bool = field(default=False, repr=False, compare=False)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & _REPLY_BIT)

    def text(self) -> str:
        """The first buffer as UTF-8 (error messages, JSON replies)."""
        return bytes(self.buffers[0]).decode("utf-8", errors="replace") if self.buffers else ""


def _head(frame: Frame) -> bytearray:
    bufs = frame.buffers
    if len(bufs) > MAX_BUFFERS:
        raise ValueError(f"a frame holds at most {MAX_BUFFERS} buffers, got {len(bufs)}")
    out = bytearray(HEADER_BYTES + _DESC.size * len(bufs))
    try:
        _HEAD.pack_into(out, 0, MAGIC, VERSION, frame.kind, frame.flags, frame.request_id,
                        min(frame.deadline_us, 0xFFFF_FFFF), frame.table, frame.shard, len(bufs),
                        frame.status, frame.aux)
    except struct.error as exc:
        raise ValueError(f"a header field is out of its wire range (kind u8, flags u16, request_id u64, "
                         f"deadline_us u32, table u16, shard u16, status u16, aux u32): kind={frame.kind} "
                         f"flags={frame.flags} request_id={frame.request_id} deadline_us={frame.deadline_us} "
                         f"table={frame.table} shard={frame.shard} status={frame.status} "
                         f"aux={frame.aux}") from exc
    for i, b in enumerate(bufs):
        code = _CODES.get(b.dtype)
        if code is None:
            raise TypeError(f"buffer {i}: dtype {b.dtype} has no wire code (use one of "
                            f"{sorted(str(d) for d in _CODES)})")
        if b.ndim not in (1, 2):
            raise ValueError(f"buffer {i}: expected 1 or 2 dimensions, got shape {b.shape}")
        if not b.flags.c_contiguous:
            raise ValueError(f"buffer {i}: must be C-contiguous")
        if b.ndim == 2 and b.shape[1] == 0:  # the descriptor's cols 0 means 1-D: it could not be decoded
            raise ValueError(f"buffer {i}: a 2-D buffer needs at least one column, got shape {b.shape}")
        cols = b.shape[1] if b.ndim == 2 else 0
        _DESC.pack_into(out, HEADER_BYTES + _DESC.size * i, code, b.ndim, 0, cols, b.nbytes)
    return out


def encode(frame: Frame) -> list[Any]:
    """Parts for a message transport: the header block, then each buffer (zero-copy)."""
    return [_head(frame), *(b.data.cast("B") if b.nbytes else b"" for b in frame.buffers)]


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def packed_size(frame: Frame) -> int:
    """Bytes ``pack`` needs for this frame."""
    n = _aligned(HEADER_BYTES + _DESC.size * len(frame.buffers))
    for b in frame.buffers:
        n += _aligned(b.nbytes)
    return n


def pack(frame: Frame, out: memoryview | None = None) -> memoryview:
    """The frame as one contiguous block (buffers at 64-byte offsets).

    Writes into ``out`` (at least ``packed_size`` bytes) when given, so a
    shared-memory ring can take the frame without an intermediate copy.
    """
    head = _head(frame)
    size = packed_size(frame)
    if out is None and frame.block is not None:  # written in place: the header is all that is missing
        frame.block[:len(head)] = np.frombuffer(head, dtype=np.uint8)
        return memoryview(frame.block.data)[:size]
    if out is None:
        out = memoryview(bytearray(size))
    elif len(out) < size:
        raise ValueError(f"need {size} bytes to pack the frame, have {len(out)}")
    dst = np.frombuffer(out, dtype=np.uint8, count=size)
    dst[:len(head)] = np.frombuffer(head, dtype=np.uint8)
    off = _aligned(len(head))
    for b in frame.buffers:
        if b.nbytes:
            dst[off:off + b.nbytes] = b.reshape(-1).view(np.uint8)
        off += _aligned(b.nbytes)
    return out[:size]


_Desc = tuple[np.dtype, tuple[int, ...], int]


def parse_head(head: Any, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> tuple[Frame, list[_Desc]]:
    """Validate a header block; the frame (without buffers) and each buffer's (dtype, shape, nbytes).

    Raises:
        FrameError: with the status to answer: BAD_FRAME, BAD_VERSION,
            UNKNOWN_KIND or TOO_LARGE (checked before anything is allocated).
    """
    mv = memoryview(head).cast("B")
    if len(mv) < HEADER_BYTES:
        raise FrameError(f"header is {len(mv)} bytes, expected at least {HEADER_BYTES}",
                         status=Status.BAD_FRAME)
    magic, version, kind, flags, rid, deadline, table, shard, nbufs, status, aux = _HEAD.unpack_from(mv, 0)
    if magic != MAGIC:
        raise FrameError(f"bad magic 0x{magic:08x}", status=Status.BAD_FRAME)
    frame = Frame(kind, [], rid, table, shard, deadline, flags, status, aux)

    def bad(message: str, code: Status = Status.BAD_FRAME) -> FrameError:
        return FrameError(message, status=code, request_id=rid)

    if version != VERSION:
        raise bad(f"protocol version {version}, this side speaks {VERSION}", Status.BAD_VERSION)
    if kind not in _KINDS:
        raise bad(f"unknown message kind {kind}", Status.UNKNOWN_KIND)
    if nbufs > MAX_BUFFERS:
        raise bad(f"{nbufs} buffers, at most {MAX_BUFFERS}")
    if len(mv) < HEADER_BYTES + _DESC.size * nbufs:
        raise bad(f"header block is {len(mv)} bytes, {nbufs} descriptors need "
                  f"{HEADER_BYTES + _DESC.size * nbufs}")
    descs = []
    total = HEADER_BYTES + _DESC.size * nbufs
    for i in range(nbufs):
        code, ndim, _, cols, nbytes = _DESC.unpack_from(mv, HEADER_BYTES + _DESC.size * i)
        dt = _DTYPES.get(code)
        if dt is None:
            raise bad(f"buffer {i}: unknown dtype code {code}")
        total += nbytes
        if total > max_bytes:
            raise bad(f"frame of at least {total} bytes is over the {max_bytes}-byte cap", Status.TOO_LARGE)
        if ndim == 1:
            if cols != 0 or nbytes % dt.itemsize:
                raise bad(f"buffer {i}: {nbytes} bytes is not a 1-D {dt} array")
            shape: tuple[int, ...] = (nbytes // dt.itemsize,)
        elif ndim == 2:
            if cols == 0 or nbytes % (dt.itemsize * cols):
                raise bad(f"buffer {i}: {nbytes} bytes is not a 2-D {dt} array of {cols} columns")
            shape = (nbytes // (dt.itemsize * cols), cols)
        else:
            raise bad(f"buffer {i}: ndim {ndim}, expected 1 or 2")
        descs.append((dt, shape, nbytes))
    return frame, descs


def decode_parts(parts: list[Any], max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    """A frame from message parts (header block, then one part per buffer), viewing them in place."""
    if not parts:
        raise FrameError("empty message", status=Status.BAD_FRAME)
    frame, descs = parse_head(parts[0], max_bytes)
    if len(parts) != 1 + len(descs):
        raise FrameError(f"header announces {len(descs)} buffers, {len(parts) - 1} arrived",
                         status=Status.BAD_FRAME, request_id=frame.request_id)
    for i, ((dt, shape, nbytes), part) in enumerate(zip(descs, parts[1:], strict=True)):
        mv = memoryview(part).cast("B")
        if len(mv) != nbytes:
            raise FrameError(f"buffer {i}: descriptor says {nbytes} bytes, {len(mv)} arrived",
                             status=Status.BAD_FRAME, request_id=frame.request_id)
        frame.buffers.append(np.frombuffer(mv, dtype=dt).reshape(shape) if nbytes else np.empty(shape, dt))
    return frame


def decode_message(parts: list[Any], max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    """A frame from a message transport's parts, in either layout: one part is a packed
    frame (``pack``), several are the header block and a part per buffer (``encode``)."""
    if len(parts) == 1:
        return unpack(parts[0], max_bytes)
    return decode_parts(parts, max_bytes)


def unpack(block: Any, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    """A frame from one contiguous block written by ``pack``, viewing it in place."""
    mv = memoryview(block).cast("B")
    frame, descs = parse_head(mv, max_bytes)
    off = _aligned(HEADER_BYTES + _DESC.size * len(descs))
    for i, (dt, shape, nbytes) in enumerate(descs):
        if off + nbytes > len(mv):
            raise FrameError(f"buffer {i}: needs bytes {off}..{off + nbytes}, the frame has {len(mv)}",
                             status=Status.BAD_FRAME, request_id=frame.request_id)
        view = np.frombuffer(mv, dtype=dt, count=nbytes // dt.itemsize, offset=off) if nbytes else None
        frame.buffers.append(view.reshape(shape) if view is not None else np.empty(shape, dt))
        off += _aligned(nbytes)
    return frame


def in_place(request: Frame, shapes: list[tuple[tuple[int, ...], Any]]) -> Frame:
    """A successful reply to ``request`` whose buffers, of the given (shape, dtype)s, are
    uninitialised views into one packed block, for the service to write its answer into.

    ``pack`` (and so every transport) sends the block without copying the buffers.
    Replacing an element of ``buffers`` is not allowed: fill them in place.
    """
    layout = []
    off = _aligned(HEADER_BYTES + _DESC.size * len(shapes))
    for shape, dt in shapes:  # plain ints: np.prod costs more than the rest of this together
        dt = np.dtype(dt)
        nbytes = dt.itemsize
        for d in shape:
            nbytes *= d
        layout.append((off, nbytes, dt, shape))
        off += _aligned(nbytes)
    block = np.empty(off, dtype=np.uint8)
    bufs = [block[o:o + n].view(dt).reshape(shape) for o, n, dt, shape in layout]
    frame = reply_to(request, bufs)
    frame.block = block
    return frame


def reply_to(request: Frame, buffers: list[np.ndarray] | None = None, *, aux: int = 0) -> Frame:
    """A successful reply to ``request``."""
    return Frame(request.kind, buffers or [], request.request_id, request.table, request.shard,
                 0, _REPLY_BIT, Status.OK, aux)


def error_reply(request: Frame | None, status: int, message: str) -> Frame:
    """An error reply (the message as one UTF-8 buffer); ``request`` may be None for unparsable input."""
    body = np.frombuffer(message.encode("utf-8")[:4096], dtype=np.uint8)
    if request is None:
        return Frame(Kind.PING, [body], 0, 0, 0, 0, _REPLY_BIT, status, 0)
    kind = request.kind if request.kind in _KINDS else Kind.PING
    return Frame(kind, [body], request.request_id, request.table, request.shard, 0, _REPLY_BIT, status, 0)
