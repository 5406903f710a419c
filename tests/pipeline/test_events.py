"""Events and sources: dead letters of every kind, format round trips, tail mode, exact resume."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamrec.pipeline.deadletter import DeadLetters
from streamrec.pipeline.events import (
    ACTION_SCHEMA,
    ACTIONS,
    IMPRESSION_SCHEMA,
    EventReader,
    ValidationConfig,
    read_events,
    validate,
)
from streamrec.pipeline.generate import GeneratorConfig, generate, write_events
from streamrec.pipeline.sources import FileSource, IteratorSource, Offset, _columns_from_rows

T0 = 1_767_225_600_000
SMALL = GeneratorConfig(users=200, items=2000, categories=20, impressions_per_s=2000,
                        late_delay_s=(5.0, 20.0), duplicate_delay_s=3.0)


def _action(i: int, **over: Any) -> dict[str, Any]:
    row = {"request_id": i, "user_id": i % 7, "item_id": 100 + i, "ts_ms": T0 + 1000 * i, "action": 1,
           "value": 0.0}
    row.update(over)
    return row


def _write_jsonl(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


def test_every_kind_of_bad_event_goes_to_dead_letters_and_the_stream_goes_on(tmp_path: Path) -> None:
    d = tmp_path / "actions"
    d.mkdir()
    good1 = [_action(i) for i in range(10)]
    bad1 = {
        "missing:user_id": {k: v for k, v in _action(90).items() if k != "user_id"},
        "missing:ts_ms": _action(91, ts_ms=None),
        "mistyped:item_id": _action(92, item_id="not-a-number"),
        "mistyped:request_id": _action(93, request_id=1.5),
        "mistyped:value": _action(94, value=[1, 2]),
        "id_out_of_range:user_id": _action(95, user_id=-3),
        "id_out_of_range:item_id": _action(96, item_id=2**53),
        "unknown_action": _action(97, action=0),
        "out_of_range:value": _action(98, value=-1.0),
        "future": _action(99, ts_ms=T0 + 10**9),
    }
    lines = [json.dumps(r) for r in good1[:5]] + [json.dumps(r) for r in bad1.values()]
    lines += ["{not json", json.dumps([1, 2, 3])] + [json.dumps(r) for r in good1[5:]]
    _write_jsonl(d / "part-000.jsonl", lines)
    # A second file, read after the frontier reached T0 + 9 s: a row 2 h older is too late.
    good2 = [_action(i, action="like") for i in range(10, 15)]
    good2.append(_action(15, action=ACTIONS["finish"], value=12.5))
    bad2 = {"too_late": _action(16, ts_ms=T0 - 7_200_000),
            "unknown_action#name": _action(17, action="teleport")}
    _write_jsonl(d / "part-001.jsonl", [json.dumps(r) for r in good2 + list(bad2.values())])

    dl_path = tmp_path / "dead" / "letters.jsonl"
    with DeadLetters(dl_path) as dl:
        out = list(read_events(d, "actions", dead_letters=dl))
    got = pa.Table.from_batches(out).to_pylist()
    want = good1 + [dict(r, action=ACTIONS["like"]) for r in good2[:5]] + [good2[5]]
    assert got == want  # every good row, untouched, in event-time order
    expected = {k.split("#")[0]: 0 for k in [*bad1, *bad2]}
    for k in [*bad1, *bad2]:
        expected[k.split("#")[0]] += 1
    expected["malformed"] = 2
    assert dict(dl.count) == expected
    written = [json.loads(line) for line in dl_path.read_text().splitlines()]
    assert sorted(w["reason"] for w in written) == sorted(dl.count.elements())
    by_reason = {w["reason"]: w["event"] for w in written}
    assert by_reason["mistyped:item_id"]["item_id"] == "not-a-number"
    assert by_reason["future"]["ts_ms"] == T0 + 10**9
    assert {w["kind"] for w in written} == {"actions"}


def test_csv_rows_are_typed_and_bad_ones_refused(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.csv").write_text("request_id,user_id,item_id,ts_ms,action,value\n"
                             f"1,2,3,{T0},click,0\n"
                             f"2,abc,3,{T0},1,0\n"
                             f"3,,3,{T0},1,0\n"
                             f"4,2,3,{T0},4\n"
                             f"5,2,3,{T0 + 5},finish,12.5\n")
    with DeadLetters(tmp_path / "dl.jsonl") as dl:
        out = pa.Table.from_batches(list(read_events(d, "actions", dead_letters=dl)))
    assert out.to_pylist() == [_action(1, user_id=2, item_id=3, ts_ms=T0),
                               _action(5, user_id=2, item_id=3, ts_ms=T0 + 5, action=4, value=12.5)]
    assert dl.count == {"mistyped:user_id": 1, "missing:user_id": 1, "malformed": 1}


def test_an_unreadable_file_is_a_dead_letter_and_the_next_file_is_read(tmp_path: Path) -> None:
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.parquet").write_bytes(b"PAR1 torn")
    _write_jsonl(d / "b.jsonl", [json.dumps(_action(1))])
    with DeadLetters(tmp_path / "dl.jsonl") as dl:
        out = list(read_events(d, "actions", dead_letters=dl))
    assert [b.num_rows for b in out] == [1] and dl.count == {"malformed": 1}
    assert "a.parquet" in (tmp_path / "dl.jsonl").read_text()


def test_validate_impressions_ranges_and_nullable_ground_truth() -> None:
    imps, _ = next(generate(SMALL))
    rows = imps.slice(0, 6).to_pylist()
    rows[1]["hour"] = 24
    rows[2]["gt_click"] = 1.5
    rows[3]["gt_like"] = None  # nullable: fine
    rows[4]["position"] = -1
    del rows[5]["category"]
    table = pa.Table.from_pylist(rows).append_column("extra", pa.array(["ignored"] * 6))
    split = validate(table, "impressions", watermark_ms=T0)
    assert list(split.reasons) == ["out_of_range:hour", "out_of_range:gt_click", "out_of_range:position",
                                   "missing:category"]
    assert split.good.schema == IMPRESSION_SCHEMA
    assert split.good.to_pylist() == [rows[0], rows[3]]
    assert split.bad.num_rows == 4 and "extra" in split.bad.schema.names


def test_an_exact_batch_passes_through_without_a_copy() -> None:
    imps, acts = next(generate(SMALL))
    for batch, kind in ((imps, "impressions"), (acts, "actions")):
        split = validate(batch, kind)
        assert split.bad.num_rows == 0 and split.good.equals(batch)
        assert split.good.column(0).buffers()[1].address == batch.column(0).buffers()[1].address


def test_wall_clock_refuses_the_future_and_event_clock_follows_the_stream() -> None:
    batch = pa.RecordBatch.from_pylist([_action(0, ts_ms=4_000_000_000_000)], schema=ACTION_SCHEMA)
    wall = EventReader(IteratorSource([batch]), "actions", config=ValidationConfig(clock="wall"))
    assert wall.read(10).num_rows == 0 and wall.refused == 1  # year 2096
    event = EventReader(IteratorSource([batch]), "actions")
    assert event.read(10).num_rows == 1


def _generated_tables(events: int) -> tuple[pa.Table, pa.Table]:
    pairs = list(generate(SMALL, events=events))
    return (pa.Table.from_batches([p[0] for p in pairs], schema=IMPRESSION_SCHEMA),
            pa.Table.from_batches([p[1] for p in pairs], schema=ACTION_SCHEMA))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_each_format_round_trips_the_same_events_in_order(tmp_path: Path, fmt: str) -> None:
    imps, acts = _generated_tables(20_000)
    rows_per_file = 4_000
    write_events(SMALL, tmp_path, events=20_000, fmt=fmt, rows_per_file=rows_per_file)
    assert not list(tmp_path.rglob("*.tmp"))
    for kind, table in (("impressions", imps), ("actions", acts)):
        files = sorted((tmp_path / kind).iterdir())
        assert len(files) >= 2 and all(f.suffix == f".{fmt}" for f in files)
        with DeadLetters(None) as dl:
            out = list(read_events(tmp_path / kind, kind, dead_letters=dl, max_rows=1_000_000))
        assert dl.total == 0
        assert len(out) == len(files)  # one batch per file at this max_rows
        got = pa.Table.from_batches(out)
        # Files hold the stream in arrival order; a batch (here, a file) comes out sorted by ts_ms.
        want, lo = [], 0
        for b in out:
            part = table.slice(lo, b.num_rows)
            want.append(part.take(np.argsort(part.column("ts_ms").to_numpy(), kind="stable")))
            lo += b.num_rows
        assert lo == table.num_rows
        assert got.equals(pa.concat_tables(want).combine_chunks()), (fmt, kind)


def test_tail_mode_takes_new_files_once_complete(tmp_path: Path) -> None:
    src = FileSource(tmp_path, tail=True, poll_s=0.0)
    reader = EventReader(src, "actions")
    assert reader.read(100) is None and not reader.finished
    _write_jsonl(tmp_path / "part-001.jsonl", [json.dumps(_action(i)) for i in range(3)])
    assert reader.read(100).column("request_id").to_pylist() == [0, 1, 2]
    tmp = tmp_path / "part-002.jsonl.tmp"
    tmp.write_text(json.dumps(_action(3)) + "\n")  # still being written: not taken
    (tmp_path / "_part-002.jsonl").write_text(json.dumps(_action(3)) + "\n")
    assert reader.read(100) is None
    os.replace(tmp, tmp_path / "part-002.jsonl")
    assert reader.read(100).column("request_id").to_pylist() == [3]
    _write_jsonl(tmp_path / "part-000.jsonl", [json.dumps(_action(9))])  # sorts before one already read
    assert reader.read(100) is None and src.skipped_files == 1
    _write_jsonl(tmp_path / "part-003.jsonl", [json.dumps(_action(4))])
    assert reader.read(100).column("request_id").to_pylist() == [4]


def test_read_events_in_tail_mode_ends_after_its_idle_timeout(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "a.jsonl", [json.dumps(_action(i)) for i in range(5)])
    out = list(read_events(tmp_path, "actions", tail=True, poll_s=0.01, idle_timeout_s=0.1))
    assert sum(b.num_rows for b in out) == 5


def _file_dir(tmp_path: Path, sizes: list[int], fmt: str) -> pa.Table:
    tables = []
    start = 0
    for i, n in enumerate(sizes):
        rows = [_action(start + j, ts_ms=T0 + 1000 * (start + j) - 500 * (j % 3)) for j in range(n)]
        start += n
        t = pa.Table.from_pylist(rows, schema=ACTION_SCHEMA)
        tables.append(t)
        path = tmp_path / f"part-{i:03d}.{fmt}"
        if fmt == "parquet":
            pq.write_table(t, path)
        else:
            _write_jsonl(path, [json.dumps(r) for r in rows])
    return pa.concat_tables(tables)


def _drain(reader: EventReader, sizes: list[int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    i = 0
    while True:
        b = reader.read(sizes[i % len(sizes)])
        i += 1
        if b is None:
            return rows
        rows += b.to_pylist()


@given(sizes=st.lists(st.integers(0, 12), min_size=1, max_size=5),
       reads=st.lists(st.integers(1, 9), min_size=1, max_size=4), cut=st.integers(0, 30),
       fmt=st.sampled_from(["parquet", "jsonl"]))
def test_offset_save_and_seek_resume_exactly(tmp_path_factory: pytest.TempPathFactory, sizes: list[int],
                                              reads: list[int], cut: int, fmt: str) -> None:
    d = tmp_path_factory.mktemp("resume")
    _file_dir(d, sizes, fmt)
    full = _drain(EventReader(FileSource(d), "actions"), reads)
    assert sorted(r["request_id"] for r in full) == list(range(sum(sizes)))
    first = EventReader(FileSource(d), "actions")
    before: list[dict[str, Any]] = []
    for i in range(cut):
        b = first.read(reads[i % len(reads)])
        if b is None:
            break
        before += b.to_pylist()
    saved = Offset.from_dict(json.loads(json.dumps(first.offset.to_dict())))
    second = EventReader(FileSource(d), "actions")
    second.seek(saved)
    after = _drain(second, reads[cut % len(reads):] + reads[:cut % len(reads)])
    # Batch boundaries may differ after the resume, so compare rows as a multiset in read order per file.
    def key(r: dict[str, Any]) -> int:
        return int(r["request_id"])

    assert sorted(before + after, key=key) == sorted(full, key=key)
    assert len(before) + len(after) == len(full)


@given(sizes=st.lists(st.integers(0, 10), min_size=1, max_size=6), cut=st.integers(0, 12),
       step=st.integers(1, 7))
def test_iterator_source_resumes_exactly(sizes: list[int], cut: int, step: int) -> None:
    batches = []
    start = 0
    for n in sizes:
        rows = [_action(start + j) for j in range(n)]
        batches.append(pa.RecordBatch.from_pylist(rows, schema=ACTION_SCHEMA))
        start += n
    first = IteratorSource(lambda: iter(batches))
    seen = []
    for _ in range(cut):
        b = first.read(step)
        if b is None:
            break
        seen += b.column("request_id").to_pylist()
    again = IteratorSource(lambda: iter(batches))
    again.seek(first.offset)
    while (b := again.read(step)) is not None:
        seen += b.column("request_id").to_pylist()
    assert seen == list(range(start)) and again.finished


def test_a_plain_iterator_cannot_seek_back() -> None:
    batches = [pa.RecordBatch.from_pylist([_action(i)], schema=ACTION_SCHEMA) for i in range(3)]
    src = IteratorSource(iter(batches))
    src.read(5)
    src.read(5)
    with pytest.raises(ValueError, match="callable"):
        src.seek(Offset(0, 0))


def test_dead_letters_to_parquet(tmp_path: Path) -> None:
    path = tmp_path / "dl.parquet"
    batch = pa.RecordBatch.from_pylist([_action(0), _action(1, action=42), _action(2, user_id=-1)])
    with DeadLetters(path) as dl:
        split = validate(batch, "actions")
        dl.write("actions", split.bad, split.reasons)
    t = pq.read_table(path)
    assert t.column("reason").to_pylist() == ["unknown_action", "id_out_of_range:user_id"]
    assert json.loads(t.column("event")[0].as_py())["action"] == 42
    assert dl.count == {"unknown_action": 1, "id_out_of_range:user_id": 1}


# -- validate against a per-row reference ------------------------------------------------------------------

_INT = re.compile(r"[+-]?\d{1,18}")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,3})?")


def _reference(rows: list[dict[str, Any]], kind: str, watermark: int | None,
               cfg: ValidationConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """Validation one row and one value at a time, straight from validate's docstring."""
    schema = IMPRESSION_SCHEMA if kind == "impressions" else ACTION_SCHEMA
    out: list[dict[str, Any] | None] = []
    why: list[str | None] = []
    for row in rows:
        conv: dict[str, Any] = {}
        reason = None
        for f in schema:
            v = row.get(f.name)
            is_int = pa.types.is_integer(f.type)
            if v is None:
                if not f.nullable:
                    reason = reason or f"missing:{f.name}"
                conv[f.name] = None
                continue
            ok = True
            if f.name == "action" and isinstance(v, str) and v.strip().lower() in ACTIONS:
                v = ACTIONS[v.strip().lower()]
            elif isinstance(v, str):
                s = v.strip()
                ok = bool((_INT if is_int else _FLOAT).fullmatch(s))
                v = (int(s) if is_int else float(s)) if ok else 0
            elif isinstance(v, float) and is_int:
                ok = math.isfinite(v) and v == math.floor(v) and abs(v) < 2.0**63
                v = int(v) if ok else 0
            if not ok:
                reason = reason or ("unknown_action" if f.name == "action" else f"mistyped:{f.name}")
            conv[f.name] = v
        checks = [(f"id_out_of_range:{n}", lambda x: 0 <= x < 2**53, n)
                  for n in ("request_id", "user_id", "item_id")]
        checks += [(f"out_of_range:{n}", lambda x: 0 <= x <= 2**31 - 1, n)
                   for n in ("position", "category", "device")]
        checks += [("out_of_range:hour", lambda x: 0 <= x <= 23, "hour"),
                   ("out_of_range:value", lambda x: math.isfinite(x) and x >= 0, "value")]
        checks += [(f"out_of_range:{n}", lambda x: 0 <= x <= 1, n)
                   for n in ("gt_click", "gt_like", "gt_finish")]
        checks += [("unknown_action", lambda x: x in ACTIONS.values(), "action"),
                   ("out_of_range:ts_ms", lambda x: x >= 0, "ts_ms")]
        for name, good, field in checks:
            if reason is None and field in schema.names and conv[field] is not None and not good(conv[field]):
                reason = name
        out.append(conv)
        why.append(reason)
    ok_ts = [r["ts_ms"] for r, w in zip(out, why, strict=True) if w is None]
    if ok_ts and cfg.max_future_ms is not None:
        ref = int(np.median(np.array(ok_ts, np.int64)))
        why = [w or ("future" if r["ts_ms"] > ref + cfg.max_future_ms else None)
               for r, w in zip(out, why, strict=True)]
    if watermark is not None and cfg.allowed_lateness_ms is not None:
        why = [w or ("too_late" if r["ts_ms"] < watermark - cfg.allowed_lateness_ms else None)
               for r, w in zip(out, why, strict=True)]
    good_rows = [r for r, w in zip(out, why, strict=True) if w is None]
    return good_rows, [w for w in why if w is not None]


