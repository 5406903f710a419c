"""The Flink runner: the sample join as a PyFlink SQL job, for when one process is not enough.

Owns: ``FlinkConfig`` and ``run_flink``, which run the embedded join's ``at_close`` semantics
(``pipeline/join.py``) as Flink SQL in the JVM, and the staging of our events into files Flink reads.

Why SQL and not Python operators: measured here, PyFlink's per-record Python DataStream operators ran at
about 0.3 k events/s (process mode) and 5 k/s (thread mode), the SQL join at about 33 k/s; the join
is where the events are, so it must not cross into Python per record.

What the job computes (the same samples as ``SampleJoin(JoinConfig(policy="at_close", late="drop"))``
on input whose events arrive in time order, which ``tests/pipeline/test_flink.py`` checks row for row):

- impressions deduplicated on (request_id, item_id), the first to arrive kept (the embedded join's rule;
  a request can show an item twice, at two positions, so staging numbers impressions in arrival order);
- actions deduplicated on (request_id, item_id, action, ts_ms);
- a LEFT join of impressions with the actions of the same (request_id, item_id) whose time is before
  the window's end (t_a < t_i + W), then per impression the label bits (an action code sets its label)
  and the sum of ``value`` (watch time); ``kind`` 0; ``emit_ts_ms`` the window's close time C(D), D
  rounded up to ``close_tick_ms`` (the embedded runner stamps the watermark it closed at instead, which
  depends on its micro-batches, so the comparison leaves that one column out).

Features: the store-free features of a ``FeatureSet`` (hashed ids, crosses, categoricals, buckets, time
parts, functions) run in the job as pandas UDFs, one per output column, each a one-feature
``FeatureSet`` computing exactly what the embedded runner computes; a ``scalar=True`` function runs as
an ordinary (row-at-a-time) UDF. Flink hands a pandas UDF whole Arrow batches, so the vectorised
kernels see batches as in the embedded runner.

Not here (said so rather than half-done): the ``eager`` policy and late corrections need a changelog
sink (an upsert table); features that read the store's windowed counters or sequences (``WindowCount``,
``Ratio``, ``Sequence``) need the store beside each Flink task, so a feature set with any of them is
refused by name; the job runs in batch mode over bounded input.
Flink's bundled formats are CSV and JSON (no Parquet jar ships with ``apache-flink``), so events are
staged as headerless CSV in schema order.

Pitfalls met and handled: Python workers are pointed at the running interpreter
(``python.executable``); results go through a filesystem sink and are read back with pyarrow, never
collected row by row; times stay ``BIGINT`` milliseconds, so no timestamp is cast on the way out.

Thread safety: ``run_flink`` starts its own JVM gateway; one call at a time per process.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from streamrec.errors import ConfigError
from streamrec.pipeline.events import ACTION_SCHEMA, ACTIONS, IMPRESSION_SCHEMA, SAMPLE_SCHEMA
from streamrec.pipeline.features import Feature, FeatureSet, Function, Ratio, Sequence, WindowCount
from streamrec.pipeline.join import JoinConfig

__all__ = ["FlinkConfig", "FlinkResult", "flink_available", "run_flink"]

_STAGED_IMPRESSIONS = IMPRESSION_SCHEMA.append(pa.field("arrival", pa.int64(), nullable=False))
_SQL_TYPES = {pa.int64(): "BIGINT", pa.int32(): "INT", pa.int8(): "TINYINT", pa.float32(): "FLOAT",
              pa.float64(): "DOUBLE"}
_STATEFUL = (WindowCount, Ratio, Sequence)


@dataclass(frozen=True)
class FlinkConfig:
    """Where and how the Flink job runs.

    Attributes:
        jobmanager: ``HOST:PORT`` of a Flink cluster's REST endpoint to submit to; ``""`` (default)
            runs Flink's local mini-cluster in this process's JVM gateway.
        parallelism: the job's default parallelism (default 1: the mini-cluster on a small machine).
        work_dir: where staged inputs and the sink's output go; ``""`` (default) a temporary directory
            removed afterwards.
    """

    jobmanager: str = ""
    parallelism: int = 1
    work_dir: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.parallelism, int) or not 1 <= self.parallelism <= 4096:
            raise ConfigError(f"must be an int in 1..4096, got {self.parallelism!r}",
                              field="flink.parallelism")
        if self.jobmanager and ":" not in self.jobmanager:
            raise ConfigError(f"must be HOST:PORT, got {self.jobmanager!r}", field="flink.jobmanager")


@dataclass(frozen=True)
class FlinkResult:
    """Samples from a Flink run (``SAMPLE_SCHEMA``, sorted by impression time, request, item) and
    the seconds spent starting the gateway and running the job."""

    samples: pa.Table
    startup_s: float
    job_s: float


def flink_available() -> str | None:
    """None if PyFlink and a Java runtime are here; else why not (for a benchmark to print)."""
    try:
        import pyflink  # noqa: F401
    except ImportError:
        return "apache-flink is not installed (pip install 'streamrec[flink]')"
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "no Java runtime (java not on PATH and JAVA_HOME unset)"
    return None


def join_sql(join: JoinConfig) -> str:
    """The INSERT statement of the join (tables ``imps``, ``acts``, ``samples_out``)."""
    W, tick = join.window_ms, join.close_tick_ms
    labels = ",\n  ".join(
        f"CAST(MAX(CASE WHEN a.action = {code} THEN 1 ELSE 0 END) AS TINYINT) AS `{name}`"
        for name, code in sorted(ACTIONS.items(), key=lambda kv: kv[1]))
    return f"""
