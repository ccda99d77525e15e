"""Celery workers and the async engine client (distributed mode)."""
