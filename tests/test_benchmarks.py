"""Every benchmark runs at its ``--smoke`` size and prints the JSON keys it documents.

Each ``benchmarks/NAME.py`` holds ``KEYS``, the keys of the JSON object its
``--json`` prints last; this runs each one in a subprocess with ``--smoke
--json`` (a few seconds each once numba's cache is warm) and checks that the
object has exactly those keys, that BENCHMARKS.md names each of them, and the
figures a smoke run can vouch for (the label of every parameter-server path,
that skipped baselines are skipped only for the reason given). A benchmark left
behind by a refactor fails here instead of on the next full run.

The benchmarks verify their own answers and fail loudly; the unit tests at
the end check that those checks can fail (a fallback to TCP under another
label, a wrong row).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

# Named one by one so each benchmark's smoke run is a test id of its own;
# test_every_benchmark_is_named fails when a new one is not added here.
NAMES = ("fanout", "features", "generate", "model", "pipeline", "propagation", "ps", "ps_ab", "replication",
         "sequence", "serving", "store", "store_churn", "store_restart", "store_tiers")
HAS_REDIS = shutil.which("redis-server") is not None
HAS_UCXX = importlib.util.find_spec("ucxx") is not None


def _keys_of(name: str) -> tuple[str, ...]:
    """The module-level ``KEYS`` literal of ``benchmarks/NAME.py`` (read, not imported)."""
    tree = ast.parse((BENCH / f"{name}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "KEYS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"benchmarks/{name}.py has no KEYS constant")


def _run(name: str, tmp_path: Path) -> dict[str, Any]:
    extra = {"ps_ab": ["--base", "HEAD"], "propagation": ["--plot", str(tmp_path / "cdf.png")]}.get(name, [])
    if name == "store_restart":  # through the CLI once, which must pass --smoke and --json on
        cmd = [sys.executable, "-m", "streamrec.cli", "bench", name, "--smoke", "--json"]
    else:
        cmd = [sys.executable, str(BENCH / f"{name}.py"), "--smoke", "--json", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{name} --smoke failed ({done.returncode}):\n{done.stderr[-4000:]}"
    lines = done.stdout.strip().splitlines()
    assert lines, f"{name} printed nothing on stdout:\n{done.stderr[-2000:]}"
    out = json.loads(lines[-1])
    assert isinstance(out, dict)
    return out


def _finite(obj: Any, where: str) -> None:
    if isinstance(obj, float):
        assert math.isfinite(obj), f"{where} is {obj}"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _finite(v, f"{where}[{i}]")


def test_every_benchmark_is_named() -> None:
    on_disk = sorted(p.stem for p in BENCH.glob("*.py") if not p.name.startswith("_"))
    assert list(NAMES) == on_disk


# ps_ab last: it reuses the kernels the others compiled.
@pytest.mark.parametrize("name", sorted(NAMES, key=lambda n: n == "ps_ab"))
def test_smoke_run_prints_documented_keys(name: str, tmp_path: Path) -> None:
    keys = _keys_of(name)
    documented = (ROOT / "BENCHMARKS.md").read_text()
    missing = [k for k in keys if f"`{k}`" not in documented]
    assert not missing, f"BENCHMARKS.md does not name {name}'s JSON keys {missing}"
    out = _run(name, tmp_path)
    assert set(out) == set(keys), f"{name}: JSON keys {sorted(out)} but KEYS {sorted(keys)}"
    _finite(out, name)
    if name == "ps":
        _check_ps(out)
    elif name == "store":
        assert (out["find_over_redis"] is not None) == HAS_REDIS
        assert out["find_over_dict"] > 0 and out["gather_huge_over_4k"] > 0
    elif name == "ps_ab":
        assert len(out["ratios"]) == 1 and out["this_over_base"] > 0
    elif name == "model":  # even at smoke size, one history per request beats 32 copies of it
        assert out["rlb_speedup"] > 1 and out["cost_ratio_10k_over_1k"] > 1


def _check_ps(out: dict[str, Any]) -> None:
    measured = {"one_sided", "shm", "tcp", "grpc", "conventional"}
    measured |= {"rdma"} if HAS_UCXX else set()
    measured |= {"redis"} if HAS_REDIS else set()
    assert {p for p, v in out["keys_per_s"].items() if v is not None} == measured
    for path in ("one_sided", "shm", "rdma", "tcp"):
        counts = out["by_transport"][path]
        if path in measured:  # the benchmark asserts this itself; the JSON must say it too
            assert set(counts) == {path} and counts[path] > 0, (path, counts)
        else:
            assert counts is None
    assert out["best_path"] in measured and out["remote_best_path"] in {"tcp", "rdma"}
    for key in ("best_over_conventional", "remote_best_over_conventional", "best_over_tcp", "tcp_over_grpc"):
        assert out[key] > 0, key
    assert (out["remote_best_over_redis"] is not None) == HAS_REDIS


# -- the checks inside the benchmarks can fail -------------------------------------------


def test_a_path_that_falls_back_to_tcp_fails_its_label() -> None:
    """A client limited to shm, against a server that offers none, is served over TCP: caught."""
    from _ps_baselines import run_clients
    from _ps_ours import load_rows, make_ps_client
    from ps import WrongPath, _assert_path

    from streamrec.ps.local import LocalCluster, loopback_spec

    spec = loopback_spec(f"fallback-{os.getpid()}", zones=1, nodes_per_zone=1, shards=1, optimizer="none",
                         metrics=False)
    node = spec.nodes[0].name
    with LocalCluster(spec, args=("--no-shm",)) as cluster:
        cluster.start()
        load_rows(spec, node, 1000, 64, transports=("tcp",))
        make = functools.partial(make_ps_client, str(cluster.spec_path), "shm", node)
        res = run_clients(make, clients=1, seconds=0.2, keys=1000, batch=64, warmup_s=0.0, inline=True)
    assert res.by_transport == {"tcp": res.calls}
    with pytest.raises(WrongPath, match="shm"):
        _assert_path("shm", res)
    _assert_path("tcp", res)


def test_rows_are_checked_in_full_and_checks_stop_the_clock() -> None:
    from _common import Wrong, check_rows, key_values, paired_rates

    keys = np.array([0, 1, 2**64 - 1, 0x0123456789ABCDEF], np.uint64)
    rows = key_values(keys, 64)
    assert (rows < 2**24).all() and len({r.tobytes() for r in rows}) == keys.size
    check_rows("ok", keys, rows)
    check_rows("absent", keys, np.where([[1], [0], [1], [1]], rows, 0).astype(np.float32),
               np.array([True, False, True, True]))
    for i, j in ((0, 0), (3, 63), (2, 40)):
        bad = rows.copy()
        bad[i, j] += 1
        with pytest.raises(Wrong, match=f"key {int(keys[i])}"):
            check_rows("bad", keys, bad)

    calls = {"n": 0, "checked": 0}

    def work() -> int:
        calls["n"] += 1
        return 1

    def verify() -> None:
        calls["checked"] += 1
        if calls["n"] > 20:
            raise Wrong("the 21st answer is wrong")

    with pytest.raises(Wrong):
        paired_rates({"w": work}, rounds=50, min_seconds=0.001, verify={"w": verify}, verify_every=4)
    assert calls["checked"] >= calls["n"] // 4
