"""EmbeddingTable on files and in snapshots: reopen, crashes (real SIGKILL), corruption.

The reference for a reopened or loaded table is the table it came from at the
moment of its ``close()`` or ``snapshot()``, compared row for row with the
optimizer state (``export(include_state=True)``); the reference after a crash is
the last state that was made durable (a clean close, a committed snapshot).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from streamrec import EmbeddingTable, Initializer
from streamrec.errors import CorruptFile, SnapshotError
from streamrec.store._persist import SnapshotJob

T0 = 1_700_000_000
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: i -> i * _MULT is a bijection of uint64


def _keys(n: int, start: int = 0) -> np.ndarray:
    """n distinct keys spread over uint64 (a different set for each disjoint range)."""
    return np.arange(start, start + n, dtype=np.uint64) * _MULT


def _rows(keys: np.ndarray, dim: int) -> np.ndarray:
    """A row per key that is a function of the key, exact in float32."""
    return ((keys >> np.uint64(40)) & np.uint64(0xFFFF)).astype(np.float64)[:, None] + np.arange(dim) / 8


def _image(table: EmbeddingTable) -> tuple[np.ndarray, np.ndarray]:
    """Every live row with its optimizer state, sorted by key."""
    width = table.dim + table.state_width
    parts = list(table.export(chunk_rows=1 << 16, include_state=True))
    keys = np.concatenate([k for k, _ in parts]) if parts else np.empty(0, np.uint64)
    vals = np.concatenate([v for _, v in parts]) if parts else np.empty((0, width), table.dtype)
    order = np.argsort(keys, kind="stable")
    return keys[order], vals[order]


def _assert_same(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> None:
    assert got[0].shape == want[0].shape, f"{got[0].size} rows, expected {want[0].size}"
    assert_array_equal(got[0], want[0])
    assert_array_equal(got[1], want[1])


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Reports:
    def __init__(self) -> None:
        self.keys: list[int] = []

    def __call__(self, keys: np.ndarray, values: np.ndarray, reason: str) -> None:
        assert reason == "expired"
        self.keys.extend(keys.tolist())

    def take(self) -> list[int]:
        out, self.keys = sorted(self.keys), []
        return out


_WATCHDOG_S = 120.0  # a child that hangs is killed, so a test fails instead of waiting forever
_watchdogs: dict[int, threading.Timer] = {}


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    """A Python child in its own process group (so a forked snapshot writer dies with it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    _watchdogs[proc.pid] = threading.Timer(_WATCHDOG_S, _killpg, (proc.pid,))
    _watchdogs[proc.pid].start()
    return proc


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is gone already
        os.killpg(pid, signal.SIGKILL)


def _expect_line(proc: subprocess.Popen[str], want: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != want:
        _kill(proc)
        assert proc.stderr is not None
        pytest.fail(f"child said {line!r}, expected {want!r}; stderr:\n{proc.stderr.read()[-3000:]}")


def _kill(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the child's whole process group and reap the child."""
    _killpg(proc.pid)
    proc.wait(timeout=30)
    _watchdogs.pop(proc.pid).cancel()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()


# -- live files: close and warm reopen ---------------------------------------------------------


@pytest.mark.parametrize("optimizer", [None, "adagrad", "adam"])
def test_live_files_reopen_identical(tmp_path: Path, optimizer: str | None) -> None:
    """Write (growing the index from 16 keys), close, open: same rows, same optimizer state,
    and the reopened table goes on exactly as a table that never stopped."""
    live = tmp_path / "live"
    kw = {"dim": 4, "optimizer": optimizer, "huge_pages": False, "capacity": 16}
    table = EmbeddingTable(path=live, **kw)
    twin = EmbeddingTable(**kw)  # the same operations in memory, never closed
    keys = _keys(20_000)
    grads = np.random.default_rng(1).integers(-8, 9, size=(keys.size, 4)) / 8
    for t in (table, twin):
        for part in np.array_split(keys, 5):
            t.insert_or_assign(part, _rows(part, 4))
        t.apply_gradients(keys[::3], grads[::3], lr=0.5)
        t.erase(keys[::7])
        t.find_or_insert(_keys(100, start=10**6))
        t.erase(keys[-3000:])
        t.compact()  # on files: moves rows and punches the freed tail out of arena.bin
    grows = table.stats().index_grows
    assert grows >= 5
    index_files = sorted(p.name for p in live.glob("index-*.bin"))
    assert index_files == [f"index-{grows + 1}.bin"]  # each growth replaced the previous file
    want, stats = _image(table), table.stats()
    table.close()
    del table

    reopened = EmbeddingTable.open(live)
    assert reopened.path == live
    _assert_same(_image(reopened), want)
    got = reopened.stats()
    for field in ("rows", "buckets", "high_water_rows", "free_rows", "row_bytes", "wasted_fraction"):
        assert getattr(got, field) == getattr(stats, field), field
    for t in (reopened, twin):  # state carried: the next steps agree bit for bit
        t.apply_gradients(keys[1::3], grads[1::3], lr=0.25)
        t.insert_or_assign(_keys(5000, start=2 * 10**6), np.ones((5000, 4)))  # reuses holes, grows
    _assert_same(_image(reopened), _image(twin))
    reopened.close()
    _assert_same(_image(EmbeddingTable.open(live)), _image(twin))


def test_reopen_refused_unless_closed_cleanly(tmp_path: Path) -> None:
    live = tmp_path / "live"
    table = EmbeddingTable(dim=2, huge_pages=False, path=live)
    with pytest.raises(SnapshotError, match="not closed cleanly"):  # created, never closed
        EmbeddingTable.open(live)
    table.insert_or_assign([1, 2], np.ones((2, 2)))
    table.close()
    EmbeddingTable.open(live)  # clean now; a reopen that only reads keeps it clean
    EmbeddingTable.open(live)
    table.find([1, 2])  # reads do not dirty the files
    EmbeddingTable.open(live)
    table.erase([1])  # a write after close: dirty again
    with pytest.raises(SnapshotError, match="not closed cleanly") as err:
        EmbeddingTable.open(live)
    assert str(live) in str(err.value)
    with table:  # the context manager closes
        table.insert_or_assign([3], np.ones((1, 2)))
    reopened = EmbeddingTable.open(live)
    assert_array_equal(reopened.contains([1, 2, 3]), [False, True, True])
    with pytest.raises(SnapshotError, match="already holds a table"):
        EmbeddingTable(dim=2, huge_pages=False, path=live)


_LIVE_CHILD = r"""
import sys
import numpy as np
from streamrec import EmbeddingTable

path, mode = sys.argv[1], sys.argv[2]
table = EmbeddingTable(dim=4, huge_pages=False, capacity=16, path=path)
keys = np.arange(1, 5001, dtype=np.uint64)
table.insert_or_assign(keys, np.repeat(keys[:, None], 4, axis=1).astype(np.float32))
table.close()
print("clean", flush=True)
if mode == "idle":
    sys.stdin.read()  # until killed
rng = np.random.default_rng(0)
first = True
while True:  # writes until killed, the index growing now and then
    batch = rng.integers(0, 2**64, size=2000, dtype=np.uint64, endpoint=False)
    table.insert_or_assign(batch, np.zeros((2000, 4)))
    table.erase(batch[::2])
    if first:
        print("writing", flush=True)
        first = False
"""


def test_sigkill_while_writing_leaves_files_refused(tmp_path: Path) -> None:
    live = tmp_path / "live"
    proc = _spawn(_LIVE_CHILD, str(live), "busy")
    try:
        _expect_line(proc, "clean")
        _expect_line(proc, "writing")
        time.sleep(random.uniform(0, 0.05))
    finally:
        _kill(proc)
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(SnapshotError, match="not closed cleanly"):
        EmbeddingTable.open(live)


def test_sigkill_after_close_reopens_what_was_closed(tmp_path: Path) -> None:
    live = tmp_path / "live"
    proc = _spawn(_LIVE_CHILD, str(live), "idle")
    try:
        _expect_line(proc, "clean")
    finally:
        _kill(proc)
    table = EmbeddingTable.open(live)
    keys = np.arange(1, 5001, dtype=np.uint64)
    values, found = table.find(keys)
    assert found.all() and len(table) == 5000
    assert_array_equal(values, np.repeat(keys[:, None], 4, axis=1).astype(np.float32))


def test_ttl_table_reopens_with_its_expiries(tmp_path: Path) -> None:
    """Expiries are seconds since the table's epoch: a reopen later must keep that epoch."""
    live = tmp_path / "live"
    clock = Clock(T0)
    table = EmbeddingTable(dim=2, ttl_s=10, ttl_slice_s=1, clock=clock, path=live, huge_pages=False)
    a, b, c = _keys(300), _keys(200, start=1000), _keys(100, start=2000)
    table.insert_or_assign(a, _rows(a, 2))  # expires at 10
    table.insert_or_assign(b, _rows(b, 2), ttl_s=0)  # never
    table.insert_or_assign(c, _rows(c, 2), ttl_s=100)  # at 100
    clock.now += 3
    table.apply_gradients(a[:50], np.ones((50, 2)), lr=1.0)  # a[:50] now at 13
    table.close()
    del table

    clock.now = T0 + 7
    reports = Reports()
    table = EmbeddingTable.open(live, clock=clock, on_evict=reports)
    assert table.contains(np.concatenate([a, b, c])).all()
    clock.now = T0 + 10
    assert_array_equal(table.contains(a), np.arange(300) < 50)
    assert table.contains(b).all() and table.contains(c).all()
    assert len(table) == 600  # expired, not yet reclaimed
    clock.now = T0 + 11
    assert table.expire() == 250
    assert reports.take() == sorted(a[50:].tolist())
    clock.now = T0 + 14
    assert table.expire() == 50
    assert reports.take() == sorted(a[:50].tolist())
    clock.now = T0 + 101
    table.insert_or_assign(b[:1], np.zeros((1, 2)), ttl_s=0)  # a write reclaims too
    assert reports.take() == sorted(c.tolist())
    assert len(table) == 200 and table.contains(b).all()


# -- snapshots ------------------------------------------------------------------------------------


def _stats_fields(table: EmbeddingTable) -> dict[str, object]:
    s = table.stats()
    keep = ("rows", "buckets", "high_water_rows", "free_rows", "index_grows", "evicted", "expired",
            "not_admitted", "wasted_fraction", "row_bytes")
    return {k: getattr(s, k) for k in keep}


@pytest.mark.parametrize("wait", [True, False])
def test_snapshot_holds_the_table_at_snapshot_time(tmp_path: Path, wait: bool) -> None:
    """Writes of every kind right after the fork (racing the child with wait=False) are not in it."""
    root = tmp_path / "snap"
    table = EmbeddingTable(dim=8, optimizer="adagrad", huge_pages=False, capacity=16)
    keys = _keys(200_000)
    table.insert_or_assign(keys, _rows(keys, 8))
    rng = np.random.default_rng(3)
    table.apply_gradients(keys[::7], rng.integers(-8, 9, size=(keys[::7].size, 8)) / 8, lr=0.5)
    table.erase(keys[::11])
    want, stats = _image(table), _stats_fields(table)

    job = table.snapshot(root, wait=wait)
    table.insert_or_assign(_keys(50_000, start=10**7), np.ones((50_000, 8)))
    table.assign(keys[1::3], np.zeros((keys[1::3].size, 8)))
    table.erase(keys[::5])
    table.apply_gradients(keys[2::3], np.ones((keys[2::3].size, 8)), lr=1.0)
    table.compact()  # gives pages back in the parent: the child's image must not notice
    after = _image(table)
    if wait:
        assert job == root
    else:
        assert isinstance(job, SnapshotJob)
        assert job.wait() == root
        assert job.done()

    loaded = EmbeddingTable.open(root)
    _assert_same(_image(loaded), want)
    assert _stats_fields(loaded) == stats
    _assert_same(_image(table), after)  # the table is untouched by the child, and usable
    more = _keys(1000, start=5 * 10**7)
    for t in (loaded, table):
        t.insert_or_assign(more, _rows(more, 8))
        assert t.contains(more).all()


def test_snapshot_generations(tmp_path: Path) -> None:
    root = tmp_path / "snap"
    table = EmbeddingTable(dim=3, huge_pages=False)
    images = []
    for gen in range(1, 6):
        new = _keys(1000, start=gen * 10**6)
        table.insert_or_assign(new, _rows(new, 3))
        table.erase(new[::gen + 1])
        assert table.snapshot(root) == root
        images.append(_image(table))
        gens = sorted(p.name for p in root.iterdir() if p.name.startswith("gen-"))
        assert gens[-1] == f"gen-{gen:06d}" and len(gens) <= 2  # the newest and the one before
        assert (root / "CURRENT").read_text().startswith(f"gen-{gen:06d} ")
        _assert_same(_image(EmbeddingTable.open(root)), images[-1])
    assert len({k.size for k, _ in images}) == 5  # each generation held something else


def test_snapshot_of_a_file_backed_table(tmp_path: Path) -> None:
    """A table on live files snapshots in-process; both its files and the snapshot reopen."""
    live, root = tmp_path / "live", tmp_path / "snap"
    table = EmbeddingTable(dim=4, optimizer="adam", huge_pages=False, path=live, capacity=16)
    keys = _keys(30_000)
    table.insert_or_assign(keys, _rows(keys, 4))
    table.apply_gradients(keys[::2], np.ones((15_000, 4)), lr=0.125)
    want = _image(table)
    assert table.snapshot(root, wait=False) == root  # nothing to wait for: written already
    table.erase(keys[:1000])
    after = _image(table)
    _assert_same(_image(EmbeddingTable.open(root)), want)
    table.close()
    _assert_same(_image(EmbeddingTable.open(live)), after)


def test_snapshot_keeps_expiries_admission_and_counters(tmp_path: Path) -> None:
    root = tmp_path / "snap"
    clock = Clock(T0)
    table = EmbeddingTable(dim=2, ttl_s=10, ttl_slice_s=1, clock=clock, admit_after=3, max_live_rows=500,
                           admission_sketch_width=1 << 12, huge_pages=False,
                           initializer=Initializer(kind="constant", value=0.5))
    a = _keys(400)
    table.insert_or_assign(a, _rows(a, 2))
    table.insert_or_assign(a[:100], _rows(a[:100], 2), ttl_s=50)
    table.insert_or_assign(_keys(200, start=10**6), np.zeros((200, 2)))  # 100 evictions
    seen = _keys(5, start=10**7)
    table.find_or_insert(seen)
    table.find_or_insert(seen)  # twice: the third sighting will admit them
    clock.now += 12
    table.expire()
    stats = _stats_fields(table)
    assert stats["evicted"] == 100 and stats["not_admitted"] == 10 and stats["expired"] > 0
    want = _image(table)
    table.snapshot(root)

    reports = Reports()
    loaded = EmbeddingTable.open(root, clock=clock, on_evict=reports)
    assert _stats_fields(loaded) == stats
    _assert_same(_image(loaded), want)
    loaded.find_or_insert(seen)  # at 12: rows until 22
    assert loaded.contains(seen).all()  # the sketch came back with its counts
    survivors = np.intersect1d(a[:100], want[0])  # rows until 50
    assert survivors.size == want[0].size > 0
    clock.now = T0 + 23
    assert loaded.expire() == 5
    assert reports.take() == sorted(seen.tolist())
    clock.now = T0 + 51
    assert loaded.expire() == survivors.size
    assert reports.take() == sorted(survivors.tolist())
    assert len(loaded) == 0


_CRASH_CHILD = r"""
import sys
import numpy as np
from streamrec import EmbeddingTable

root, n1, n2 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
mult = np.uint64(0x9E3779B97F4A7C15)

def rows(keys):
    return ((keys >> np.uint64(40)) & np.uint64(0xFFFF)).astype(np.float64)[:, None] + np.arange(8) / 8

table = EmbeddingTable(dim=8, huge_pages=False, capacity=n1 + n2)
first = np.arange(0, n1, dtype=np.uint64) * mult
table.insert_or_assign(first, rows(first))
table.erase(first[::10])
table.snapshot(root)
second = np.arange(n1, n1 + n2, dtype=np.uint64) * mult
table.insert_or_assign(second, rows(second))
print("second", flush=True)
table.snapshot(root)
print("done", flush=True)
sys.stdin.read()
"""


def _crash_mid_snapshot(root: Path, n1: int, n2: int, delay_s: float) -> str:
    """Kill (SIGKILL, whole group) the child once its second snapshot has begun; returns CURRENT."""
    proc = _spawn(_CRASH_CHILD, str(root), str(n1), str(n2))
    try:
        _expect_line(proc, "second")
        arena = root / "gen-000002" / "arena.arr"
        deadline = time.monotonic() + 30
        while not arena.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0002)
        time.sleep(delay_s)
    finally:
        _kill(proc)
    return (root / "CURRENT").read_text().split()[0]


def _check_crashed_root(root: Path, current: str, n1: int, n2: int) -> None:
    first = _keys(n1)
    kept = np.setdiff1d(first, first[::10])
    second = _keys(n2, start=n1)
    loaded = EmbeddingTable.open(root)
    if current == "gen-000001":
        want = kept
        assert not loaded.contains(second).any()
    else:
        assert current == "gen-000002"
        want = np.concatenate([kept, second])
    assert len(loaded) == want.size
    values, found = loaded.find(want)
    assert found.all()
    assert_array_equal(values, _rows(want, 8).astype(np.float32))
    assert not loaded.contains(first[::10]).any()
    # The root takes a new generation after the crash, clearing the leftovers.
    loaded.erase(want[:10])
    loaded.snapshot(root)
    gens = sorted(p.name for p in root.iterdir() if p.name.startswith("gen-"))
    assert current in gens and len(gens) == 2
    assert len(EmbeddingTable.open(root)) == want.size - 10


def _crash_trials(tmp_path: Path, delays: list[float], n1: int, n2: int) -> None:
    midway = 0
    for i, delay in enumerate(delays):
        root = tmp_path / f"snap{i}"
        current = _crash_mid_snapshot(root, n1, n2, delay)
        partial = (root / "gen-000002").exists() and current == "gen-000001"
        midway += partial
        _check_crashed_root(root, current, n1, n2)
    assert midway >= 1, "no trial killed the child inside its second snapshot"


def test_sigkill_during_snapshot_keeps_the_previous_one(tmp_path: Path) -> None:
    """A process snapshots 300k rows, then starts a snapshot of 900k and is SIGKILLed inside it."""
    _crash_trials(tmp_path, [0.0, 0.005], n1=300_000, n2=600_000)


@pytest.mark.slow
def test_sigkill_during_snapshot_at_random_moments(tmp_path: Path) -> None:
    rng = random.Random(11)
    _crash_trials(tmp_path, [rng.uniform(0, 0.2) for _ in range(12)], n1=300_000, n2=600_000)


# -- corruption -----------------------------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    size = path.stat().st_size
    if how == "delete":
        path.unlink()
    elif how.startswith("flip"):
        pos = {"flip-start": 0, "flip-middle": size // 2, "flip-end": size - 1}[how]
        with open(path, "r+b") as f:
            f.seek(pos)
            byte = f.read(1)
            f.seek(pos)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        keep = {"truncate-1": size - 1, "truncate-half": size // 2, "truncate-0": 0}[how]
        os.truncate(path, keep)


DAMAGES = ["flip-start", "flip-middle", "flip-end", "truncate-1", "truncate-half", "truncate-0", "delete"]


@pytest.fixture(scope="module")
def pristine_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot with every array a table writes: index, arena, free list, admission sketch."""
    root = tmp_path_factory.mktemp("pristine") / "snap"
    table = EmbeddingTable(dim=3, optimizer="adagrad", admit_after=2, admission_sketch_width=1 << 12,
                           huge_pages=False)
    keys = _keys(3000)
    table.insert_or_assign(keys, _rows(keys, 3))
    table.erase(keys[::4])
    table.find_or_insert(_keys(10, start=10**6))
    table.snapshot(root)
    return root


SNAPSHOT_FILES = ["CURRENT", "gen-000001/MANIFEST.json", "gen-000001/index.arr", "gen-000001/arena.arr",
                  "gen-000001/free.arr", "gen-000001/sketch.arr"]


def test_pristine_snapshot_has_the_files_under_test(pristine_snapshot: Path) -> None:
    files = sorted(str(p.relative_to(pristine_snapshot)) for p in pristine_snapshot.rglob("*") if p.is_file())
    assert files == sorted(SNAPSHOT_FILES)
    assert len(EmbeddingTable.open(pristine_snapshot)) == 2250


@pytest.mark.parametrize("name", SNAPSHOT_FILES)
def test_damaged_snapshot_file_is_refused_by_name(pristine_snapshot: Path, tmp_path: Path, name: str) -> None:
    for how in DAMAGES:
        root = tmp_path / how
        shutil.copytree(pristine_snapshot, root)
        _damage(root / name, how)
        with pytest.raises(SnapshotError) as err:
            EmbeddingTable.open(root)
        assert Path(name).name in str(err.value), f"{how}: {err.value}"
        if how != "delete":
            assert isinstance(err.value, CorruptFile), f"{how}: {err.value!r}"


@pytest.fixture(scope="module")
def pristine_live(tmp_path_factory: pytest.TempPathFactory) -> Path:
    live = tmp_path_factory.mktemp("pristine") / "live"
    table = EmbeddingTable(dim=3, huge_pages=False, capacity=16, path=live)
    keys = _keys(3000)
    table.insert_or_assign(keys, _rows(keys, 3))
    table.erase(keys[::4])
    table.close()
    return live


def _index_file(live: Path) -> str:
    (index,) = live.glob("index-*.bin")
    return index.name


def test_pristine_live_dir_reopens(pristine_live: Path, tmp_path: Path) -> None:
    copy = tmp_path / "live"
    shutil.copytree(pristine_live, copy)
    table = EmbeddingTable.open(copy)
    keys = _keys(3000)
    assert len(table) == 2250
    assert_array_equal(table.contains(keys), np.arange(3000) % 4 != 0)
    assert _index_file(copy) != "index-1.bin"  # the index grew on files


@pytest.mark.parametrize(
    ("target", "how", "named"),
    [
        ("index", "flip-start", "index"),
        ("index", "flip-middle", "index"),
        ("index", "flip-end", "index"),
        ("index", "truncate-1", "index"),
        ("index", "delete", "index"),
        ("arena.bin", "truncate-0", "arena.bin"),
        ("arena.bin", "rows-1", "arena.bin"),
        ("state.bin", "garbage", "state.bin"),
        ("state.bin", "truncate-half", "state.bin"),
        ("state.bin", "flip-start", "state.bin"),
        ("TABLE.json", "delete", "TABLE.json"),
        ("TABLE.json", "garbage", "TABLE.json"),
    ],
)
def test_damaged_live_dir_is_refused_by_name(pristine_live: Path, tmp_path: Path, target: str, how: str,
                                              named: str) -> None:
    live = tmp_path / "live"
    shutil.copytree(pristine_live, live)
    path = live / (_index_file(live) if target == "index" else target)
    if how == "garbage":
        path.write_bytes(np.random.default_rng(5).bytes(path.stat().st_size))
    elif how == "rows-1":  # one byte short of the rows in use
        os.truncate(path, 3000 * EmbeddingTable.open(pristine_live).stats().row_bytes - 1)
    else:
        _damage(path, how)
    with pytest.raises(SnapshotError) as err:
        EmbeddingTable.open(live)
    name = path.name if named == "index" else named
    assert name in str(err.value), str(err.value)


def test_truncated_free_list_is_refused(pristine_live: Path, tmp_path: Path) -> None:
    live = tmp_path / "live"
    shutil.copytree(pristine_live, live)
    os.truncate(live / "free.bin", 0)
    with pytest.raises(SnapshotError, match=r"free\.bin"):
        EmbeddingTable.open(live)


@pytest.mark.parametrize("word", [8, 9, 10], ids=["high", "free", "live"])
def test_flipped_counter_in_state_is_refused(pristine_live: Path, tmp_path: Path, word: int) -> None:
    live = tmp_path / "live"
    shutil.copytree(pristine_live, live)
    with open(live / "state.bin", "r+b") as f:
        f.seek(8 * word)
        low = f.read(1)[0]
        f.seek(8 * word)
        f.write(bytes([low ^ 0x40]))
    with pytest.raises(SnapshotError, match=r"state\.bin"):
        EmbeddingTable.open(live)
