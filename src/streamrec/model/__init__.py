"""The long-sequence ranking model (STCA with request-level batching), its baselines, the torch bridge to
the store's sparse embeddings, online training, metrics and checkpoints."""
