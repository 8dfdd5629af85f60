"""Durable storage: items per collection (``ItemStore``) and published index files
(``BlobStore``); one SQL backend (SQLite or Postgres), chosen by ``create_store``."""
