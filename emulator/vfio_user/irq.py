"""The interrupt table of one client: eventfds and masks per irq index (§3.6).

:class:`IrqTable` implements :class:`~emulator.vfio_user.backend.IrqLines`
for the device backend and applies DEVICE_SET_IRQS.  Validation follows
libvfio-user (index and range checks, count 0 only to disable a whole index,
ERR/REQ only TRIGGER with count <= 1, fds only with DATA_EVENTFD and exactly
``count`` of them).  Semantics:

* ``EVENTFD|TRIGGER`` with fds assigns them to ``[start, start+count)``; with
  no fds it de-assigns (closes) that range.
* ``NONE|TRIGGER`` with count 0 disables the index: every fd closed, masks
  and pending bits cleared.  With count > 0 (or ``BOOL|TRIGGER``) the server
  fires those interrupts.
* ``NONE|MASK``/``NONE|UNMASK`` (or BOOL) mask/unmask sub-indexes.  A trigger
  while masked is remembered and delivered at the unmask.
* ``EVENTFD|UNMASK`` (``EVENTFD|MASK``) installs an eventfd that, when the
  client signals it, unmasks (masks) that sub-index -- the INTx resample fd
  KVM signals at guest EOI.  These fds are watched through the ``watch`` /
  ``unwatch`` callbacks (the server passes its loop's add_reader/remove_reader).
* An index whose info has AUTOMASKED (INTx) masks itself when it fires.

Every fd must be an eventfd (anything else is refused with EINVAL: a pipe
can block the loop when full or make it spin at end of file); the server
switches it to non-blocking.  A trigger writes an 8-byte little-endian 1 to
the eventfd; a counter at its maximum (EAGAIN) drops that interrupt, logged
once per fd.  Every fd a SET_IRQS brings is either stored or closed, on every
error path.  ``on_change(index)``
is called after every change of fds or masks (the backend's ``irqs_changed``).
"""
from __future__ import annotations

import errno
import logging
import os
from typing import Callable, Sequence

from emulator.vfio_user import protocol as p
from emulator.vfio_user.backend import IrqInfo
from emulator.vfio_user.codec import close_fds
from emulator.vfio_user.protocol import MessageError

log = logging.getLogger(__name__)

_ONE = p.EVENTFD_VALUE.pack(1)
_EVENTFD_LINK = "anon_inode:[eventfd]"


