"""`nvme-emu` command line: subcommands live next to the code they drive."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help).  Each module defines add_arguments(parser) and run(args) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("emulator.subsystem.serve", "run an NVM subsystem (YAML config, or the embedded default)"),
    "scenario": ("emulator.guest.scenario", "turn a qemu-configs scenario into a running setup"),
    "migrate": ("emulator.mmh.cli", "live-migrate a guest's disk between two nvme-emu processes"),
    "demo": ("emulator.guest.demo", "boot a guest on the embedded default, write, verify, show nvme-cli"),
    "bench": ("emulator.host.loadgen", "drive a serve child over vfio-user, no guest: IOPS, CPU µs per I/O"),
    "status": ("emulator.subsystem.monitor_cli", "a running emulator's controllers, clients, queues, capacity"),
    "stats": ("emulator.subsystem.monitor_cli", "a running emulator's command counts, errors, latency"),
    "rpc": ("emulator.subsystem.monitor_cli", "call one control-socket method, print its JSON result"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nvme-emu", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError:
            pass
    args = parser.parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
