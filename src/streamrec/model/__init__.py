"""The long-sequence ranking model (STCA with request-level batching), its baselines, the torch bridge to
the store's sparse embeddings, online training, metrics and checkpoints."""

from streamrec.model.baselines import DIN, MeanPool, Popularity, SASRec
from streamrec.model.batch import RequestBatch
from streamrec.model.embedding import StoreEmbedding
from streamrec.model.stca import STCA, ModelConfig

# Plain sorted() order, which tests/test_exported_members.py pins (ruff's isort order puts STCA first).
__all__ = ["DIN", "MeanPool", "ModelConfig", "Popularity", "RequestBatch", "SASRec", "STCA",  # noqa: RUF022
           "StoreEmbedding"]
