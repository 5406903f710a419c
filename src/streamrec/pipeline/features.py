"""The feature DSL: a declarative ``FeatureSet`` computed the same way for training and serving.

Owns: the ``FeatureSet`` that compiles the feature kinds (hashed ids, crosses,
categoricals, buckets, time parts, windowed counts over ``Counters``, smoothed
ratios, as-of sequences from a ``SequenceStore``, and Python functions,
vectorised or marked ``scalar``: defined in ``_feature_kinds``, re-exported
here) into one plan over Arrow/numpy batches, the ``Stores`` it reads, its JSON
manifest, and ``default_features()``. It must not
import ``model``; it never writes the sequence store (the join appends to it).

One object, two paths. ``FeatureSet.transform(samples, stores)`` (training,
each row as of its own ``ts_ms``) and ``FeatureSet.request_features(user_id,
candidates, context, now_ms, stores)`` (serving, every candidate as of
``now_ms``) build the same input columns and run the same plan, so the same
event gets the same values on both paths. Nothing a feature reads is later
than the row's time: counters count whole buckets before it (``counters``
module doc) and sequences keep events with ``timestamp < ts_ms`` only, so a
sample emitted after its label arrived never sees that label.

Output schema (per feature; B rows):

==================  ==========================  ===================================
kind                columns                     dtype, values
==================  ==========================  ===================================
``HashedId``        ``name``                    int64 in [0, buckets): keyed SipHash
``Cross``           ``name``                    int64 in [0, buckets)
``Categorical``     ``name``                    int64 in [0, size]; size = out of range
``Bucketize``       ``name``                    int64 in [0, len(boundaries)]
``TimePart``        ``name``                    int64: hour [0, 24), day_of_week
                                                [0, 7) Monday = 0, minute_of_day
``WindowCount``     ``name``                    float32 count, exact (< 2**24)
``Ratio``           ``name``                    float32 (num + prior w) / (den + w)
``Sequence``        ``name_item`` ...           list<int64> item, list<int8> action,
                                                list<int64> ts_ms, list<float32> extras;
                                                ragged (offsets + values), oldest first
``Function``        ``name``                    its ``dtype``
==================  ==========================  ===================================

Integer columns are categorical ids; float columns are dense values (the
model's ``RequestBatch.from_samples`` picks them so). Each output field's Arrow
metadata records ``kind``, ``scalar`` and, for ids, ``cardinality``.

Thread safety: a ``FeatureSet`` is immutable after construction apart from its
statistics (scalar rows counted under a lock); ``transform`` and
``request_features`` may run in many threads. ``Stores.observe`` is the
counters' single writer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from streamrec.errors import ConfigError, FeatureError, MissingColumns, NonFiniteInput
from streamrec.pipeline._feature_kinds import (
    HOUR_MS,
    KINDS,
    Bucketize,
    Categorical,
    Cross,
    Feature,
    Function,
    HashedId,
    Ratio,
    Sequence,
    TimePart,
    WindowCount,
)
from streamrec.pipeline.counters import Channel, Counters, CounterSpec
from streamrec.store import SequenceStore
from streamrec.store._index import hash_key, hash_key_of_seed
from streamrec.store._jit import kernel

__all__ = [
    "Bucketize",
    "Categorical",
    "Cross",
    "Feature",
    "FeatureSet",
    "Function",
    "HashedId",
    "Ratio",
    "Sequence",
    "Stores",
    "TimePart",
    "WindowCount",
    "default_features",
]

MANIFEST_FORMAT = "streamrec.FeatureSet/1"
_DAY_MS = 86_400_000
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday; Monday = 0


# -- stores ----------------------------------------------------------------------------------------


@dataclass
class Stores:
    """What a feature set reads: its counters, the sequence store, the item catalog.

    Attributes:
        counters: one ``Counters`` per counter group of the feature set
            (``FeatureSet.counter_specs``), by group name.
        sequences: the store the join appends actions to (``Sequence`` features).
        item_category: item id -> category, for serving requests whose context
            does not give the candidates' categories (the generator's
            ``Catalog.category``).

    Thread safety: ``observe`` is the counters' one writer; reads are lock-free.
    """

    counters: dict[str, Counters] = field(default_factory=dict)
    sequences: SequenceStore | None = None
    item_category: np.ndarray | None = None

    def observe(self, impressions: pa.RecordBatch | None = None,
                actions: pa.RecordBatch | None = None) -> None:
        """Count a micro-batch of events into every counter (impressions first, one write per counter)."""
        for c in self.counters.values():
            c.update(impressions, actions)

    def snapshot_counters(self, root: str | os.PathLike[str]) -> None:
        """Snapshot every counter table under ``root/<group name>``."""
        for name, c in self.counters.items():
            c.snapshot(Path(root) / name)


# -- the feature set -------------------------------------------------------------------------------


class FeatureSet:
    """Features declared once, computed as one vectorised plan for training and for serving.

    Shape contract: ``transform`` takes B sample rows and returns them with the
    features appended; ``request_features`` takes one user, M candidate items
    and a context and returns M rows (``item_id`` and the features). Output
    columns, dtypes and ranges: module doc; ``schema`` has them with metadata.

    Args:
        features: the features, in output order. A ``Ratio`` names features
            declared before it; ``Bucketize`` and ``Function`` may read them too
            (bucketed counts, a log of a count).
        name: recorded in the manifest and the schema's metadata.
        horizon_ms: how far behind the newest event counter reads stay exact
            (``CounterSpec.horizon_ms``): at least the join's label window plus
            its lateness.

    Raises:
        ConfigError: repeated output names, a ratio of unknown features, a bad feature.

    Thread safety: module doc.

    Example::

        fs = FeatureSet([HashedId("user_hash", column="user_id"),
                         WindowCount("user_clicks_1h", key="user_id", event="click", window_ms=3_600_000),
                         Sequence("hist", last=50)])
        stores = fs.make_stores(sequences=seq_store)
        stores.observe(impressions, actions)                          # the runner, per micro-batch
        out = fs.transform(samples, stores)                           # samples + features
        req = fs.request_features(7, np.array([1, 2]), {"device": 1, "hour": 9, "category": [3, 4]},
                                  now_ms, stores)                     # 2 rows, the same values
    """

    def __init__(self, features: Iterable[Feature], *, name: str = "features",
                 horizon_ms: int = 40 * 60_000) -> None:
        self.features: tuple[Feature, ...] = tuple(features)
        self.name = name
        self.horizon_ms = horizon_ms
        if not (isinstance(horizon_ms, int) and horizon_ms >= 0):
            raise ConfigError(f"must be an int >= 0, got {horizon_ms!r}", field="feature_set.horizon_ms")
        outputs: list[pa.Field] = []
        seen: dict[str, Feature] = {}
        for f in self.features:
            if not isinstance(f, Feature) or type(f) not in KINDS.values():
                raise ConfigError(f"expected a feature, got {f!r}", field="feature_set.features")
        later = {fld.name for f in self.features for fld in f.output_fields()}
        for f in self.features:
            for c in f.inputs:
                # Bucketize and Function may read an earlier feature's values (bucketed counts ...).
                if c in later and not (isinstance(f, (Bucketize, Function)) and c in seen
                                       and not isinstance(seen[c], Sequence)):
                    raise ConfigError(f"input {c!r} is a feature: only Bucketize and Function read "
                                      "features, scalar ones declared before them", field=f"{f.name}")
            if isinstance(f, Ratio):
                for dep in (f.numerator, f.denominator):
                    if dep not in seen or seen[dep].output_fields()[0].type != pa.float32():
                        raise ConfigError(f"{dep!r} must be a float32 feature declared before the ratio",
                                          field=f"{f.name}")
            for fld in f.output_fields():
                if fld.name in seen:
                    raise ConfigError(f"output column {fld.name!r} repeats", field=f"{f.name}")
                seen[fld.name] = f
                outputs.append(fld)
        names = set(seen)
        self._inputs = tuple(dict.fromkeys(c for f in self.features for c in f.inputs if c not in names))
        groups: dict[tuple[str, int, int], list[Channel]] = {}
        self._channel: dict[str, tuple[str, int]] = {}
        for f in self.features:
            if isinstance(f, WindowCount):
                spec0 = CounterSpec(f.key, f.window_ms, f.bucket_ms, horizon_ms, (f.channel,))
                chans = groups.setdefault((f.key, f.window_ms, spec0.bucket_ms), [])
                if f.channel not in chans:
                    chans.append(f.channel)
                group = _group_name(f.key, f.window_ms, spec0.bucket_ms)
                self._channel[f.name] = (group, chans.index(f.channel))
        self._specs = {_group_name(k, w, b): CounterSpec(k, w, b, horizon_ms, tuple(ch))
                       for (k, w, b), ch in groups.items()}
        self.fingerprint = hashlib.sha256(json.dumps(self._body(), sort_keys=True).encode()).hexdigest()
        self.schema = pa.schema(outputs, metadata={"feature_set": name, "fingerprint": self.fingerprint})
        self._scalar_rows = {f.name: 0 for f in self.features if isinstance(f, Function) and f.scalar}
        self._fns = {f.name: f.resolve() for f in self.features if isinstance(f, Function)}
        self._keys = {f.name: tuple(np.uint64(x) for x in hash_key_of_seed(f.seed))
                      for f in self.features if isinstance(f, (HashedId, Cross))}
        self._lock = threading.Lock()

    # -- description ------------------------------------------------------------------

    @property
    def inputs(self) -> tuple[str, ...]:
        """The sample columns the set reads (``ts_ms`` and ``user_id`` among them where needed)."""
        return self._inputs

    @property
    def counter_specs(self) -> dict[str, CounterSpec]:
        """One counter group per (key, window, bucket) of the set's ``WindowCount`` features."""
        return dict(self._specs)

    @property
    def scalar_rows(self) -> dict[str, int]:
        """Rows computed by each ``scalar=True`` function since this object was made."""
        with self._lock:
            return dict(self._scalar_rows)

    def __repr__(self) -> str:
        return f"FeatureSet({self.name!r}, {len(self.features)} features, {len(self.schema)} columns)"

    def make_stores(self, *, sequences: SequenceStore | None = None, item_category: np.ndarray | None = None,
                    capacity: int = 1024) -> Stores:
        """Fresh ``Stores`` for this set: an empty ``Counters`` per group, and what is passed."""
        return Stores({n: Counters(s, capacity=capacity) for n, s in self._specs.items()}, sequences,
                      item_category)

    def open_stores(self, root: str | os.PathLike[str], *, sequences: SequenceStore | None = None,
                    item_category: np.ndarray | None = None) -> Stores:
        """``Stores`` whose counters are loaded from ``Stores.snapshot_counters(root)``."""
        return Stores({n: Counters.open(Path(root) / n, s) for n, s in self._specs.items()}, sequences,
                      item_category)

    # -- the two paths ----------------------------------------------------------------

    def transform(self, samples: pa.RecordBatch, stores: Stores) -> pa.RecordBatch:
        """The training path: ``samples`` with the features appended, each row as of its ``ts_ms``.

        Raises:
            MissingColumns: input columns absent (all of them listed).
            FeatureError: nulls or negative ids in inputs, a feature column
                already in ``samples``, a store the set needs is missing.
            NonFiniteInput: NaN or inf in a numeric input or a function's output.
        """
        if not isinstance(samples, pa.RecordBatch):
            raise FeatureError(f"samples: expected a pyarrow.RecordBatch, got {type(samples).__name__}")
        clash = sorted(set(samples.schema.names) & set(self.schema.names))
        if clash:
            raise FeatureError(f"feature column(s) {clash} are already in the samples", feature=self.name)
        arrays = self._compute(samples, stores)
        return pa.RecordBatch.from_arrays([*samples.columns, *arrays],
                                          schema=pa.schema([*samples.schema, *self.schema]))

    def request_features(self, user_id: int, candidates: Any, context: Mapping[str, Any], now_ms: int,
                         stores: Stores) -> pa.RecordBatch:
        """The serving path: M rows, ``item_id`` then the features, every candidate as of ``now_ms``.

        Args:
            user_id: the requesting user.
            candidates: (M,) item ids.
            context: the other input columns (``device``, ``hour``, ``position``,
                ``category`` ...), each a scalar for all candidates or (M,)
                values. ``category`` may come from ``stores.item_category`` instead.
            now_ms: the request's time (event time, ms).

        Raises: as ``transform``; FeatureError also for context values of the wrong shape.
        """
        items = np.asarray(candidates)
        if items.ndim != 1 or (items.size and items.dtype.kind not in "iu"):
            raise FeatureError(f"candidates: expected (M,) integer item ids, got {items.dtype} {items.shape}")
        if not isinstance(context, Mapping):
            raise FeatureError("context: expected a mapping of column to values, "
                               f"got {type(context).__name__}")
        m = items.shape[0]
        cols: dict[str, Any] = {"user_id": np.full(m, user_id, dtype=np.int64),
                                "item_id": items.astype(np.int64),
                                "ts_ms": np.full(m, now_ms, dtype=np.int64)}
        for name in self._inputs:
            if name in cols:
                continue
            if name in context:
                v = np.asarray(context[name])
                if v.ndim == 0:
                    v = np.full(m, v[()])
                elif v.shape != (m,):
                    raise FeatureError(f"expected a scalar or ({m},) values, got shape {v.shape}",
                                       column=name)
                cols[name] = v
            elif name == "category" and stores.item_category is not None:
                cat = stores.item_category
                if m and (int(items.min()) < 0 or int(items.max()) >= cat.shape[0]):
                    raise FeatureError(f"items outside the catalog of {cat.shape[0]} items; "
                                       "give their categories in the context", column="category")
                cols[name] = cat[items.astype(np.int64)]
        missing = [n for n in self._inputs if n not in cols]
        if missing:
            raise MissingColumns(missing, feature="request context")
        batch = pa.RecordBatch.from_pydict({k: pa.array(v) for k, v in cols.items()})
        arrays = self._compute(batch, stores)
        return pa.RecordBatch.from_arrays([batch.column("item_id"), *arrays],
                                          schema=pa.schema([batch.schema.field("item_id"), *self.schema]))

    def _compute(self, batch: pa.RecordBatch, stores: Stores) -> list[pa.Array]:
        missing = [n for n in self._inputs if n not in batch.schema.names]
        if missing:
            raise MissingColumns(missing, feature=self.name)
        cols = _Columns(batch)
        b = batch.num_rows
        done: dict[str, np.ndarray] = {}
        counts: dict[str, np.ndarray] = {}
        out: list[pa.Array] = []
        for f in self.features:
            if isinstance(f, HashedId):
                v = np.empty(b, dtype=np.int64)
                _hash_ids(cols.ids(f.column, f.name).view(np.uint64), *self._keys[f.name], f.buckets, v)
            elif isinstance(f, Cross):
                stack = np.stack([cols.ids(c, f.name) for c in f.columns]).view(np.uint64)
                v = np.empty(b, dtype=np.int64)
                _hash_cross(stack, *self._keys[f.name], f.buckets, v)
            elif isinstance(f, Categorical):
                x = cols.ints(f.column, f.name)
                v = np.where((x >= 0) & (x < f.size), x, f.size)
            elif isinstance(f, Bucketize):
                x = done[f.column] if f.column in done else cols.numbers(f.column, f.name)
                v = np.searchsorted(np.array(f.boundaries), x, side="right")
                v = v.astype(np.int64, copy=False)
            elif isinstance(f, TimePart):
                t = cols.ids(f.column, f.name) + f.utc_offset_min * 60_000
                if f.part == "hour":
                    v = (t // HOUR_MS) % 24
                elif f.part == "day_of_week":
                    v = (t // _DAY_MS + _EPOCH_WEEKDAY) % 7
                else:
                    v = (t // 60_000) % 1440
            elif isinstance(f, WindowCount):
                group, ch = self._channel[f.name]
                if group not in counts:
                    counter = stores.counters.get(group)
                    if counter is None:
                        raise FeatureError(f"the stores hold no counter group {group!r} "
                                           "(build them with FeatureSet.make_stores)", feature=f.name)
                    counts[group] = counter.read(cols.ids(f.key, f.name), cols.ids("ts_ms", f.name))
                v = counts[group][:, ch].astype(np.float32)
            elif isinstance(f, Ratio):
                num, den = done[f.numerator].astype(np.float64), done[f.denominator].astype(np.float64)
                v = ((num + f.prior * f.weight) / (den + f.weight)).astype(np.float32)
            elif isinstance(f, Sequence):
                if stores.sequences is None:
                    raise FeatureError("the stores hold no sequence store", feature=f.name)
                off, seq = f.read(stores.sequences, cols.ids(f.user, f.name), cols.ids("ts_ms", f.name))
                offsets = pa.array(off.astype(np.int32))
                for fld, k in zip(f.output_fields(), f.fields, strict=True):
                    values = seq[k].astype(fld.type.value_type.to_pandas_dtype(), copy=False)
                    out.append(pa.ListArray.from_arrays(offsets, pa.array(values)))
                continue
            else:
                assert isinstance(f, Function)
                v = self._call(f, [done[c] if c in done else cols.numbers(c, f.name) if cols.is_float(c)
                                   else cols.ints(c, f.name) for c in f.args], b)
            done[f.name] = v
            out.append(pa.array(v))
        return out

    def _call(self, f: Function, args: list[np.ndarray], b: int) -> np.ndarray:
        fn = self._fns[f.name]
        if f.scalar:
            got = np.array([fn(*row) for row in zip(*(a.tolist() for a in args), strict=True)] if args
                           else [fn() for _ in range(b)], dtype=f.dtype)
            with self._lock:
                self._scalar_rows[f.name] += b
        else:
            got = np.asarray(fn(*args))
        if got.shape != (b,):
            raise FeatureError(f"{f.fn} returned shape {got.shape}, expected ({b},)", feature=f.name)
        v = got.astype(f.dtype)
        if v.dtype.kind == "f":
            _require_finite(v, f.name, f.name)
        return v

    # -- manifest -----------------------------------------------------------------------

    def _body(self) -> dict[str, Any]:
        feats = [{"kind": f.kind, **dataclasses.asdict(f)} for f in self.features]
        return {"name": self.name, "horizon_ms": self.horizon_ms, "features": feats}

    def to_manifest(self) -> dict[str, Any]:
        """The JSON-able description ``from_manifest`` rebuilds this set from (functions by import path)."""
        return {"format": MANIFEST_FORMAT, **self._body(), "fingerprint": self.fingerprint}

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> FeatureSet:
        """The feature set a manifest describes.

        Raises:
            ConfigError: an unknown format or kind, a bad field, or a fingerprint
                that does not match the features (the manifest was edited).
        """
        if not isinstance(manifest, Mapping) or manifest.get("format") != MANIFEST_FORMAT:
            got = manifest.get("format") if isinstance(manifest, Mapping) else type(manifest).__name__
            raise ConfigError(f"expected format {MANIFEST_FORMAT!r}, got {got!r}", field="manifest.format")
        feats = []
        for i, raw in enumerate(manifest.get("features", ())):
            raw = dict(raw)
            kind = KINDS.get(raw.pop("kind", None))
            if kind is None:
                raise ConfigError(f"unknown kind; known: {sorted(KINDS)}",
                                  field=f"manifest.features[{i}].kind")
            try:
                feats.append(kind(**raw))
            except TypeError as exc:
                raise ConfigError(str(exc), field=f"manifest.features[{i}]") from None
        fs = cls(feats, name=manifest.get("name", "features"), horizon_ms=manifest.get("horizon_ms", 0))
        if manifest.get("fingerprint", fs.fingerprint) != fs.fingerprint:
            raise ConfigError(f"fingerprint {manifest['fingerprint']} does not match the features "
                              f"({fs.fingerprint})", field="manifest.fingerprint")
        return fs

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the manifest as JSON (atomically: a temporary file renamed over ``path``)."""
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_manifest(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, p)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureSet:
        """The feature set saved at ``path``. Raises ConfigError for an unreadable or bad manifest."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read a feature-set manifest from {path}: {exc}") from exc
        return cls.from_manifest(raw)


def _group_name(key: str, window_ms: int, bucket_ms: int) -> str:
    return f"{key}_w{window_ms}_b{bucket_ms}"


def default_features(*, id_buckets: int = 1 << 22, cross_buckets: int = 1 << 20, history: int = 50,
                     horizon_ms: int = 40 * 60_000) -> FeatureSet:
    """The feature set the model trains on and serving computes (``name="default"``).

    Columns: ``user_hash``, ``item_hash`` (ids hashed into ``id_buckets``),
    ``category_id`` (< 1024), ``device_id`` (< 16), ``hour_id`` (the context's
    local hour), ``day_of_week`` (of ``ts_ms``, UTC), ``position_bucket``,
    ``user_clicks_1h``, ``item_impressions_10m``, ``item_clicks_10m``,
    ``item_ctr_10m`` (smoothed, prior 5 %), ``user_x_category`` (hashed into
    ``cross_buckets``), and the user's last ``history`` behaviours
    ``hist_item``, ``hist_action``, ``hist_ts_ms`` (lists; ``history=0``
    leaves them out, for a model that reads histories from the sequence
    store itself, as ``RequestBatch.from_samples`` does).

    Counters use one-minute buckets: a count is at most a minute stale, and
    a row holds window + horizon + 1 buckets (an item's row: 51 buckets of
    two counts, 824 bytes), which every update rewrites; ten-second buckets
    for the ten-minute counts made the item rows 4.8 kB and counting 5x slower.
    """
    return FeatureSet([
        HashedId("user_hash", column="user_id", buckets=id_buckets),
        HashedId("item_hash", column="item_id", buckets=id_buckets),
        Categorical("category_id", column="category", size=1024),
        Categorical("device_id", column="device", size=16),
        Categorical("hour_id", column="hour", size=24),
        TimePart("day_of_week", part="day_of_week"),
        Bucketize("position_bucket", column="position", boundaries=(1, 2, 3, 5, 8, 13, 21, 34, 55, 89)),
        WindowCount("user_clicks_1h", key="user_id", event="click", window_ms=HOUR_MS),
        WindowCount("item_impressions_10m", key="item_id", event="impression", window_ms=600_000,
                    bucket_ms=60_000),
        WindowCount("item_clicks_10m", key="item_id", event="click", window_ms=600_000, bucket_ms=60_000),
        Ratio("item_ctr_10m", numerator="item_clicks_10m", denominator="item_impressions_10m"),
        Cross("user_x_category", columns=("user_id", "category"), buckets=cross_buckets),
        *([Sequence("hist", last=history)] if history else []),
    ], name="default", horizon_ms=horizon_ms)


# -- input columns ---------------------------------------------------------------------------------


class _Columns:
    """A batch's columns as checked numpy arrays, each converted once."""

    def __init__(self, batch: pa.RecordBatch) -> None:
        self._batch = batch
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def _raw(self, name: str, who: str) -> np.ndarray:
        col = self._batch.column(name)
        if col.null_count:
            raise FeatureError(f"{col.null_count} null value(s)", feature=who, column=name)
        a = col.to_numpy(zero_copy_only=False)
        if a.dtype.kind not in "iuf":
            raise FeatureError(f"expected numbers, got {col.type}", feature=who, column=name)
        return a

    def is_float(self, name: str) -> bool:
        return pa.types.is_floating(self._batch.schema.field(name).type)

    def ints(self, name: str, who: str) -> np.ndarray:
        """int64 values of an integer column."""
        key = (name, "ints")
        if key not in self._cache:
            a = self._raw(name, who)
            if a.dtype.kind == "f":
                raise FeatureError(f"expected integers, got {a.dtype}", feature=who, column=name)
            if a.dtype == np.uint64 and a.size and int(a.max()) >= 1 << 63:
                raise FeatureError("values past 2**63", feature=who, column=name)
            self._cache[key] = a.astype(np.int64, copy=False)
        return self._cache[key]

    def ids(self, name: str, who: str) -> np.ndarray:
        """int64 values of an integer column, all >= 0 (ids and times)."""
        a = self.ints(name, who)
        if (name, "ids") not in self._cache:
            if a.size and int(a.min()) < 0:
                raise FeatureError(f"expected non-negative ids or times, got {int(a.min())}", feature=who,
                                   column=name)
            self._cache[(name, "ids")] = a
        return a

    def numbers(self, name: str, who: str) -> np.ndarray:
        """float64 values of a numeric column, all finite."""
        key = (name, "numbers")
        if key not in self._cache:
            a = self._raw(name, who).astype(np.float64, copy=False)
            _require_finite(a, who, name)
            self._cache[key] = a
        return self._cache[key]


def _require_finite(a: np.ndarray, feature: str, column: str) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        raise NonFiniteInput(feature=feature, column=column, rows=int(bad.sum()),
                             first_row=int(np.argmax(bad)))


# -- kernels ---------------------------------------------------------------------------------------
# Both inline the store's keyed hash (``_index.hash_key``). Numba's cache keys a kernel on its own file
# only: a change to ``hash_key`` needs this file touched (or its __pycache__ cleared) too.


@kernel
def _hash_ids(x: np.ndarray, k0: np.uint64, k1: np.uint64, buckets: int, out: np.ndarray) -> None:
    """out[i] = SipHash(x[i]) mod buckets.

    Requires: x uint64 (B,), out int64 (B,), buckets >= 1.
    """
    nb = np.uint64(buckets)
    for i in range(x.shape[0]):
        out[i] = np.int64(hash_key(x[i], k0, k1) % nb)


@kernel
def _hash_cross(x: np.ndarray, k0: np.uint64, k1: np.uint64, buckets: int, out: np.ndarray) -> None:
    """out[i] = the columns of x[:, i] hashed in a chain (each hash keys the next) mod buckets.

    Requires: x uint64 (K, B) with K >= 2, out int64 (B,), buckets >= 1.
    """
    nb = np.uint64(buckets)
    for i in range(x.shape[1]):
        h = hash_key(x[0, i], k0, k1)
        for j in range(1, x.shape[0]):
            h = hash_key(x[j, i], k0 ^ h, k1)
        out[i] = np.int64(h % nb)
