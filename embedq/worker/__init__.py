"""Worker side: encoder backends, cache, batcher, and the per-process runtime."""
