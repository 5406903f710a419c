"""The wire format: round trips of every dtype and shape, and every refusal of a malformed frame."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.testing import assert_array_equal

from streamrec.errors import FrameError, TransportError
from streamrec.transport.frames import (
    ALIGN,
    DEFAULT_MAX_FRAME_BYTES,
    HEADER_BYTES,
    MAGIC,
    MAX_BUFFERS,
    VERSION,
    Flag,
    Frame,
    Kind,
    Status,
    decode_message,
    decode_parts,
    encode,
    error_reply,
    in_place,
    pack,
    packed_size,
    parse_head,
    reply_to,
    unpack,
)

# The wire dtype table, by code (frames._DTYPES): the tests pin it, since both sides must agree.
WIRE = {1: np.uint8, 2: np.bool_, 3: np.int32, 4: np.uint32, 5: np.int64, 6: np.uint64, 7: np.float16,
        8: np.float32, 9: np.float64}
HEAD = struct.Struct("<IBBHQIHHHHI")  # magic version kind flags id deadline table shard nbufs status aux
DESC = struct.Struct("<BBHIQ")  # dtype ndim reserved cols nbytes


def raw_head(*, magic: int = MAGIC, version: int = VERSION, kind: int = Kind.FIND, rid: int = 77,
             descs: Sequence[tuple[int, int, int, int]] = (),
             nbufs: int | None = None) -> bytes:
    """A header block built by hand: ``descs`` are (dtype code, ndim, cols, nbytes)."""
    n = len(descs) if nbufs is None else nbufs
    out = HEAD.pack(magic, version, kind, 0, rid, 0, 0, 0, n, 0, 0)
    return out + b"".join(DESC.pack(code, ndim, 0, cols, nbytes) for code, ndim, cols, nbytes in descs)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dt = np.dtype(draw(st.sampled_from(list(WIRE.values()))))
    rows = draw(st.integers(0, 9))
    shape = (rows,) if draw(st.booleans()) else (rows, draw(st.integers(1, 5)))
    raw = draw(st.binary(min_size=rows * int(np.prod(shape[1:])) * dt.itemsize,
                         max_size=rows * int(np.prod(shape[1:])) * dt.itemsize))
    a = np.frombuffer(raw, dtype=np.uint8).view(dt).reshape(shape) if raw else np.empty(shape, dt)
    if dt == np.bool_:
        a = a.view(np.uint8) != 0  # only 0 and 1 are valid bools
    return np.ascontiguousarray(a)


frames = st.builds(
    Frame,
    kind=st.sampled_from(list(Kind)),
    buffers=st.lists(arrays(), max_size=MAX_BUFFERS),
    request_id=st.integers(0, 2**64 - 1),
    table=st.integers(0, 2**16 - 1),
    shard=st.integers(0, 2**16 - 1),
    deadline_us=st.integers(0, 2**32 - 1),
    flags=st.sampled_from([Flag.NONE, Flag.REPLY, Flag.RETRY, Flag.REPLY | Flag.RETRY]),
    status=st.sampled_from(list(Status)),
    aux=st.integers(0, 2**32 - 1),
)


def assert_same(got: Frame, want: Frame) -> None:
    for name in ("kind", "request_id", "table", "shard", "deadline_us", "flags", "status", "aux"):
        assert getattr(got, name) == getattr(want, name), name
    assert len(got.buffers) == len(want.buffers)
    for g, w in zip(got.buffers, want.buffers, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert g.tobytes() == w.tobytes()  # bitwise: NaN payloads and -0.0 survive


# -- round trips ---------------------------------------------------------------------------------


@given(frames)
def test_encode_decode_round_trip(frame: Frame) -> None:
    parts = encode(frame)
    assert len(parts) == 1 + len(frame.buffers)
    assert_same(decode_parts(parts), frame)
    assert_same(decode_parts([bytes(p) for p in parts]), frame)  # as a transport that copies would


@given(frames)
def test_pack_unpack_round_trip(frame: Frame) -> None:
    block = pack(frame)
    assert len(block) == packed_size(frame)
    assert_same(unpack(block), frame)


@given(frames, st.integers(0, 200))
def test_pack_into_a_larger_block(frame: Frame, extra: int) -> None:
    out = memoryview(bytearray(packed_size(frame) + extra))
    block = pack(frame, out)
    assert len(block) == packed_size(frame)
    assert_same(unpack(out), frame)  # trailing bytes are ignored


@pytest.mark.parametrize("code", sorted(WIRE))
@pytest.mark.parametrize("shape", [(0,), (7,), (0, 3), (4, 3), (1, 1)])
def test_every_wire_dtype_and_shape(code: int, shape: tuple[int, ...]) -> None:
    dt = np.dtype(WIRE[code])
    a = (np.arange(int(np.prod(shape))) % 2).astype(dt).reshape(shape)
    frame = Frame(Kind.ASSIGN, [a], request_id=5)
    head = bytes(encode(frame)[0])
    assert DESC.unpack_from(head, HEADER_BYTES)[0] == code
    for got in (decode_parts(encode(frame)), unpack(pack(frame))):
        assert got.buffers[0].dtype == dt and got.buffers[0].shape == shape
        assert_array_equal(got.buffers[0], a)


def test_max_buffers_round_trip() -> None:
    bufs = [np.full(i + 1, i, dtype=np.int32) for i in range(MAX_BUFFERS)]
    frame = Frame(Kind.EXPORT, bufs)
    assert_same(decode_parts(encode(frame)), frame)
    assert_same(unpack(pack(frame)), frame)


def test_no_buffers() -> None:
    frame = Frame(Kind.PING, request_id=3)
    assert len(encode(frame)) == 1
    assert_same(decode_parts(encode(frame)), frame)
    assert packed_size(frame) == ALIGN
    assert_same(unpack(pack(frame)), frame)


def test_decoded_buffers_view_the_received_bytes() -> None:
    keys = np.arange(16, dtype=np.uint64)
    parts = [bytes(p) for p in encode(Frame(Kind.FIND, [keys]))]
    got = decode_parts(parts).buffers[0]
    assert not got.flags.writeable  # a view of immutable received bytes, not a copy
    assert_array_equal(got, keys)


@given(st.lists(arrays(), min_size=1, max_size=MAX_BUFFERS))
def test_packed_buffers_sit_at_64_byte_offsets(bufs: list[np.ndarray]) -> None:
    frame = Frame(Kind.FIND, bufs)
    block = pack(frame)
    base = np.frombuffer(block, dtype=np.uint8).ctypes.data
    got = unpack(block)
    off = -(-(HEADER_BYTES + DESC.size * len(bufs)) // ALIGN) * ALIGN
    for g, b in zip(got.buffers, bufs, strict=True):
        if b.nbytes:
            assert g.ctypes.data - base == off
            assert off % ALIGN == 0
        off += -(-b.nbytes // ALIGN) * ALIGN
    assert off == len(block)


# -- replies written in place ---------------------------------------------------------------------


@given(st.lists(arrays(), min_size=0, max_size=MAX_BUFFERS), st.integers(0, 2**64 - 1))
def test_in_place_reply_packs_without_copying(bufs: list[np.ndarray], rid: int) -> None:
    request = Frame(Kind.FIND, [], request_id=rid, table=3, shard=5)
    reply = in_place(request, [(b.shape, b.dtype) for b in bufs])
    assert reply.is_reply and reply.request_id == rid and reply.table == 3 and reply.shard == 5
    for dst, src in zip(reply.buffers, bufs, strict=True):
        assert dst.flags.writeable and dst.flags.c_contiguous
        dst[...] = src
    assert reply.block is not None
    block = pack(reply)
    assert len(block) == packed_size(reply) == reply.block.nbytes
    assert np.shares_memory(np.frombuffer(block, dtype=np.uint8), reply.block)  # the block itself goes out
    want = reply_to(request, bufs)
    assert_same(unpack(block), want)
    assert_same(unpack(pack(reply, memoryview(bytearray(len(block) + 64)))), want)  # into a ring: a copy


def test_in_place_buffers_sit_where_pack_puts_them() -> None:
    reply = in_place(Frame(Kind.FIND), [((3, 5), np.float32), ((3,), np.bool_), ((0,), np.uint64)])
    base = reply.block.ctypes.data  # type: ignore[union-attr]
    off = -(-(HEADER_BYTES + DESC.size * 3) // ALIGN) * ALIGN
    assert reply.buffers[0].ctypes.data - base == off
    assert reply.buffers[1].ctypes.data - base == off + ALIGN  # 60 bytes of floats, padded to 64
    assert reply.buffers[2].shape == (0,)


@given(frames)
def test_decode_message_takes_either_layout(frame: Frame) -> None:
    assert_same(decode_message([pack(frame)]), frame)
    assert_same(decode_message([bytes(p) for p in encode(frame)]), frame)


# -- encode refuses what it cannot send ----------------------------------------------------------


def test_encode_refuses_non_contiguous() -> None:
    with pytest.raises(ValueError, match="buffer 1: must be C-contiguous"):
        encode(Frame(Kind.ASSIGN, [np.zeros(2, np.uint64), np.zeros((4, 4), np.float32)[:, ::2]]))
    with pytest.raises(ValueError, match="C-contiguous"):
        pack(Frame(Kind.ASSIGN, [np.zeros((4, 4), np.float32).T]))


@pytest.mark.parametrize("dtype", [np.complex64, np.int8, np.uint16, np.object_, "S3", ">u8", ">f4"])
def test_encode_refuses_unsupported_dtypes(dtype: npt.DTypeLike) -> None:
    with pytest.raises(TypeError, match=r"buffer 0: dtype .* has no wire code \(use one of"):
        encode(Frame(Kind.FIND, [np.zeros(3, dtype=dtype)]))


@pytest.mark.parametrize("shape", [(), (2, 2, 2)])
def test_encode_refuses_ndim_other_than_1_or_2(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="expected 1 or 2 dimensions"):
        encode(Frame(Kind.FIND, [np.zeros(shape, np.float32)]))


def test_encode_refuses_2d_without_columns() -> None:
    # cols 0 means 1-D on the wire: such a buffer could be sent but never decoded.
    with pytest.raises(ValueError, match="at least one column"):
        encode(Frame(Kind.FIND, [np.zeros((3, 0), np.float32)]))


def test_encode_refuses_too_many_buffers() -> None:
    with pytest.raises(ValueError, match=f"at most {MAX_BUFFERS} buffers"):
        encode(Frame(Kind.FIND, [np.zeros(1)] * (MAX_BUFFERS + 1)))


@pytest.mark.parametrize("field,value", [("request_id", -1), ("request_id", 2**64), ("table", 2**16),
                                         ("shard", -1), ("aux", 2**32), ("status", 2**16),
                                         ("kind", 256), ("deadline_us", -5)])
def test_encode_refuses_header_fields_out_of_range(field: str, value: int) -> None:
    frame = Frame(Kind.FIND, [np.zeros(1, np.uint64)])
    setattr(frame, field, value)
    with pytest.raises(ValueError, match=f"{field}={value}"):
        encode(frame)


def test_deadline_is_clamped_to_u32() -> None:
    got = decode_parts(encode(Frame(Kind.PING, deadline_us=2**40)))
    assert got.deadline_us == 2**32 - 1


def test_pack_refuses_a_short_block() -> None:
    frame = Frame(Kind.FIND, [np.zeros(100, np.uint64)])
    with pytest.raises(ValueError, match=f"need {packed_size(frame)} bytes"):
        pack(frame, memoryview(bytearray(packed_size(frame) - 1)))


# -- parse_head refuses malformed headers --------------------------------------------------------


def refused(head: bytes, status: Status, match: str, *, rid: int | None = 77,
            max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> FrameError:
    with pytest.raises(FrameError, match=match) as info:
        parse_head(head, max_bytes)
    assert isinstance(info.value, TransportError)
    assert info.value.status == status
    if rid is not None:
        assert info.value.request_id == rid
    return info.value


@pytest.mark.parametrize("n", [0, 1, HEADER_BYTES - 1])
def test_short_header(n: int) -> None:
    refused(raw_head()[:n], Status.BAD_FRAME, f"header is {n} bytes", rid=0)


def test_bad_magic_has_no_request_id() -> None:
    refused(raw_head(magic=0x12345678), Status.BAD_FRAME, "bad magic 0x12345678", rid=0)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_bad_version(version: int) -> None:
    refused(raw_head(version=version), Status.BAD_VERSION, f"protocol version {version}")


@pytest.mark.parametrize("kind", [0, 3, 9, 19, 255])
def test_unknown_kind(kind: int) -> None:
    refused(raw_head(kind=kind), Status.UNKNOWN_KIND, f"unknown message kind {kind}")


def test_too_many_buffers() -> None:
    descs = [(1, 1, 0, 1)] * (MAX_BUFFERS + 1)
    refused(raw_head(descs=descs), Status.BAD_FRAME, f"{MAX_BUFFERS + 1} buffers, at most {MAX_BUFFERS}")


def test_descriptor_block_truncated() -> None:
    head = raw_head(descs=[(6, 1, 0, 8), (6, 1, 0, 8)])
    refused(head[:-1], Status.BAD_FRAME, "2 descriptors need")
    refused(raw_head(descs=[(6, 1, 0, 8)], nbufs=2), Status.BAD_FRAME, "2 descriptors need")


@pytest.mark.parametrize("code", [0, 10, 255])
def test_unknown_dtype_code(code: int) -> None:
    refused(raw_head(descs=[(code, 1, 0, 8)]), Status.BAD_FRAME, f"unknown dtype code {code}")


@pytest.mark.parametrize("ndim", [0, 3, 255])
def test_bad_ndim(ndim: int) -> None:
    refused(raw_head(descs=[(8, ndim, 2, 16)]), Status.BAD_FRAME, f"ndim {ndim}, expected 1 or 2")


@pytest.mark.parametrize("desc", [
    (6, 1, 0, 12),  # 12 bytes of u64
    (6, 1, 3, 24),  # 1-D with columns
    (8, 2, 3, 16),  # 16 bytes is not rows of 3 f32
    (8, 2, 0, 16),  # 2-D without columns
    (7, 2, 5, 18),  # 18 bytes is not rows of 5 f16
])
def test_nbytes_not_a_whole_array(desc: tuple[int, int, int, int]) -> None:
    refused(raw_head(descs=[desc]), Status.BAD_FRAME, "is not a [12]-D")


def test_total_over_the_cap_is_refused_before_allocating() -> None:
    # A hostile header may announce far more than will ever arrive: refused from the header alone.
    huge = raw_head(descs=[(1, 1, 0, 2**62)])
    refused(huge, Status.TOO_LARGE, "over the")
    with pytest.raises(FrameError) as info:
        decode_parts([huge])  # no part for the buffer: still TOO_LARGE, not a count mismatch
    assert info.value.status == Status.TOO_LARGE
    # the cap counts the header and every buffer together
    cap = HEADER_BYTES + 2 * DESC.size + 100
    parse_head(raw_head(descs=[(1, 1, 0, 50), (1, 1, 0, 50)]), cap)
    refused(raw_head(descs=[(1, 1, 0, 50), (1, 1, 0, 51)]), Status.TOO_LARGE, f"{cap}-byte cap",
            max_bytes=cap)


def test_unpack_applies_the_cap() -> None:
    frame = Frame(Kind.FIND, [np.zeros(100, np.uint64)], request_id=9)
    with pytest.raises(FrameError) as info:
        unpack(pack(frame), max_bytes=500)
    assert info.value.status == Status.TOO_LARGE and info.value.request_id == 9


# -- decode_parts / unpack refuse bytes that do not match the header ---------------------------


def test_empty_message() -> None:
    with pytest.raises(FrameError, match="empty message") as info:
        decode_parts([])
    assert info.value.status == Status.BAD_FRAME


@pytest.mark.parametrize("extra", [-1, 1])
def test_parts_count_mismatch(extra: int) -> None:
    parts = encode(Frame(Kind.ASSIGN, [np.zeros(3, np.uint64), np.zeros((3, 2), np.float32)], request_id=41))
    parts = parts[:extra] if extra < 0 else [*parts, b"x"]
    with pytest.raises(FrameError, match="header announces 2 buffers") as info:
        decode_parts(parts)
    assert info.value.status == Status.BAD_FRAME and info.value.request_id == 41


@pytest.mark.parametrize("cut", [-1, 1])
def test_part_length_mismatch(cut: int) -> None:
    parts = [bytes(p) for p in encode(Frame(Kind.FIND, [np.zeros(4, np.uint64)], request_id=42))]
    parts[1] = parts[1][:cut] if cut < 0 else parts[1] + b"\0" * 8
    with pytest.raises(FrameError, match="buffer 0: descriptor says 32 bytes") as info:
        decode_parts(parts)
    assert info.value.status == Status.BAD_FRAME and info.value.request_id == 42


def test_unpack_truncated_block() -> None:
    block = bytes(pack(Frame(Kind.FIND, [np.zeros(4, np.uint64), np.zeros(8, np.uint8)], request_id=43)))
    with pytest.raises(FrameError, match="buffer 1: needs bytes") as info:
        unpack(block[:-ALIGN + 7])
    assert info.value.status == Status.BAD_FRAME and info.value.request_id == 43


@given(st.binary(max_size=200))
def test_garbage_never_escapes_as_anything_but_frame_error(junk: bytes) -> None:
    for decode in (lambda: decode_parts([junk]), lambda: unpack(junk), lambda: decode_parts([junk, junk])):
        try:
            decode()
        except FrameError as exc:
            assert exc.status in {Status.BAD_FRAME, Status.BAD_VERSION, Status.UNKNOWN_KIND, Status.TOO_LARGE}


@given(frames, st.data())
def test_corrupted_headers_decode_or_raise_frame_error(frame: Frame, data: st.DataObject) -> None:
    parts = [bytearray(p) for p in encode(frame)]
    i = data.draw(st.integers(0, len(parts[0]) - 1))
    parts[0][i] ^= data.draw(st.integers(1, 255))
    try:
        got = decode_parts(parts)
    except FrameError:
        return
    assert len(got.buffers) == len(frame.buffers)


# -- replies and codes ---------------------------------------------------------------------------


def test_reply_to_copies_routing_fields() -> None:
    req = Frame(Kind.FIND, [np.zeros(1, np.uint64)], request_id=99, table=2, shard=5, deadline_us=1000,
                flags=Flag.RETRY, aux=1)
    rep = reply_to(req, [np.ones(1, np.float32)], aux=7)
    assert (rep.kind, rep.request_id, rep.table, rep.shard) == (Kind.FIND, 99, 2, 5)
    assert rep.flags == Flag.REPLY and rep.is_reply and not req.is_reply
    assert rep.status == Status.OK and rep.aux == 7 and rep.deadline_us == 0
    assert len(rep.buffers) == 1
    assert reply_to(req).buffers == []


def test_error_reply_fields() -> None:
    req = Frame(Kind.ASSIGN, [], request_id=12, table=1, shard=3)
    rep = error_reply(req, Status.BAD_REQUEST, "values: expected (2, 4) — got (2, 5)")
    assert (rep.kind, rep.request_id, rep.table, rep.shard) == (Kind.ASSIGN, 12, 1, 3)
    assert rep.is_reply and rep.status == Status.BAD_REQUEST
    assert rep.text() == "values: expected (2, 4) — got (2, 5)"
    got = decode_parts(encode(rep))  # an error reply is itself a valid frame
    assert got.status == Status.BAD_REQUEST and got.text() == rep.text()


def test_error_reply_without_a_request_and_with_an_unknown_kind() -> None:
    rep = error_reply(None, Status.BAD_FRAME, "garbage")
    assert (rep.kind, rep.request_id, rep.status, rep.text()) == (Kind.PING, 0, Status.BAD_FRAME, "garbage")
    rep = error_reply(Frame(200, request_id=4), Status.UNKNOWN_KIND, "?")
    assert rep.kind == Kind.PING and rep.request_id == 4
    decode_parts(encode(rep))


def test_error_reply_caps_the_message() -> None:
    rep = error_reply(Frame(Kind.FIND), Status.INTERNAL, "x" * 10_000)
    assert rep.buffers[0].nbytes == 4096


def test_text_of_an_empty_frame() -> None:
    assert Frame(Kind.PING).text() == ""


def test_retriable_statuses() -> None:
    assert {s for s in Status if s.retriable} == {Status.DEADLINE, Status.OVERLOADED, Status.UNAVAILABLE,
                                                 Status.NOT_HOSTED, Status.INTERNAL, Status.NOT_LEADER}
    assert not Status.OK.retriable and not Status.BAD_REQUEST.retriable


def test_wire_constants() -> None:
    assert HEADER_BYTES == 32 and DESC.size == 16 and ALIGN == 64
    assert MAGIC.to_bytes(4, "little") == b"SRPC"
    head = bytes(encode(Frame(Kind.PING, request_id=0x0102030405060708))[0])
    assert head[:4] == b"SRPC" and head[4] == VERSION and head[5] == Kind.PING
    assert HEAD.unpack(head)[4] == 0x0102030405060708
