"""EmbeddingTable read/write concurrency: lock-free readers beside one writer that grows the table."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.testing import assert_array_equal

from streamrec import EmbeddingTable, Initializer

DIM = 128  # 512 bytes of float32: eight cache lines, written element by element
GROW_STEP = 500  # grow keys inserted per writer step
N_STABLE, N_CHURN, N_GROW, N_NEVER = 2_000, 1_000, 40_000, 2_000
N_HOT = 64  # stable keys rewritten several times per writer step, read often: where tearing would show
STABLE = slice(0, N_STABLE)
CHURN = slice(N_STABLE, N_STABLE + N_CHURN)
GROW0 = N_STABLE + N_CHURN
NEVER0 = GROW0 + N_GROW
N_KEYS = NEVER0 + N_NEVER

_rng = np.random.default_rng(77)
KEYS = _rng.permutation(np.unique(_rng.integers(0, 2**64, size=2 * N_KEYS, dtype=np.uint64, endpoint=False)))[
    :N_KEYS
]
TAGS = (KEYS % np.uint64(65_521)).astype(np.float32) + 1  # a per-key column, exact in float32


def rows_for(idx: np.ndarray, version: int | np.ndarray) -> np.ndarray:
    """The rows written for keys ``KEYS[idx]`` at ``version`` (one, or one per row): [tag, v, ..., v]."""
    rows = np.empty((idx.size, DIM), dtype=np.float32)
    rows[:] = np.asarray(version, dtype=np.float32).reshape(-1, 1)
    rows[:, 0] = TAGS[idx]
    return rows


@dataclass
class Round:
    """One table's life: created small, grown to every grow key."""

    table: EmbeddingTable
    number: int
    grown: int = 0  # grow keys [GROW0, GROW0 + grown) are in; published after the insert returns


@dataclass
class Shared:
    """What the writer publishes and the readers check against."""

    round: Round
    version: int = 0  # the highest version the writer has started to write
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    rounds: int = 0
    grows: int = 0
    reads: int = 0
    seen_absent_churn: int = 0
    seen_found_grow: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, msg: str) -> None:
        with self.lock:
            self.errors.append(msg)
        self.stop.set()


def _new_round(number: int, version: int) -> Round:
    table = EmbeddingTable(dim=DIM, capacity=16, initializer=Initializer(kind="zeros"), huge_pages=False)
    idx = np.arange(N_STABLE + N_CHURN)
    table.insert_or_assign(KEYS[idx], rows_for(idx, version))
    return Round(table, number)


def _writer(shared: Shared, seconds: float, seed: int, written: np.ndarray, present: np.ndarray) -> None:
    """Update stable keys, erase and reinsert churn keys, insert grow keys; new table per round."""
    rng = np.random.default_rng(seed)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and not shared.stop.is_set():
            rnd = shared.round
            if rnd.grown >= N_GROW:
                shared.grows += rnd.table.stats().index_grows
                shared.version += 1
                shared.round = _new_round(rnd.number + 1, shared.version)
                written[:] = 0
                present[:] = False
                written[: N_STABLE + N_CHURN] = shared.version
                present[: N_STABLE + N_CHURN] = True
                shared.rounds += 1
                continue
            table = rnd.table
            shared.version += 1
            v = shared.version
            grow = np.arange(GROW0 + rnd.grown, GROW0 + rnd.grown + GROW_STEP)
            table.insert_or_assign(KEYS[grow], rows_for(grow, v))
            written[grow], present[grow] = v, True
            rnd.grown += GROW_STEP

            stable = rng.choice(N_STABLE, size=200, replace=False)
            table.insert_or_assign(KEYS[stable], rows_for(stable, v))
            written[stable] = v
            # The hot keys, rewritten 16 times in one call, each pass a newer version.
            hot = np.tile(np.arange(N_HOT), 16)
            versions = shared.version + 1 + np.arange(hot.size) // N_HOT
            shared.version = int(versions[-1])
            table.insert_or_assign(KEYS[hot], rows_for(hot, versions))
            written[:N_HOT] = shared.version

            gone = CHURN.start + rng.choice(N_CHURN, size=100, replace=False)
            table.erase(KEYS[gone])
            present[gone] = False
            back = CHURN.start + rng.choice(N_CHURN, size=100, replace=False)
            shared.version += 1
            table.insert_or_assign(KEYS[back], rows_for(back, shared.version))
            written[back], present[back] = shared.version, True
    except Exception as exc:  # surfaced by the test, not lost in the thread
        shared.fail(f"writer: {exc!r}")
    finally:
        shared.stop.set()


def _check_masks(shared: Shared, rnd: Round, idx: np.ndarray, found: np.ndarray,
                 grown_before: int, grown_after: int, who: str) -> bool:
    stable = idx < CHURN.start
    never = idx >= NEVER0
    grow_pos = idx - GROW0
    is_grow = (idx >= GROW0) & ~never
    must = stable | (is_grow & (grow_pos < grown_before))
    must_not = never | (is_grow & (grow_pos >= grown_after + GROW_STEP))
    if (must & ~found).any():
        bad = idx[must & ~found][:5]
        shared.fail(f"{who} round {rnd.number}: present keys reported absent, e.g. indices {bad.tolist()}")
        return False
    if (must_not & found).any():
        bad = idx[must_not & found][:5]
        shared.fail(f"{who} round {rnd.number}: keys never inserted reported found, e.g. {bad.tolist()}")
        return False
    with shared.lock:
        shared.reads += 1
        shared.seen_absent_churn += int((~found & (idx >= CHURN.start) & (idx < CHURN.stop)).sum())
        shared.seen_found_grow += int((found & is_grow).sum())
    return True


