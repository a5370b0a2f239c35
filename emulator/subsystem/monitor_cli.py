"""`nvme-emu status` and `nvme-emu stats`: a running emulator at a glance, through its
control socket (methods ``status`` and ``stats``, docs/management-socket.md);
`nvme-emu rpc METHOD [PARAMS]` calls any method (in the style of SPDK's rpc.py)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from emulator.control import ControlClient, ControlError


def add_arguments(p: argparse.ArgumentParser) -> None:
    if p.prog.split()[-1] == "rpc":
        p.add_argument("method", help="e.g. status, stats, migration, rpc.methods")
        p.add_argument("params", nargs="?", default="{}", help="JSON object (default {})")
        p.add_argument("--config", help="the subsystem YAML the emulator was started with")
        p.add_argument("--socket", type=Path, help="the control socket (instead of a config)")
        return
    p.add_argument("config", nargs="?", help="the subsystem YAML the emulator was started with "
                                             "(default: the embedded default's state directory)")
    p.add_argument("--socket", type=Path, help="the control socket (instead of a config)")
    p.add_argument("--json", action="store_true", help="print the method's JSON reply")
    if p.prog.split()[-1] == "stats":
        p.add_argument("--cntlid", type=int, help="one controller only")
        p.add_argument("--watch", nargs="?", type=float, const=1.0, metavar="SECONDS",
                       help="print rates every SECONDS (default 1) until interrupted")
        p.add_argument("--count", type=int, help="with --watch: stop after this many samples")


def control_path(args: argparse.Namespace) -> Path:
    if args.socket is not None:
        return Path(args.socket)
    from emulator.subsystem.config import default_config, load_config
    cfg = load_config(args.config) if args.config else default_config()
    return cfg.control_path


def run(args: argparse.Namespace) -> int:
    from emulator.subsystem.config import ConfigError
    try:
        path = control_path(args)
        if args.command == "rpc":
            return rpc(path, args.method, args.params)
        with ControlClient(path, timeout=10.0) as c:
            if args.command == "status":
                st = c.call("status")
                if args.json:
                    print(json.dumps(st, indent=2))
                    return 0
                print(format_status(st))
                mig = format_migration(c.call("migration"))
                if mig:
                    print(mig)
                return 0
            params = {"cntlid": args.cntlid} if args.cntlid is not None else {}
            if args.watch:
                return watch(c, params, args.watch, args.count, args.json, sys.stdout)
            s = c.call("stats", params)
            print(json.dumps(s, indent=2) if args.json else format_stats(s))
            return 0
    except ConfigError as e:
        print(f"nvme-emu: config error: {e}", file=sys.stderr)
        return 2
    except (OSError, ControlError) as e:
        print(f"nvme-emu: cannot query the emulator's control socket: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def rpc(path: Path, method: str, params_text: str) -> int:
    try:
        params = json.loads(params_text)
    except ValueError as e:
        print(f"nvme-emu: params are not JSON: {e}", file=sys.stderr)
        return 2
    if not isinstance(params, dict):
        print("nvme-emu: params must be a JSON object", file=sys.stderr)
        return 2
    with ControlClient(path, timeout=30.0) as c:
        try:
            result = c.call(method, params)
        except ControlError as e:
            if e.code is None:
                raise
            print(json.dumps({"code": e.code, "message": e.message}), file=sys.stderr)
            return 1
    print(json.dumps(result, indent=2))
    return 0


# -- formatting ------------------------------------------------------------------------

def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def format_status(st: dict[str, Any]) -> str:
    sub = st["subsystem"]
    out = [f"nvme-emu pid {st['pid']}, up {st['uptime_s']:.0f} s, {sub['nqn']} (SN {sub['serial']})"]
    for c in st["controllers"]:
        state = ("suspended" if c["suspended"] else "enabled" if c["enabled"] and c["ready"]
                 else "enabling" if c["enabled"] else "disabled")
        client = c["client"]
        who = "no client" if client is None else (
            f"client pid {client['pid']}" + (" (paused)" if client["paused"] else ""))
        io = [q for q in c["queues"]["sq"] if q["qid"]]
        ns = ",".join(str(n) for n in c["namespaces"]) or "-"
        out.append(f"  ctrl {c['cntlid']:<3} {c['type']:<3} {state:<9} {who:<22} "
                   f"I/O queues {len(io):<3} namespaces {ns:<8} {c['socket']}")
    for n in st["namespaces"]:
        pct = 100.0 * n["allocated"] / n["size"] if n["size"] else 0.0
        out.append(f"  ns {n['nsid']:<5} {size(n['size']):>10}  lba {n['lba_size']:<4}  "
                   f"allocated {size(n['allocated'])} ({pct:.1f}%)  {n['file']}")
    cap = st["capacity"]
    out.append(f"  capacity {size(cap['size'])}, allocated {size(cap['allocated'])}")
    return "\n".join(out)


def format_migration(m: dict[str, Any]) -> str:
    """A line per migration fact, or '' when no migration runs."""
    if not m["active"]:
        return ""
    out = ["  migration active:"]
    for r in m["reported"]:
        extra = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("phase", "client", "reported_at"))
        out.append(f"    MMH (control client {r['client']}): phase {r['phase']}" + (f", {extra}" if extra else ""))
    for c in m["controllers"]:
        facts = [w for w, on in (("suspended" + (f" by MMC {c['suspended_by']}" if c["suspended_by"] else ""),
                                  c["suspended"]), ("released", c["released"]), ("paused", c["paused"])) if on]
        if facts:
            out.append(f"    ctrl {c['cntlid']}: {', '.join(facts)}")
    for mmc in m["mmcs"]:
        for q in mmc["cdqs"]:
            out.append(f"    MMC {mmc['cntlid']} CDQ {q['cdqid']} for ctrl {q['cntlid']}: "
                       f"{'logging' if q['logging'] else 'not logging'}, {q['used']} of {q['slots']} entries unread")
        for t in mmc["tracks"]:
            out.append(f"    MMC {mmc['cntlid']} tracks ctrl {t['cntlid']}'s memory: {t['dirty']} of "
                       f"{t['granules']} granules of {size(t['granule'])} dirty")
        for sq in mmc["sequences"]:
            out.append(f"    MMC {mmc['cntlid']}: controller state for ctrl {sq['cntlid']} open, {sq['bytes']} bytes")
    return "\n".join(out)


def percentile(buckets: list[dict[str, Any]], q: float) -> str:
    """The latency bucket holding quantile ``q``, as "<N us"."""
    total = sum(b["count"] for b in buckets)
    if not total:
        return "-"
    acc = 0
    for b in buckets:
        acc += b["count"]
        if acc >= q * total:
            return f"<{b['lt_ns'] / 1000:.0f}us" if b["lt_ns"] is not None else ">8s"
    return "-"


def format_stats(s: dict[str, Any]) -> str:
    out = []
    for c in s["controllers"]:
        errs = sum(e["count"] for e in c["errors"])
        out.append(f"ctrl {c['cntlid']}: {c['io']['commands']} I/O commands ({size(c['io']['bytes'])}), "
                   f"{c['admin']['commands']} admin, {errs} errors; I/O latency "
                   f"p50 {percentile(c['io']['latency'], 0.5)} p99 {percentile(c['io']['latency'], 0.99)}")
        for kind in ("admin", "io"):
            for o in c[kind]["opcodes"]:
                out.append(f"  {kind:<5} {o['name']:<28} {o['commands']:>10} cmds {size(o['bytes']):>12}")
        for e in c["errors"]:
            out.append(f"  error {e['name']:<28} {e['count']:>10}  (SCT {e['sct']:x}h SC {e['sc']:02x}h)")
    return "\n".join(out)


def _delta(new: list[dict[str, Any]], old: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    before = {b[key]: b["count"] for b in old}
    return [{**b, "count": b["count"] - before.get(b[key], 0)} for b in new]


def watch(c: ControlClient, params: dict[str, Any], interval: float, count: int | None,
          as_json: bool, out: TextIO) -> int:
    """One line per controller and sample: rates since the previous sample."""
    prev = c.call("stats", params)
    n = 0
    tty = out.isatty()
    while count is None or n < count:
        time.sleep(interval)
        cur = c.call("stats", params)
        dt = max(cur["time"] - prev["time"], 1e-9)
        old = {x["cntlid"]: x for x in prev["controllers"]}
        rows = []
        for x in cur["controllers"]:
            o = old.get(x["cntlid"])
            if o is None:
                continue
            lat = _delta(x["io"]["latency"], o["io"]["latency"], "lt_ns")
            rows.append({
                "cntlid": x["cntlid"],
                "io_per_s": (x["io"]["commands"] - o["io"]["commands"]) / dt,
                "mb_per_s": (x["io"]["bytes"] - o["io"]["bytes"]) / dt / 1e6,
                "admin_per_s": (x["admin"]["commands"] - o["admin"]["commands"]) / dt,
                "errors": sum(e["count"] for e in x["errors"]) - sum(e["count"] for e in o["errors"]),
                "p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)})
        if as_json:
            print(json.dumps({"time": cur["time"], "controllers": rows}), file=out, flush=True)
        else:
            if tty:
                out.write("\x1b[H\x1b[2J")
            out.write(time.strftime("%H:%M:%S ") + f"every {interval:g} s\n"
                      f"{'ctrl':>5} {'IO/s':>10} {'MB/s':>9} {'admin/s':>8} {'errors':>7} {'p50':>9} {'p99':>9}\n")
            for r in rows:
                out.write(f"{r['cntlid']:>5} {r['io_per_s']:>10.0f} {r['mb_per_s']:>9.2f} "
                          f"{r['admin_per_s']:>8.1f} {r['errors']:>7} {r['p50']:>9} {r['p99']:>9}\n")
            out.flush()
        prev = cur
        n += 1
    return 0