_ABSENT = object()


def _mostly(valid: st.SearchStrategy[Any], *bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Valid about 9 times in 10, so rows reach the later checks (a draw of 0 picks a bad value)."""
    return st.tuples(st.integers(0, 9), valid, st.one_of(*bad, st.none(), st.just(_ABSENT))).map(
        lambda t: t[1] if t[0] else t[2])


def _values(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    ints = _mostly(st.integers(0, 50), st.integers(-5, -1), st.sampled_from([2**53 - 1, 2**53, 2**63 + 5]),
                   st.sampled_from([3.0, 1.5, float("inf"), 2.0**53]),
                   st.sampled_from(["12", " 7 ", "x", "1e3", "-4", ""]), st.just(True))
    small = _mostly(st.integers(0, 23), st.sampled_from([24, -1, 2**31]),
                    st.sampled_from([2.0, 0.5, "3", "z"]))
    floats = _mostly(st.sampled_from([0.0, 0.25, 1.0]),
                     st.sampled_from([12.5, -1.0, float("inf"), float("nan"), "0.5", "1e1", "abc"]),
                     st.integers(0, 3))
    ts = _mostly(st.integers(T0 - 10_000, T0 + 10_000),
                 st.sampled_from([T0 + 3_600_000 + k for k in (-20_000, 20_000, 40_000)]),
                 st.sampled_from([T0 + 10**10, T0 - 10**10, -5]))
    fields: dict[str, st.SearchStrategy[Any]] = {"request_id": ints, "user_id": ints, "item_id": ints,
                                                 "ts_ms": ts}
    if kind == "actions":
        fields |= {"action": _mostly(st.integers(1, 6), st.integers(-1, 8),
                                     st.sampled_from(["click", " Like", "teleport", "4"])),
                   "value": floats}
    else:
        fields |= {"position": small, "category": small, "device": small, "hour": small,
                   "gt_click": floats, "gt_like": floats, "gt_finish": floats}
    return st.fixed_dictionaries(fields).map(lambda d: {k: v for k, v in d.items() if v is not _ABSENT})


@given(data=st.data(), kind=st.sampled_from(["impressions", "actions"]), n=st.integers(1, 40),
       watermark=st.one_of(st.none(), st.integers(T0 - 4_000_000, T0 + 4_000_000)))
def test_validate_agrees_with_a_per_row_reference(data: st.DataObject, kind: str, n: int,
                                                   watermark: int | None) -> None:
    rows = data.draw(st.lists(_values(kind), min_size=n, max_size=n))
    table = _columns_from_rows(rows)
    cfg = ValidationConfig()
    split = validate(table, kind, watermark_ms=watermark, config=cfg)
    want_good, want_why = _reference(table.to_pylist(), kind, watermark, cfg)
    assert list(split.reasons) == want_why
    schema = IMPRESSION_SCHEMA if kind == "impressions" else ACTION_SCHEMA
    assert split.good.equals(pa.RecordBatch.from_pylist(want_good, schema=schema))
    assert split.bad.num_rows == len(want_why)
