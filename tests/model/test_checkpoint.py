"""Checkpoints: a round trip, corruption refused, and a publisher SIGKILLed at each step of a publish
leaving the previous version loadable and CURRENT on it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from streamrec.errors import CheckpointError
from streamrec.model.checkpoint import current_version, load_current, publish
from streamrec.store.table import EmbeddingTable

torch.set_num_threads(1)


def _module(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))


def _table(n: int) -> EmbeddingTable:
    t = EmbeddingTable(dim=4, huge_pages=False, optimizer="adagrad")
    keys = np.arange(n, dtype=np.int64) * 7
    t.insert_or_assign(keys, np.arange(n * 4, dtype=np.float32).reshape(n, 4))
    t.apply_gradients(keys, np.ones((n, 4), np.float32), 0.1)
    return t


def test_round_trip(tmp_path: Path) -> None:
    m = _module(0)
    opt = torch.optim.Adam(m.parameters())
    m(torch.ones(2, 4)).sum().backward()
    opt.step()
    table = _table(50)
    assert current_version(tmp_path) is None
    v = publish(tmp_path, m.state_dict(), tables={"items": table}, optimizer=opt.state_dict(),
                model_config={"dim": 4, "layers": [3, 1]}, features={"names": ["a", "b"]},
                counters={"samples": 123, "batches": 4}, fsync=False)
    assert v == 1 and current_version(tmp_path) == 1
    ck = load_current(tmp_path)
    try:
        assert ck.version == 1 and ck.model_config == {"dim": 4, "layers": [3, 1]}
        assert ck.manifest["features"] == {"names": ["a", "b"]}
        assert ck.manifest["counters"] == {"samples": 123, "batches": 4}
        for k, want in m.state_dict().items():
            assert torch.equal(ck.dense[k], want)
        assert ck.optimizer is not None and ck.optimizer["state"][0]["step"] == 1
        keys = np.arange(50, dtype=np.int64) * 7
        got, found = ck.tables["items"].find(keys, include_state=True)
        want, _ = table.find(keys, include_state=True)
        assert found.all() and np.array_equal(got, want)
        m2 = _module(1)
        m2.load_state_dict(ck.dense)
        assert torch.equal(m2(torch.ones(1, 4)), m(torch.ones(1, 4)))
    finally:
        for t in ck.tables.values():
            t.close()
        table.close()


def test_versions_increase_and_old_ones_are_pruned(tmp_path: Path) -> None:
    for i in range(5):
        assert publish(tmp_path, _module(i).state_dict(), keep=2, fsync=False) == i + 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("v")) == ["v000004", "v000005"]
    ck = load_current(tmp_path, tables=False)
    assert ck.version == 5 and torch.equal(ck.dense["0.weight"], _module(4).state_dict()["0.weight"])


@pytest.mark.parametrize("damage", ["flip_dense", "truncate_table", "manifest", "current", "missing"])
def test_corruption_is_refused(tmp_path: Path, damage: str) -> None:
    table = _table(20)
    publish(tmp_path, _module(0).state_dict(), tables={"t": table}, fsync=False)
    table.close()
    vdir = tmp_path / "v000001"
    if damage == "flip_dense":
        p = vdir / "dense.pt"
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 1
        p.write_bytes(bytes(b))
        match = "dense.pt.*crc32"
    elif damage == "truncate_table":
        p = max((f for f in (vdir / "tables").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size - 1)
        match = "bytes, the manifest says"
    elif damage == "manifest":
        p = vdir / "MANIFEST.json"
        p.write_bytes(p.read_bytes().replace(b'"samples"', b'"sampleZ"', 1) + b" ")
        match = "MANIFEST.json.*CURRENT says"
    elif damage == "current":
        (tmp_path / "CURRENT").write_bytes(b"v000001\n")
        match = "malformed"
    else:
        (vdir / "dense.pt").unlink()
        match = "dense.pt: checkpoint refused: listed in the manifest"
    with pytest.raises(CheckpointError, match=match):
        load_current(tmp_path)


# The publisher runs in a child that SIGKILLs itself at one step of its second publish.
_CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    import streamrec.model.checkpoint as ck
    from streamrec.store.table import EmbeddingTable
    import numpy as np
    torch.set_num_threads(1)
    model_dir, step = sys.argv[1], sys.argv[2]
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    table = EmbeddingTable(dim=4, huge_pages=False)
    table.insert_or_assign(np.arange(10, dtype=np.int64), np.ones((10, 4), np.float32))
    dense = {"w": torch.full((3,), 2.0)}
    if step == "dense":
        real_save = torch.save
        def half_save(obj, path):
            real_save(obj, path)
            with open(path, "r+b") as f:
                f.truncate(10)
            die()
        torch.save = half_save
    elif step == "table":
        EmbeddingTable.snapshot = die
    elif step == "manifest":
        real_write = ck._write_version
        def write_then_die(tmp, *a):
            real_write(tmp, *a)
            (tmp / "MANIFEST.json").write_bytes(b"{")
            die()
        ck._write_version = write_then_die
    elif step in ("rename", "current_tmp"):
        # os is the global module (the table snapshot renames too): die only at the publish's own step
        real = os.rename if step == "rename" else os.replace
        def hook(src, dst):
            if os.path.basename(src).startswith(".tmp-v") or os.path.basename(dst) == "CURRENT" and (
                    os.path.dirname(os.path.abspath(dst)) == os.path.abspath(model_dir)):
                die()
            real(src, dst)
        setattr(os, "rename" if step == "rename" else "replace", hook)
    ck.publish(model_dir, dense, tables={"t": table})
""")


@pytest.mark.parametrize("step", ["dense", "table", "manifest", "rename", "current_tmp"])
def test_crash_mid_publish_keeps_previous_version(tmp_path: Path, step: str) -> None:
    publish(tmp_path, {"w": torch.full((3,), 1.0)}, model_config={"v": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), step], env=env, timeout=120,
                         capture_output=True, text=True)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert current_version(tmp_path) == 1
    ck = load_current(tmp_path)
    assert ck.version == 1 and torch.equal(ck.dense["w"], torch.full((3,), 1.0))
    # the next publish clears the leftovers and gets the next number
    assert publish(tmp_path, {"w": torch.full((3,), 3.0)}, fsync=False) == 2
    assert torch.equal(load_current(tmp_path).dense["w"], torch.full((3,), 3.0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp", "CURRENT.tmp"))]


def test_one_publisher_at_a_time(tmp_path: Path) -> None:
    import fcntl

    publish(tmp_path, {"w": torch.zeros(1)}, fsync=False)
    fd = os.open(tmp_path / ".publish.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(CheckpointError, match="another process is publishing"):
            publish(tmp_path, {"w": torch.ones(1)}, fsync=False)
    finally:
        os.close(fd)
    assert load_current(tmp_path).version == 1
