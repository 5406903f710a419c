"""Array files and snapshot directories: round trips, corruption, crashes, forks, input checks.

The reference for every read is the array that was written, compared byte for
byte (NaN payloads included); the reference for a crashed write is the snapshot
that was CURRENT before it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from streamrec.errors import CorruptFile, SnapshotError
from streamrec.store._files import (
    DEFAULT_CHUNK_BYTES,
    ArrayInfo,
    map_array,
    read_array,
    read_array_into,
    read_snapshot,
    snapshot_info,
    verify_array,
    write_array,
    write_snapshot,
)
from streamrec.store._memory import Region

HEADER = 4096  # payload offset of format 1
FOOTER = 32
DTYPES = ["|b1", "|i1", "|u1", "<u2", "<i4", "<u8", ">i4", "<f2", "<f4", ">f8", "<c8", "<M8[ns]", "<m8[s]",
          "|S5", "<U3"]

Snapshot = tuple[dict[str, Any], dict[str, np.ndarray]]


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def same_snapshot(got: Snapshot, want: Snapshot) -> bool:
    return (
        got[0] == want[0]
        and list(got[1]) == list(want[1])
        and all(same(got[1][k], want[1][k]) for k in want[1])
    )


@st.composite
def raw_arrays(draw: st.DrawFn, max_side: int = 12) -> np.ndarray:
    """Any dtype of DTYPES, any shape (0-d and empty included), arbitrary bytes."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=max_side))
    n = int(np.prod(shape)) * dtype.itemsize
    data = draw(st.binary(min_size=n, max_size=n))
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("files")


# -- array files: round trips ------------------------------------------------------------------


