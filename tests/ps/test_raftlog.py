"""The replicated batch log: entry format in process, then three real member processes on loopback.

Each member is a process running ``BatchLog`` with a small control socket (the
stand-in for the PS server that will host it). The test process is the writer:
it streams batches, follows ``NotLeader`` redirects, retries unacknowledged
batches with the same (writer, seq), and checks every acknowledged batch is
applied exactly once on every live member: batch ``s`` adds 1 to row ``s`` and
to row 0, so a row above 1, or row 0 differing from the sum of the others,
is a batch applied twice or partly.
"""

from __future__ import annotations

import pickle
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from streamrec.errors import ConfigError, CorruptFile
from streamrec.ps.raftlog import Op, RaftLogConfig, decode_entry, encode_entry, wipe

DIM = 4
N_KEYS = 400

_NODE = r"""
import os, pickle, sys, zmq, numpy as np
from streamrec.store import EmbeddingTable
from streamrec.config import Initializer
from streamrec.errors import NotLeader, ReplicationError
from streamrec.ps.raftlog import BatchLog, Op, RaftLogConfig
me, peers, ctl_port, data_dir = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4]
snap_every, dim, n_keys = (int(x) for x in sys.argv[5:8])
# generous timeouts: the test host is shared and starved CPUs delay heartbeats
cfg = RaftLogConfig(snapshot_min_entries=snap_every, election_timeout_s=(1.0, 2.5), heartbeat_s=0.1)
def make():
    return EmbeddingTable(dim=dim, capacity=1024, initializer=Initializer(kind="zeros"))
def corrupt(exc):
    print("corrupt:", exc, file=sys.stderr, flush=True)
    os._exit(3)  # the owner wipes this member and restarts it
log = BatchLog(me, peers, make, data_dir, cfg, on_corrupt=corrupt)
rep = zmq.Context().socket(zmq.REP)
rep.bind(f"tcp://127.0.0.1:{ctl_port}")
while True:
    msg = pickle.loads(rep.recv())
    kind = msg[0]
    try:
        if kind == "status":
            out = ("ok", log.is_leader, log.leader, log.applied_index)
        elif kind == "submit":
            _, op, keys, values, writer, seq, lr = msg
            ack = log.submit(Op(op), keys, values, writer=writer, seq=seq, lr=lr, timeout=2.0)
            out = ("ok", ack.index, ack.applied)
        elif kind == "dump":
            vals, found = log.table.find(np.arange(n_keys + 1, dtype=np.uint64))
            out = ("ok", vals, found, log.high_water(), log.applied_index, log.getStatus()["log_len"])
        else:
            out = ("error", f"unknown {kind}")
    except NotLeader as e:
        out = ("not_leader", e.leader)
    except ReplicationError as e:
        out = ("error", e.reason)
    rep.send(pickle.dumps(out))
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Group:
    """Three member processes and the writer's view of them."""

    def __init__(self, root: Path, snap_every: int) -> None:
        ports = _free_ports(6)
        self.addrs = [f"127.0.0.1:{p}" for p in ports[:3]]
        self.ctl = ports[3:]
        self.root = root
        self.snap_every = snap_every
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * 3
        self.ctx = zmq.Context()
        self.socks: dict[int, zmq.Socket[bytes]] = {}
        self.target = 0

    def start(self, i: int) -> None:
        peers = ",".join(a for j, a in enumerate(self.addrs) if j != i)
        self.procs[i] = subprocess.Popen(
            [sys.executable, "-c", _NODE, self.addrs[i], peers, str(self.ctl[i]), str(self.root / f"m{i}"),
             str(self.snap_every), str(DIM), str(N_KEYS)], stderr=subprocess.DEVNULL)

    def signal(self, i: int, sig: int) -> None:
        proc = self.procs[i]
        assert proc is not None
        if proc.poll() is None:
            proc.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.wait()
            self.procs[i] = None
            self._drop(i)

    def _drop(self, i: int) -> None:
        sock = self.socks.pop(i, None)
        if sock is not None:
            sock.close(0)

    def call(self, i: int, msg: tuple[Any, ...], timeout_s: float = 4.0) -> tuple[Any, ...] | None:
        """The member's answer, or None if it did not answer in time."""
        sock = self.socks.get(i)
        if sock is None:
            sock = self.ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{self.ctl[i]}")
            self.socks[i] = sock
        sock.send(pickle.dumps(msg))
        if not sock.poll(int(timeout_s * 1000)):
            self._drop(i)  # a REQ socket that missed its reply cannot send again
            return None
        out: tuple[Any, ...] = pickle.loads(sock.recv())
        return out

    def live(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p is not None]

    def leader(self, timeout_s: float = 120.0) -> int:  # a cold numba cache compiles for a while
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for i in self.live():
                st = self.call(i, ("status",), 1.0)
                if st is not None and st[1]:
                    return i
            time.sleep(0.1)
        raise AssertionError("no leader")

    def submit(self, op: Op, keys: np.ndarray, values: np.ndarray | None, seq: int, lr: float = 0.0,
               deadline_s: float = 60.0) -> bool:
        """Submit until acknowledged (True) or the deadline passes (False); follows redirects."""
        end = time.monotonic() + deadline_s
        target = self.target if self.target in self.live() else self.live()[0]
        while time.monotonic() < end:
            out = self.call(target, ("submit", int(op), keys, values, 7, seq, lr))
            if out is not None and out[0] == "ok":
                self.target = target  # the leader, as a client remembers it
                return True
            if out is not None and out[0] == "not_leader" and out[1] in self.addrs:
                target = self.addrs.index(out[1])
                if target in self.live():
                    continue
            time.sleep(0.05)
            live = self.live()
            target = live[(live.index(target) + 1) % len(live)] if target in live else live[0]
        return False

    def dump(self, i: int) -> tuple[np.ndarray, np.ndarray, dict[int, int], int, int]:
        """(values, found, high-water map, applied index, log entries kept) of member i."""
        out = self.call(i, ("dump",), 10.0)
        assert out is not None and out[0] == "ok"
        vals, found, high, applied, log_len = out[1:]
        return vals, found, high, applied, log_len

    def close(self) -> None:
        for i in self.live():
            self.signal(i, signal.SIGKILL)
        self.ctx.term()


