"""``nvme-emu scenario FILE``: turn a qemu-configs/*.yaml scenario into a running setup.

A scenario file::

    description: text
    emulators:                      # one entry per emulator process
      - name: main                  # also the state directory name: <workdir>/<name>
        config: {subsystem: ..., namespaces: [...], controllers: [...]}   # emulator YAML schema
    guests:                         # QEMU instances; the first one is booted by --boot
      - name: vm
        memory: 512M
        devices:
          - {emulator: main, cntlid: 1}          # vfio-user-pci on that controller's socket
          - {qemu_nvme: {size: 64MiB}}          # QEMU's own NVMe on a raw file (comparison)
        incoming: "unix:{workdir}/migration.sock"   # optional (migration destination)
        qmp: true                   # optional: QMP socket at <workdir>/<guest name>/qmp.sock
    migrate: [a, b, a]              # optional: with --boot, the first guest loops fio on its disk
                                    # while the disk live-migrates a -> b -> a (nvme-emu migrate)

Unless an emulator config sets ``state_dir`` (relative to the scenario file), the state
directory is ``<workdir>/<name>``; ``<workdir>`` defaults to ``<cache>/scenarios/<stem>``.
The runner writes each emulator config to ``<workdir>/<name>.yaml`` and starts
``python -m emulator serve <that file>``.

Without ``--boot`` the emulators keep running until Ctrl-C so the printed QEMU command
can be pasted into another terminal.  ``--print-only`` starts nothing.
"""
from __future__ import annotations

import argparse
import copy
import re
import shlex
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from emulator.guest.env import GuestEnv, GuestEnvMissing, cache_dir
from emulator.guest.emuproc import EmulatorError, EmulatorProcess
from emulator.guest.initramfs import build_initramfs, wrap_init
from emulator.guest.qemu import (Guest, GuestError, GuestSpec, QemuNvme, VfioUserDevice,
                                 format_command, qemu_command)

_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")

# The /init of --boot: no shell, just show what the guest's nvme driver and nvme-cli see.
SHOW_BODY = r"""
sleep 1
for i in $(seq 1 100); do ls /dev/nvme[0-9]* >/dev/null 2>&1 && break; sleep 0.1; done
sleep 2
capture nvme_list nvme list
capture nvme_list_subsys nvme list-subsys
for c in /dev/nvme[0-9]*; do
    case "$c" in *n[0-9]*) continue ;; esac
    capture "id_ctrl_${c#/dev/}" sh -c "nvme id-ctrl $c | head -n 25"
done
capture dmesg_nvme sh -c "dmesg | grep -i -E 'nvme|vfio' | tail -n 40"
ls /dev/nvme[0-9]* >/dev/null 2>&1 && pass nvme_devices || fail nvme_devices "no /dev/nvme* in the guest"
"""

SHELL_BODY = r"""
capture nvme_list nvme list
echo "nvme-emu guest shell: nvme, fio, mkfs.ext4 available; 'poweroff -f' to quit"
setsid cttyhack sh
"""


def parse_size(s: str | int) -> int:
    """'1GiB', '64M', '512', 4096 -> bytes."""
    if isinstance(s, int):
        return s
    m = _SIZE.match(str(s))
    if not m:
        raise ValueError(f"bad size {s!r}")
    return int(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper())


@dataclass
class EmulatorDef:
    name: str
    config: dict[str, Any]
    state_dir: Path
    config_file: Path
    sockets: dict[int, Path]                # cntlid -> socket path


@dataclass
class GuestDef:
    name: str
    spec: GuestSpec
    workdir: Path
    uses: list[str] = field(default_factory=list)   # emulator names it needs
    qmp: bool = False

    @property
    def qmp_socket(self) -> Path | None:
        return self.workdir / "qmp.sock" if self.qmp else None


@dataclass
class Scenario:
    path: Path
    description: str
    workdir: Path
    emulators: list[EmulatorDef]
    guests: list[GuestDef]
    migrate: list[str] = field(default_factory=list)  # emulator names, in migration order

    def emulator(self, name: str) -> EmulatorDef:
        for e in self.emulators:
            if e.name == name:
                return e
        raise KeyError(f"{self.path}: no emulator named {name!r}")


