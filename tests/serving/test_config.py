"""ServeConfig: documented defaults, a TOML [serve] table, and errors that name the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from streamrec.errors import ConfigError
from streamrec.serving import ServeConfig


def test_defaults_bind_loopback_and_every_field_is_documented() -> None:
    cfg = ServeConfig()
    assert cfg.host == "127.0.0.1" and cfg.port == 8000 and cfg.max_candidates == 5000
    doc = ServeConfig.__doc__ or ""
    for f in dataclasses.fields(ServeConfig):
        assert f"    {f.name}:" in doc, f.name


def test_toml_and_overrides(tmp_path: Path) -> None:
    p = tmp_path / "serve.toml"
    p.write_text('[serve]\nport = 9001\nmax_wait_ms = 2.5\ndso = false\nexecutor = "compile"\n')
    cfg = ServeConfig.from_toml(p, port=9002)
    assert (cfg.port, cfg.max_wait_ms, cfg.dso, cfg.executor) == (9002, 2.5, False, "compile")


@pytest.mark.parametrize(("text", "field"), [
    ("[serve]\nprot = 1\n", "serve.prot"),
    ("[serve]\nport = -1\n", "serve.port"),
    ("[serve]\nmax_candidates = 0\n", "serve.max_candidates"),
    ("[serve]\nexecutor = \"tensorrt\"\n", "serve.executor"),
    ("[serve]\npda = 1\n", "serve.pda"),
    ("[serve]\nqueue_candidates = 10\n", "serve.queue_candidates"),
    ("[serve]\nmax_wait_ms = \"soon\"\n", "serve.max_wait_ms"),
])
def test_bad_values_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    p = tmp_path / "serve.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        ServeConfig.from_toml(p)
    assert e.value.field == field


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        ServeConfig.from_toml(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[serve\n")
    with pytest.raises(ConfigError, match="cannot read"):
        ServeConfig.from_toml(tmp_path / "bad.toml")
