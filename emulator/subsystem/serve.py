"""`nvme-emu serve [CONFIG.yaml]`: run an NVM subsystem in the foreground.

Prints ``listening on <socket path>`` once per controller when every socket
listens; SIGINT or SIGTERM flushes the namespaces and exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from emulator import pollloop
from emulator.subsystem.config import ConfigError, default_config, load_config
from emulator.vfio_user.dmawrite import DEFAULT_MODE, MODES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="subsystem YAML (default: embedded default)")
    p.add_argument("--state-dir", type=Path,
                   help="state directory for the embedded default (namespaces, sockets)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="text: one line per event naming the controller; json: one object per line")
    p.add_argument("--visible-writes", choices=MODES, default=DEFAULT_MODE,
                   help="device writes QEMU performs itself (vfio-user DMA_WRITE), so that TCG drops stale "
                        "translated code: off, boot (below 1 MiB, default) or all")


def _raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: each client may hold up to max_dma_maps
    mappings (an fd each before Python 3.13), and the soft limit is often only 1024."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def run(args: argparse.Namespace) -> int:
    from emulator.subsystem.logfmt import setup_logging
    setup_logging(str(args.log_level), getattr(args, "log_format", "text"))
    try:
        config = load_config(args.config) if args.config else default_config(args.state_dir)
    except ConfigError as e:
        print(f"nvme-emu: config error: {e}", file=sys.stderr)
        return 2
    from emulator.subsystem.runtime import Runtime

    _raise_fd_limit()
    loop = pollloop.new_event_loop()  # NVMe shadow tail polling may wait in C
    asyncio.set_event_loop(loop)
    try:
        runtime = Runtime(config, loop, visible_writes=args.visible_writes)
    except (OSError, ValueError) as e:
        print(f"nvme-emu: cannot start: {e}", file=sys.stderr)
        return 1
    # Handlers first: a SIGTERM right after the "listening on" lines must still flush.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, loop.stop)
    try:
        paths = runtime.start()
    except OSError as e:
        print(f"nvme-emu: cannot start: {e}", file=sys.stderr)
        runtime.close()
        loop.close()
        return 1
    for path in paths:
        print(f"listening on {path}", flush=True)
    print(f"control socket {runtime.control.path}", flush=True)
    try:
        loop.run_forever()
    finally:
        runtime.close()
        loop.close()
    logging.getLogger("nvme-emu").info("stopped; namespaces flushed")
    return 0