def load_scenario(path: Path, workdir: Path | None = None, body: str = SHOW_BODY) -> Scenario:
    """Read a scenario file and resolve every path (nothing is started or written)."""
    path = path.resolve()
    data = yaml.safe_load(path.read_text()) or {}
    workdir = (workdir or cache_dir() / "scenarios" / path.stem).resolve()
    emus: list[EmulatorDef] = []
    for e in data.get("emulators") or []:
        name = str(e["name"])
        cfg = copy.deepcopy(e.get("config") or {})
        if "config_file" in e:
            cfg_path = (path.parent / e["config_file"]).resolve()
            cfg = yaml.safe_load(cfg_path.read_text()) or {}
            base = cfg_path.parent
        else:
            base = path.parent
        sd = cfg.get("state_dir")
        state_dir = (base / sd).resolve() if sd else workdir / name
        cfg = {"state_dir": str(state_dir), **{k: v for k, v in cfg.items() if k != "state_dir"}}
        sockets = {int(c["cntlid"]): state_dir / str(c["socket"]) for c in cfg.get("controllers") or []}
        emus.append(EmulatorDef(name, cfg, state_dir, workdir / f"{name}.yaml", sockets))
    sc = Scenario(path, str(data.get("description", "")).strip(), workdir, emus, [],
                  [str(n) for n in data.get("migrate") or []])
    for n in sc.migrate:
        sc.emulator(n)
    if sc.migrate:
        from emulator.guest.lmrun import fio_loop_body
        body = fio_loop_body(_ns_mib(sc.emulator(sc.migrate[0])))
    for g in data.get("guests") or []:
        name = str(g.get("name", f"guest{len(sc.guests)}"))
        gdir = workdir / name
        spec = GuestSpec(init=body, memory_mb=parse_size(g.get("memory", "512M")) // (1 << 20))
        uses: list[str] = []
        for i, d in enumerate(g.get("devices") or []):
            if "emulator" in d:
                emu = sc.emulator(str(d["emulator"]))
                cntlid = int(d["cntlid"])
                if cntlid not in emu.sockets:
                    raise KeyError(f"{path}: emulator {emu.name} has no controller {cntlid}")
                spec.vfio_user.append(VfioUserDevice(emu.sockets[cntlid], id=d.get("id") or f"{emu.name}-c{cntlid}",
                                                     props=dict(d.get("props") or {})))
                uses.append(emu.name)
            elif "qemu_nvme" in d:
                q = d["qemu_nvme"] or {}
                img = Path(str(q.get("image", gdir / f"qemu-nvme{i}.img")))
                spec.qemu_nvme.append(QemuNvme(img, serial=str(q.get("serial", f"QEMUNVME{i:04d}")),
                                               props=dict(q.get("props") or {}),
                                               size=parse_size(q.get("size", "64MiB"))))
            else:
                raise ValueError(f"{path}: guest {name}: device needs 'emulator' or 'qemu_nvme': {d}")
        if g.get("incoming"):
            spec.incoming = str(g["incoming"]).format(workdir=workdir)
        spec.append = str(g.get("append", ""))
        sc.guests.append(GuestDef(name, spec, gdir, sorted(set(uses)), bool(g.get("qmp", False))))
    return sc


def _ns_mib(e: EmulatorDef) -> int:
    ns = (e.config.get("namespaces") or [{}])[0]
    return parse_size(ns.get("size", "1GiB")) >> 20


def _prepare_guest(env: GuestEnv, g: GuestDef) -> list[str]:
    """Create images and the initrd so the printed command line works as is."""
    g.workdir.mkdir(parents=True, exist_ok=True)
    for nv in g.spec.qemu_nvme:
        nv.ensure_image()
    initrd = g.workdir / "initrd.img"
    build_initramfs(env, wrap_init(g.spec.init), initrd, g.spec.extra_files)
    return qemu_command(env, g.spec, initrd, g.qmp_socket)


def write_configs(sc: Scenario) -> None:
    sc.workdir.mkdir(parents=True, exist_ok=True)
    for e in sc.emulators:
        e.state_dir.mkdir(parents=True, exist_ok=True)
        e.config_file.write_text(yaml.safe_dump(e.config, sort_keys=False))


def start_emulators(sc: Scenario, command: list[str] | None, timeout: float = 60.0) -> list[EmulatorProcess]:
    procs: list[EmulatorProcess] = []
    try:
        for e in sc.emulators:
            p = EmulatorProcess(e.config_file, sc.workdir / f"{e.name}.log", name=e.name,
                                expect=len(e.sockets) or None, command=command, cwd=sc.workdir)
            procs.append(p)
            print(f"[scenario] starting emulator {e.name}: {' '.join(p.argv)}", flush=True)
            for s in p.start(timeout=timeout):
                print(f"[scenario]   {e.name} listening on {s}", flush=True)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return procs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="scenario YAML (see qemu-configs/)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="state, logs, sockets (default: <cache>/scenarios/<file stem>)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--boot", action="store_true",
                      help="boot the first guest (or --guest) with an /init that prints nvme list, then stop")
    mode.add_argument("--print-only", action="store_true",
                      help="write configs and print the command lines; start nothing")
    parser.add_argument("--guest", default=None, help="guest to boot with --boot (default: the first)")
    parser.add_argument("--shell", action="store_true",
                        help="printed command lines boot to an interactive shell on the console")
    parser.add_argument("--timeout", type=float, default=240.0, help="guest timeout in seconds (--boot)")
    parser.add_argument("--emulator-cmd", default=None,
                        help="emulator command instead of 'python -m emulator serve' (testing)")


