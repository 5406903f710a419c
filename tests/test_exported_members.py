"""Pins streamrec's public surface: each package's sorted __all__, and that every name exists."""

from __future__ import annotations

import importlib

import pytest

EXPECTED = {
    "streamrec": [
        "Adagrad",
        "Adam",
        "ConfigError",
        "EmbeddingTable",
        "Initializer",
        "StoreError",
        "StreamrecError",
        "TableBusy",
        "TableConfig",
        "TableFull",
    ],
    "streamrec.config": [
        "Adagrad",
        "Adam",
        "Initializer",
        "Optimizer",
        "TableConfig",
        "load_table_config",
        "table_config_from_dict",
        "table_config_to_dict",
    ],
    "streamrec.errors": [
        "BadRequest",
        "CheckpointError",
        "ConfigError",
        "CorruptFile",
        "DeadlineExceeded",
        "DeadlineMissed",
        "FeatureError",
        "FrameError",
        "IndexGrowthRefused",
        "MissingColumns",
        "NonFiniteInput",
        "NonFiniteValues",
        "NotLeader",
        "Overloaded",
        "PeerUnavailable",
        "RemoteError",
        "ReplicationError",
        "ServingError",
        "SnapshotError",
        "StoreError",
        "StreamrecError",
        "TableBusy",
        "TableFull",
        "TooStale",
        "TransportError",
    ],
    "streamrec.cluster": [
        "Breaker",
        "ClusterSpec",
        "FanoutTree",
        "NodeSpec",
        "Place",
        "Router",
        "RouterConfig",
        "TableSpec",
        "attach",
        "cluster_spec_from_text",
        "embedded_spec",
        "fanout_tree",
        "load_cluster_spec",
        "tree_depth",
    ],
    "streamrec.transport": ["Connection", "Endpoint", "Flag", "Frame", "Kind", "Status"],
    "streamrec.ps": ["PSClient", "StorageServer"],
    "streamrec.model": ["Checkpoint", "DIN", "MeanPool", "ModelConfig", "Popularity", "ProgressiveMetrics",
                        "RequestBatch", "SASRec", "STCA", "StoreEmbedding", "TrainConfig", "Trainer",
                        "load_current", "publish"],
    "streamrec.serving": ["ModelRunner", "RankRequest", "ServeConfig", "Server", "VersionWatcher"],
    "streamrec.store": [
        "EmbeddingTable",
        "SequenceStore",
        "TableStats",
        "TierStats",
        "TieredTable",
    ],
}


@pytest.mark.parametrize("module_name", sorted(EXPECTED))
def test_all_is_pinned_and_sorted(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert list(module.__all__) == sorted(module.__all__), f"{module_name}.__all__ is not sorted"
    assert sorted(module.__all__) == EXPECTED[module_name]


@pytest.mark.parametrize("module_name", sorted(EXPECTED))
def test_every_exported_name_exists(module_name: str) -> None:
    module = importlib.import_module(module_name)
    for name in module.__all__:
        assert hasattr(module, name), f"{module_name}.{name} is in __all__ but missing"


def test_reexports_are_the_same_objects() -> None:
    import streamrec
    from streamrec import config, errors, store

    for name in streamrec.__all__:
        origin = next(m for m in (config, errors, store) if name in m.__all__)
        assert getattr(streamrec, name) is getattr(origin, name)


def test_error_tree() -> None:
    from streamrec.errors import ConfigError, StoreError, StreamrecError, TableBusy, TableFull

    assert issubclass(ConfigError, StreamrecError) and issubclass(ConfigError, ValueError)
    assert issubclass(StoreError, StreamrecError)
    assert issubclass(TableFull, StoreError) and issubclass(TableBusy, StoreError)
    full = TableFull(rows=1, max_rows=2, load_factor=0.5, position=3)
    assert (full.rows, full.max_rows, full.load_factor, full.position) == (1, 2, 0.5, 3)
    assert TableBusy(waited_s=2.5).waited_s == 2.5


def test_transport_error_tree() -> None:
    from streamrec.errors import (
        DeadlineExceeded,
        FrameError,
        PeerUnavailable,
        RemoteError,
        StreamrecError,
        TransportError,
    )

    for cls in (FrameError, PeerUnavailable, DeadlineExceeded, RemoteError):
        assert issubclass(cls, TransportError)
    assert issubclass(TransportError, StreamrecError)
    e = FrameError("bad", status=1, request_id=7, peer="a:1", transport="tcp")
    assert (e.status, e.request_id, e.peer, e.transport) == (1, 7, "a:1", "tcp")
    assert str(e) == "tcp/a:1: bad"
    assert DeadlineExceeded("slow", deadline_s=0.5).deadline_s == 0.5
    assert RemoteError("no", status=7).status == 7
