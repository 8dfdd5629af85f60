"""Celery tasks. Import from here: ``from embedq.tasks import embed_texts``."""

from embedq.tasks.embed import embed_texts

__all__ = ["embed_texts"]
