"""Small files written atomically (write a temporary file, fsync, rename, fsync the directory).

A reader sees the old file or the new one, never a torn mix, even after a
machine crash: the namespace registry of the subsystem and the Write
Uncorrectable marks of a namespace are kept this way.

A full file system must not refuse these writes (a Format NVM or a Namespace
Attachment already made in memory could not be persisted): the temporary file
is kept between writes as a *spare*, its blocks reserved (``fallocate``) for
a document of the current size and a little more.  The next write fills the
spare in place (no new block), renames it over the file, whose blocks the new
spare then takes.  Only a document that outgrows its spare, or the first write
of a file on a full file system, can still fail with ENOSPC.
"""
from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("nvme.persist")


_SPARE_SLACK = 4096  # bytes a document may grow by and still fit its spare


def spare_path(path: Path) -> Path:
    """The temporary file of ``path``'s atomic writes, kept as its spare."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = spare_path(path)
    # no O_TRUNC: the spare's reserved blocks are overwritten, not freed and allocated again
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        view, offset = memoryview(data), 0
        while offset < len(view):
            offset += os.pwrite(fd, view[offset:], offset)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    reserve_spare(path, len(data))


def reserve_spare(path: Path, size: int) -> None:
    """Reserve the blocks of ``path``'s next atomic write (``size`` bytes and some slack).

    Best effort: on a full file system it reserves what it can (a document of
    the same size still fits: the file just replaced gave its blocks back)."""
    tmp = spare_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        log.warning("%s: no spare for the next write (%s)", tmp, e)
        return
    try:
        for want in (size + _SPARE_SLACK, size):
            try:
                if want:
                    os.posix_fallocate(fd, 0, want)
                return
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    log.warning("%s: spare not reserved (%s)", tmp, e)
                    return
        log.warning("%s: no room to reserve the next write; it may fail while the file system is full", tmp)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Remove an atomically written file and its spare."""
    Path(path).unlink(missing_ok=True)
    spare_path(path).unlink(missing_ok=True)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    """The JSON document at ``path``, or None when there is none or it is unreadable
    (logged: an atomic writer never leaves a torn file, so that is damage from outside)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.error("%s: unreadable, ignored (%s)", path, e)
        return None
