"""`nvme-emu migrate SOURCE DESTINATION`: live-migrate a guest's disk between two
nvme-emu processes (the Migration Management Host).

SOURCE and DESTINATION are control sockets, or the YAML configs of the two
processes (their ``control_socket``).  On a terminal, progress goes to stderr
(phase, round, bytes copied and left, dirty rate, ETA); at the end one summary
line goes to stdout, or with ``--json`` the whole report.  Exit status 0 when
the disk moved, 1 when it did not (the source then still serves the guest).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from emulator.mmh.endpoint import Endpoint
from emulator.mmh.engine import Engine, Options, Progress


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="source control socket, or its YAML config")
    p.add_argument("destination", help="destination control socket, or its YAML config")
    p.add_argument("--cntlid", type=int, default=1, help="migratable controller on the source (default 1)")
    p.add_argument("--dest-cntlid", type=int, help="migratable controller on the destination (default: --cntlid)")
    p.add_argument("--mmc", type=int, help="source MMC cntlid (default: the only MMC)")
    p.add_argument("--dest-mmc", type=int, help="destination MMC cntlid (default: the only MMC)")
    p.add_argument("--max-rounds", type=int, default=Options.max_rounds, help="pre-copy rounds (default %(default)s)")
    p.add_argument("--small", type=int, default=Options.small_bytes,
                   help="bytes: a round this small ends the pre-copy (default %(default)s)")
    p.add_argument("--lmq-slots", type=int, default=Options.lmq_slots,
                   help="LBA Migration Queue entries (default %(default)s)")
    p.add_argument("--no-track-memory", action="store_true", help="do not track guest memory changes")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--log-level", default="WARNING")


def control_path(arg: str) -> str:
    """A control socket path, or the control socket of a YAML config."""
    p = Path(arg)
    if p.suffix in (".yaml", ".yml"):
        from emulator.subsystem.config import load_config
        return str(load_config(p).control_path)
    return str(p)


class TtyProgress:
    def __init__(self) -> None:
        self.width = 0

    def __call__(self, pr: Progress) -> None:
        eta = f"{pr.eta_s:.1f} s" if pr.eta_s is not None else "-"
        line = (f"{pr.phase:9} round {pr.round:2}  copied {pr.bytes_copied / 2**20:8.1f} MiB  "
                f"left {pr.bytes_left / 2**20:8.1f} MiB  dirty {pr.dirty_rate / 2**20:6.1f} MiB/s  ETA {eta}")
        sys.stderr.write("\r" + line.ljust(self.width))
        sys.stderr.flush()
        self.width = len(line)

    def end(self) -> None:
        if self.width:
            sys.stderr.write("\n")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    opts = Options(max_rounds=args.max_rounds, small_bytes=args.small, lmq_slots=args.lmq_slots,
                   track_memory=not args.no_track_memory)
    src = Endpoint("source", control_path(args.source), args.cntlid, args.mmc)
    dst = Endpoint("destination", control_path(args.destination),
                   args.dest_cntlid if args.dest_cntlid is not None else args.cntlid, args.dest_mmc)
    progress = TtyProgress() if sys.stderr.isatty() and not args.json else None
    report = Engine(src, dst, opts, on_progress=progress).run()
    if progress is not None:
        progress.end()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
    return 0 if report.ok else 1
