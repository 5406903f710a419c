"""The embedded runner: exactly once across a SIGKILL (real subprocesses), file and generator sources
agree, subscribers see what the files hold, every impression is emitted once, config files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamrec.errors import ConfigError
from streamrec.pipeline.generate import GeneratorConfig, write_events
from streamrec.pipeline.join import JoinConfig
from streamrec.pipeline.runner import EmbeddedRunner, PipelineConfig, committed_files, load_pipeline_config

ROOT = Path(__file__).resolve().parents[2]
GEN = GeneratorConfig(users=300, items=3000, categories=20, impressions_per_s=2000.0, seed=3)
# Late and duplicate copies within 20 s, so the stream's tail (steps until the last copy arrives) is short.
SMALL = {"users": 300, "items": 3000, "categories": 20, "impressions_per_s": 2000.0, "seed": 3,
         "late_delay_s": [5.0, 20.0], "duplicate_delay_s": 5.0, "reaction_delay_s": 3.0}


def toml(tmp: Path, out: str, **top: object) -> Path:
    lines = [f'output = "{tmp / out}"', "events = 24000", "batch_ms = 1000", "checkpoint_every = 10",
             "rows_per_file = 3000", "progress = false"]
    lines += [f"{k} = {v!r}".replace("'", '"') for k, v in top.items()]
    lines += ["[join]", "window_s = 30", 'policy = "eager"', 'late = "correct"', "late_horizon_s = 60",
              "huge_pages = false", "[generator]"]
    lines += [f"{k} = {v!r}" for k, v in SMALL.items()]  # lists and floats: TOML as Python prints them
    path = tmp / f"{out}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def samples_of(output: Path) -> pa.Table:
    files = committed_files(output)
    assert files and all(f.exists() for f in files)
    assert sorted(p.name for p in output.glob("part-*")) == sorted(f.name for f in files)  # nothing else
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return table.sort_by([(c, "ascending") for c in ("request_id", "item_id", "kind", "emit_ts_ms",
                                                      "click", "like", "follow", "finish", "skip", "share")])


def cli(config: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "streamrec.cli", "pipeline", "run", "--config", str(config), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigkill_mid_stream_then_resume_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """A run killed with SIGKILL after two checkpoints, then resumed, writes exactly the samples of an
    uninterrupted run (eager with corrections, late corrections, features: every kind of state)."""
    whole = toml(tmp_path, "whole", features="default")
    p = cli(whole)
    assert p.wait(timeout=600) == 0, p.stdout.read().decode() if p.stdout else ""
    broken = toml(tmp_path, "broken", features="default", pace=5.0)
    p = cli(broken)
    ck = tmp_path / "broken" / "_checkpoints"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # two checkpoints in, mid-stream
        cur = ck / "CURRENT"
        if cur.exists() and cur.read_text() >= "epoch-000003":
            break
        assert p.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert '"finished": false' in (ck / (ck / "CURRENT").read_text() / "state.json").read_text()
    fast = toml(tmp_path, "broken", features="default")  # the same run, no longer paced
    p = cli(fast)
    assert p.wait(timeout=600) == 0, p.stdout.read().decode() if p.stdout else ""
    a, b = samples_of(tmp_path / "whole"), samples_of(tmp_path / "broken")
    assert a.num_rows > 5000 and set(a.column("kind").to_pylist()) >= {0, 1, 2, 3}
    assert b.equals(a)


def test_files_and_generator_agree_and_subscribers_see_the_files(tmp_path: Path) -> None:
    write_events(GEN, tmp_path / "events", events=8_000, rows_per_file=3000)
    common: dict[str, Any] = {"batch_ms": 500, "checkpoint_every": 5, "progress": False, "events": 8_000,
                              "generator": GEN}
    join = JoinConfig(window_s=30, huge_pages=False)
    gen = EmbeddedRunner(PipelineConfig(output=str(tmp_path / "gen"), join=join, **common), resume=False)
    seen: list[pa.RecordBatch] = []
    sub = gen.subscribe()
    import threading

    t = threading.Thread(target=lambda: seen.extend(sub))
    t.start()
    stats = gen.run()
    t.join(timeout=60)
    files = EmbeddedRunner(PipelineConfig(output=str(tmp_path / "files"), join=join, source="files",
                                          impressions=str(tmp_path / "events" / "impressions"),
                                          actions=str(tmp_path / "events" / "actions"), **common),
                           resume=False)
    files.run()
    a, b = samples_of(tmp_path / "gen"), samples_of(tmp_path / "files")
    assert b.equals(a)
    assert pa.Table.from_batches(seen).num_rows == a.num_rows == stats.samples
    # at_close: one sample per impression that was neither a duplicate nor late
    c = gen.join.counts
    assert a.num_rows == c["impressions"] - c["duplicate_impressions"] - c["late_impressions"]
    assert set(a.column("kind").to_pylist()) == {0}
    assert len(set(zip(a.column("request_id").to_pylist(), a.column("item_id").to_pylist(),
                       strict=True))) == a.num_rows
    # a finished run started again does nothing more
    again = EmbeddedRunner(PipelineConfig(output=str(tmp_path / "gen"), join=join, **common))
    assert again.run().samples == stats.samples


def test_bad_events_in_files_go_to_dead_letters_and_change_no_sample(tmp_path: Path) -> None:
    """source = "files": JSONL files with bad events beside the good ones; the run never stops, every bad
    event is in the dead-letter file with its reason, and the samples equal those of the clean files."""
    import json
    import shutil

    write_events(GEN, tmp_path / "clean", events=8_000, rows_per_file=3000)
    shutil.copytree(tmp_path / "clean", tmp_path / "dirty")
    t0 = GEN.start_ms
    bad_imps = [{"request_id": 1, "user_id": 2, "item_id": 3, "ts_ms": t0, "position": 0, "category": 1,
                 "device": 0},                                              # no hour
                {"request_id": "x", "user_id": 2, "item_id": 3, "ts_ms": t0, "position": 0, "category": 1,
                 "device": 0, "hour": 1},                                   # mistyped id
                {"request_id": 1, "user_id": -5, "item_id": 3, "ts_ms": t0, "position": 0, "category": 1,
                 "device": 0, "hour": 1}]                                   # id out of range
    bad_acts = [{"request_id": 1, "user_id": 2, "item_id": 3, "ts_ms": t0, "action": 99, "value": 0.0},
                {"request_id": 1, "user_id": 2, "item_id": 3, "ts_ms": t0, "action": "warp", "value": 0.0},
                {"request_id": 1, "user_id": 2, "item_id": 3, "ts_ms": t0, "value": 0.0}]
    for kind, rows in (("impressions", bad_imps), ("actions", bad_acts)):
        (tmp_path / "dirty" / kind / "0000-bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    join = JoinConfig(window_s=30, huge_pages=False)
    runs = {}
    for name in ("clean", "dirty"):
        r = EmbeddedRunner(PipelineConfig(output=str(tmp_path / f"out-{name}"), join=join, source="files",
                                          impressions=str(tmp_path / name / "impressions"),
                                          actions=str(tmp_path / name / "actions"), batch_ms=500,
                                          progress=False), resume=False)
        runs[name] = r.run()
    assert samples_of(tmp_path / "out-dirty").equals(samples_of(tmp_path / "out-clean"))
    assert runs["clean"].dead_letters == {} and sum(runs["dirty"].dead_letters.values()) == 6
    lines = [json.loads(x) for x in (tmp_path / "out-dirty" / "_dead_letters.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(x["reason"] for x in lines)
    assert {x["kind"] for x in lines} == {"impressions", "actions"}


def test_config_file_errors_name_the_field(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text("batch_ms = 0\n")
    with pytest.raises(ConfigError, match="batch_ms"):
        load_pipeline_config(p)
    p.write_text("[join]\nwindow = 30\n")
    with pytest.raises(ConfigError, match=r"join\.window"):
        load_pipeline_config(p)
    p.write_text('features = "default"\n[join]\nwindow_s = 60\n'
                 "[generator]\nusers = 5\nrare_period = [10, 20]\n")
    cfg = load_pipeline_config(p)
    assert cfg.join.window_s == 60 and cfg.generator.users == 5 and cfg.generator.rare_period == (10, 20)
    example = load_pipeline_config(ROOT / "examples" / "pipeline.toml")
    assert example.features == "default" and example.join == JoinConfig()


def test_a_checkpoint_of_another_join_config_is_refused(tmp_path: Path) -> None:
    kw: dict[str, Any] = {"output": str(tmp_path / "o"), "events": 3000, "generator": GEN, "progress": False}
    EmbeddedRunner(PipelineConfig(join=JoinConfig(window_s=30, huge_pages=False), **kw)).run(max_batches=3)
    with pytest.raises(ConfigError, match="join"):
        EmbeddedRunner(PipelineConfig(join=JoinConfig(window_s=60, huge_pages=False), **kw))
