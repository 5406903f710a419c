"""The event schemas of the pipeline and the validation that splits a batch into good rows and dead letters.

Owns: ``IMPRESSION_SCHEMA``, ``ACTION_SCHEMA``, ``SAMPLE_SCHEMA`` and ``ACTIONS`` (every other pipeline and
model module imports these names from here), the per-row validation of incoming record batches, and
``read_events``, the one call that turns a path or an iterator into validated batches in event-time order.
It must not import ``model``; it does not know about the join or features.

Thread safety: the constants are immutable; the functions hold no state beyond their arguments.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = [
    "ACTIONS",
    "ACTION_SCHEMA",
    "IMPRESSION_SCHEMA",
    "MAX_ID",
    "SAMPLE_SCHEMA",
]

# Ids must survive a round trip through a float64 (JSON readers, pandas) unchanged: 2**53.
MAX_ID = 2**53

# Action codes; 0 is reserved as "no action" and is never valid in an event.
ACTIONS: dict[str, int] = {"click": 1, "like": 2, "follow": 3, "finish": 4, "skip": 5, "share": 6}

IMPRESSION_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts_ms", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("category", pa.int32(), nullable=False),
        pa.field("device", pa.int32(), nullable=False),
        pa.field("hour", pa.int8(), nullable=False),
        # Ground truth from the generator: passed through for the best achievable AUC, never a feature.
        pa.field("gt_click", pa.float32(), nullable=True),
        pa.field("gt_like", pa.float32(), nullable=True),
        pa.field("gt_finish", pa.float32(), nullable=True),
    ]
)

ACTION_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts_ms", pa.int64(), nullable=False),
        pa.field("action", pa.int8(), nullable=False),
        pa.field("value", pa.float32(), nullable=False),  # watch time in seconds for finish; 0 otherwise
    ]
)

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts_ms", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("category", pa.int32(), nullable=False),
        pa.field("device", pa.int32(), nullable=False),
        pa.field("hour", pa.int8(), nullable=False),
        pa.field("click", pa.int8(), nullable=False),
        pa.field("like", pa.int8(), nullable=False),
        pa.field("follow", pa.int8(), nullable=False),
        pa.field("finish", pa.int8(), nullable=False),
        pa.field("skip", pa.int8(), nullable=False),
        pa.field("share", pa.int8(), nullable=False),
        pa.field("watch_time", pa.float32(), nullable=False),
        # 0 final at window close, 1 eager positive, 2 correction, 3 late correction (after close).
        pa.field("kind", pa.int8(), nullable=False),
        pa.field("emit_ts_ms", pa.int64(), nullable=False),
        pa.field("gt_click", pa.float32(), nullable=True),
        pa.field("gt_like", pa.float32(), nullable=True),
        pa.field("gt_finish", pa.float32(), nullable=True),
    ]
)
