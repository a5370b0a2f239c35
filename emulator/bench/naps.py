"""How long the shadow SQ tail poller's nap really lasts, with the default timer slack
and with the poller's (emulator/nvme/sqpoll.py NAP_SECONDS, NAP_SLACK_NS;
cbind/timerslack.py), side by side in one run.

    python -m emulator.bench.naps [--naps 2000] [--rounds 3]

Prints the mean duration of one ``time.sleep(NAP_SECONDS)`` in µs for each
slack, alternating, and the ratio.  Without cffi the slack cannot be changed
and both columns measure the default.
"""
from __future__ import annotations

import argparse
import statistics
import time

from cbind import timerslack
from emulator.nvme.sqpoll import NAP_SECONDS, NAP_SLACK_NS


def nap_us(naps: int) -> float:
    """Mean wall time of one nap, µs."""
    t0 = time.perf_counter()
    for _ in range(naps):
        time.sleep(NAP_SECONDS)
    return (time.perf_counter() - t0) / naps * 1e6


def measure(naps: int, rounds: int) -> dict[str, float]:
    before = timerslack.get_ns()
    default: list[float] = []
    short: list[float] = []
    try:
        for _ in range(rounds):
            timerslack.set_ns(0)  # the thread's default slack
            default.append(nap_us(naps))
            timerslack.set_ns(NAP_SLACK_NS)
            short.append(nap_us(naps))
    finally:
        if before is not None:
            timerslack.set_ns(before)
    d, s = statistics.median(default), statistics.median(short)
    return {"default_slack_ns": float(before or 0), "default_us": d, "short_us": s, "ratio": d / s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emulator.bench.naps", description=__doc__.split("\n")[0])
    p.add_argument("--naps", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    r = measure(a.naps, a.rounds)
    print(f"nap of {NAP_SECONDS * 1e6:.0f} us, median of {a.rounds} rounds of {a.naps}:")
    print(f"  default timer slack ({r['default_slack_ns'] / 1000:.0f} us)  {r['default_us']:7.1f} us")
    print(f"  timer slack {NAP_SLACK_NS / 1000:.0f} us              {r['short_us']:7.1f} us")
    print(f"  default / short  {r['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
