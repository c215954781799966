"""Benchmarks: each prints fleet and a baseline side by side from one run."""
