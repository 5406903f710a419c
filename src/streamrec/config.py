"""Configuration records for streamrec, and their TOML form.

Owns: frozen dataclasses describing how a part is built (a table's shape, its
optimizer, its initializer), the defaults and where each comes from, and loading
them from TOML with errors that name the field. It must not import any package
of ours but ``errors``: every part reads its config from here.

Thread safety: every record is frozen and therefore shareable.

A table in TOML (every field optional but ``dim``)::

    [table]
    dim = 64                    # embedding width
    dtype = "float32"           # "float32" or "float64"
    capacity = 1_000_000        # keys the index is first sized for
    max_rows = 0                # arena reservation in rows; 0 = automatic
    optimizer = "adagrad"       # "none", "adagrad" or "adam"
    [table.adagrad]             # or [table.adam]
    eps = 1e-10
    [table.initializer]
    kind = "normal"             # zeros, constant, uniform, normal, truncated_normal
    std = 0.01
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from streamrec.errors import ConfigError

__all__ = [
    "Adagrad",
    "Adam",
    "Initializer",
    "Optimizer",
    "TableConfig",
    "load_table_config",
    "table_config_from_dict",
    "table_config_to_dict",
]

InitKind = Literal["zeros", "constant", "uniform", "normal", "truncated_normal"]
_INIT_KINDS = ("zeros", "constant", "uniform", "normal", "truncated_normal")


@dataclass(frozen=True)
class Adagrad:
    """Sparse Adagrad, updated per row as PyTorch's dense ``torch.optim.Adagrad`` does.

    ``acc += g**2; w -= lr * g / (sqrt(acc) + eps)``; the accumulator lives in the
    row beside the embedding (``dim`` more elements per row).

    Attributes:
        eps: added to the denominator; 1e-10 is PyTorch's default.
        initial_accumulator: starting value of ``acc``; 0.0 is PyTorch's default
            (TensorFlow uses 0.1).
    """

    eps: float = 1e-10
    initial_accumulator: float = 0.0

    def __post_init__(self) -> None:
        _check_positive("adagrad.eps", self.eps)
        v = self.initial_accumulator
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
            raise ConfigError(
                f"must be a finite number >= 0, got {self.initial_accumulator!r}",
                field="adagrad.initial_accumulator",
            )


@dataclass(frozen=True)
class Adam:
    """Sparse Adam with per-row bias correction, equal to PyTorch's ``torch.optim.Adam``
    for a row updated at every step.

    The row holds ``m`` and ``v`` (``dim`` each) and its own step count ``t``
    (one element), so a row's bias correction counts that row's own updates (as
    "lazy" sparse Adam does) and never needs a global step. ``t`` is an exact
    integer in the row's float type up to 2**24 and stops there, where both
    corrections already equal 1 in double precision; ``beta**t`` is computed in
    float64 at each step (storing the powers in float32 drifted from PyTorch).

    Attributes:
        beta1, beta2, eps: as in PyTorch (defaults 0.9, 0.999, 1e-8).
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
                raise ConfigError(f"must be in [0, 1), got {v!r}", field=f"adam.{name}")
        _check_positive("adam.eps", self.eps)


Optimizer = Adagrad | Adam


@dataclass(frozen=True)
class Initializer:
    """How a new row's embedding is filled.

    Values are a pure function of ``(key, seed)``: the same key gets the same
    starting row in every process, shard and replica, and in any batch order, so
    replicas that create a row independently agree without talking.

    Attributes:
        kind: ``zeros``, ``constant`` (``value``), ``uniform`` (``low``..``high``),
            ``normal`` (``mean``, ``std``) or ``truncated_normal`` (``mean``,
            ``std``, redrawn outside 2 std as TensorFlow's does).
        std: default 0.01, a common embedding init scale (TorchRec's default
            uniform bound is 1/sqrt(rows), far smaller for large tables).
        seed: mixed into every key's random stream.
    """

    kind: InitKind = "normal"
    mean: float = 0.0
    std: float = 0.01
    low: float = -0.01
    high: float = 0.01
    value: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in _INIT_KINDS:
            raise ConfigError(
                f"must be one of {', '.join(_INIT_KINDS)}; got {self.kind!r}",
                field="initializer.kind",
            )
        for name in ("mean", "std", "low", "high", "value"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ConfigError(f"must be a finite number, got {v!r}", field=f"initializer.{name}")
        if self.std < 0:
            raise ConfigError(f"must be >= 0, got {self.std!r}", field="initializer.std")
        if self.low > self.high:
            raise ConfigError(
                f"low ({self.low}) must not exceed high ({self.high})", field="initializer.low"
            )
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**64):
            raise ConfigError(f"must be an int in [0, 2**64), got {self.seed!r}", field="initializer.seed")


