"""The fault suite: every promise in the docs, with the fault injected by real processes."""
