"""fallocate(2) through cffi, for real deallocation (hole punching).

Python's os module has posix_fallocate but not fallocate with
FALLOC_FL_PUNCH_HOLE / FALLOC_FL_ZERO_RANGE.  cffi's ABI mode calls libc
directly (no compiler needed at install time).  Without cffi (or on a file
system that refuses the mode) the fallback writes zeroes: the data reads
back the same, only the space stays allocated.
"""
from __future__ import annotations

import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

try:
    import cffi

    _ffi = cffi.FFI()
    _ffi.cdef("int fallocate(int fd, int mode, long offset, long len);")
    _libc = _ffi.dlopen(None)
    HAVE_CFFI = True
except Exception:  # pragma: no cover - cffi is a declared dependency
    _libc = None
    HAVE_CFFI = False

_ZERO_CHUNK = bytes(1 << 20)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    if _libc is None:
        return False
    rc = _libc.fallocate(fd, mode, offset, length)
    if rc != 0:
        return False
    return True


def write_zeroes(fd: int, offset: int, length: int) -> None:
    """Pure-Python fallback: store zeroes over the range."""
    end = offset + length
    while offset < end:
        n = min(len(_ZERO_CHUNK), end - offset)
        os.pwrite(fd, _ZERO_CHUNK[:n], offset)
        offset += n


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate [offset, offset+length): reads return zeroes afterwards.

    Returns True when the space was really released, False when the
    fallback wrote zeroes instead.
    """
    if length <= 0:
        return True
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
        return True
    write_zeroes(fd, offset, length)
    return False


def zero_range(fd: int, offset: int, length: int) -> None:
    """Zero [offset, offset+length) keeping it allocated."""
    if length <= 0:
        return
    if not _fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
        write_zeroes(fd, offset, length)
