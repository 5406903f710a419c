"""Serving: the Open Inference Protocol server, CPU preprocessing apart from model execution, near-model
caches, compiled execution and the request orchestrator."""
