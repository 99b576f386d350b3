"""Integrations with other libraries (Celery)."""
