"""fleet: a resource-aware batch-processing worker fleet on Celery and Redis."""

__version__ = "0.1.0"
