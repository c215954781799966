"""Batch tasks a data team runs on the fleet; used by the demo, tests and benchmarks."""
