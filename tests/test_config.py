"""streamrec.config: record validation, table_config_from_dict, load_table_config; errors name the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from streamrec import EmbeddingTable
from streamrec.config import (
    Adagrad,
    Adam,
    Initializer,
    TableConfig,
    load_table_config,
    table_config_from_dict,
)
from streamrec.errors import ConfigError, StreamrecError

# -- the records ---------------------------------------------------------------------------------


def test_defaults_are_pytorchs_and_documented_ones() -> None:
    assert Adagrad() == Adagrad(eps=1e-10, initial_accumulator=0.0)
    assert Adam() == Adam(beta1=0.9, beta2=0.999, eps=1e-8)
    init = Initializer()
    assert (init.kind, init.mean, init.std, init.seed) == ("normal", 0.0, 0.01, 0)
    cfg = TableConfig(dim=8)
    assert (cfg.dtype, cfg.capacity, cfg.max_rows, cfg.optimizer, cfg.huge_pages) == (
        "float32", 1024, 0, None, True,
    )
    assert cfg.initializer == Initializer()


def test_records_are_frozen() -> None:
    for record in (Adagrad(), Adam(), Initializer(), TableConfig(dim=1)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            record.eps = 1.0  # type: ignore[misc, union-attr]


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Adagrad(eps=0), "adagrad.eps"),
        (lambda: Adagrad(eps=-1e-3), "adagrad.eps"),
        (lambda: Adagrad(eps=float("nan")), "adagrad.eps"),
        (lambda: Adagrad(eps="1e-3"), "adagrad.eps"),
        (lambda: Adagrad(initial_accumulator=-0.1), "adagrad.initial_accumulator"),
        (lambda: Adagrad(initial_accumulator=float("inf")), "adagrad.initial_accumulator"),
        (lambda: Adam(beta1=1.0), "adam.beta1"),
        (lambda: Adam(beta1=-0.1), "adam.beta1"),
        (lambda: Adam(beta2=1.5), "adam.beta2"),
        (lambda: Adam(beta2="0.9"), "adam.beta2"),
        (lambda: Adam(eps=0.0), "adam.eps"),
        (lambda: Adam(eps=float("inf")), "adam.eps"),
        (lambda: Initializer(kind="gaussian"), "initializer.kind"),
        (lambda: Initializer(std=-1.0), "initializer.std"),
        (lambda: Initializer(std=float("nan")), "initializer.std"),
        (lambda: Initializer(mean=float("inf")), "initializer.mean"),
        (lambda: Initializer(value="1"), "initializer.value"),
        (lambda: Initializer(kind="uniform", low=1.0, high=0.0), "initializer.low"),
        (lambda: Initializer(seed=-1), "initializer.seed"),
        (lambda: Initializer(seed=2**64), "initializer.seed"),
        (lambda: Initializer(seed=1.5), "initializer.seed"),
        (lambda: TableConfig(dim=0), "table.dim"),
        (lambda: TableConfig(dim=True), "table.dim"),
        (lambda: TableConfig(dim=4.0), "table.dim"),
        (lambda: TableConfig(dim=4, dtype="float16"), "table.dtype"),
        (lambda: TableConfig(dim=4, capacity=0), "table.capacity"),
        (lambda: TableConfig(dim=4, capacity=2**32), "table.capacity"),
        (lambda: TableConfig(dim=4, max_rows=-1), "table.max_rows"),
        (lambda: TableConfig(dim=4, max_rows=2**32), "table.max_rows"),
        (lambda: TableConfig(dim=4, optimizer="adam"), "table.optimizer"),
    ],
)
def test_bad_values_raise_config_error_naming_the_field(make: object, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        make()  # type: ignore[operator]
    err = info.value
    assert err.field == field
    assert str(err).startswith(f"{field}: ")
    assert isinstance(err, ValueError) and isinstance(err, StreamrecError)


def test_adagrad_initial_accumulator_of_the_wrong_type_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"adagrad\.initial_accumulator"):
        Adagrad(initial_accumulator="0.1")  # type: ignore[arg-type]


def test_good_values_are_accepted() -> None:
    Adam(beta1=0.0, beta2=0.0, eps=1)
    Adagrad(eps=1, initial_accumulator=0)
    Initializer(kind="uniform", low=0.0, high=0.0)
    Initializer(seed=2**64 - 1, std=0.0)
    TableConfig(dim=1, capacity=2**32 - 1, max_rows=2**32 - 1, dtype="float64", optimizer=Adam())


# -- from a dict (parsed TOML) ---------------------------------------------------------------------


def test_from_dict_builds_every_part() -> None:
    cfg = table_config_from_dict({
        "dim": 16, "dtype": "float64", "capacity": 100, "max_rows": 5000, "huge_pages": False,
        "optimizer": "adam", "adam": {"beta1": 0.8, "eps": 1e-6},
        "initializer": {"kind": "uniform", "low": -0.5, "high": 0.5, "seed": 7},
    })
    assert cfg == TableConfig(
        dim=16, dtype="float64", capacity=100, max_rows=5000, huge_pages=False,
        optimizer=Adam(beta1=0.8, eps=1e-6),
        initializer=Initializer(kind="uniform", low=-0.5, high=0.5, seed=7),
    )
    assert table_config_from_dict({"dim": 2}) == TableConfig(dim=2)
    assert table_config_from_dict({"dim": 2, "optimizer": "none"}).optimizer is None
    assert table_config_from_dict({"dim": 2, "optimizer": "adagrad"}).optimizer == Adagrad()
    assert table_config_from_dict(
        {"dim": 2, "optimizer": "adagrad", "adagrad": {"initial_accumulator": 0.1}}
    ).optimizer == Adagrad(initial_accumulator=0.1)


def test_from_dict_does_not_modify_its_argument() -> None:
    raw = {"dim": 2, "optimizer": "adagrad", "adagrad": {"eps": 1e-3}, "initializer": {"kind": "zeros"}}
    copy = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    table_config_from_dict(raw)
    assert raw == copy


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        ({}, "table.dim", "required"),
        ({"capacity": 10}, "table.dim", "required"),
        ({"dim": 0}, "table.dim", ">= 1"),
        ({"dim": "8"}, "table.dim", "'8'"),
        ({"dim": 8, "bogus": 1}, "table", "bogus"),
        ({"dim": 8, "dtype": "int8"}, "table.dtype", "int8"),
        ({"dim": 8, "optimizer": "sgdx"}, "table.optimizer", "sgdx"),
        ({"dim": 8, "optimizer": 1}, "table.optimizer", "1"),
        ({"dim": 8, "optimizer": "adagrad", "adagrad": {"eps": 0}}, "table.adagrad.eps", "> 0"),
        ({"dim": 8, "optimizer": "adagrad", "adagrad": {"epsilon": 1e-3}}, "table.adagrad", "epsilon"),
        ({"dim": 8, "optimizer": "adagrad", "adagrad": 3}, "table.adagrad", "table"),
        ({"dim": 8, "optimizer": "adam", "adam": {"beta2": 1.0}}, "table.adam.beta2", "[0, 1)"),
        ({"dim": 8, "optimizer": "adam", "adam": {"betas": [0.9, 0.99]}}, "table.adam", "betas"),
        ({"dim": 8, "initializer": {"kind": "he"}}, "table.initializer.kind", "he"),
        ({"dim": 8, "initializer": {"std": -1}}, "table.initializer.std", ">= 0"),
        ({"dim": 8, "initializer": {"sd": 1}}, "table.initializer", "sd"),
        ({"dim": 8, "initializer": "normal"}, "table.initializer", "table"),
    ],
)
def test_from_dict_errors_name_the_field(raw: dict, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        table_config_from_dict(raw)
    assert info.value.field == field
    assert field in str(info.value) and words in str(info.value)


def test_from_dict_refuses_a_non_table_and_uses_where() -> None:
    with pytest.raises(ConfigError, match="must be a table") as info:
        table_config_from_dict([1, 2])
    assert info.value.field == "table"
    with pytest.raises(ConfigError) as info:
        table_config_from_dict({"dim": 0}, where="tables.users")
    assert info.value.field == "tables.users.dim"
    with pytest.raises(ConfigError) as info:
        table_config_from_dict({"dim": 4, "initializer": {"std": -1}}, where="tables.items")
    assert info.value.field == "tables.items.initializer.std"


# -- from a TOML file ------------------------------------------------------------------------------

GOOD_TOML = """
[table]
dim = 64
dtype = "float32"
capacity = 1_000_000
max_rows = 0
optimizer = "adagrad"

