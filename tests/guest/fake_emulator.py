"""A stand-in for `python -m emulator serve [CONFIG]` that keeps the process contract only.

It listens on every controller socket of the config (or <--state-dir or .>/ctrl1.sock without one),
prints `listening on <path>` per controller, and exits 0 on SIGTERM.  It never answers
vfio-user messages.  FAKE_EMU_EXIT=N exits with status N before listening;
FAKE_EMU_SILENT=1 listens but prints nothing.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import yaml


def main(argv: list[str]) -> int:
    args: list[str] = []
    state_dir = Path(".")
    it = iter(a for a in argv if a != "serve")
    for a in it:
        if a == "--state-dir":
            state_dir = Path(next(it))
        elif not a.startswith("--"):
            args.append(a)
    print("fake emulator starting", file=sys.stderr, flush=True)
    if os.environ.get("FAKE_EMU_EXIT"):
        print("fake emulator: failing as asked", file=sys.stderr, flush=True)
        return int(os.environ["FAKE_EMU_EXIT"])
    if args:
        cfg_path = Path(args[0])
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        state = cfg_path.parent / cfg.get("state_dir", ".")
        paths = [state / c["socket"] for c in cfg.get("controllers") or []]
    else:
        paths = [state_dir / "ctrl1.sock"]
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    # before the first "listening on": a SIGTERM right after it must already mean "exit 0"
    signal.signal(signal.SIGTERM, on_term)
    socks = []
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.unlink(missing_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(p))
        s.listen(4)
        socks.append(s)
        # like a logger on stderr: must not count as the contract's listening line
        print(f"INFO server listening on {p}", file=sys.stderr, flush=True)
        if not os.environ.get("FAKE_EMU_SILENT"):
            print(f"listening on {p}", flush=True)
    while not stop:
        time.sleep(0.05)
    for s, p in zip(socks, paths):
        s.close()
        p.unlink(missing_ok=True)
    print("fake emulator: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