@dataclass(frozen=True)
class TableConfig:
    """Shape and behaviour of one embedding table.

    Attributes:
        dim: embedding width D (elements per row), >= 1.
        dtype: element type of embeddings and optimizer state: ``"float32"``
            (default) or ``"float64"``.
        capacity: keys the index is first sized for (default 1024); the table
            grows past it by doubling the index, losing nothing.
        max_rows: the row arena's reservation in rows. 0 (default) reserves
            ``2**31`` rows of address space, which costs no memory until rows are
            written (pages are materialised on first touch), or less where the
            address space is not there. Row numbers are 32-bit, so at most
            ``2**32 - 1``.
        optimizer: ``None`` (plain SGD in ``apply_gradients``), ``Adagrad()`` or
            ``Adam()``; strings ``"adagrad"``/``"adam"`` are accepted by the table.
        initializer: how new rows start (see ``Initializer``).
        huge_pages: advise the kernel to back the arena and index with 2 MiB
            pages (default True): random-row gathers run faster on them
            (``gather_huge_over_4k`` of ``benchmarks/store.py``).
        ttl_s: default time to live of a row in seconds, counted from its last
            write (0 = rows never expire). A write may give its own TTL. An
            expired row reads as absent at once and is reclaimed when its
            expiry slice passes.
        ttl_slice_s: width of an expiry slice in seconds (0 = ttl_s / 16, at
            least 1): memory of expired rows is held at most this much longer.
        max_live_rows: row limit (0 = none). At the limit a new key evicts a row
            by ``eviction``; inserts never fail for lack of room.
        eviction: ``"lru"`` (last access) or ``"lfu"`` (access count, halved
            every ``lfu_decay_min`` minutes, as Redis's LFU decays).
        eviction_sample: rows sampled per eviction; the lowest score goes
            (Redis's default sample of 5 tracks true LRU closely; 8 is closer).
        lfu_decay_min: LFU counts halve every this many minutes (default 1, Redis's).
        admit_after: a key gets a row only after ``find_or_insert`` has seen it
            this many times (0 = at once); a count-min sketch of
            ``admission_sketch_width`` x 4 bytes counts sightings (Monolith's filter).
        admission_sketch_width: counters per sketch row, a power of two.
        nonfinite: what a write carrying NaN or infinity does (values, or an
            optimizer step whose result would not be finite in ``dtype``, so a
            float64 1e40 into float32 counts): ``"raise"`` (default) refuses
            the whole batch with ``NonFiniteValues`` and writes nothing, since
            one NaN poisons a row and its optimizer state for good; ``"skip"``
            writes the other rows and counts the dropped ones in
            ``stats().nonfinite_skipped``.
        min_load_factor: the growth floor (libcuckoo's ``minimum_load_factor``,
            whose default 0.05 this is). An insert that finds no slot while the
            load factor is below it is refused with ``IndexGrowthRefused``
            instead of doubling the index: at that load only crafted keys
            collide so, and doubling for them is how 25 keys once asked for
            2**39 buckets. 0 disables the floor; below 1.
        max_index_bytes: the ceiling on the index's size in bytes (64 per
            bucket): a growth past it is refused with ``IndexGrowthRefused``.
            0 (default) = automatic: the buckets ``max_rows`` keys need at load
            0.5 (32 GiB for the default 2**31 rows), the most a table can use.
        hash_seed: 0 (default) draws the index's 128-bit hash key from the OS
            (``secrets``) when the table is created; it is kept in the table's
            files and snapshots. Any other value (below 2**64) fixes the key, for
            tests and reproducible runs only: keys crafted against a known key
            collide (``store._index`` explains).
    """

    dim: int
    dtype: Literal["float32", "float64"] = "float32"
    capacity: int = 1024
    max_rows: int = 0
    optimizer: Optimizer | None = None
    initializer: Initializer = field(default_factory=Initializer)
    huge_pages: bool = True
    ttl_s: int = 0
    ttl_slice_s: int = 0
    max_live_rows: int = 0
    eviction: Literal["lru", "lfu"] = "lru"
    eviction_sample: int = 8
    lfu_decay_min: int = 1
    admit_after: int = 0
    admission_sketch_width: int = 1 << 20
    nonfinite: Literal["raise", "skip"] = "raise"
    min_load_factor: float = 0.05
    max_index_bytes: int = 0
    hash_seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.dim, int) and not isinstance(self.dim, bool) and self.dim >= 1):
            raise ConfigError(f"must be an int >= 1, got {self.dim!r}", field="table.dim")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(
                f"must be 'float32' or 'float64', got {self.dtype!r}", field="table.dtype"
            )
        if not (isinstance(self.capacity, int) and 1 <= self.capacity < 2**32):
            raise ConfigError(
                f"must be an int in [1, 2**32), got {self.capacity!r}", field="table.capacity"
            )
        if not (isinstance(self.max_rows, int) and 0 <= self.max_rows < 2**32):
            raise ConfigError(
                f"must be 0 (automatic) or an int below 2**32, got {self.max_rows!r}",
                field="table.max_rows",
            )
        for name, lo, hi in (("ttl_s", 0, 2**31), ("ttl_slice_s", 0, 2**31), ("max_live_rows", 0, 2**32),
                             ("eviction_sample", 1, 1025), ("lfu_decay_min", 0, 2**16),
                             ("admit_after", 0, 256), ("admission_sketch_width", 1, 2**31)):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi):
                raise ConfigError(f"must be an int in [{lo}, {hi}), got {v!r}", field=f"table.{name}")
        w = self.admission_sketch_width
        if w & (w - 1):
            raise ConfigError(f"must be a power of two, got {w}", field="table.admission_sketch_width")
        if self.eviction not in ("lru", "lfu"):
            raise ConfigError(f"must be 'lru' or 'lfu', got {self.eviction!r}", field="table.eviction")
        if self.nonfinite not in ("raise", "skip"):
            raise ConfigError(f"must be 'raise' or 'skip', got {self.nonfinite!r}", field="table.nonfinite")
        mlf = self.min_load_factor
        if not (isinstance(mlf, (int, float)) and not isinstance(mlf, bool) and 0 <= mlf < 1):
            raise ConfigError(f"must be a number in [0, 1), got {mlf!r}", field="table.min_load_factor")
        for name, hi in (("max_index_bytes", 2**62), ("hash_seed", 2**64)):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < hi):
                raise ConfigError(f"must be an int in [0, {hi}), got {v!r}", field=f"table.{name}")
        if not isinstance(self.initializer, Initializer):
            raise ConfigError(
                f"must be an Initializer, got {type(self.initializer).__name__}", field="table.initializer"
            )
        if self.optimizer is not None and not isinstance(self.optimizer, (Adagrad, Adam)):
            raise ConfigError(
                f"must be None, Adagrad() or Adam(), got {self.optimizer!r}", field="table.optimizer"
            )


