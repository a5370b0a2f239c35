"""Accepting on a non-blocking listening socket read by an asyncio loop, with back-off.

Shared by the vfio-user server and the control socket server.  A failed
``accept`` (EMFILE, ENFILE, ENOBUFS...) leaves the connection queued, so the
listener stays readable: calling accept again at once would spin the loop.
Instead the listener's reader is removed for ``ACCEPT_BACKOFF`` seconds and
then ``resume`` puts it back (each server knows whether it still listens).
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

ACCEPT_BACKOFF = 0.1  # seconds without accepting after a failed accept


def accept_or_back_off(listener: socket.socket, loop: asyncio.AbstractEventLoop,
                       log: logging.Logger, what: str,
                       resume: Callable[[], object]) -> socket.socket | None:
    """One accept: the new connection, or None (nothing waiting, or accept failed and the
    listener's reader is off until ``resume`` runs ``ACCEPT_BACKOFF`` seconds later)."""
    try:
        sock, _ = listener.accept()
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as e:
        log.error("%s failed: %s", what, e)
        loop.remove_reader(listener.fileno())
        loop.call_later(ACCEPT_BACKOFF, resume)
        return None
    return sock
