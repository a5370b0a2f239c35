"""C bindings built with cffi, each with a pure-Python fallback.

- fileops: fallocate(2) (punch hole / zero range), which the standard library lacks.
- prp: the PRP list entry loop of every I/O command (hot path), prp.c in API mode.
- ioq: the I/O fast path (emulator/nvme/fastpath.py) in C, ioq.c in API mode: Read and
  Write with PRPs from SQE to CQE; its fallback is the fast path's Python implementation.
- build: lazy, locked, hash-keyed cffi API-mode builds for such modules.
"""