@given(arr=raw_arrays(), chunk_bytes=st.integers(1, 300))
def test_array_round_trip_every_reader(workdir: Path, arr: np.ndarray, chunk_bytes: int) -> None:
    path = workdir / "rt.arr"
    info = write_array(path, arr, chunk_bytes=chunk_bytes, fsync=False)
    assert info == ArrayInfo("rt.arr", arr.dtype.str, arr.shape, arr.nbytes, chunk_bytes,
                             -(-arr.nbytes // chunk_bytes), info.crc)
    assert path.stat().st_size == HEADER + arr.nbytes + 4 * info.chunks + FOOTER
    assert same(read_array(path), arr)
    out = np.empty_like(arr)
    read_array_into(path, out)
    assert same(out, arr)
    assert verify_array(path) == info
    mapped = map_array(path, writable=False)
    assert same(np.asarray(mapped), arr) and not mapped.flags.writeable
    del mapped


def test_large_array_with_default_chunks_and_a_region_view(workdir: Path) -> None:
    # 20 MiB: three 8 MiB chunks, the last short; written from and read into views of reserved regions.
    rows, dim = 327_680, 16
    src_region, dst_region = (Region(rows * dim * 4, huge_pages=False) for _ in range(2))
    src = src_region.array(np.float32, (rows, dim))
    src[:] = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    info = write_array(workdir / "big.arr", src)
    assert (info.chunk_bytes, info.chunks) == (DEFAULT_CHUNK_BYTES, 3)
    dst = dst_region.array(np.float32, (rows, dim))
    read_array_into(workdir / "big.arr", dst)
    assert same(dst, src)


def test_truncation_and_checksum_messages_say_exactly_what(workdir: Path) -> None:
    path = workdir / "msg.arr"
    arr = np.arange(1024, dtype="<f4")  # 4,096 payload bytes in 16 chunks of 256
    write_array(path, arr, chunk_bytes=256)
    data = path.read_bytes()
    cases = {
        data[: HEADER + 1024]: "truncated: 1,024 of 4,096 payload bytes",
        data[:100]: "truncated: 100 of 4,096 header bytes",
        data[:-1]: "truncated: 95 of 96 bytes of checksum table and footer",
        data + b"xyz": "3 bytes of trailing garbage after the footer",
        b"NOTARRAY" + data[8:]: "bad magic b'NOTARRAY': not a streamrec array file",
        data[:8] + (2).to_bytes(4, "little") + data[12:]: "unknown format version 2 (this build reads 1)",
        data[:40] + b"\x07" + data[41:]: "header checksum mismatch",
        data[:-1] + bytes([data[-1] ^ 1]): "footer checksum mismatch",
        data[:-FOOTER - 1] + bytes([data[-FOOTER - 1] ^ 1]) + data[-FOOTER:]:
            "checksum table does not match its crc in the footer",
    }
    pos = HEADER + 3 * 256 + 17
    cases[data[:pos] + bytes([data[pos] ^ 0x40]) + data[pos + 1 :]] = "chunk 3 of 16: checksum mismatch"
    for bad, problem in cases.items():
        path.write_bytes(bad)
        with pytest.raises(CorruptFile) as ei:
            read_array(path)
        assert ei.value.problem.startswith(problem) and ei.value.path == str(path)
        assert str(path) in str(ei.value)


def test_out_of_another_dtype_or_shape_is_refused(workdir: Path) -> None:
    path = workdir / "shape.arr"
    write_array(path, np.zeros((4, 3), dtype=np.float32))
    for out in (np.zeros((3, 4), np.float32), np.zeros((4, 3), np.float64), np.zeros((4, 3), ">f4")):
        with pytest.raises(CorruptFile, match=r"holds <f4 \(4, 3\), expected"):
            read_array_into(path, out)


def test_verify_array_checks_only_the_chunks_asked_for(workdir: Path) -> None:
    path = workdir / "verify.arr"
    write_array(path, np.arange(100, dtype=np.int64), chunk_bytes=64)  # 800 bytes, 13 chunks
    data = bytearray(path.read_bytes())
    data[HEADER + 5 * 64 + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert verify_array(path, chunks=[0, 4, 6, 12]).chunks == 13
    with pytest.raises(CorruptFile, match="chunk 5 of 13: checksum mismatch"):
        verify_array(path, chunks=[4, 5])
    with pytest.raises(CorruptFile, match="chunk 5 of 13"):
        verify_array(path)
    with pytest.raises(ValueError, match="out of range"):
        verify_array(path, chunks=[13])


# -- map_array ---------------------------------------------------------------------------------


def test_map_array_read_only_writable_and_empty(workdir: Path) -> None:
    path = workdir / "map.arr"
    arr = np.arange(600, dtype=np.float64).reshape(200, 3)
    write_array(path, arr, chunk_bytes=1000)
    ro = map_array(path, writable=False)
    assert same(np.asarray(ro), arr)
    with pytest.raises(ValueError):
        ro[0, 0] = 1.0
    del ro
    rw = map_array(path, writable=True)
    assert isinstance(rw, np.memmap)
    rw[0, 0] = -1.0  # first chunk only
    rw.flush()
    del rw  # the write reached the file, and chunk 0's checksum is stale:
    with pytest.raises(CorruptFile, match="chunk 0 of 5: checksum mismatch"):
        read_array(path)
    verify_array(path, chunks=range(1, 5))
    write_array(workdir / "empty.arr", np.zeros((0, 7), np.uint16))
    empty = map_array(workdir / "empty.arr", writable=False)
    assert empty.shape == (0, 7) and empty.dtype == np.uint16


@pytest.mark.parametrize("where", ["magic", "header", "padding", "table", "footer", "truncated", "garbage"])
def test_map_array_refuses_a_damaged_header_or_tail(workdir: Path, where: str) -> None:
    path = workdir / f"map-{where}.arr"
    write_array(path, np.arange(50, dtype=np.int32), chunk_bytes=64)
    data = bytearray(path.read_bytes())
    pos = {"magic": 3, "header": 60, "padding": 1000, "table": HEADER + 200 + 5, "footer": len(data) - 20}
    if where in pos:
        data[pos[where]] ^= 0x10
    elif where == "truncated":
        del data[-1]
    else:
        data += b"\0"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFile) as ei:
        map_array(path, writable=False)
    assert ei.value.path == str(path)


def test_map_array_does_not_read_the_payload(workdir: Path) -> None:
    path = workdir / "lazy.arr"
    write_array(path, np.zeros(64, np.uint8), chunk_bytes=16)
    data = bytearray(path.read_bytes())
    data[HEADER + 20] = 9
    path.write_bytes(bytes(data))
    assert map_array(path, writable=False)[20] == 9  # mapped as it is ...
    with pytest.raises(CorruptFile, match="chunk 1 of 4"):  # ... and verify_array finds it
        verify_array(path)


# -- snapshots: round trips and generations ----------------------------------------------------


@given(
    arrays=st.dictionaries(names, raw_arrays(max_side=9), max_size=4),
    meta=st.dictionaries(st.text(max_size=6), json_values, max_size=4),
    chunk_bytes=st.integers(1, 200),
)
def test_snapshot_round_trip(
    workdir: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any], chunk_bytes: int
) -> None:
    root = workdir / "rt-snap"
    gen = write_snapshot(root, arrays, meta, chunk_bytes=chunk_bytes, fsync=False)
    assert same_snapshot(read_snapshot(root), (meta, arrays))
    info = snapshot_info(root)
    assert info.path == gen and info.meta == meta and list(info.arrays) == list(arrays)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("gen-"))[-1] == gen.name


