"""Operating embedq: worker heartbeats, SLOs, Prometheus metrics and ``embedq status``."""
