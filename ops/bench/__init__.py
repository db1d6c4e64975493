"""Benchmarks: scripts that write JSON, markdown and a plot; run by `driftserve bench <name>`."""
