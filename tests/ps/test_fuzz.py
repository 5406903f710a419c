"""Fuzzed frames against a running server: it stays up, answers every message
with a well-formed error (or a correct reply), and keeps answering valid
requests correctly.

One server process (``LocalCluster``, one node hosting both shards of table
``emb``, dim 8) takes:

- over TCP, 100,000+ frames from raw zmq DEALER sockets, made by a seeded
  generator of structured mutations of valid requests (each category in
  ``_Fuzzer.CATEGORIES``: garbage parts, truncated or lying headers and
  descriptors, sizes over the cap, unknown kinds, tables and shards, wrong
  dtypes and shapes for each request kind, replies sent as requests, bit flips
  of valid frames, and valid requests on keys far from the checked rows),
  pipelined in windows, with a valid FIND checked about every 1,000 frames;
  a hypothesis-driven part draws frames from the same categories;
- over its shared-memory endpoint, a few thousand of the same frames written
  as raw ring records, and corrupt ring records (the server drops that link
  and keeps serving).

Each frame with a predictable outcome records the status it must get back by
its request id (frames the server cannot read an id from are answered with id
0, and counted). At the end the process is alive, answers HELLO, and its
metrics count the bad frames. About 20 s on two cores.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from streamrec.cluster.spec import ClusterSpec
from streamrec.ps.local import LocalCluster, loopback_spec
from streamrec.transport import frames, shm
from streamrec.transport.frames import MAGIC, VERSION, Flag, Frame, Kind, Status, decode_message

_DIM = 8
_SHARDS = 2
_ROWS = 1000  # checked rows: key k holds k in every element
_FAR = 1 << 40  # fuzzed keys are at or above this, so fuzzed writes never touch a checked row
_TCP_FRAMES = 100_000
_SHM_FRAMES = 20_000
_WINDOW = 500  # frames in flight: under the server's 1024-request worker queue, so no OVERLOADED
_CHECK_EVERY = 1000
_CHECK_IDS = 1 << 60  # request ids of the checking FINDs start here

_HEAD = struct.Struct("<IBBHQIHHHHI")  # as frames._HEAD: magic version kind flags id deadline table
_DESC = struct.Struct("<BBHIQ")  # shard nbufs status aux; a descriptor: dtype ndim 0 cols nbytes
_CODES = {np.dtype(np.uint8): 1, np.dtype(np.bool_): 2, np.dtype(np.int32): 3, np.dtype(np.uint32): 4,
          np.dtype(np.int64): 5, np.dtype(np.uint64): 6, np.dtype(np.float16): 7,
          np.dtype(np.float32): 8, np.dtype(np.float64): 9}
_REQUESTS = (Kind.PING, Kind.HELLO, Kind.STATS, Kind.FIND, Kind.FIND_OR_INSERT, Kind.APPLY_GRADIENTS,
             Kind.ASSIGN, Kind.ERASE, Kind.EXPORT)
_DATA = (Kind.FIND, Kind.FIND_OR_INSERT, Kind.APPLY_GRADIENTS, Kind.ASSIGN, Kind.ERASE, Kind.EXPORT)
_FRAME_ERRORS = frozenset({Status.BAD_FRAME, Status.BAD_VERSION, Status.UNKNOWN_KIND, Status.TOO_LARGE})


@pytest.fixture(scope="module")
def server() -> Iterator[LocalCluster]:
    spec = loopback_spec(f"fuzz-{os.getpid()}", zones=1, nodes_per_zone=1, shards=_SHARDS, dim=_DIM)
    with LocalCluster(spec) as c:
        c.start()
        from streamrec.ps.client import PSClient

        with PSClient(spec, transports=("tcp",)) as client:
            keys = np.arange(_ROWS, dtype=np.uint64)
            client.assign("emb", keys, _row_values(keys))
        yield c


def _row_values(keys: np.ndarray) -> np.ndarray:
    return np.repeat(keys.astype(np.float32)[:, None], _DIM, axis=1)


# ---- making frames -----------------------------------------------------------------------------


def _head(kind: int, rid: int, nbufs: int, *, magic: int = MAGIC, version: int = VERSION, flags: int = 0,
          deadline: int = 0, table: int = 0, shard: int = 0, status: int = 0, aux: int = 0) -> bytes:
    return _HEAD.pack(magic, version, kind, flags, rid, deadline, table, shard, nbufs, status, aux)


def _desc(a: np.ndarray) -> bytes:
    return _DESC.pack(_CODES[a.dtype], a.ndim, 0, a.shape[1] if a.ndim == 2 else 0, a.nbytes)


def _parts(kind: int, rid: int, bufs: list[np.ndarray], **head: Any) -> list[bytes]:
    return [_head(kind, rid, len(bufs), **head) + b"".join(_desc(b) for b in bufs),
            *(b.tobytes() for b in bufs)]


@dataclass
class _Fuzz:
    """One fuzzed message: its parts, its request id (0: the server cannot read it), and
    the status it must be answered with (None: any well-formed reply will do; a bit flip's
    reply may also come with id 0, when the flip broke the magic)."""

    category: str
    parts: list[bytes]
    rid: int
    expect: Status | None


class _Fuzzer:
    """A seeded generator of structured mutations of valid requests."""

    CATEGORIES = ("garbage", "empty", "short_header", "bad_magic", "bad_version", "unknown_kind",
                  "too_many_buffers", "short_descriptors", "parts_mismatch", "lying_size", "over_cap",
                  "bad_dtype", "bad_ndim", "bad_shape", "reply_as_request", "unknown_table", "not_hosted",
                  "wrong_args", "bit_flip", "valid", "deadline")

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.next_rid = 1

    def rid(self) -> int:
        self.next_rid += 1
        return self.next_rid

    def keys(self, n: int | None = None) -> np.ndarray:
        n = int(self.rng.integers(0, 64)) if n is None else n
        return self.rng.integers(_FAR, 1 << 63, n, dtype=np.uint64)

    def bytes(self, n: int) -> bytes:
        return self.rng.bytes(n)

    def valid(self, kind: int | None = None) -> tuple[int, list[np.ndarray]]:
        """A well-formed request of a random kind (keys far from the checked rows)."""
        r = self.rng
        kind = int(r.choice(_REQUESTS)) if kind is None else kind
        k = self.keys()
        b = k.shape[0]
        if kind in (Kind.PING, Kind.HELLO, Kind.STATS):
            return kind, []
        if kind in (Kind.FIND, Kind.FIND_OR_INSERT, Kind.ERASE):
            return kind, [k]
        if kind == Kind.APPLY_GRADIENTS:
            return kind, [k, r.standard_normal((b, _DIM), dtype=np.float32),
                          np.array([r.uniform(0, 1)])]
        if kind == Kind.ASSIGN:
            return kind, [k, r.standard_normal((b, _DIM), dtype=np.float32)]
        return kind, [np.array([r.integers(0, 4096)], np.int64), np.array([r.integers(1, 256)], np.int64)]

    def wrong_args(self) -> tuple[int, list[np.ndarray]]:
        """A well-formed frame whose buffers do not fit its kind (BAD_REQUEST)."""
        r = self.rng
        kind, bufs = self.valid(int(r.choice(_DATA)))
        b = bufs[0].shape[0]
        choices: list[list[np.ndarray]] = [
            bufs[:-1] if len(bufs) > 1 else [],  # a buffer missing
            [*bufs, self.keys(3)] if len(bufs) < 8 else bufs[:1],  # one too many
        ]
        if kind == Kind.EXPORT:
            choices += [[bufs[0].astype(np.int32), bufs[1]], [np.array([-1], np.int64), bufs[1]],
                        [bufs[0], np.array([0], np.int64)], [bufs[0], np.array([1 << 20], np.int64)],
                        [np.zeros((1, 2), np.int64), bufs[1]]]
        else:
            k = bufs[0]
            choices += [[k.astype(np.int64), *bufs[1:]], [k.astype(np.float64), *bufs[1:]],
                        [k.reshape(-1, 1) if b else np.zeros((0, 1), np.uint64), *bufs[1:]]]
        if kind in (Kind.APPLY_GRADIENTS, Kind.ASSIGN):
            v = bufs[1]
            choices += [[bufs[0], v[:, :-1].copy(), *bufs[2:]],  # wrong dim
                        [bufs[0], np.zeros((b + 1, _DIM), v.dtype), *bufs[2:]],  # wrong rows
                        [bufs[0], v.reshape(-1).copy(), *bufs[2:]]]  # 1-D values
        if kind == Kind.APPLY_GRADIENTS:
            choices += [[*bufs[:2], np.array([0.1], np.float32)], [*bufs[:2], np.array([0.1, 0.2])],
                        [*bufs[:2], np.array([np.nan])], [*bufs[:2], np.array([-1.0])],
                        [*bufs[:2], np.array([np.inf])]]
        return kind, choices[int(r.integers(0, len(choices)))]

    def make(self, category: str) -> _Fuzz:
        r = self.rng
        rid = self.rid()

        def fz(parts: list[bytes], expect: Status | None, rid: int = rid) -> _Fuzz:
            return _Fuzz(category, parts, rid, expect)

        if category == "garbage":
            return fz([self.bytes(int(r.integers(0, 100))) for _ in range(int(r.integers(1, 7)))],
                      Status.BAD_FRAME, 0)
        if category == "empty":
            return fz([b""], Status.BAD_FRAME, 0)
        if category == "short_header":
            kind, bufs = self.valid()
            return fz([_parts(kind, rid, bufs)[0][:int(r.integers(0, 32))]], Status.BAD_FRAME, 0)
        if category == "bad_magic":
            kind, bufs = self.valid()
            magic = int(r.integers(0, 1 << 32))
            return fz(_parts(kind, rid, bufs, magic=magic if magic != MAGIC else 0), Status.BAD_FRAME, 0)
        if category == "bad_version":
            kind, bufs = self.valid()
            return fz(_parts(kind, rid, bufs, version=int(r.choice([0, 2, 255]))), Status.BAD_VERSION)
        if category == "unknown_kind":
            known = {int(k) for k in Kind}
            kind = int(r.choice([k for k in range(256) if k not in known]))
            return fz(_parts(kind, rid, [self.keys()]), Status.UNKNOWN_KIND)
        if category == "too_many_buffers":
            n = int(r.choice([9, 16, 255, 65535]))
            return fz([_head(Kind.FIND, rid, n) + self.bytes(16 * int(r.integers(0, 10)))],
                      Status.BAD_FRAME)
        if category == "short_descriptors":
            kind, bufs = self.valid(int(r.choice(_DATA)))
            parts = _parts(kind, rid, bufs)
            cut = int(r.integers(32, len(parts[0])))
            return fz([parts[0][:cut], *parts[1:]], Status.BAD_FRAME)
        if category == "parts_mismatch":
            kind, bufs = self.valid(int(r.choice(_DATA)))
            parts = _parts(kind, rid, bufs)
            extra = [self.bytes(8) for _ in range(int(r.integers(1, 4)))]
            return fz(parts[:-1] if r.random() < 0.5 else parts + extra, Status.BAD_FRAME)
        if category == "lying_size":
            k = self.keys(int(r.integers(1, 64)))
            parts = _parts(Kind.FIND, rid, [k])
            delta = 8 * int(r.choice([-1, 1, 2, 100]))
            head = parts[0][:32] + _DESC.pack(6, 1, 0, 0, max(k.nbytes + delta, 0))
            return fz([head, parts[1]], Status.BAD_FRAME)
        if category == "over_cap":
            size = [(64 << 20) + 8, 1 << 40, (1 << 64) - 8][int(r.integers(0, 3))]
            head = _head(Kind.FIND, rid, 1) + _DESC.pack(6, 1, 0, 0, size)
            return fz([head, self.bytes(8)], Status.TOO_LARGE)
        if category == "bad_dtype":
            code = int(r.choice([0, 10, 11, 128, 255]))
            return fz([_head(Kind.FIND, rid, 1) + _DESC.pack(code, 1, 0, 0, 8), self.bytes(8)],
                      Status.BAD_FRAME)
        if category == "bad_ndim":
            ndim = int(r.choice([0, 3, 4, 255]))
            return fz([_head(Kind.FIND, rid, 1) + _DESC.pack(6, ndim, 0, 0, 16), self.bytes(16)],
                      Status.BAD_FRAME)
        if category == "bad_shape":
            ndim, cols, nbytes = [(2, 0, 16), (2, 3, 16), (1, 2, 16), (1, 0, 12)][int(r.integers(0, 4))]
            return fz([_head(Kind.FIND, rid, 1) + _DESC.pack(6, ndim, 0, cols, nbytes), self.bytes(nbytes)],
                      Status.BAD_FRAME)
        if category == "reply_as_request":
            kind, bufs = self.valid()
            return fz(_parts(kind, rid, bufs, flags=Flag.REPLY), Status.BAD_FRAME)
        if category == "unknown_table":
            kind, bufs = self.valid(int(r.choice(_DATA)))
            return fz(_parts(kind, rid, bufs, table=int(r.integers(1, 65536))), Status.UNKNOWN_TABLE)
        if category == "not_hosted":
            kind, bufs = self.valid(int(r.choice(_DATA)))
            return fz(_parts(kind, rid, bufs, shard=int(r.integers(_SHARDS, 65536))), Status.NOT_HOSTED)
        if category == "wrong_args":
            kind, bufs = self.wrong_args()
            return fz(_parts(kind, rid, bufs), Status.BAD_REQUEST)
        if category == "bit_flip":  # nothing is expected of the reply but its form
            kind, bufs = self.valid()
            blob = bytearray(b"".join(_parts(kind, rid, bufs)))
            lens = [len(p) for p in _parts(kind, rid, bufs)]
            for _ in range(int(r.integers(1, 4))):
                i = int(r.integers(0, min(len(blob), 32 + 16 * len(bufs) + 16)))
                if not 8 <= i < 16:  # the request id stays, so the reply is matched (or comes as id 0)
                    blob[i] ^= 1 << int(r.integers(0, 8))
            out, at = [], 0
            for n in lens:
                out.append(bytes(blob[at:at + n]))
                at += n
            return fz(out, None)
        if category == "valid":
            kind, bufs = self.valid()
            return fz(_parts(kind, rid, bufs, aux=int(r.integers(0, 2))), Status.OK)
        if category == "deadline":  # a 1 us budget: answered DEADLINE, or OK if a worker was that quick
            kind, bufs = self.valid(int(r.choice(_DATA)))
            return fz(_parts(kind, rid, bufs, deadline=1), None)
        raise AssertionError(category)

    def stream(self, n: int) -> Iterator[_Fuzz]:
        cats = self.CATEGORIES
        picks = self.rng.integers(0, len(cats), n)
        for i in picks:
            yield self.make(cats[int(i)])


# ---- checking replies --------------------------------------------------------------------------


@dataclass
class _Tally:
    sent: int = 0
    replies: int = 0
    anonymous_expected: int = 0  # frames the server cannot read an id from: answered with id 0
    loose: int = 0  # raw frames: answered with id 0, or any id their bytes happen to hold
    other: int = 0  # replies matching no recorded id
    checks: int = 0
    frame_errors: int = 0  # frames the server must count as bad (not replies-as-requests)


class _Checker:
    """Matches replies to what was sent. ``strict``: each fuzzed frame's status and id are
    checked as recorded (TCP); else only each reply's form and the count (shm, where a
    frame is one block and bytes past a short header or buffer are the ring's zero padding)."""

    def __init__(self, spec: ClusterSpec, *, strict: bool = True) -> None:
        self.spec = spec
        self.strict = strict
        self.expect: dict[int, tuple[str, Status | None]] = {}
        self.checks: dict[int, np.ndarray] = {}
        self.tally = _Tally()
        self.statuses: Counter[str] = Counter()
        self.mismatches: list[str] = []
        self.rng = np.random.default_rng(99)
        self.next_check = _CHECK_IDS

    def note(self, f: _Fuzz) -> None:
        t = self.tally
        t.sent += 1
        if not self.strict:
            return
        if f.rid == 0:
            if f.expect is None:
                t.loose += 1
            else:
                t.anonymous_expected += 1
        else:
            self.expect[f.rid] = (f.category, f.expect)
        if f.expect in _FRAME_ERRORS and f.category != "reply_as_request":
            t.frame_errors += 1

    def check_frame(self) -> list[bytes]:
        """A valid FIND of checked rows, all of one shard (as a client sends it)."""
        keys = np.unique(self.rng.integers(0, _ROWS, 128, dtype=np.uint64))
        shards = self.spec.shard_of(0, keys)
        shard = int(shards[0])
        keys = keys[shards == shard]
        rid = self.next_check
        self.next_check += 1
        self.checks[rid] = keys
        self.tally.sent += 1
        return _parts(Kind.FIND, rid, [keys], shard=shard)

    def reply(self, reply: Frame) -> None:
        t = self.tally
        t.replies += 1
        assert reply.is_reply, reply
        assert reply.status in Status._value2member_map_, reply.status
        self.statuses[Status(reply.status).name] += 1
        rid = reply.request_id
        if rid in self.checks:
            keys = self.checks.pop(rid)
            assert reply.status == Status.OK, reply.text()
            values, found = reply.buffers
            assert found.all() and np.array_equal(values, _row_values(keys))
            t.checks += 1
            return
        if not self.strict:
            return
        if rid in self.expect:
            category, want = self.expect.pop(rid)
            if category == "deadline":
                assert reply.status in (Status.OK, Status.DEADLINE), reply.text()
            elif want is not None and reply.status != want:
                self.mismatches.append(f"{category}: wanted {want.name}, got "
                                       f"{Status(reply.status).name}: {reply.text()[:200]}")
            return
        assert rid == 0 or t.loose, f"a reply to request id {rid}, which was never sent or answered already"
        assert reply.status != Status.OK or t.loose, reply
        t.other += 1

    def verify(self, where: str) -> None:
        t = self.tally
        assert not self.mismatches, f"{where}: {len(self.mismatches)} wrong, e.g. {self.mismatches[:5]}"
        assert t.replies == t.sent, f"{where}: {t.sent} sent, {t.replies} answered"
        assert not self.checks, f"{where}: {len(self.checks)} checking FINDs unanswered"
        left = Counter(category for category, _ in self.expect.values())
        assert set(left) <= {"bit_flip"}, f"{where}: fuzzed frames unanswered: {left}"
        assert t.other == t.anonymous_expected + t.loose + left["bit_flip"], (t, left)


