"""Serving replica: HTTP predict API over the newest exported model and Redis embeddings."""
