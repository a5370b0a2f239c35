"""Hostile-input tooling: seeded fuzzers over real sockets and the soak loop (``scripts/soak``)."""
