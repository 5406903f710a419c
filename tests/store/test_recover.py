"""A live directory that was not closed cleanly has a way forward: ``EmbeddingTable.recover``.

Before it, ``open`` said "open its last snapshot instead" and ``EmbeddingTable(path=)``
said "reopen it with EmbeddingTable.open": a loop with no exit at that path. Both
messages now name ``recover``, which rebuilds the live files from a snapshot (rows,
optimizer state and expiry) or discards the rows, and the result reopens warm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from streamrec.errors import SnapshotError
from streamrec.store import EmbeddingTable


def _dirty(live: Path, clock: object = None) -> EmbeddingTable:
    table = EmbeddingTable(dim=4, huge_pages=False, path=live, optimizer="adagrad", ttl_s=100,
                           clock=clock)  # type: ignore[arg-type]
    table.insert_or_assign(np.arange(1, 101, dtype=np.uint64), np.ones((100, 4)))
    return table


def test_both_messages_name_recover(tmp_path: Path) -> None:
    live = tmp_path / "live"
    _dirty(live)  # never closed: dirty
    with pytest.raises(SnapshotError, match=r"EmbeddingTable\.recover"):
        EmbeddingTable.open(live)
    with pytest.raises(SnapshotError, match=r"EmbeddingTable\.recover"):
        EmbeddingTable(dim=4, huge_pages=False, path=live)


def test_recover_from_a_snapshot_keeps_rows_state_and_expiry(tmp_path: Path) -> None:
    now = [1000.0]
    live, snap = tmp_path / "live", tmp_path / "snap"
    table = _dirty(live, lambda: now[0])
    keys = np.arange(1, 101, dtype=np.uint64)
    table.apply_gradients(keys, np.full((100, 4), 0.5), lr=0.1)
    table.snapshot(snap)
    want = table.export_range_with_expiry(0, 1000, include_state=True)
    table.insert_or_assign(np.array([500], np.uint64), np.ones((1, 4)))  # after the snapshot: lost
    now[0] += 40
    got = EmbeddingTable.recover(live, snapshot=snap, clock=lambda: now[0])
    k, v, e, _ = got.export_range_with_expiry(0, 1000, include_state=True)
    order = np.argsort(k)
    assert_array_equal(k[order], want[0])
    assert_array_equal(v[order], want[1])  # embedding and Adagrad state
    assert_array_equal(e[order], want[2])  # the rows' own deadlines, not a fresh TTL
    assert not got.contains([500])[0]
    got.close()
    assert EmbeddingTable.open(live, clock=lambda: now[0]).contains(keys).all()  # warm reopen works
    now[0] += 61  # past the original deadline (1000 + 100)
    assert not EmbeddingTable.open(live, clock=lambda: now[0]).find(keys)[1].any()


def test_recover_without_a_snapshot_discards_the_rows(tmp_path: Path) -> None:
    live = tmp_path / "live"
    _dirty(live)
    got = EmbeddingTable.recover(live)
    assert len(got) == 0 and got.dim == 4 and got.config.ttl_s == 100
    got.insert_or_assign([7], np.ones((1, 4)))
    got.close()
    assert EmbeddingTable.open(live).contains([7])[0]


def test_recover_refuses_a_snapshot_of_another_shape(tmp_path: Path) -> None:
    live, snap = tmp_path / "live", tmp_path / "snap"
    _dirty(live)
    other = EmbeddingTable(dim=8, huge_pages=False)
    other.insert_or_assign([1], np.ones((1, 8)))
    other.snapshot(snap)
    with pytest.raises(SnapshotError, match="dim, dtype, optimizer"):
        EmbeddingTable.recover(live, snapshot=snap)
    with pytest.raises(SnapshotError, match="not closed cleanly"):  # left as it was
        EmbeddingTable.open(live)
