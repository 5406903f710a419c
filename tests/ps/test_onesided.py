"""OneSidedReader against the table that writes the directory: same answers, in
this process and in others, under concurrent growth; read-only for real.

The concurrent tests write values that encode their key and a version (every
element of a row equal to key * 2**20 + version, exact in float64), so a torn
row (mixed versions), another key's row, or a version going backwards is seen.
The writer erases odd keys only and publishes how far its inserts got, so an
even key below that mark must be found: a reader stuck on a replaced index
would miss it.
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from streamrec.errors import SnapshotError
from streamrec.ps.onesided import OneSidedReader
from streamrec.store import EmbeddingTable

_SHIFT = float(2**20)
_MAX_KEY = 1 << 21  # the concurrent writer's keys are in [1, _MAX_KEY)
_ABSENT = 1 << 29  # keys from here on are never written
_DIM = 8


def _encode(keys: np.ndarray, version: int) -> np.ndarray:
    col = keys.astype(np.float64) * _SHIFT + version
    return np.repeat(col[:, None], _DIM, axis=1)


def _check(keys: np.ndarray, values: np.ndarray, found: np.ndarray, last: np.ndarray, inserted: int
           ) -> str | None:
    """Why this read is impossible under the writer's schedule, or None.

    Keys are unique; every key below ``inserted`` had been inserted before the read began.
    """
    if (found & (keys >= _ABSENT)).any():
        return "a key never written was found"
    if (~found & (keys < inserted) & (keys % 2 == 0)).any():
        return "a key inserted before the read (and never erased) was missing"
    if values[~found].any():
        return "an absent key came with nonzero values"
    k, v = keys[found], values[found]
    if (v != v[:, :1]).any():
        return f"torn row: {v[(v != v[:, :1]).any(axis=1)][0]}"
    owner = np.floor(v[:, 0] / _SHIFT)
    if (owner != k.astype(np.float64)).any():
        return "another key's row"
    version = v[:, 0] - owner * _SHIFT
    if (version < last[k]).any():
        return "a key's version went backwards"
    last[k] = version
    return None


def _probe(rng: np.random.Generator, n: int) -> np.ndarray:
    present = rng.integers(1, _MAX_KEY, size=n, dtype=np.uint64)
    absent = rng.integers(_ABSENT, _ABSENT + 1000, size=n // 16, dtype=np.uint64)
    return np.unique(np.concatenate([present, absent]))


def _read_until(reader: OneSidedReader, stop: Any, progress: Any, seed: int, fresh_every: int = 0
                ) -> dict[str, Any]:
    """Read random batches until ``stop`` is set, checking each; a report.

    ``progress.value``: the writer's insert mark (keys below it are in).
    """
    rng = np.random.default_rng(seed)
    last = np.full(_MAX_KEY, -1.0)
    report: dict[str, Any] = {"reads": 0, "found": 0, "generations": set(), "error": None, "fresh": 0}
    while not stop.is_set():
        keys = _probe(rng, 1024)
        inserted = progress.value
        values, found = reader.find(keys)
        report["generations"].add(reader.generation)
        err = _check(keys, values, found, last, inserted)
        if err is None and (reader.contains(keys) & (keys >= _ABSENT)).any():
            err = "contains() found a key never written"
        if err is not None:
            report["error"] = err
            break
        report["reads"] += 1
        report["found"] += int(found.sum())
        if fresh_every and report["reads"] % fresh_every == 0:  # opening while the index grows
            with OneSidedReader(reader.path) as fresh:
                fresh.find(keys[:64])
            report["fresh"] += 1
    return report


def _reader_process(path: str, out: Any, ready: Any, stop: Any, progress: Any) -> None:
    try:
        with OneSidedReader(path) as reader:
            reader.find(np.arange(8, dtype=np.uint64))  # kernels loaded before the writer starts
            ready.set()
            report = _read_until(reader, stop, progress, seed=os.getpid(), fresh_every=50)
    except BaseException as exc:
        report = {"error": f"{type(exc).__name__}: {exc}"}
        ready.set()
    out.put(report)


def _find_process(path: str, keys: np.ndarray, out: Any) -> None:
    try:
        with OneSidedReader(path) as reader:
            out.put((*reader.find(keys, include_state=True), reader.contains(keys)))
    except BaseException as exc:
        out.put(f"{type(exc).__name__}: {exc}")


class _Writer:
    """Inserts (growing index and arena), assigns new versions, erases; versions only rise."""

    def __init__(self, path: Path, progress: Any) -> None:
        self.table = EmbeddingTable(dim=_DIM, dtype="float64", capacity=16, huge_pages=False, path=path)
        self.progress = progress
        self.rng = np.random.default_rng(7)
        self.next_key = 1
        self.version = 0

    def step(self, new: int = 400) -> None:
        self.version += 1
        hi = min(self.next_key + new, _MAX_KEY)
        if hi > self.next_key:
            keys = np.arange(self.next_key, hi, dtype=np.uint64)
            self.table.insert_or_assign(keys, _encode(keys, self.version))
            self.next_key = hi
            self.progress.value = hi
        some = np.unique(self.rng.integers(1, self.next_key, size=400, dtype=np.uint64))
        self.table.assign(some, _encode(some, self.version))
        self.table.erase(self.rng.integers(1, self.next_key, size=80, dtype=np.uint64) | np.uint64(1))

    def run(self, seconds: float, min_grows: int) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end or self.table.stats().index_grows < min_grows:
            self.step()
            time.sleep(0.001)  # paced, so the growths spread over the readers' run


# -- agreement with the table ------------------------------------------------------------------------

CONFIGS = [
    {"dim": 8},
    {"dim": 5, "dtype": "float64", "optimizer": "adagrad"},
    {"dim": 16, "optimizer": "adam", "ttl_s": 3600},
    {"dim": 4, "max_live_rows": 3000, "eviction": "lfu"},
]


def _filled(path: Path, cfg: dict[str, Any], n: int = 5000) -> tuple[EmbeddingTable, np.ndarray]:
    table = EmbeddingTable(capacity=16, huge_pages=False, path=path, **cfg)
    rng = np.random.default_rng(1)
    keys = np.unique(rng.integers(0, 2**64, size=n, dtype=np.uint64))
    table.insert_or_assign(keys, rng.normal(size=(keys.size, table.dim)))
    table.apply_gradients(keys[::3], rng.normal(size=(keys[::3].size, table.dim)), lr=0.1)
    table.erase(keys[::7])
    edges = np.array([0, 2**64 - 1], dtype=np.uint64)
    probe = np.concatenate([keys, rng.integers(0, 2**64, size=1000, dtype=np.uint64), edges])
    return table, rng.permutation(probe)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_same_process_agrees_with_table(tmp_path: Path, cfg: dict[str, Any]) -> None:
    table, probe = _filled(tmp_path / "live", cfg)
    with OneSidedReader(tmp_path / "live") as reader:
        assert (reader.dim, reader.dtype, reader.state_width) == (table.dim, table.dtype, table.state_width)
        for include_state in (False, True):
            want_v, want_f = table.find(probe, include_state=include_state)
            got_v, got_f = reader.find(probe, include_state=include_state)
            assert_array_equal(got_f, want_f)
            assert_array_equal(got_v, want_v)
        assert_array_equal(reader.contains(probe), table.contains(probe))
        out = np.full((probe.size, table.dim), 7, dtype=table.dtype)
        assert reader.find(probe, out=out)[0] is out
        assert_array_equal(out, table.find(probe)[0])
        assert reader.find([])[0].shape == (0, table.dim)


def test_other_process_agrees_with_table(tmp_path: Path) -> None:
    table, probe = _filled(tmp_path / "live", CONFIGS[1])
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_find_process, args=(str(tmp_path / "live"), probe, out))
    proc.start()
    try:
        got = out.get(timeout=60)
    finally:
        proc.join(30)
    assert not isinstance(got, str), got
    values, found, contains = got
    want_v, want_f = table.find(probe, include_state=True)
    assert_array_equal(found, want_f)
    assert_array_equal(contains, want_f)
    assert_array_equal(values, want_v)


def test_input_checks_are_the_tables(tmp_path: Path) -> None:
    EmbeddingTable(dim=3, huge_pages=False, path=tmp_path / "live")
    with OneSidedReader(tmp_path / "live") as reader:
        with pytest.raises(ValueError, match="non-negative"):
            reader.find([-1])
        with pytest.raises(TypeError, match="dtype float64"):
            reader.contains(np.array([1.5]))
        with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
            reader.find([1, 2], out=np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="closed"):
        reader.find([1])


# -- concurrent writer -------------------------------------------------------------------------------


def test_reader_in_another_process_under_growth_never_sees_a_torn_row(tmp_path: Path) -> None:
    live = tmp_path / "live"
    ctx = mp.get_context("spawn")
    out, ready, stop, progress = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Value("q", 0, lock=False)
    writer = _Writer(live, progress)
    writer.step()
    proc = ctx.Process(target=_reader_process, args=(str(live), out, ready, stop, progress))
    proc.start()
    try:
        assert ready.wait(60)
        arena_before = (live / "arena.bin").stat().st_size
        writer.run(seconds=3.0, min_grows=8)
        stop.set()
        report = out.get(timeout=60)
    finally:
        stop.set()
        proc.join(30)
    assert report["error"] is None, report["error"]
    grows = writer.table.stats().index_grows
    assert (live / "arena.bin").stat().st_size > 4 * arena_before  # the arena grew under the mapping
    assert report["reads"] > 20 and report["found"] > 0, report
    assert len(report["generations"]) >= 3, (report["generations"], grows)
    assert report["fresh"] > 0
    with OneSidedReader(live) as reader:  # and at rest it agrees exactly
        keys = np.arange(0, writer.next_key + 10, dtype=np.uint64)
        assert_array_equal(reader.find(keys)[0], writer.table.find(keys)[0])


def test_reader_shared_by_threads_under_growth(tmp_path: Path) -> None:
    live = tmp_path / "live"
    progress = SimpleNamespace(value=0)
    writer = _Writer(live, progress)
    writer.step()
    stop = threading.Event()
    reports: list[dict[str, Any]] = []
    with OneSidedReader(live) as reader:
        threads = [threading.Thread(target=lambda s=s: reports.append(_read_until(reader, stop, progress, s)))
                   for s in range(2)]
        for t in threads:
            t.start()
        try:
            writer.run(seconds=1.5, min_grows=8)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert reader.generation == writer.table.stats().index_grows + 1
    assert len(reports) == 2
    for rep in reports:
        assert rep["error"] is None, rep["error"]
        assert rep["reads"] > 0


def test_writer_reopening_the_directory_keeps_readers_going(tmp_path: Path) -> None:
    live = tmp_path / "live"
    writer = _Writer(live, SimpleNamespace(value=0))
    for _ in range(5):
        writer.step()
    with OneSidedReader(live) as reader:
        writer.table.close()
        table = EmbeddingTable.open(live)
        keys = np.arange(1, 30000, dtype=np.uint64)
        table.insert_or_assign(keys, _encode(keys, 99))  # grows the index again
        assert_array_equal(reader.find(keys)[0], _encode(keys, 99))
        assert reader.generation == int(next(live.glob("index-*.bin")).stem.split("-")[1])


# -- TTL ---------------------------------------------------------------------------------------------


def test_ttl_rows_read_as_absent_after_expiry(tmp_path: Path) -> None:
    now = [1_000_000.0]
    table = EmbeddingTable(dim=2, ttl_s=10, huge_pages=False, clock=lambda: now[0], path=tmp_path / "live")
    short, long = np.arange(1, 101, dtype=np.uint64), np.arange(101, 201, dtype=np.uint64)
    table.insert_or_assign(short, np.ones((100, 2)))
    table.insert_or_assign(long, np.ones((100, 2)), ttl_s=100)
    both = np.concatenate([short, long])
    with OneSidedReader(tmp_path / "live", clock=lambda: now[0]) as reader:
        now[0] += 9
        assert reader.find(both)[1].all()
        now[0] += 2  # short ones expired; nothing was written, so they are still in the index
        values, found = reader.find(both)
        assert_array_equal(found, np.repeat([False, True], 100))
        assert not values[:100].any()
        assert_array_equal(found, table.find(both)[1])
        assert_array_equal(reader.contains(both), found)


# -- read-only ---------------------------------------------------------------------------------------


def _fingerprint(live: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for f in sorted(live.iterdir()):
        st = f.stat()
        out[f.name] = (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
    return out


def _mapping_at(addr: int) -> tuple[str, str]:
    """(permissions, path) of this process's mapping holding ``addr``."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= addr < hi:
                return fields[1], fields[5].strip() if len(fields) > 5 else ""
    raise AssertionError(f"{addr:#x} is not mapped")


