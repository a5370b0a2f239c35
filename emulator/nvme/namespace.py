"""A namespace on a sparse backing file.

Data moves between the file and guest memory with preadv/pwritev straight
into the DMA views: no intermediate copy.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from cbind import fileops
from emulator.memory import DmaError
from emulator.nvme import fastgen, offload, persist
from emulator.nvme.allocation import AllocationMap
from emulator.nvme.config import NamespaceConfig
from emulator.nvme.spec import Generic, generic
from emulator.nvme.uncorrectable import UncorrectableMarks

# A file system out of space (or quota): the namespace's thin provisioning ran
# out: Capacity Exceeded (Base 2.1 Generic Command Status Values, SC 81h), never Internal Error.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def file_errors(what: str) -> Iterator[None]:
    """Turn the OSErrors of a data-path system call into the command's status.

    EFAULT: guest memory behind a DMA view is gone (its file shrank): a
    DmaError (Data Transfer Error).  ENOSPC/EDQUOT: Capacity Exceeded.
    Others propagate (Internal Error).
    """
    try:
        yield
    except OSError as e:
        if e.errno == errno.EFAULT:
            raise DmaError(0, 0, f"{what}: guest memory unreachable") from None
        if e.errno in _NO_SPACE:
            raise generic(Generic.CAPACITY_EXCEEDED, f"{what}: {os.strerror(e.errno)}") from None
        raise


IOV_MAX = 1024


def open_backing_file(path: Path, size: int) -> int:
    """Open (or create, 0600) a namespace's backing file of ``size`` bytes; growing it is fine.

    Refused with ValueError: a symbolic link (never followed: its target would be
    resized), anything but a regular file, and an existing file larger than
    ``size`` (shrinking it would destroy the data past ``size``).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link; refusing to follow it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if st.st_size > size:
            raise ValueError(f"{path} holds {st.st_size} bytes but its namespace is configured as {size} bytes; "
                             f"refusing to shrink it (configure size: {st.st_size} or more)")
        if st.st_size < size:
            os.ftruncate(fd, size)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Namespace:
    def __init__(self, config: NamespaceConfig, subsystem_nqn: str = "") -> None:
        self.config = config
        self.nsid = config.nsid
        self.path = Path(config.file)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = open_backing_file(self.path, config.size)
        # Stable unique identifiers (Identify NS NGUID/EUI64, NS descriptors).
        digest = hashlib.sha256(f"{subsystem_nqn}/{config.nsid}".encode()).digest()
        self.nguid = digest[:16]
        self.eui64 = digest[16:24]
        self.uuid = bytearray(digest[:16])
        self.uuid[6] = (self.uuid[6] & 0x0F) | 0x80  # RFC 9562 version 8 (custom)
        self.uuid[8] = (self.uuid[8] & 0x3F) | 0x80
        try:
            self._open_format(config)
        except OSError as e:
            os.close(self.fd)
            if e.errno == errno.ELOOP:
                raise ValueError(f"{self.path}.alloc is a symbolic link; refusing to follow it") from None
            raise

    def _open_format(self, config: NamespaceConfig) -> None:
        self.config = config
        self.lba_size = config.lba_size
        self.lba_shift = config.lba_size.bit_length() - 1
        self.nsze = config.size // config.lba_size
        self.allocation = AllocationMap.open(self.path, self.nsze, config.tlbaag, self.fd,
                                             config.lba_size)
        self.uncorrectable = UncorrectableMarks(UncorrectableMarks.sidecar(self.path), self.nsze)
        fastgen.bump()  # the I/O fast path's namespace tables hold fd, geometry and bitmap

    def reformat(self, lba_size: int) -> None:
        """Format NVM (Base 2.1 §5.1.10): every LBA deallocated (reads as zeroes),
        marks cleared, and the namespace re-opened in the LBA format ``lba_size``.
        The tracked granule keeps its size in bytes, so TLBAAG follows the new LBA size."""
        granule = self.config.tlbaag * self.config.lba_size
        before = self.config
        self.erase()
        offload.wait_idle()  # no worker thread may still use the old bitmap
        self.allocation.close()
        Path(str(self.path) + ".alloc").unlink(missing_ok=True)
        try:
            with file_errors("format"):  # a full file system: Capacity Exceeded
                self._open_format(replace(self.config, lba_size=lba_size,
                                          tlbaag=max(1, granule // lba_size)))
        except BaseException:
            # The new format's bitmap could not be set up: the namespace stays usable
            # in its old format (the bitmap it just freed has room again), erased as
            # the command's user data erase left it.
            Path(str(self.path) + ".alloc").unlink(missing_ok=True)
            self._open_format(before)
            raise

    def erase(self) -> None:
        """Deallocate every LBA (Format user data erase, Sanitize Block Erase) and make it durable."""
        self.deallocate(0, self.nsze)
        self.flush()

    # -- data path -----------------------------------------------------------
    def in_range(self, slba: int, nlb: int) -> bool:
        """nlb is a count (1's based)."""
        return slba + nlb <= self.nsze

    def read_into(self, slba: int, views: list[memoryview]) -> None:
        with file_errors("read"):
            self._transfer(slba, views, read=True)

    def write_from(self, slba: int, nlb: int, views: list[memoryview]) -> None:
        with file_errors("write"):
            self._transfer(slba, views, read=False)
        self.allocation.mark_allocated(slba, nlb)
        if self.uncorrectable:
            self.uncorrectable.clear(slba, nlb)  # a write heals a Write Uncorrectable mark

    def _transfer(self, slba: int, views: list[memoryview], read: bool) -> None:
        """preadv/pwritev straight between the file and the DMA views."""
        offset = slba << self.lba_shift
        io = os.preadv if read else os.pwritev
        for chunk in _iov_chunks(views):
            want = sum(len(v) for v in chunk)
            got = io(self.fd, chunk, offset)
            if got != want:
                self._finish_short(chunk, got, offset, read=read)
            offset += want

    def _finish_short(self, chunk: list[memoryview], done: int, offset: int, read: bool) -> None:
        # Slow path for a short preadv/pwritev: finish view by view.
        pos = 0
        for v in chunk:
            n = len(v)
            if pos + n <= done:
                pos += n
                continue
            skip = max(0, done - pos)
            sub = v[skip:]
            off = offset + pos + skip
            while len(sub):
                k = os.preadv(self.fd, [sub], off) if read else os.pwritev(self.fd, [sub], off)
                if k <= 0:
                    if read:  # beyond EOF reads as zeroes
                        sub[:] = bytes(len(sub))
                        break
                    raise OSError(errno.EIO, "short write to backing file")
                sub = sub[k:]
                off += k
            pos += n

    def write_zeroes(self, slba: int, nlb: int, deallocate: bool) -> None:
        """Write Zeroes (NVM CS §3.3.8); DEAC=1 deallocates (DLFEAT: reads return 0)."""
        offset, length = slba << self.lba_shift, nlb << self.lba_shift
        if deallocate:
            self.deallocate(slba, nlb)
        else:
            with file_errors("write zeroes"):
                fileops.zero_range(self.fd, offset, length)
            self.allocation.mark_allocated(slba, nlb)
            if self.uncorrectable:
                self.uncorrectable.clear(slba, nlb)

    def deallocate(self, slba: int, nlb: int) -> None:
        self.punch(slba, nlb)
        self.allocation.mark_deallocated(slba, nlb)
        if self.uncorrectable:
            self.uncorrectable.clear(slba, nlb)

    def punch(self, slba: int, nlb: int) -> None:
        """The file part of a deallocation (no bitmap update): safe on a worker thread."""
        with file_errors("deallocate"):
            fileops.punch_hole(self.fd, slba << self.lba_shift, nlb << self.lba_shift)

    def flush(self) -> None:
        self.flush_begin()()

    def flush_begin(self) -> Callable[[], None]:
        """The event-loop part of a flush; returns the blocking part (fdatasync of the
        data and the bitmap), safe on a worker thread."""
        fds = self.flush_files()
        return lambda: sync_files(fds)

    def flush_files(self) -> list[int]:
        """The event-loop part of a flush: the fds that :func:`sync_files` must sync."""
        with file_errors("flush"):
            return [fd for fd in (self.fd, self.allocation.begin_save()) if fd >= 0]

    def nuse(self) -> int:
        """Namespace Utilization in LBAs (allocated blocks)."""
        return self.allocation.allocated_lbas()

    def close(self) -> None:
        if self.fd >= 0:
            offload.wait_idle()  # no worker thread may still use the fd
            try:
                self.flush()
            finally:
                os.close(self.fd)
                self.fd = -1
                fastgen.bump()
                self.allocation.close()

    def destroy(self) -> None:
        """Namespace Management delete: close, then remove the backing file and its sidecars."""
        self.close()
        self.remove_stale(self.path)

    @staticmethod
    def remove_stale(path: Path) -> None:
        """Files a deleted or crashed namespace left at ``path``: a new one starts empty."""
        for p in (Path(path), Path(str(path) + ".alloc")):
            p.unlink(missing_ok=True)
        persist.remove(UncorrectableMarks.sidecar(Path(path)))


def sync_files(fds: list[int]) -> None:
    """fdatasync each fd (the blocking part of a flush; safe on a worker thread)."""
    with file_errors("flush"):
        for fd in fds:
            os.fdatasync(fd)


def _iov_chunks(views: list[memoryview]) -> list[list[memoryview]]:
    if len(views) <= IOV_MAX:
        return [views]
    return [views[i:i + IOV_MAX] for i in range(0, len(views), IOV_MAX)]
