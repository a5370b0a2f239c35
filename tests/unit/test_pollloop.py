"""emulator/pollloop.py: the asyncio loop whose select has a waiter slot."""
from __future__ import annotations

import socket
from typing import Any

from emulator import pollloop


def test_the_waiter_runs_before_select_and_the_loop_goes_on() -> None:
    loop = pollloop.new_event_loop()
    try:
        sel = pollloop.waiting_selector(loop)
        assert sel is not None
        seen: list[Any] = []

        def waiter(epfd: int, timeout: float | None) -> bool:
            seen.append((epfd == sel.fileno(), timeout))
            return True  # "waited": select then only looks
        sel.waiter = waiter
        a, b = socket.socketpair()
        got: list[bytes] = []
        loop.add_reader(a.fileno(), lambda: (got.append(a.recv(10)), loop.stop()))
        loop.call_later(0.01, b.send, b"x")
        loop.run_forever()
        assert got == [b"x"] and seen and all(s[0] for s in seen)
        loop.remove_reader(a.fileno())
        a.close()
        b.close()
    finally:
        loop.close()


def test_a_failing_waiter_is_dropped() -> None:
    loop = pollloop.new_event_loop()
    try:
        sel = pollloop.waiting_selector(loop)
        assert sel is not None

        def boom(epfd: int, timeout: float | None) -> bool:
            raise RuntimeError("planted")
        sel.waiter = boom
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert sel.waiter is None
    finally:
        loop.close()


def test_other_loops_have_no_waiter_slot() -> None:
    import asyncio
    loop = asyncio.new_event_loop()
    try:
        assert pollloop.waiting_selector(loop) is None
        assert pollloop.waiting_selector(object()) is None
    finally:
        loop.close()
