"""The top functions of a ``py-spy record -f raw`` profile, self and total.

    python -m emulator.bench.pyspy_top PROFILE.txt [--top 25] [--lines]

``-f raw`` writes one line per distinct stack: frames from the outermost to
the innermost, separated by ``;``, then the sample count.  A frame is
``function (file:line)``; by default frames are merged per function
(``function (file)``), ``--lines`` keeps the line.  Percentages are of all
samples in the file (py-spy without ``--idle`` records only samples where a
thread was not idle, so they are shares of the busy time).
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")


def frame_name(frame: str, keep_line: bool = False) -> str:
    """``function (file:line)`` -> ``function (file)`` unless ``keep_line``."""
    return frame if keep_line else _LINE.sub(")", frame)


def top(lines: list[str], keep_line: bool = False) -> tuple[int, Counter[str], Counter[str]]:
    """(samples, self counts, total counts): a function counts once per stack in total."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in lines:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [frame_name(f, keep_line) for f in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for f in set(frames):
            total[f] += count
    return samples, own, total


def report(path: Path, n: int = 25, keep_line: bool = False) -> str:
    samples, own, total = top(path.read_text().splitlines(), keep_line)
    if not samples:
        return f"{path}: no samples"
    out = [f"{path}: {samples} samples", "self:"]
    out += [f"  {100 * c / samples:5.1f} %  {f}" for f, c in own.most_common(n)]
    out.append("total (inclusive):")
    out += [f"  {100 * c / samples:5.1f} %  {f}" for f, c in total.most_common(n)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profiles", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--lines", action="store_true", help="one entry per source line, not per function")
    args = p.parse_args(argv)
    for path in args.profiles:
        print(report(path, args.top, args.lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
