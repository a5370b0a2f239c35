"""Copy (NVM CS 1.2 §3.3.2): source range descriptors and the byte mover.

Source Range Entries (Figures 43-46): format 0h (32 bytes) and 1h (40 bytes)
take their LBAs from the command's namespace; formats 2h (32 bytes) and 3h
(40 bytes) carry a Source NSID (bytes 3:0), so a Copy may read from another
namespace of the subsystem attached to the controller.  In every format SLBA
is bytes 15:8 and NLB (0's based) bytes 17:16; the protection information
fields are unused (no PI).

``copy_bytes`` uses copy_file_range(2), which lets the file system share or
copy extents without the data passing through this process, and falls back to
pread/pwrite where the kernel refuses (EXDEV, EINVAL, ENOSYS, EOPNOTSUPP).  It
depends on file descriptors only, so it can run off the event loop: a Copy of
``OFFLOAD_COPY`` bytes or more does (nvm_cmds.copy).
"""
from __future__ import annotations

import errno
import os
import struct

# DESFMT -> (entry size, has SNSID)
DESCRIPTOR_FORMATS = {0x0: (32, False), 0x1: (40, False), 0x2: (32, True), 0x3: (40, True)}
RANGE_HEAD = struct.Struct("<I4xQH")  # SNSID (formats 2h/3h), SLBA, NLB (0's based)
_CHUNK = 1 << 20
# A copy this large (bytes) runs on a worker thread, off the event loop (MCL allows gigabytes).
OFFLOAD_COPY = 1 << 20
_FALLBACK_ERRNOS = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF)


def parse_ranges(data: bytes, desfmt: int, count: int, default_nsid: int) -> list[tuple[int, int, int]]:
    """(source NSID, SLBA, NLB 1's based) for each of ``count`` entries."""
    size, has_snsid = DESCRIPTOR_FORMATS[desfmt]
    out = []
    for i in range(count):
        snsid, slba, nlb0 = RANGE_HEAD.unpack_from(data, i * size)
        out.append((snsid if has_snsid else default_nsid, slba, nlb0 + 1))
    return out


def copy_bytes(src_fd: int, src_off: int, dst_fd: int, dst_off: int, length: int) -> None:
    """Copy ``length`` bytes between files (or inside one, non-overlapping)."""
    while length > 0:
        try:
            n = os.copy_file_range(src_fd, dst_fd, length, src_off, dst_off)
        except OSError as e:
            if e.errno not in _FALLBACK_ERRNOS:
                raise
            n = 0
        if n <= 0:  # refused or EOF-short: copy through a buffer
            n = min(length, _CHUNK)
            data = os.pread(src_fd, n, src_off)
            data += bytes(n - len(data))  # beyond EOF reads as zeroes
            view = memoryview(data)
            off = dst_off
            while view:
                k = os.pwrite(dst_fd, view, off)
                view, off = view[k:], off + k
        src_off, dst_off, length = src_off + n, dst_off + n, length - n


def copy_ranges(pieces: list[tuple[int, int, int]], dst_fd: int, dst_off: int, sync: bool) -> None:
    """Copy each (source fd, offset, length) of ``pieces`` in turn to ``dst_fd`` from ``dst_off``;
    ``sync``: fdatasync the destination afterwards (FUA)."""
    for src_fd, src_off, length in pieces:
        copy_bytes(src_fd, src_off, dst_fd, dst_off, length)
        dst_off += length
    if sync:
        os.fdatasync(dst_fd)