def test_a_read_session_leaves_every_file_untouched(tmp_path: Path) -> None:
    live = tmp_path / "live"
    # LRU: a writer-side read would store each row's access time; the reader must not.
    table, probe = _filled(live, {"dim": 8, "max_live_rows": 100_000, "eviction": "lru"})
    before = _fingerprint(live)
    time.sleep(0.01)  # so that a write would show in st_mtime_ns
    with OneSidedReader(live) as reader:
        for _ in range(3):
            reader.find(probe)
            reader.contains(probe)
    assert _fingerprint(live) == before
    assert table.find(probe)[1].any()


def test_mappings_are_read_only(tmp_path: Path) -> None:
    live = tmp_path / "live"
    _filled(live, {"dim": 8})
    reader = OneSidedReader(live)
    arena, index = reader._arena, reader._current
    assert arena is not None
    for addr, name in ((arena.map.addr, "arena.bin"), (index.map.addr, f"index-{reader.generation}.bin")):
        perms, path = _mapping_at(addr)
        assert (perms, Path(path).name) == ("r--s", name)
    assert arena.map.length > (live / "arena.bin").stat().st_size  # reserved past the end of the file
    with pytest.raises(ValueError, match="read-only"):
        reader._view.state[0] = 1
    pid = os.fork()
    if pid == 0:  # a store through the kernel's (numpy-writeable) view must fault
        try:
            faulthandler.disable()  # the fault is expected: no traceback dump
            arena.arena64[0, 0] = 1
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
    addr = arena.map.addr
    reader.close()
    with open("/proc/self/maps") as maps:  # close() unmapped the reservation
        assert f"{addr:x}-" not in maps.read()


