"""Benchmarks (scripts/bench-*): tools over the device, not part of it."""
