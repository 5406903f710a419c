"""Features at serving equal the pipeline's for the same event: the server's preprocessing
(``FeatureSet.request_features`` plus the sequence store) gives the model the same categorical and
dense columns and the same history that training's ``fs.transform`` + ``RequestBatch.from_samples``
give it, row for row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamrec.model.batch import RequestBatch
from streamrec.model.stca import STCA
from streamrec.serving.cache import HistoryCache
from streamrec.serving.codec import RankRequest
from streamrec.serving.executor import ModelRunner
from streamrec.serving.preprocess import Preprocessor, feature_columns
from tests.pipeline.test_features import traffic
from tests.serving.conftest import small_config


def test_serving_features_and_history_equal_the_training_path() -> None:
    fs, stores, samples = traffic()
    labels = {t: pa.array(np.zeros(samples.num_rows, np.int8)) for t in ("click", "like", "finish")}
    samples = pa.RecordBatch.from_arrays([*samples.columns, *labels.values()],
                                         names=[*samples.schema.names, *labels])
    trained = fs.transform(samples, stores)
    sparse_cols, dense_cols = feature_columns(fs)
    assert dense_cols and len(sparse_cols) > 3
    runner = ModelRunner(STCA(small_config(sparse_features=len(sparse_cols), dense_features=len(dense_cols))))
    pre = Preprocessor(fs, stores, max_history=6, cache=HistoryCache(1 << 20))
    checked = 0
    for r in np.unique(trained.column("request_id").to_numpy()).tolist():
        rows = trained.filter(pc.equal(trained.column("request_id"), r))
        want = RequestBatch.from_samples(rows, stores.sequences, max_len=6)
        items = rows.column("item_id").to_numpy()
        req = RankRequest(int(rows.column("user_id")[0].as_py()), items, {
            "device": np.asarray(rows.column("device")[0].as_py(), np.int64),
            "hour": np.asarray(rows.column("hour")[0].as_py(), np.int64),
            "position": rows.column("position").to_numpy().astype(np.int64)},  # no category: the catalog's
            ts_ms=int(rows.column("ts_ms")[0].as_py()))
        for _ in range(2):  # the second time the history comes from the cache
            got = pre.prepare(req, runner)
            order = np.searchsorted(got.items, want.target_item.numpy())  # unique items -> sample rows
            np.testing.assert_array_equal(got.items[order], want.target_item.numpy())
            np.testing.assert_array_equal(got.sparse[order], want.sparse.numpy())
            np.testing.assert_array_equal(got.dense[order], want.dense.numpy())
            np.testing.assert_array_equal(got.category[order], want.target_category.numpy())
            assert got.encoded is not None
            np.testing.assert_array_equal(got.encoded.items.numpy(), want.hist_item.numpy())
            np.testing.assert_array_equal(got.encoded.actions.numpy(), want.hist_action.numpy())
            np.testing.assert_array_equal(got.encoded.ts_ms.numpy(), want.hist_ts_ms.numpy())
            np.testing.assert_array_equal(got.encoded.values.numpy(), want.hist_value.numpy())
        checked += want.num_targets
    assert checked > 50
    assert pre.cache is not None and pre.cache.stats.hits >= pre.cache.stats.lookups // 2
