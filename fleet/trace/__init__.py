"""Traces: what a fleet did (or a synthetic workload), as a versioned JSON-lines file
that ``fleet simulate`` replays and ``fleet tune`` searches over. See docs/tuning.md."""