def test_generations_keep_current_and_previous_only(tmp_path: Path) -> None:
    for i in range(1, 5):
        gen = write_snapshot(tmp_path, {"x": np.full(3, i)}, {"i": i})
        assert gen.name == f"gen-{i:06d}"
        assert sorted(p.name for p in tmp_path.iterdir()) == (
            ["CURRENT", f"gen-{i - 1:06d}", gen.name] if i > 1 else ["CURRENT", gen.name]
        )
    assert (tmp_path / "CURRENT").read_bytes() == b"gen-000004 crc32=%08x\n" % zlib.crc32(b"gen-000004")
    meta, arrays = read_snapshot(tmp_path)
    assert meta == {"i": 4} and same(arrays["x"], np.full(3, 4))


def test_read_snapshot_into_allocated_arrays(tmp_path: Path) -> None:
    want: dict[str, np.ndarray] = {
        "rows": np.arange(40, dtype=np.float32).reshape(10, 4),
        "keys": np.arange(10, dtype=np.uint64),
    }
    write_snapshot(tmp_path, want, {"dim": 4})
    regions: dict[str, Region] = {}

    def allocate(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        regions[name] = Region(1 << 21, huge_pages=False)
        return regions[name].array(dtype, shape)

    meta, got = read_snapshot(tmp_path, allocate=allocate)
    assert meta == {"dim": 4} and same_snapshot((meta, got), ({"dim": 4}, want))
    assert all(np.shares_memory(got[k], regions[k].array(np.uint8, (1 << 21,))) for k in want)
    with pytest.raises(ValueError, match=r"allocate\('rows', ...\) result: expected <f4 \(10, 4\)"):
        read_snapshot(tmp_path, allocate=lambda n, d, s: np.zeros((1,), d))
    with pytest.raises(ValueError, match="writeable C-contiguous"):
        read_snapshot(tmp_path, allocate=lambda n, d, s: np.zeros(s[::-1], d).T)


def test_no_snapshot_and_partial_leftovers(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="no snapshot: CURRENT not found"):
        read_snapshot(tmp_path)
    (tmp_path / "gen-000007").mkdir()  # a crashed first write, never CURRENT
    (tmp_path / "gen-000007" / "x.arr").write_bytes(b"partial")
    (tmp_path / "CURRENT.tmp").write_bytes(b"gen-000007")
    (tmp_path / "notes.txt").write_text("not ours")
    gen = write_snapshot(tmp_path, {"x": np.ones(2)}, {})
    assert gen.name == "gen-000008"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT", "gen-000008", "notes.txt"]


def test_write_refuses_to_touch_a_root_with_a_damaged_current(tmp_path: Path) -> None:
    write_snapshot(tmp_path, {"x": np.ones(2)}, {})
    write_snapshot(tmp_path, {"x": np.zeros(2)}, {})
    (tmp_path / "CURRENT").write_bytes(b"gen-000002 crc32=00000000\n")
    with pytest.raises(CorruptFile, match="checksum mismatch"):
        write_snapshot(tmp_path, {"x": np.ones(2)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT", "gen-000001", "gen-000002"]


def test_manifest_is_json_and_unknown_formats_are_refused(tmp_path: Path) -> None:
    gen = write_snapshot(tmp_path, {"x": np.ones(2)}, {"a": [1, "b"]})
    doc = json.loads((gen / "MANIFEST.json").read_text())
    assert doc["manifest"]["meta"] == {"a": [1, "b"]} and doc["manifest"]["format"] == 1
    changes: list[tuple[dict[str, Any], str]] = [
        ({"format": 2}, "unknown manifest format 2"),
        ({"generation": 9}, "manifest of generation 9 in gen-000001"),
        ({"arrays": {"x": {"file": "../x.arr"}}}, "malformed manifest"),
        ({"arrays": {"../x": doc["manifest"]["arrays"]["x"]}}, "malformed manifest"),
    ]
    for change, problem in changes:
        text = json.dumps({**doc["manifest"], **change}).encode()
        (gen / "MANIFEST.json").write_bytes(b'{"crc32": "%08x", "manifest": %s}\n' % (zlib.crc32(text), text))
        with pytest.raises(CorruptFile, match=problem):
            read_snapshot(tmp_path)


def test_a_valid_file_from_another_generation_is_refused(tmp_path: Path) -> None:
    g1 = write_snapshot(tmp_path, {"x": np.arange(5)}, {})
    g2 = write_snapshot(tmp_path, {"x": np.arange(5) + 1}, {})
    (g2 / "x.arr").write_bytes((g1 / "x.arr").read_bytes())
    with pytest.raises(CorruptFile, match=r"does not match MANIFEST.json: crc \d+ in the file"):
        read_snapshot(tmp_path)
    (g2 / "x.arr").unlink()
    with pytest.raises(SnapshotError, match="cannot open") as ei:
        read_snapshot(tmp_path)
    assert ei.value.path == str(g2 / "x.arr")


# -- snapshots: every file, every kind of damage -----------------------------------------------


@pytest.fixture(scope="module")
def damaged_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[Path, bytes]]:
    """A root whose CURRENT snapshot has multi-chunk, 0-d and empty arrays, and a previous generation."""
    root = tmp_path_factory.mktemp("damage")
    rng = np.random.default_rng(1)
    write_snapshot(root, {"rows": np.zeros((40, 8), np.float32)}, {"v": 1}, chunk_bytes=256)
    arrays: dict[str, np.ndarray] = {
        "rows": rng.standard_normal((40, 8)).astype(np.float32),
        "keys": rng.integers(0, 2**63, 37).astype(np.uint64),
        "scalar": np.array(7, dtype=np.int16),
        "empty": np.zeros((0, 4), dtype=np.bool_),
    }
    gen = write_snapshot(root, arrays, {"v": 2, "note": "damage"}, chunk_bytes=256)
    files = [root / "CURRENT", gen / "MANIFEST.json", *(gen / f"{k}.arr" for k in arrays)]
    return root, {f: f.read_bytes() for f in files}


def overwrite(path: Path, new: bytes, old: bytes) -> None:
    """Turn ``path`` from ``old`` into ``new`` in place, writing only from the first difference.

    (Rewriting whole files through O_TRUNC makes ext4 flush on close: 20x slower here.)
    """
    n = min(len(new), len(old))
    diff = np.flatnonzero(np.frombuffer(new, np.uint8, n) != np.frombuffer(old, np.uint8, n))
    start = int(diff[0]) if diff.size else n
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, new[start:], start)
        os.ftruncate(fd, len(new))
    finally:
        os.close(fd)


@contextmanager
def replaced(path: Path, data: bytes, original: bytes) -> Iterator[None]:
    overwrite(path, data, original)
    try:
        yield
    finally:
        overwrite(path, original, data)


def assert_refused(root: Path, path: Path) -> None:
    with pytest.raises(CorruptFile) as ei:
        read_snapshot(root)
    assert ei.value.path == str(path) and path.name in str(ei.value), str(ei.value)


def arr_positions(size: int, nbytes: int) -> list[int]:
    """Header fields, padding, payload ends and middle, table ends, every footer field."""
    payload = [HEADER, HEADER + nbytes // 2, HEADER + nbytes - 1] if nbytes else []
    table_start, footer_start = HEADER + nbytes, size - FOOTER
    table = [table_start, footer_start - 1] if footer_start > table_start else []
    header = [0, 7, 8, 12, 16, 20, 32, 96, 104, 112, 120, 127, 128, 131, 132, 2000, HEADER - 1]
    return header + payload + table + [footer_start + k for k in (0, 7, 8, 16, 24, 27, 28, 31)]


def file_cases(root: Path, path: Path, data: bytes) -> tuple[list[int], list[int]]:
    """(positions to flip, lengths to truncate to) for one file: every byte of the text files."""
    if path.suffix != ".arr":
        return list(range(len(data))), list(range(len(data)))
    nbytes = snapshot_info(root).arrays[path.stem].nbytes
    cuts = {0, 1, 131, 132, HEADER - 1, HEADER, HEADER + nbytes // 2, HEADER + nbytes, len(data) - FOOTER}
    return arr_positions(len(data), nbytes), sorted(cuts | {len(data) - 1})


def test_every_file_flipped_and_truncated_is_refused_naming_it(
    damaged_root: tuple[Path, dict[Path, bytes]],
) -> None:
    root, originals = damaged_root
    assert len(originals) == 6
    for path, data in originals.items():
        positions, cuts = file_cases(root, path, data)
        for pos in positions:
            for xor in (0x01, 0x80):
                with replaced(path, data[:pos] + bytes([data[pos] ^ xor]) + data[pos + 1 :], data):
                    assert_refused(root, path)
        for cut in cuts:
            with replaced(path, data[:cut], data):
                assert_refused(root, path)
        for extra in (b"\0", b"}\n", b"garbage" * 10):
            with replaced(path, data + extra, data):
                assert_refused(root, path)
    assert read_snapshot(root)[0] == {"v": 2, "note": "damage"}  # everything restored


@given(data=st.data())
@settings(max_examples=150)
def test_random_damage_to_any_file_is_refused(
    damaged_root: tuple[Path, dict[Path, bytes]], data: st.DataObject
) -> None:
    root, originals = damaged_root
    path = data.draw(st.sampled_from(sorted(originals)))
    raw = originals[path]
    if data.draw(st.booleans()):
        pos, xor = data.draw(st.integers(0, len(raw) - 1)), data.draw(st.integers(1, 255))
        bad = raw[:pos] + bytes([raw[pos] ^ xor]) + raw[pos + 1 :]
    else:
        bad = raw[: data.draw(st.integers(0, len(raw) - 1))]
    with replaced(path, bad, raw):
        assert_refused(root, path)


# -- crash consistency: SIGKILL at every step, and at random moments ---------------------------


def run_in_child(fn: Callable[[], object]) -> int:
    """Fork; the child runs ``fn`` and exits (0 on success). Returns the child's pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait(pid: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"child {pid} did not finish in {timeout} s")
        time.sleep(0.0005)


STEP_CALLS = ("open", "write", "fsync", "close", "replace", "mkdir", "unlink", "rmdir", "scandir")


def counting_os(kill_at: int, log: list[str]) -> None:
    """In a child: count calls of STEP_CALLS; SIGKILL ourselves just before call number ``kill_at``."""

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            log.append(name)
            if len(log) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return step

    for name in STEP_CALLS:
        setattr(os, name, counted(name, getattr(os, name)))


FIRST: Snapshot = (
    {"n": 1},
    {"rows": np.arange(96, dtype=np.float32).reshape(24, 4), "keys": np.arange(24, dtype=np.uint64)},
)
SECOND: Snapshot = (
    {"n": 2},
    {
        "rows": -np.arange(120, dtype=np.float32).reshape(30, 4),
        "keys": np.arange(30, dtype=np.uint64) * 3,
        "extra": np.ones(7, np.int8),
    },
)
THIRD: Snapshot = ({"n": 3}, {"keys": np.arange(5, dtype=np.uint64)})


def prepare(root: Path) -> None:
    """gen-1 (older), gen-2 = FIRST (CURRENT), gen-3 a crashed write's leftover: both cleanups run."""
    write_snapshot(root, THIRD[1], THIRD[0], fsync=False)
    write_snapshot(root, FIRST[1], FIRST[0], chunk_bytes=160, fsync=False)
    (root / "gen-000003").mkdir()
    (root / "gen-000003" / "rows.arr").write_bytes(b"torn")


def test_sigkill_at_every_step_of_a_write_leaves_a_whole_snapshot(tmp_path: Path) -> None:
    # Learn the write's steps (os calls) from one uninterrupted run in a child, then kill before each.
    log_file = tmp_path / "steps.json"

    def learn() -> None:
        log: list[str] = []
        counting_os(0, log)
        write_snapshot(tmp_path / "learn", SECOND[1], SECOND[0], chunk_bytes=160)
        log_file.write_text(json.dumps(log))

    prepare(tmp_path / "learn")
    assert wait(run_in_child(learn)) == 0
    steps = json.loads(log_file.read_text())
    commit = steps.index("replace") + 1  # killed before this call: the old snapshot stays CURRENT
    assert len(steps) > 50 and steps.count("rmdir") >= 2, steps
    for kill_at in range(1, len(steps) + 1):
        root = tmp_path / f"k{kill_at}"
        prepare(root)

        def doomed(root: Path = root, kill_at: int = kill_at) -> None:
            counting_os(kill_at, [])
            write_snapshot(root, SECOND[1], SECOND[0], chunk_bytes=160)

        status = wait(run_in_child(doomed))
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (kill_at, status)
        want = FIRST if kill_at <= commit else SECOND
        assert same_snapshot(read_snapshot(root), want), (kill_at, steps[kill_at - 1])
        before = snapshot_info(root).path.name
        gen = write_snapshot(root, THIRD[1], THIRD[0], fsync=False)  # cleans up what the crash left
        assert sorted(p.name for p in root.iterdir()) == sorted(["CURRENT", before, gen.name]), kill_at
        assert same_snapshot(read_snapshot(root), THIRD)


BIG = {f"part{i}": np.random.default_rng(i).integers(0, 2**63, 1 << 20, dtype=np.uint64) for i in range(3)}


def test_sigkill_at_random_moments_of_a_large_write(tmp_path: Path) -> None:
    # 24 MiB in 96 chunks of 256 KiB; the parent kills the writing child after random sleeps.
    big: Snapshot = ({"n": "big"}, BIG)

    def write_big(root: Path) -> Callable[[], object]:
        return partial(write_snapshot, root, BIG, big[0], chunk_bytes=1 << 18)

    start = time.monotonic()
    assert wait(run_in_child(write_big(tmp_path / "timed"))) == 0
    full = time.monotonic() - start
    rng = random.Random(7)
    outcomes: set[str] = set()
    for i, fraction in enumerate([0.02, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.5]):
        root = tmp_path / f"r{i}"
        write_snapshot(root, FIRST[1], FIRST[0])
        pid = run_in_child(write_big(root))
        time.sleep(fraction * rng.uniform(0.8, 1.2) * full)
        os.kill(pid, signal.SIGKILL)
        status = wait(pid)
        got = read_snapshot(root)
        if same_snapshot(got, FIRST):
            assert os.WIFSIGNALED(status), i  # a child that finished must have committed
            outcomes.add("first")
        else:
            assert same_snapshot(got, big), i
            outcomes.add("second")
        write_snapshot(root, THIRD[1], THIRD[0])
        assert len([p for p in root.iterdir() if p.name.startswith("gen-")]) == 2
    assert "first" in outcomes, (full, outcomes)


def test_fork_from_a_busy_multithreaded_parent(tmp_path: Path) -> None:
    # BGSAVE: threads hold locks and run numpy/zlib/json when the parent forks; the child writes
    # the arrays as they were at the fork while the parent keeps changing them.
    stop = threading.Event()
    lock = threading.Lock()
    arr = np.zeros((1000, 8), np.float32)

    def busy() -> None:
        while not stop.is_set():
            with lock:
                zlib.crc32(np.ones(10_000, np.uint8).data)
                json.dumps({"x": list(range(50))})

    threads = [threading.Thread(target=busy, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(5):
            arr[:] = i
            frozen = arr.copy()
            meta = {"i": i}
            pid = run_in_child(partial(write_snapshot, tmp_path, {"rows": arr}, meta))
            arr[:] = -1  # the parent keeps serving; the child's copy-on-write view is unchanged
            assert wait(pid, timeout=20) == 0
            assert same_snapshot(read_snapshot(tmp_path), (meta, {"rows": frozen}))
    finally:
        stop.set()
        for t in threads:
            t.join()


# -- input checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arr", "error", "match"),
    [
        (np.zeros((4, 4))[:, ::2], ValueError, "C-contiguous"),
        (np.zeros((4, 4)).T, ValueError, "C-contiguous"),
        ([1, 2, 3], TypeError, "expected a numpy ndarray"),
        (np.array([object()]), TypeError, "cannot be stored"),
        (np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]), TypeError, "cannot be stored"),
        (np.zeros((1,) * 9), ValueError, "at most 8 dims"),
    ],
)
def test_write_array_refuses_bad_arrays(workdir: Path, arr: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        write_array(workdir / "bad.arr", arr)
    with pytest.raises(error, match=match):
        write_snapshot(workdir / "bad-snap", {"a": arr}, {})


@pytest.mark.parametrize("chunk_bytes", [0, -1, 2**41, 1.5, True, "8"])
def test_bad_chunk_bytes(workdir: Path, chunk_bytes: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="chunk_bytes"):
        write_array(workdir / "bad.arr", np.zeros(3), chunk_bytes=chunk_bytes)


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a.b", "../x", "a b", "é", "x" * 201, 3, None])
def test_bad_array_names(tmp_path: Path, name: Any) -> None:
    with pytest.raises(ValueError, match="expected an ASCII identifier"):
        write_snapshot(tmp_path, {name: np.zeros(2)}, {})
    assert not (tmp_path / "CURRENT").exists()


@pytest.mark.parametrize(
    ("meta", "error", "match"),
    [
        ({"a": np.float32(1)}, ValueError, "JSON-serialisable"),
        ({"a": object()}, ValueError, "JSON-serialisable"),
        ({"a": float("nan")}, ValueError, "JSON-serialisable"),
        ({"a": (1, 2)}, ValueError, "round trip"),
        ({1: "x"}, ValueError, "round trip"),
        ([("a", 1)], TypeError, "expected a mapping"),
    ],
)
def test_bad_meta(tmp_path: Path, meta: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        write_snapshot(tmp_path, {"a": np.zeros(2)}, meta)
    assert list(tmp_path.iterdir()) == []


def test_bad_out_and_paths(workdir: Path) -> None:
    write_array(workdir / "o.arr", np.zeros((4, 4)))
    with pytest.raises(TypeError, match="expected a numpy ndarray"):
        read_array_into(workdir / "o.arr", [0.0] * 16)  # type: ignore[arg-type]
    ro = np.zeros((4, 4))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable C-contiguous"):
        read_array_into(workdir / "o.arr", ro)
    with pytest.raises(ValueError, match="writeable C-contiguous"):
        read_array_into(workdir / "o.arr", np.zeros((4, 4)).T)
    with pytest.raises(TypeError, match="path"):
        read_array(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="arrays: expected a mapping"):
        write_snapshot(workdir / "s", [np.zeros(2)], {})  # type: ignore[arg-type]
    with pytest.raises(SnapshotError, match="cannot open"):
        read_array(workdir / "missing.arr")