def _finder(shared: Shared, seed: int, who: str) -> None:
    rng = np.random.default_rng(seed)
    last = np.zeros(N_KEYS)  # highest version this reader saw per key, this round
    number = -1
    try:
        while not shared.stop.is_set():
            rnd = shared.round
            if rnd.number != number:
                number, last[:] = rnd.number, 0
            if rng.random() < 0.5:
                idx = rng.permutation(N_HOT)
            else:
                idx = rng.choice(N_KEYS, size=int(rng.integers(1, 2_000)), replace=False)
            grown_before = rnd.grown
            out = np.empty((idx.size, DIM), dtype=np.float32) if rng.random() < 0.5 else None
            values, found = rnd.table.find(KEYS[idx], out=out)
            vmax = shared.version
            grown_after = rnd.grown
            if not _check_masks(shared, rnd, idx, found, grown_before, grown_after, who):
                return
            if (values[~found] != 0).any():
                shared.fail(f"{who}: an absent key's row is not zeros")
                return
            got, gidx = values[found], idx[found]
            version = got[:, 1]
            torn = (got[:, 0] != TAGS[gidx]) | (got[:, 1:] != version[:, None]).any(axis=1)
            if torn.any():
                i = int(np.argmax(torn))
                shared.fail(f"{who}: torn or foreign row for key index {gidx[i]}: {got[i].tolist()}")
                return
            if (version < 1).any() or (version > vmax).any():
                shared.fail(f"{who}: a version that was never written: {version.min()}..{version.max()} "
                            f"(writer at {vmax})")
                return
            if (version < last[gidx]).any():
                i = int(np.argmax(version < last[gidx]))
                shared.fail(f"{who}: key index {gidx[i]} went back from version {last[gidx[i]]} "
                            f"to {version[i]}")
                return
            last[gidx] = version
    except Exception as exc:
        shared.fail(f"{who}: {exc!r}")


def _container(shared: Shared, seed: int, who: str) -> None:
    rng = np.random.default_rng(seed)
    try:
        while not shared.stop.is_set():
            rnd = shared.round
            idx = rng.choice(N_KEYS, size=int(rng.integers(1, 3_000)), replace=False)
            grown_before = rnd.grown
            found = rnd.table.contains(KEYS[idx])
            if not _check_masks(shared, rnd, idx, found, grown_before, rnd.grown, who):
                return
    except Exception as exc:
        shared.fail(f"{who}: {exc!r}")


def _warm_up() -> None:
    """Run every kernel the threads use once, so a cold numba cache compiles here, not in the timed part."""
    table = EmbeddingTable(dim=DIM, capacity=1, initializer=Initializer(kind="zeros"), huge_pages=False)
    idx = np.arange(100)
    table.insert_or_assign(KEYS[idx], rows_for(idx, 1))
    table.find(KEYS[idx], out=np.empty((idx.size, DIM), dtype=np.float32))
    table.find(KEYS[idx])
    table.contains(KEYS[idx])
    table.erase(KEYS[idx[:10]])


def _run(reader: Callable[[Shared, int, str], None], n_readers: int, seconds: float, seed: int) -> Shared:
    written = np.zeros(N_KEYS, dtype=np.int64)
    present = np.zeros(N_KEYS, dtype=bool)
    _warm_up()
    shared = Shared(round=_new_round(0, 1), version=1)
    written[: N_STABLE + N_CHURN] = 1
    present[: N_STABLE + N_CHURN] = True
    threads = [threading.Thread(target=reader, args=(shared, seed + i, f"reader {i}"), daemon=True)
               for i in range(n_readers)]
    writer_args = (shared, seconds, seed, written, present)
    threads.append(threading.Thread(target=_writer, args=writer_args, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 60)
        assert not t.is_alive(), "a thread hung"
    assert not shared.errors, "\n".join(shared.errors)

    # Quiescent: the last round's table holds exactly what the writer wrote last.
    table = shared.round.table
    idx = np.arange(N_KEYS)
    values, found = table.find(KEYS)
    assert_array_equal(found, present)
    live = idx[present]
    expect = np.zeros((N_KEYS, DIM), dtype=np.float32)
    for v in np.unique(written[present]):
        sel = live[written[live] == v]
        expect[sel] = rows_for(sel, int(v))
    assert_array_equal(values, expect)
    assert len(table) == int(present.sum())
    shared.grows += table.stats().index_grows
    return shared


def test_find_beside_a_growing_writer_sees_only_whole_written_rows() -> None:
    shared = _run(_finder, n_readers=3, seconds=4.0, seed=1)
    assert shared.reads > 50
    assert shared.grows >= 10, "the index should have been rebuilt while readers ran"
    assert shared.seen_absent_churn > 0 and shared.seen_found_grow > 0


def test_contains_beside_a_growing_writer() -> None:
    shared = _run(_container, n_readers=2, seconds=2.0, seed=100)
    assert shared.reads > 50
    assert shared.grows >= 10
