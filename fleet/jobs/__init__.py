"""Batch jobs: split an input into chunks, fan out, aggregate, track progress in Redis."""
