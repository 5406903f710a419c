"""Serving: the Open Inference Protocol server, CPU preprocessing apart from model execution, near-model
caches, compiled execution and the request orchestrator.

Modules: ``config`` (ServeConfig), ``codec`` (OIP v2 JSON and binary tensors, ``/rank``), ``preprocess``
(features and histories on CPU workers), ``cache`` (encoded histories, hot embeddings, reused buffers),
``executor`` (a model version split for history reuse; eager or compiled), ``orchestrator`` (admission,
deadlines, packing and splitting), ``versions`` (CURRENT watched, swaps between batches), ``metrics``
(Prometheus), ``app`` (the routes) and ``server`` (it all under uvicorn).
"""

from streamrec.serving.codec import RankRequest
from streamrec.serving.config import ServeConfig
from streamrec.serving.executor import ModelRunner
from streamrec.serving.server import Server
from streamrec.serving.versions import VersionWatcher

__all__ = ["ModelRunner", "RankRequest", "ServeConfig", "Server", "VersionWatcher"]
