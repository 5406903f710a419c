"""The long-sequence ranking model (STCA with request-level batching), its baselines, the torch bridge to
the store's sparse embeddings, online training, metrics and checkpoints."""

from streamrec.model.baselines import DIN, MeanPool, Popularity, SASRec
from streamrec.model.batch import RequestBatch
from streamrec.model.checkpoint import Checkpoint, load_current, publish
from streamrec.model.embedding import StoreEmbedding
from streamrec.model.metrics import ProgressiveMetrics
from streamrec.model.stca import STCA, ModelConfig
from streamrec.model.train import TrainConfig, Trainer

# Plain sorted() order, which tests/test_exported_members.py pins (ruff's isort order puts STCA first).
__all__ = ["Checkpoint", "DIN", "MeanPool", "ModelConfig", "Popularity", "ProgressiveMetrics",  # noqa: RUF022
           "RequestBatch", "SASRec", "STCA", "StoreEmbedding", "TrainConfig", "Trainer", "load_current",
           "publish"]
