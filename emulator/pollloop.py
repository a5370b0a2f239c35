"""An asyncio event loop whose wait for I/O can be taken over by a *waiter*.

asyncio's loop blocks in ``selector.select(timeout)`` when it has nothing to
run.  ``new_event_loop()`` gives it a selector with one slot, ``waiter``:
when set, ``select`` first calls ``waiter(epoll_fd, timeout)``, which may do
work of its own until the epoll fd is readable or the timeout passes (the
NVMe shadow SQ tail poller, emulator/nvme/sqwait.py, spins and serves I/O
in C there), and then looks at the fds without blocking if the waiter says it
waited.  The loop knows nothing of what the waiter does; a waiter that
raises is dropped (logged) and the loop goes on as a plain one.

``waiting_selector(loop)`` finds the selector of such a loop (None for any
other loop, whose users then poll the old way).
"""
from __future__ import annotations

import asyncio
import logging
import selectors
from typing import Any, Callable

log = logging.getLogger("pollloop")

# waiter(epoll fd, timeout in seconds or None) -> True if it waited (the fds are then
# looked at without blocking), False to let select block as usual
Waiter = Callable[[int, "float | None"], bool]


class WaitingSelector(selectors.EpollSelector):
    """EpollSelector with a ``waiter`` slot (module text)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiter: Waiter | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        w = self.waiter
        if w is not None:
            try:
                if w(self.fileno(), timeout):
                    timeout = 0
            except Exception:
                log.exception("event loop waiter failed; dropped")
                self.waiter = None
        return super().select(timeout)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An asyncio loop on a WaitingSelector (where epoll exists, else a plain one)."""
    if not hasattr(selectors, "EpollSelector"):
        return asyncio.new_event_loop()
    return asyncio.SelectorEventLoop(WaitingSelector())


def waiting_selector(loop: Any) -> WaitingSelector | None:
    """The WaitingSelector of ``loop``, or None (another loop or a test scheduler)."""
    sel = getattr(loop, "_selector", None)  # asyncio.BaseSelectorEventLoop keeps it there
    return sel if isinstance(sel, WaitingSelector) else None
