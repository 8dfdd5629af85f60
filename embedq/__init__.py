"""embedq: asynchronous text embeddings at any scale (Celery + Redis + sentence-transformers)."""

__version__ = "0.1.0"