# -- bad directories ---------------------------------------------------------------------------------


def _bad_dir(tmp_path: Path, kind: str) -> Path:
    live = tmp_path / "live"
    if kind == "missing":
        return tmp_path / "nothing-here"
    if kind == "empty":
        live.mkdir()
        return live
    table = EmbeddingTable(dim=2, huge_pages=False, path=live)
    if kind == "snapshot":
        return Path(str(table.snapshot(tmp_path / "snap")))
    if kind == "old-format":
        meta = json.loads((live / "TABLE.json").read_text())
        (live / "TABLE.json").write_text(json.dumps({**meta, "format": 1}))
    elif kind == "no-state":
        (live / "state.bin").unlink()
    elif kind == "garbage-state":
        (live / "state.bin").write_bytes(bytes(4096))
    elif kind == "not-a-table":
        meta = json.loads((live / "TABLE.json").read_text())
        (live / "TABLE.json").write_text(json.dumps({**meta, "kind": "sequence_store"}))
    elif kind == "no-index":
        for f in live.glob("index-*.bin"):
            f.unlink()
    return live


@pytest.mark.parametrize("kind", ["missing", "empty", "snapshot", "old-format", "no-state", "garbage-state",
                                  "not-a-table", "no-index"])
def test_bad_directory_is_refused_by_name(tmp_path: Path, kind: str) -> None:
    path = _bad_dir(tmp_path, kind)
    with pytest.raises(SnapshotError) as err:
        OneSidedReader(path)
    assert str(path) in str(err.value)