@contextmanager
def group(tmp_path: Path, snap_every: int = 5000) -> Iterator[Group]:
    g = Group(tmp_path, snap_every)
    try:
        for i in range(3):
            g.start(i)
        yield g
    finally:
        for i in g.live():
            g.signal(i, signal.SIGCONT)
        g.close()


def stream(g: Group, seqs: range, on_ack: dict[int, Any] | None = None) -> list[int]:
    """Batch ``s`` adds 1 to rows 0 and ``s``; returns the acknowledged seqs. ``on_ack``: seq -> action."""
    acked = []
    for s in seqs:
        keys = np.array([0, s], dtype=np.uint64)
        assert g.submit(Op.APPLY_GRADIENTS, keys, -np.ones((2, DIM), dtype=np.float32), s, lr=1.0), s
        acked.append(s)
        if on_ack and s in on_ack:
            on_ack[s]()
    return acked


def setup_rows(g: Group) -> None:
    keys = np.arange(N_KEYS + 1, dtype=np.uint64)
    assert g.submit(Op.INSERT_OR_ASSIGN, keys, np.zeros((keys.size, DIM), dtype=np.float32), 1)


def check_exactly_once(g: Group, acked: list[int], members: list[int]) -> None:
    """Every acknowledged batch applied exactly once, identically, on every member given."""
    deadline = time.monotonic() + 20
    while True:
        dumps = [g.dump(i) for i in members]
        if len({d[3] for d in dumps}) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len({d[3] for d in dumps}) == 1, f"applied indexes differ: {[d[3] for d in dumps]}"
    first = dumps[0][0]
    for vals, found, high, _, _ in dumps:
        assert found.all()
        np.testing.assert_array_equal(vals, first)  # no divergence
        counts = vals[:, 0]
        assert set(np.unique(counts[1:])) <= {0.0, 1.0}, "a batch applied twice"
        assert (counts[acked] == 1).all(), "an acknowledged batch is missing"
        assert counts[0] == counts[1:].sum(), "row 0 disagrees: a batch applied in part"
        assert (vals == vals[:, :1]).all()
        assert high[7] >= max(acked)


# -- in process ---------------------------------------------------------------

def test_entry_round_trip_and_corruption_detected() -> None:
    keys = np.array([3, 1, 2**63 + 5], dtype=np.uint64)
    vals = np.arange(12, dtype=np.float32).reshape(3, 4)
    e = encode_entry(Op.APPLY_GRADIENTS, keys, vals, writer=9, seq=41, lr=0.5)
    op, k, v, w, s, lr = decode_entry(e)
    assert (op, w, s, lr) == (Op.APPLY_GRADIENTS, 9, 41, 0.5)
    np.testing.assert_array_equal(k, keys)
    assert v is not None
    np.testing.assert_array_equal(v, vals)
    for pos in (0, 20, len(e) - 1):
        bad = bytearray(e)
        bad[pos] ^= 0x40
        with pytest.raises(CorruptFile):
            decode_entry(bytes(bad))
    with pytest.raises(CorruptFile):
        decode_entry(e[:-4])
    op, k, v, *_ = decode_entry(encode_entry(Op.ERASE, keys, None, writer=1, seq=1))
    assert op == Op.ERASE and v is None and k.tolist() == keys.tolist()
    with pytest.raises(ValueError, match="values"):
        encode_entry(Op.ASSIGN, keys, vals[:2], writer=1, seq=1)


