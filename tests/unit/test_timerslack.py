"""cbind/timerslack.py (prctl PR_SET_TIMERSLACK) and its use by the SQ poller."""
from __future__ import annotations

import threading

import pytest

from cbind import timerslack
from emulator.bench import naps


def _in_thread(fn):  # the slack is per thread: never change the test runner's own
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_set_and_get_the_threads_slack() -> None:
    if timerslack.get_ns() is None:
        pytest.skip("no cffi: the slack cannot be read (pip install cffi)")

    def body() -> tuple[int | None, bool, int | None]:
        timerslack.set_ns(50_000)  # Linux's default (a thread inherits its creator's slack)
        old = timerslack.get_ns()
        ok = timerslack.set_ns(1000)
        return old, ok, timerslack.get_ns()

    old, ok, new = _in_thread(body)
    assert ok and new == 1000 and old != 1000


def test_naps_bench_runs() -> None:
    r = _in_thread(lambda: naps.measure(naps=20, rounds=1))
    assert r["default_us"] > 0 and r["short_us"] > 0  # no timing asserted