def is_eventfd(fd: int) -> bool:
    """True if ``fd`` is an eventfd (what /proc says the open file is)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == _EVENTFD_LINK
    except OSError:
        return False


def prepare_eventfd(fd: int) -> None:
    """Refuse an fd that is not an eventfd; make it non-blocking (a full counter must not block the loop)."""
    if not is_eventfd(fd):
        raise MessageError(f"SET_IRQS: fd {fd} is not an eventfd")
    os.set_blocking(fd, False)

Watch = Callable[[int, Callable[[], None]], object]
Unwatch = Callable[[int], object]


class _Index:
    """State of one irq index (INTx, MSI, MSI-X, ERR, REQ)."""

    __slots__ = ("count", "automasked", "trigger", "masked", "pending", "mask_fd", "unmask_fd")

    def __init__(self, info: IrqInfo) -> None:
        self.count = info.count
        self.automasked = bool(info.flags & p.IRQ_INFO_AUTOMASKED)
        self.trigger: list[int | None] = [None] * info.count
        self.masked = [False] * info.count
        self.pending = [False] * info.count
        self.mask_fd: dict[int, int] = {}  # sub-index -> eventfd the client signals to mask
        self.unmask_fd: dict[int, int] = {}  # sub-index -> eventfd the client signals to unmask


class IrqTable:
    """Eventfds, masks and pending bits of every irq index of one connection."""

    def __init__(self, infos: Sequence[IrqInfo], *, watch: Watch | None = None, unwatch: Unwatch | None = None,
                 on_change: Callable[[int], None] | None = None) -> None:
        self._indexes = [_Index(info) for info in infos]
        self._watch = watch
        self._unwatch = unwatch
        self._on_change = on_change
        self._full_logged: set[int] = set()  # trigger fds whose full counter was logged

    # -- IrqLines ------------------------------------------------------------------
    def trigger(self, index: int, subindex: int) -> bool:
        """Fire one interrupt; False if no eventfd is assigned (a masked one stays pending)."""
        try:
            line = self._indexes[index]
            fd = line.trigger[subindex]
        except IndexError:
            return False
        if fd is None:
            return False
        if line.masked[subindex]:
            line.pending[subindex] = True
            return True
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            # the counter is at its maximum: this interrupt is dropped (the
            # reader still sees a nonzero count); say so once per fd
            if fd not in self._full_logged:
                self._full_logged.add(fd)
                log.warning("irq %d.%d: eventfd counter full, interrupt dropped", index, subindex)
        except OSError as e:
            log.warning("irq %d.%d: eventfd write failed: %s", index, subindex, e)
            return False
        if line.automasked:
            line.masked[subindex] = True
        return True

    def direct_fd(self, index: int, subindex: int) -> int | None:
        try:
            line = self._indexes[index]
            fd = line.trigger[subindex]
        except IndexError:
            return None
        if fd is None or line.masked[subindex] or line.automasked:
            return None
        return fd

    def assigned(self, index: int, subindex: int) -> bool:
        try:
            return self._indexes[index].trigger[subindex] is not None
        except IndexError:
            return False

    def masked(self, index: int, subindex: int) -> bool:
        try:
            return self._indexes[index].masked[subindex]
        except IndexError:
            return False

    # -- DEVICE_SET_IRQS ---------------------------------------------------------------
    def set_irqs(self, flags: int, index: int, start: int, count: int,
                 fds: Sequence[int] = (), data: bytes = b"") -> None:
        """Apply one SET_IRQS; takes ownership of ``fds`` (closed on error).

        Raises MessageError (EINVAL) for a request libvfio-user would refuse.
        """
        try:
            line = self._validate(flags, index, start, count, fds, data)
            for fd in fds:
                prepare_eventfd(fd)
        except (MessageError, OSError) as e:
            close_fds(fds)
            if isinstance(e, OSError):
                raise MessageError(f"SET_IRQS: {e}") from None
            raise
        kind, action = flags & p.IRQ_SET_DATA_MASK, flags & p.IRQ_SET_ACTIONS
        subs = range(start, start + count)
        mask = action == p.IRQ_SET_ACTION_MASK
        if kind == p.IRQ_SET_DATA_EVENTFD:
            for i, sub in enumerate(subs):
                fd = fds[i] if fds else None
                try:
                    if action == p.IRQ_SET_ACTION_TRIGGER:
                        self._replace(line.trigger, sub, fd)
                    else:
                        self._watch_fd(line.mask_fd if mask else line.unmask_fd, index, sub, fd, mask)
                except BaseException:
                    close_fds(fds[i + 1:])  # not stored yet; fds[i] is stored or closed by the callee
                    raise
        elif action == p.IRQ_SET_ACTION_TRIGGER and count == 0:
            self._disable(line)
        else:
            targets = [sub for sub, b in zip(subs, data) if b] if kind == p.IRQ_SET_DATA_BOOL else subs
            for sub in targets:
                if action == p.IRQ_SET_ACTION_TRIGGER:
                    self.trigger(index, sub)
                else:
                    self._set_mask(index, sub, mask)
        if self._on_change is not None:
            self._on_change(index)

    def _validate(self, flags: int, index: int, start: int, count: int,
                  fds: Sequence[int], data: bytes) -> _Index:
        if not 0 <= index < len(self._indexes):
            raise MessageError(f"SET_IRQS: no irq index {index}")
        line = self._indexes[index]
        kind, action = flags & p.IRQ_SET_DATA_MASK, flags & p.IRQ_SET_ACTIONS
        if flags & ~(p.IRQ_SET_DATA_MASK | p.IRQ_SET_ACTIONS) or kind.bit_count() != 1 or action.bit_count() != 1:
            raise MessageError(f"SET_IRQS: flags 0x{flags:x}")
        if count == 0:
            if (kind, action, start) != (p.IRQ_SET_DATA_NONE, p.IRQ_SET_ACTION_TRIGGER, 0):
                raise MessageError("SET_IRQS: count 0 is only NONE|TRIGGER from 0 (disable)")
        elif start >= line.count or start + count > line.count:
            raise MessageError(f"SET_IRQS: [{start}, {start}+{count}) outside index {index} of {line.count}")
        if index in (p.PCI_ERR_IRQ_INDEX, p.PCI_REQ_IRQ_INDEX) and (action != p.IRQ_SET_ACTION_TRIGGER or count > 1):
            raise MessageError(f"SET_IRQS: index {index} takes only TRIGGER with count <= 1")
        if fds and (kind != p.IRQ_SET_DATA_EVENTFD or len(fds) != count):
            raise MessageError(f"SET_IRQS: {len(fds)} fds with flags 0x{flags:x} and count {count}")
        if kind == p.IRQ_SET_DATA_BOOL and len(data) != count:
            raise MessageError(f"SET_IRQS: {len(data)} bool bytes for count {count}")
        return line

    def _replace(self, slots: list[int | None], sub: int, fd: int | None) -> None:
        old = slots[sub]
        slots[sub] = fd
        if old is not None and old != fd:
            self._full_logged.discard(old)
            close_fds((old,))

    def _watch_fd(self, table: dict[int, int], index: int, sub: int, fd: int | None, mask: bool) -> None:
        self._unwatch_fd(table, sub)
        if fd is None:
            return
        if self._watch is not None:
            try:
                self._watch(fd, lambda: self._signalled(fd, index, sub, mask))
            except BaseException:
                close_fds((fd,))  # e.g. an fd epoll cannot poll: refused, not kept
                raise
        table[sub] = fd

    def _unwatch_fd(self, table: dict[int, int], sub: int) -> None:
        old = table.pop(sub, None)
        if old is not None:
            if self._unwatch is not None:
                self._unwatch(old)
            close_fds((old,))

    def _signalled(self, fd: int, index: int, sub: int, mask: bool) -> None:
        try:
            got = os.read(fd, 8)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.EBADF:
                log.warning("irq %d.%d: reading the %smask eventfd: %s", index, sub, "" if mask else "un", e)
            got = b""
        if not got:  # end of file or a read error: stop watching instead of spinning on it
            table = self._indexes[index].mask_fd if mask else self._indexes[index].unmask_fd
            if table.get(sub) == fd:
                self._unwatch_fd(table, sub)
            return
        self._set_mask(index, sub, mask)
        if self._on_change is not None:
            self._on_change(index)

    def _set_mask(self, index: int, sub: int, mask: bool) -> None:
        line = self._indexes[index]
        line.masked[sub] = mask
        if not mask and line.pending[sub]:
            line.pending[sub] = False
            self.trigger(index, sub)

    def _disable(self, line: _Index) -> None:
        for sub in range(line.count):
            self._replace(line.trigger, sub, None)
            line.masked[sub] = line.pending[sub] = False
        for table in (line.mask_fd, line.unmask_fd):
            for sub in list(table):
                self._unwatch_fd(table, sub)

    # -- connection life -------------------------------------------------------------
    def assignments(self) -> list[tuple[int, int, int, int]]:
        """Every fd held: (index, sub-index, SET_IRQS action it came with, fd)."""
        out = []
        for index, line in enumerate(self._indexes):
            out += [(index, sub, p.IRQ_SET_ACTION_TRIGGER, fd) for sub, fd in enumerate(line.trigger) if fd is not None]
            out += [(index, sub, p.IRQ_SET_ACTION_MASK, fd) for sub, fd in line.mask_fd.items()]
            out += [(index, sub, p.IRQ_SET_ACTION_UNMASK, fd) for sub, fd in line.unmask_fd.items()]
        return out

    def mask_state(self) -> list[tuple[int, int, bool, bool]]:
        """(index, sub-index, masked, pending) of every masked or pending line."""
        return [(index, sub, line.masked[sub], line.pending[sub])
                for index, line in enumerate(self._indexes) for sub in range(line.count)
                if line.masked[sub] or line.pending[sub]]

    def restore_masks(self, rows: Sequence[tuple[int, int, bool, bool]]) -> None:
        """Set masks and pending bits saved by :meth:`mask_state` (a connection hand-over)."""
        for index, sub, masked, pending in rows:
            line = self._indexes[index]
            if not 0 <= sub < line.count:
                raise MessageError(f"irq {index}.{sub} outside the index")
            line.masked[sub], line.pending[sub] = bool(masked), bool(pending)
            if self._on_change is not None:
                self._on_change(index)

    def close(self) -> None:
        """Close every fd (the client went away)."""
        for line in self._indexes:
            self._disable(line)
