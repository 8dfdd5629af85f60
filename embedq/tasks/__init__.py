"""Celery tasks. Import from here: ``from embedq.tasks import embed_texts``."""

from embedq.tasks.embed import embed_texts
from embedq.tasks.ingest import ingest_documents, rebuild_index

__all__ = ["embed_texts", "ingest_documents", "rebuild_index"]
