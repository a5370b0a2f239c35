"""CPU time of host processes per guest job, cut at the guest's result markers.

A guest benchmark prints one ``@@RESULT`` line per finished job.  A sampler
thread watches the guest's results and, whenever new ones appear, reads the
CPU time (utime + stime, all threads, ``/proc/PID/stat``) of the processes it
watches (the emulator, QEMU): the CPU a process spent between two results is
what the job ending at the second one cost it, start-up and ramp-up included.
The sampling period bounds the error (default 20 ms, plus the kernel's
10 ms tick).  ``JobSamples`` does the same for any sampled figures (the
emulator's I/O counters of emulator/bench/iocount.py, ``bench --count``).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable, Mapping, Self

_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> float | None:
    """utime + stime of process ``pid`` (all its threads), or of its thread ``tid``, in
    seconds; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TCK  # fields 14 and 15 of proc(5)


class Ticker:
    """A daemon thread that calls ``begin()`` once, then ``tick()`` every ``period``
    seconds until ``stop()`` (the bench's samplers and watchers)."""

    def __init__(self, period: float, name: str) -> None:
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def begin(self) -> None:
        """Runs in the thread before the first tick."""

    def tick(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        self.begin()
        while not self._stop.wait(self.period):
            self.tick()


class JobSamples(Ticker):
    """Per result key: the change of each sampled figure since the previous result
    (``delta[key][name]``) and the wall seconds in between (``wall[key]``).

    ``sample`` returns the figures (name -> value) at one moment.  A name that first
    appears at a sample counts from ``zero`` (a counter that starts at 0) or, with
    ``zero`` False, from its first value (the CPU time of a process found late)."""

    def __init__(self, results: Mapping[str, str], sample: Callable[[], Mapping[str, float]],
                 period: float = 0.02, zero: bool = False) -> None:
        super().__init__(period, "job-samples")
        self.results = results
        self.sample = sample
        self.zero = zero
        self.delta: dict[str, dict[str, float]] = {}
        self.wall: dict[str, float] = {}

    def begin(self) -> None:
        self._seen: set[str] = set(self.results)
        self._last, self._t_last = self.sample(), time.monotonic()

    def tick(self) -> None:
        new = [k for k in list(self.results) if k not in self._seen]
        if not new:
            return
        now, t = self.sample(), time.monotonic()
        for k in new:  # several at once: the first takes the interval, the others nothing
            self._seen.add(k)
            self.delta[k] = {n: now[n] - self._last.get(n, 0 if self.zero else now[n]) for n in now}
            self.wall[k] = t - self._t_last
            self._last, self._t_last = now, t


class JobCpu(JobSamples):
    """CPU seconds of each watched process per result key (``cpu[key][name]``)."""

    def __init__(self, results: Mapping[str, str], pids: Mapping[str, Callable[[], int | None]],
                 period: float = 0.02) -> None:
        super().__init__(results, self._sample, period)
        self.pids = pids
        self.cpu = self.delta

    def _sample(self) -> dict[str, float]:
        out = {}
        for name, pid in self.pids.items():
            p = pid()
            v = cpu_seconds(p) if p else None
            if v is not None:
                out[name] = v
        return out