def run(args: argparse.Namespace) -> int:
    try:
        env = GuestEnv.load()
    except GuestEnvMissing as e:
        print(f"nvme-emu scenario: {e}", file=sys.stderr)
        return 2
    sc = load_scenario(args.file, args.workdir, SHELL_BODY if args.shell and not args.boot else SHOW_BODY)
    print(f"[scenario] {sc.path.name}: {sc.description}" if sc.description else f"[scenario] {sc.path.name}")
    write_configs(sc)
    command = shlex.split(args.emulator_cmd) if args.emulator_cmd else None
    procs: list[EmulatorProcess] = []
    if not args.print_only:
        try:
            procs = start_emulators(sc, command)
        except EmulatorError as e:
            print(f"[scenario] {e}", file=sys.stderr)
            return 1
    try:
        for g in sc.guests:
            argv = _prepare_guest(env, g)
            print(f"\n# QEMU command line for guest '{g.name}' (emulators: {', '.join(g.uses) or 'none'}):")
            print(format_command(argv, env.qemu_env), flush=True)
            if g.qmp_socket:
                print(f"# QMP: {g.qmp_socket}")
        if args.print_only:
            return 0
        if args.boot:
            return _boot(env, sc, args, procs)
        print("\n[scenario] emulators running; paste a command above into another terminal. "
              "Ctrl-C stops them.", flush=True)
        _wait_for_signal(procs)
        return 0
    finally:
        for p in procs:
            rc = p.stop()
            print(f"[scenario] emulator {p.name} stopped (status {rc}); log {p.log_path}")


def _boot(env: GuestEnv, sc: Scenario, args: argparse.Namespace, procs: list[EmulatorProcess]) -> int:
    if not sc.guests:
        print("[scenario] no guests in the scenario", file=sys.stderr)
        return 2
    g = next((x for x in sc.guests if x.name == args.guest), None) if args.guest else sc.guests[0]
    if g is None:
        print(f"[scenario] no guest named {args.guest!r}", file=sys.stderr)
        return 2
    emus = [p for p in procs if p.name in g.uses]
    print(f"\n[scenario] booting guest '{g.name}' (console log {g.workdir / 'console.log'})", flush=True)
    if sc.migrate:
        emus = [p for p in procs if p.name in set(sc.migrate) | set(g.uses)]
        return _boot_and_migrate(env, sc, g, emus, args.timeout)
    try:
        with Guest(env, g.spec, g.workdir, emulators=emus, name=g.name, qmp=g.qmp) as guest:
            guest.start()
            res = guest.wait(timeout=args.timeout)
    except GuestError as e:
        print(f"[scenario] {e}", file=sys.stderr)
        return 1
    for name, text in res.outputs.items():
        print(f"\n$ {name.replace('_', ' ')}\n{text}")
    print(f"\n[scenario] guest '{g.name}': booted to /init in {res.boot_seconds or 0:.1f} s, "
          f"finished in {res.wall_seconds:.1f} s")
    return 0


def _control(e: EmulatorDef) -> Path:
    return e.state_dir / str(e.config.get("control_socket", "control.sock"))


def _boot_and_migrate(env: GuestEnv, sc: Scenario, g: GuestDef, emus: list[EmulatorProcess],
                      timeout: float) -> int:
    """Boot ``g`` looping fio; migrate its disk along ``sc.migrate``; stop fio; report."""
    from emulator.guest.lmrun import write_stop_sentinel, migrate
    path = [sc.emulator(n) for n in sc.migrate]
    status = 0
    try:
        with Guest(env, g.spec, g.workdir, emulators=emus, name=g.name, qmp=g.qmp) as guest:
            guest.start()
            for n, (src, dst) in enumerate(zip(path, path[1:]), start=1):
                guest.wait_for("PASS", f"writing_{n}", timeout=timeout)
                r = migrate(_control(src), _control(dst))
                print(f"[scenario] migrate {src.name} -> {dst.name}: {r.summary()}", flush=True)
                if not r.ok:
                    status = 1
                    break
            last = path[-1] if status == 0 else path[0]
            for e in (last, *path):
                mmc = [c for c in e.config.get("controllers") or [] if c.get("type") == "mmc"]
                if mmc:
                    break
            write_stop_sentinel(e.sockets[int(mmc[0]["cntlid"])], _ns_mib(path[0]) << 20)
            res = guest.wait(timeout=timeout, check=False)
    except GuestError as e:
        print(f"[scenario] {e}", file=sys.stderr)
        return 1
    print(f"[scenario] guest: fio runs {res.results.get('fio_runs')}, failed runs "
          f"{res.results.get('fio_failures')}, md5 {res.results.get('md5')}; "
          f"dmesg nvme errors: {res.outputs.get('dmesg_bad', '').strip() or 'none'}")
    return status or (0 if res.ok and res.results.get("fio_failures") == "0" else 1)


def _wait_for_signal(procs: list[EmulatorProcess]) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        dead = [p for p in procs if not p.running]
        if dead:
            print(f"[scenario] emulator {dead[0].name} exited (status {dead[0].returncode}); "
                  f"log {dead[0].log_path}", file=sys.stderr)
            return


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m emulator.guest.scenario")
    add_arguments(ap)
    sys.exit(run(ap.parse_args()))
