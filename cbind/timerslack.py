"""The calling thread's timer slack, prctl(2) PR_SET_TIMERSLACK, through cffi.

Linux lets a sleeping thread's wakeup be late by its *timer slack* (50 µs by
default) so that timers can be batched.  A short nap, such as the 20 µs nap
between two empty turns of the shadow SQ tail poller
(emulator/nvme/sqpoll.py), then lasts about 70 µs, and every command the host
submits during it waits that long.  Python's os module has no prctl; cffi's
ABI mode calls libc directly (no compiler needed).  Without cffi the slack
stays as it is (the fallback: naps are longer, nothing else changes).

``python -m emulator.bench.naps`` measures a 20 µs nap with the default slack
and with 1 µs, side by side.
"""
from __future__ import annotations

PR_SET_TIMERSLACK = 29
PR_GET_TIMERSLACK = 30

try:
    import cffi

    _ffi = cffi.FFI()
    _ffi.cdef("int prctl(int option, unsigned long arg2, unsigned long arg3, "
              "unsigned long arg4, unsigned long arg5);")
    _libc = _ffi.dlopen(None)
except Exception:  # pragma: no cover - cffi is a declared dependency
    _libc = None


def get_ns() -> int | None:
    """The calling thread's timer slack in nanoseconds, or None without prctl."""
    if _libc is None:
        return None
    rc = _libc.prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0)
    return None if rc < 0 else int(rc)


def set_ns(ns: int) -> bool:
    """Set the calling thread's timer slack (0 restores the thread's default); True if set."""
    if _libc is None:
        return False
    return _libc.prctl(PR_SET_TIMERSLACK, max(0, ns), 0, 0, 0) == 0