[table.adagrad]
eps = 1e-10
initial_accumulator = 0.1

[table.initializer]
kind = "truncated_normal"
std = 0.02
seed = 42
"""


def test_load_table_config_reads_the_table_section(tmp_path: Path) -> None:
    path = tmp_path / "table.toml"
    path.write_text(GOOD_TOML)
    cfg = load_table_config(path)
    assert cfg == TableConfig(
        dim=64, capacity=1_000_000, optimizer=Adagrad(initial_accumulator=0.1),
        initializer=Initializer(kind="truncated_normal", std=0.02, seed=42),
    )
    assert load_table_config(str(path)) == cfg
    raw = {"dim": 4, "optimizer": "adam", "huge_pages": False}
    table = EmbeddingTable.from_config(table_config_from_dict(raw))
    assert table.state_width == 2 * 4 + 1 and table.dim == 4  # Adam: m, v, and the row's step t


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[table]\ncapacity = 5\n", "table.dim"),
        ("[table]\ndim = 4\nfoo = 1\n", "foo"),
        ('[table]\ndim = 4\noptimizer = "rmsprop"\n', "table.optimizer"),
        ('[table]\ndim = 4\n[table.initializer]\nkind = "he"\n', "table.initializer.kind"),
        ("[tables]\ndim = 4\n", "[table]"),
        ("[table]\ndim = \n", "not valid TOML"),
        ("[table\ndim = 4\n", "not valid TOML"),
    ],
)
def test_load_table_config_errors_name_the_file_and_field(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_table_config(path)
    assert words in str(info.value)
    assert str(path) in str(info.value)


def test_load_table_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_table_config(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(ConfigError, match="cannot read"):
        load_table_config(tmp_path)  # a directory


def test_load_table_config_keeps_the_field_attribute(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text("[table]\ndim = 0\n")
    with pytest.raises(ConfigError) as info:
        load_table_config(path)
    assert info.value.field == "table.dim"