def test_config_fails_fast() -> None:
    with pytest.raises(ConfigError, match="election_timeout_s"):
        RaftLogConfig(election_timeout_s=(1.0, 0.5))
    with pytest.raises(ConfigError, match="heartbeat_s"):
        RaftLogConfig(heartbeat_s=0.5)


# -- three processes ----------------------------------------------------------

def test_leader_killed_mid_stream_every_ack_once_everywhere(tmp_path: Path) -> None:
    with group(tmp_path) as g:
        g.leader()
        setup_rows(g)

        lead = g.leader()
        proc = g.procs[lead]
        assert proc is not None
        # the kill lands while the writer has a batch in flight, not between batches
        timer = threading.Timer(0.03, proc.kill)
        acked = stream(g, range(2, 120), on_ack={40: timer.start})
        timer.join()
        g.signal(lead, signal.SIGKILL)  # reap it
        assert len(g.live()) == 2
        check_exactly_once(g, acked, g.live())


def test_minority_cannot_acknowledge_and_a_stalled_follower_catches_up(tmp_path: Path) -> None:
    with group(tmp_path) as g:
        lead = g.leader()
        setup_rows(g)
        others = [i for i in range(3) if i != lead]
        # one follower stalled: the majority still acknowledges
        g.signal(others[0], signal.SIGSTOP)
        acked = stream(g, range(2, 30))
        # both followers stalled: the leader alone is a minority and acknowledges nothing
        g.signal(others[1], signal.SIGSTOP)
        out = g.call(lead, ("submit", int(Op.APPLY_GRADIENTS), np.array([0, 30], dtype=np.uint64),
                            -np.ones((2, DIM), dtype=np.float32), 7, 30, 1.0), timeout_s=6.0)
        assert out is not None and out[0] != "ok", out
        for i in others:
            g.signal(i, signal.SIGCONT)
        acked += stream(g, range(30, 50))
        print("T streamed", time.monotonic())  # seq 30 resubmitted: it may have committed, never twice
        check_exactly_once(g, acked, [0, 1, 2])


@pytest.mark.slow
def test_all_members_restarted_lose_nothing(tmp_path: Path) -> None:
    with group(tmp_path, snap_every=30) as g:  # snapshots and log truncation happen during the stream
        g.leader()
        setup_rows(g)
        acked = stream(g, range(2, 150))
        for i in range(3):
            g.signal(i, signal.SIGKILL)
        for i in range(3):
            g.start(i)
        g.leader()
        assert all((tmp_path / f"m{i}" / "raft.dump").exists() for i in range(3))
        acked += stream(g, range(150, 170))
        check_exactly_once(g, acked, [0, 1, 2])
        for i in range(3):  # the log was truncated behind the snapshot: the rest came from the snapshot
            _, _, _, applied, log_len = g.dump(i)
            assert log_len < applied - 100


def _flip_in_snapshot(path: Path) -> None:
    """Flip a byte in the middle of the largest file of the snapshot (the table's rows)."""
    with tarfile.open(path) as tar:
        big = max(tar.getmembers(), key=lambda m: m.size)
        at = big.offset_data + big.size // 2
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def _flip_in_last_entry(path: Path) -> None:
    """Change one gradient of the last batch in the journal (-1.0 becomes -0.5); the framing stays valid."""
    data = bytearray(path.read_bytes())
    at = data.rfind(np.float32(-1.0).tobytes())
    assert at > 0
    data[at:at + 4] = np.float32(-0.5).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("what", ["snapshot", "entry"])
def test_corruption_is_detected_and_the_member_resyncs(tmp_path: Path, what: str) -> None:
    # a snapshot to corrupt, or every entry still in the journal to replay on restart
    with group(tmp_path, snap_every=30 if what == "snapshot" else 5000) as g:
        g.leader()
        setup_rows(g)
        acked = stream(g, range(2, 100))
        victim = next(i for i in range(3) if i != g.leader())
        g.signal(victim, signal.SIGKILL)
        home = tmp_path / f"m{victim}"
        if what == "snapshot":
            _flip_in_snapshot(home / "raft.dump")
        else:
            _flip_in_last_entry(home / "raft.journal")
        g.start(victim)
        proc = g.procs[victim]
        assert proc is not None
        assert proc.wait(timeout=120) == 3  # it found the corruption and stopped rather than diverge
        g.procs[victim] = None
        wipe(home)
        g.start(victim)  # re-syncs from the leader: snapshot transfer, then the log
        acked += stream(g, range(100, 120))
        check_exactly_once(g, acked, [0, 1, 2])

