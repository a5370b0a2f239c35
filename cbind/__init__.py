"""C bindings built with cffi, each with a pure-Python fallback.

- fileops: fallocate(2) (punch hole / zero range), which the standard library lacks.
"""