# ---- the TCP run -------------------------------------------------------------------------------


def _dealer(address: str) -> zmq.Socket:
    sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(f"tcp://{address}")
    return sock


def _drain(sock: zmq.Socket, checker: _Checker, until: int, timeout_s: float = 10.0) -> None:
    """Read replies until ``until`` have arrived in all."""
    deadline = time.monotonic() + timeout_s
    while checker.tally.replies < until:
        if not sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            raise AssertionError(f"{until - checker.tally.replies} replies missing after {timeout_s} s "
                                 f"({checker.tally})")
        checker.reply(decode_message(sock.recv_multipart()))


def _metric(port: int, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2.0) as r:
        text = r.read().decode()
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def _hello(address: str) -> dict[str, Any]:
    from streamrec.transport.tcp import TcpConnection

    with TcpConnection(address) as conn:
        reply = conn.request(Frame(Kind.HELLO, request_id=5), 2.0)
    assert reply.status == Status.OK
    return json.loads(reply.text())


def test_tcp_fuzz_100k_frames(server: LocalCluster, record_property: Any) -> None:
    node = server.spec.nodes[0]
    pid = server.pid(node.name)
    bad_before = _metric(node.metrics_port, "streamrec_ps_bad_frames_total", 'transport="tcp"')
    checker = _Checker(server.spec)
    fuzzer = _Fuzzer(seed=20240601)
    socks = [_dealer(node.address) for _ in range(4)]
    t0 = time.monotonic()
    try:
        stream = fuzzer.stream(_TCP_FRAMES)
        done = False
        w = 0
        while not done:
            sock = socks[w % len(socks)]  # each window from another peer identity
            w += 1
            base = checker.tally.sent
            for f in stream:
                checker.note(f)
                sock.send_multipart(f.parts, copy=True)
                if checker.tally.sent - base >= _WINDOW:
                    break
            else:
                done = True
            if w % (_CHECK_EVERY // _WINDOW) == 0 or done:
                sock.send_multipart(checker.check_frame())
            _drain(sock, checker, checker.tally.sent)
    finally:
        for s in socks:
            s.close(0)
    elapsed = time.monotonic() - t0
    checker.verify("tcp")
    t = checker.tally
    fuzzed = t.sent - t.checks
    assert fuzzed >= _TCP_FRAMES and t.checks >= _TCP_FRAMES // _CHECK_EVERY, t
    # still the same process, alive, answering
    assert server.pid(node.name) == pid and server.procs[node.name].poll() is None
    assert _hello(node.address)["pid"] == pid
    bad = _metric(node.metrics_port, "streamrec_ps_bad_frames_total", 'transport="tcp"') - bad_before
    assert bad >= t.frame_errors, (bad, t)
    assert checker.statuses["INTERNAL"] == 0, "a fuzzed frame hit a server bug (see the node's log)"
    assert "Traceback" not in server.log_tail(node.name, 1000), server.log_tail(node.name, 40)
    report = (f"{fuzzed} fuzzed frames + {t.checks} checked FINDs in {elapsed:.1f} s; "
              f"server counted {bad:.0f} bad frames; replies by status {dict(checker.statuses)}")
    print(report)
    record_property("tcp_fuzz", report)



def test_tcp_part_over_the_cap_drops_only_that_peer(server: LocalCluster) -> None:
    """A part over the frame cap (and the packing slack above it) is cut off by libzmq
    (``MAXMSGSIZE``) before it is buffered: that peer gets no reply, and the server
    keeps serving the others."""
    node = server.spec.nodes[0]
    over = server.spec.max_frame_bytes + (1 << 16)
    big = _dealer(node.address)
    good = _dealer(node.address)
    checker = _Checker(server.spec)
    try:
        head = _head(Kind.FIND, 77, 1) + _DESC.pack(6, 1, 0, 0, over)
        big.send_multipart([head, bytes(over)])
        good.send_multipart(checker.check_frame())
        _drain(good, checker, 1)
        assert not big.poll(300), "a frame over the cap was answered"
        good.send_multipart(checker.check_frame())
        _drain(good, checker, 2)
    finally:
        big.close(0)
        good.close(0)
    assert _hello(node.address)["pid"] == server.pid(node.name)


@settings(max_examples=500, deadline=None)
@given(category=st.sampled_from(_Fuzzer.CATEGORIES), seed=st.integers(0, 2**32 - 1),
       raw=st.lists(st.binary(max_size=96), min_size=1, max_size=9))
def test_hypothesis_frames(server: LocalCluster, category: str, seed: int, raw: list[bytes]) -> None:
    """Hypothesis draws a category and a seed for the generator, and raw parts (as they
    are, and behind a valid magic): each gets one well-formed reply (the generated
    frame with its recorded status), and a valid FIND after them is answered correctly."""
    checker = _Checker(server.spec)
    fuzzer = _Fuzzer(seed)
    fuzzer.next_rid = 1 << 40  # far from the small ids raw bytes tend to hold
    f = fuzzer.make(category)
    raw_magic = _Fuzz("raw", [_head(Kind.FIND, 3, 0)[:4] + raw[0], *raw[1:]], 0, None)
    dealer = _dealer(server.spec.nodes[0].address)
    try:
        for fz in (f, _Fuzz("raw", raw, 0, None), raw_magic):
            checker.note(fz)
            dealer.send_multipart(fz.parts)
        dealer.send_multipart(checker.check_frame())
        _drain(dealer, checker, checker.tally.sent, timeout_s=5.0)
    finally:
        dealer.close(0)
    checker.verify(category)


# ---- the shared-memory ring --------------------------------------------------------------------


def _block(parts: list[bytes]) -> bytes:
    """Parts laid out as ``frames.pack`` lays out a frame: each at a 64-byte boundary."""
    out = bytearray()
    for p in parts:
        out += p
        out += bytes(-len(out) % frames.ALIGN)
    return bytes(out) or bytes(frames.ALIGN)


def _send_raw(conn: shm.ShmConnection, block: bytes) -> None:
    """Publish ``block`` as one request record, as ``ShmConnection.send`` publishes a packed frame."""
    ring = conn._seg.req
    nbytes = len(block)
    deadline = time.monotonic() + 5.0
    while (at := ring.reserve(nbytes)) < 0:
        if at == shm._PADDED:
            conn._ring(shm._DOORBELL)
            continue
        assert time.monotonic() < deadline, "no room in the request ring"
        time.sleep(1e-4)
    ring.out(at, nbytes)[:] = block
    ring.commit(at, nbytes)
    conn._ring(shm._DOORBELL)


def _shm_drain(conn: shm.ShmConnection, checker: _Checker, until: int) -> None:
    deadline = time.monotonic() + 10.0
    while checker.tally.replies < until:
        assert time.monotonic() < deadline, f"{until - checker.tally.replies} shm replies missing"
        reply = conn.recv(0.5)
        if reply is not None:
            checker.reply(reply)


def test_shm_ring_fuzz(server: LocalCluster, record_property: Any) -> None:
    """Fuzzed frames written straight into the request ring are each answered with a
    well-formed reply, and checked FINDs in between stay correct; then records that
    break the ring protocol get that link dropped, and new links are served."""
    node = server.spec.nodes[0]
    offer = _hello(node.address)["offers"].get("shm")
    if offer is None:
        pytest.skip("the server offers no shared memory here")
    checker = _Checker(server.spec, strict=False)
    fuzzer = _Fuzzer(seed=7)
    window = 48  # under the server's 64 unread replies: it never waits for the client to take one
    conn = shm.ShmConnection.connect(offer)
    t0 = time.monotonic()
    try:
        stream = fuzzer.stream(_SHM_FRAMES)
        for i, f in enumerate(stream, 1):
            checker.note(f)
            _send_raw(conn, _block(f.parts))
            if i % window == 0:
                if i % (window * 10) == 0:
                    _send_raw(conn, _block(checker.check_frame()))
                _shm_drain(conn, checker, checker.tally.sent)
        _send_raw(conn, _block(checker.check_frame()))
        _shm_drain(conn, checker, checker.tally.sent)
    finally:
        conn.close()
    checker.verify("shm")
    assert checker.tally.checks >= _SHM_FRAMES // (window * 10)
    elapsed = time.monotonic() - t0
    bad = _metric(node.metrics_port, "streamrec_ps_bad_frames_total", 'transport="shm"')
    assert bad > 0
    report = (f"shm: {checker.tally.sent - checker.tally.checks} fuzzed records + {checker.tally.checks} "
              f"checked FINDs in {elapsed:.1f} s; replies by status {dict(checker.statuses)}")
    print(report)
    record_property("shm_fuzz", report)

    # records that break the ring protocol: the server drops the link, and serves new ones
    for how in ("length", "kind", "head_unaligned", "head_ahead"):
        conn = shm.ShmConnection.connect(offer)
        try:
            ring = conn._seg.req
            if how in ("length", "kind"):
                at = ring.reserve(64)
                ring.commit(at, 64)
                word = 0 if how == "length" else 1
                ring.hdr[(at % ring.size) // 8 + word] = 100 if how == "length" else 7
            else:
                conn._seg.ctl[shm._W_REQ_HEAD] = 100 if how == "head_unaligned" else ring.size + 64
            conn._ring(shm._DOORBELL)
            deadline = time.monotonic() + 2.0
            while not conn._server_gone() and time.monotonic() < deadline:
                time.sleep(0.005)
            assert conn._server_gone(), f"{how}: the server kept a link whose ring is corrupt"
        finally:
            conn.close()
        with shm.ShmConnection.connect(offer) as fresh:
            checker = _Checker(server.spec)
            fresh.send(decode_message(checker.check_frame()))
            _shm_drain(fresh, checker, 1)
    assert _hello(node.address)["pid"] == server.pid(node.name)