def _check_positive(name: str, v: Any) -> None:
    if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise ConfigError(f"must be a finite number > 0, got {v!r}", field=name)


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, naming unknown or mistyped fields."""
    if not isinstance(raw, dict):
        raise ConfigError(f"must be a table, got {type(raw).__name__}", field=where)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}", field=where
        )
    try:
        return cls(**raw)
    except ConfigError as exc:
        if exc.field and not exc.field.startswith(where):
            leaf = exc.field.split(".")[-1]
            raise ConfigError(str(exc).split(": ", 1)[1], field=f"{where}.{leaf}") from None
        raise
    except TypeError as exc:
        raise ConfigError(str(exc), field=where) from exc


def table_config_from_dict(raw: Any, where: str = "table") -> TableConfig:
    """Build a ``TableConfig`` from a parsed TOML table (see the module docstring)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"must be a table, got {type(raw).__name__}", field=where)
    raw = dict(raw)
    opt_name = raw.pop("optimizer", "none")
    adagrad = raw.pop("adagrad", {})
    adam = raw.pop("adam", {})
    init = raw.pop("initializer", {})
    optimizer: Optimizer | None
    for other, section in (("adagrad", adagrad), ("adam", adam)):
        if other != opt_name and section:
            raise ConfigError(f"is given but optimizer is {opt_name!r}", field=f"{where}.{other}")
    if opt_name == "none":
        optimizer = None
    elif opt_name == "adagrad":
        optimizer = _build(Adagrad, adagrad, f"{where}.adagrad")
    elif opt_name == "adam":
        optimizer = _build(Adam, adam, f"{where}.adam")
    else:
        raise ConfigError(
            f"must be 'none', 'adagrad' or 'adam', got {opt_name!r}", field=f"{where}.optimizer"
        )
    raw["optimizer"] = optimizer
    raw["initializer"] = _build(Initializer, init, f"{where}.initializer")
    if "dim" not in raw:
        raise ConfigError("is required", field=f"{where}.dim")
    cfg: TableConfig = _build(TableConfig, raw, where)
    return cfg


def table_config_to_dict(cfg: TableConfig) -> dict[str, Any]:
    """The TOML form of ``cfg`` (what ``table_config_from_dict`` reads back)."""
    raw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    opt = raw.pop("optimizer")
    raw["initializer"] = dataclasses.asdict(cfg.initializer)
    if opt is None:
        raw["optimizer"] = "none"
    elif isinstance(opt, Adagrad):
        raw["optimizer"] = "adagrad"
        raw["adagrad"] = dataclasses.asdict(opt)
    else:
        raw["optimizer"] = "adam"
        raw["adam"] = dataclasses.asdict(opt)
    return raw


def load_table_config(path: str | Path) -> TableConfig:
    """Read ``[table]`` from a TOML file; errors name the file and the field."""
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from exc
    if "table" not in doc:
        raise ConfigError(f"{p} has no [table] section", field="table")
    try:
        return table_config_from_dict(doc["table"])
    except ConfigError as exc:
        message = str(exc).split(": ", 1)[1] if exc.field else str(exc)
        raise ConfigError(f"{message} (in {p})", field=exc.field) from exc