INSERT INTO samples_out
SELECT i.request_id, i.user_id, i.item_id, i.ts_ms, i.`position`, i.category, i.device, i.`hour`,
  {labels},
  CAST(COALESCE(SUM(a.`value`), 0) AS FLOAT) AS watch_time,
  CAST(0 AS TINYINT) AS kind,
  CAST(((i.ts_ms + {W} + {tick - 1}) / {tick}) * {tick} AS BIGINT) AS emit_ts_ms,
  i.gt_click, i.gt_like, i.gt_finish
FROM (
  SELECT * FROM (
    SELECT *, ROW_NUMBER() OVER (PARTITION BY request_id, item_id ORDER BY arrival) AS rn FROM imps)
  WHERE rn = 1) AS i
LEFT JOIN (
  SELECT request_id, item_id, action, ts_ms, MIN(`value`) AS `value`
  FROM acts GROUP BY request_id, item_id, action, ts_ms) AS a
  ON i.request_id = a.request_id AND i.item_id = a.item_id AND a.ts_ms < i.ts_ms + {W}
GROUP BY i.request_id, i.user_id, i.item_id, i.ts_ms, i.`position`, i.category, i.device, i.`hour`,
  i.gt_click, i.gt_like, i.gt_finish
"""


def run_flink(impressions: Iterable[pa.RecordBatch], actions: Iterable[pa.RecordBatch], join: JoinConfig,
              config: FlinkConfig | None = None, features: FeatureSet | None = None) -> FlinkResult:
    """Run the join over the given events as a Flink job and return its samples.

    Args:
        impressions, actions: record batches of ``IMPRESSION_SCHEMA`` / ``ACTION_SCHEMA`` (validated
            events: what the embedded runner's sources pass on after the dead-letter check).
        join: the join's settings; only ``policy="at_close"`` with ``late="drop"`` runs here.
        config: where the job runs (default: a local mini-cluster).
        features: a feature set of store-free features, appended to the samples (its ``schema``).

    Raises:
        ConfigError: a policy this runner does not run, a feature that reads the store, or Flink/Java
            missing (the reason is named).
    """
    config = config or FlinkConfig()
    if features is not None:
        stateful = [f.name for f in features.features if isinstance(f, _STATEFUL)]
        if stateful:
            raise ConfigError(f"the Flink runner computes store-free features only; {stateful} read the "
                              f"store's counters or sequences", field="features")
    if join.policy != "at_close" or join.late != "drop":
        raise ConfigError(f"the Flink runner runs policy='at_close' with late='drop' only, got "
                          f"policy={join.policy!r}, late={join.late!r}", field="join.policy")
    missing = flink_available()
    if missing is not None:
        raise ConfigError(missing, field="runner")
    own = not config.work_dir
    work = Path(tempfile.mkdtemp(prefix="streamrec-flink-")) if own else Path(config.work_dir)
    try:
        _stage(work / "imps", _STAGED_IMPRESSIONS, impressions)
        _stage(work / "acts", ACTION_SCHEMA, actions)
        out = work / "samples_out"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        env = _environment(config)
        out_schema = SAMPLE_SCHEMA if features is None else pa.schema([*SAMPLE_SCHEMA, *features.schema])
        for name, schema in (("imps", _STAGED_IMPRESSIONS), ("acts", ACTION_SCHEMA),
                             ("samples_out", out_schema)):
            env.execute_sql(_ddl(name, schema, work / name))
        sql = join_sql(join)
        if features is not None:
            sql = _with_features(env, sql, features)
        t1 = time.perf_counter()
        env.execute_sql(sql).wait()
        t2 = time.perf_counter()
        return FlinkResult(_read(out, out_schema), startup_s=t1 - t0, job_s=t2 - t1)
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _environment(config: FlinkConfig) -> Any:  # pyflink ships no type hints
    from pyflink.table import EnvironmentSettings, TableEnvironment

    env = TableEnvironment.create(EnvironmentSettings.in_batch_mode())
    conf = env.get_config()
    conf.set("python.executable", sys.executable)
    conf.set("parallelism.default", str(config.parallelism))
    if config.jobmanager:
        host, port = config.jobmanager.rsplit(":", 1)
        conf.set("execution.target", "remote")
        conf.set("rest.address", host)
        conf.set("rest.port", port)
    return env


def _with_features(env: Any, join_insert: str, features: FeatureSet) -> str:
    """The join's INSERT with one UDF call per feature column over the joined samples."""
    from pyflink.table import DataTypes
    from pyflink.table.udf import udf

    flink_types = {pa.int64(): DataTypes.BIGINT(), pa.float32(): DataTypes.FLOAT(),
                   pa.float64(): DataTypes.DOUBLE()}
    calls = []
    for f in features.features:
        fld = f.output_fields()[0]
        scalar = isinstance(f, Function) and f.scalar
        fn = udf(_FeatureColumn(f, scalar), result_type=flink_types[fld.type],
                 func_type="general" if scalar else "pandas")
        env.create_temporary_function(f"feature_{f.name}", fn)
        args = ", ".join(f"s.`{c}`" for c in f.inputs) or "s.ts_ms"
        calls.append(f"feature_{f.name}({args}) AS `{fld.name}`")
    head, select = join_insert.split("SELECT", 1)
    return f"{head}SELECT s.*, {', '.join(calls)} FROM (SELECT{select}) AS s"


class _FeatureColumn:
    """One feature's column, as a Flink UDF: the same one-feature ``FeatureSet`` the embedded runner's
    plan runs, over pandas Series (a batch) or, for a ``scalar`` function, Python scalars (a row)."""

    def __init__(self, feature: Feature, scalar: bool) -> None:
        self.feature, self.scalar = feature, scalar
        self.inputs = feature.inputs or ("ts_ms",)
        self._fs: FeatureSet | None = None

    def __call__(self, *cols: Any) -> Any:
        if self._fs is None:  # built in the Python worker, after unpickling
            self._fs = FeatureSet([self.feature])
        fs = self._fs
        arrays = [pa.array([c]) if self.scalar else pa.Array.from_pandas(c) for c in cols]
        batch = pa.RecordBatch.from_arrays(arrays, names=list(self.inputs))
        out = fs.transform(batch, fs.make_stores()).column(self.feature.name)
        return out[0].as_py() if self.scalar else out.to_pandas()


def _ddl(name: str, schema: pa.Schema, path: Path) -> str:
    cols = ", ".join(f"`{f.name}` {_SQL_TYPES[f.type]}" for f in schema)
    return (f"CREATE TEMPORARY TABLE {name} ({cols}) WITH ('connector' = 'filesystem', "
            f"'path' = '{path.resolve()}', 'format' = 'csv', 'csv.null-literal' = '')")


def _stage(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> None:
    """Write ``batches`` as headerless CSV files in schema order (nulls as empty fields), numbering
    rows in arrival order where ``schema`` has an ``arrival`` column."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    opts = pacsv.WriteOptions(include_header=False)
    numbered = "arrival" in schema.names
    n = 0
    with pacsv.CSVWriter(path / "part-0.csv", schema, write_options=opts) as w:
        for b in batches:
            if numbered:
                b = b.append_column("arrival", pa.array(np.arange(n, n + b.num_rows, dtype=np.int64)))
                n += b.num_rows
            w.write_batch(b.select(schema.names).cast(schema))


def _read(out: Path, schema: pa.Schema) -> pa.Table:
    files = sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith((".", "_")))
    convert = pacsv.ConvertOptions(column_types=schema, null_values=[""], strings_can_be_null=True)
    read = pacsv.ReadOptions(column_names=schema.names)
    parts = [pacsv.read_csv(p, read_options=read, convert_options=convert) for p in files]
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    table = table.cast(schema)
    order = np.lexsort([table[c].to_numpy() for c in ("item_id", "request_id", "ts_ms")])
    return table.take(pa.array(order))
