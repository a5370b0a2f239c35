"""pytest plugin: emulated NVMe subsystems and TCG guests for your own tests.

Installing the package registers it (entry point ``pytest11``); without
installing, load it with ``-p emulator.pytest_plugin``.

Fixtures
--------
``nvme_emu``       ``nvme_emu(config=None, *, name="emu", ...) -> NvmeEmu``: starts
                   ``nvme-emu serve`` as a child process on a YAML file or a dict (a dict's
                   ``state_dir`` defaults to the test's work directory; ``None`` is one
                   64 MiB namespace on one I/O controller).  The handle has ``sockets``,
                   ``state_dir``, ``control_socket``, ``log_path``, ``host(cntlid)`` (a
                   Python NVMe host driver over vfio-user) and ``control()`` (a
                   control-socket client).  Stopped at teardown; on failure the report
                   gets its log tail.
``nvme_guest``     ``nvme_guest(commands, *, on=[emu or socket, ...], ...) -> GuestRun``:
                   boots a TCG guest on the given controllers (an emulator: all of them;
                   ``emu.select(1, 2)``: some; or socket paths) with the provisioned kernel
                   and tools (or ``kernel=`` / ``initramfs=`` of your own), waits for the
                   controllers, runs each shell command and returns each one's ``rc`` and
                   ``output``.  Each phase (boot, probe, command N, poweroff) has a timeout
                   that kills QEMU and names the phase.  ``nvme_guest.boot(body_or_spec,
                   ...)`` is the lower-level marker interface (``emulator.guest.qemu``).
``nvme_emu_env``   the provisioned guest tool box (``bash scripts/guest-env``).  Missing:
                   the test is skipped with a reason naming ``scripts/guest-env``; under
                   ``CI=true`` it fails instead.
``nvme_emu_workdir``  a short per-test directory (UNIX socket paths must stay < 108 bytes).

Option ``--nvme-emu-keep`` keeps every work directory and log (by default they are
removed when the test passes and kept, and named in the report, when it fails).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytest

from emulator.guest.commands import GuestRun, PhaseFailed, body, normalize, run_commands
from emulator.guest.emuproc import EmulatorProcess
from emulator.guest.env import GuestEnv, GuestEnvMissing
from emulator.guest.qemu import Guest, GuestFailed, GuestResult, GuestSpec, QemuNvme, VfioUserDevice

WORK_BASE = Path(tempfile.gettempdir()) / "nvme-emu-tests"
DEFAULT_CONFIG: dict[str, Any] = {
    "namespaces": [{"nsid": 1, "size": "64MiB", "lba_size": 512}],
    "controllers": [{"cntlid": 1, "type": "io"}],
}
GUEST_ENV_HINT = "bash scripts/guest-env"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


# --------------------------------------------------------------------------- hooks

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nvme-emu", "nvme-emu emulated NVMe subsystems and guests")
    group.addoption("--nvme-emu-keep", action="store_true", default=False,
                    help="keep nvme-emu work directories and logs of passing tests too")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "nvme_guest: boots a TCG guest under QEMU (needs scripts/guest-env)")
    config._nvme_emu_kept = []  # type: ignore[attr-defined]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"nvme_guest", "nvme_emu_env"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.nvme_guest)


class _Registry:
    """What a test started, for failure reports and teardown."""

    def __init__(self) -> None:
        self.guests: list[Guest] = []
        self.emulators: list[EmulatorProcess] = []
        self.workdirs: list[Path] = []


def _registry(node: Any) -> _Registry:
    reg = getattr(node, "_nvme_emu_registry", None)
    if reg is None:
        reg = _Registry()
        node._nvme_emu_registry = reg
    return reg


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    item._nvme_emu_failed = True  # type: ignore[attr-defined]
    reg: _Registry | None = getattr(item, "_nvme_emu_registry", None)
    if reg is None or rep.when == "teardown" and getattr(item, "_nvme_emu_reported", False):
        return
    item._nvme_emu_reported = True  # type: ignore[attr-defined]
    for g in reg.guests:
        rep.sections.append((f"guest console tail: {g.name} ({g.console_log})", g.console_tail(60) or "(empty)"))
    for e in reg.emulators:
        rep.sections.append((f"nvme-emu log tail: {e.name} ({e.log_path})", e.log_tail(60) or "(empty)"))
    for d in reg.workdirs:
        rep.sections.append(("nvme-emu work dir (kept)", str(d)))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    kept = getattr(config, "_nvme_emu_kept", [])
    if kept:
        terminalreporter.write_sep("-", "nvme-emu work directories kept")
        for d in kept:
            terminalreporter.write_line(str(d))


# --------------------------------------------------------------------------- emulator

class NvmeEmu(EmulatorProcess):
    """A running ``nvme-emu serve`` child process (see :class:`EmulatorProcess`)."""

    def __init__(self, *args: Any, state_dir: Path | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.state_dir = state_dir
        self._hosts: list[Any] = []

    @property
    def control_socket(self) -> Path | None:
        """The control socket (JSON-RPC 2.0: ``status``, ``stats``...)."""
        if self.config is None:
            return None
        from emulator.subsystem.config import load_config
        return load_config(self.config).control_path

    def control(self, timeout: float = 30.0) -> Any:
        """A connected :class:`emulator.control.ControlClient` (close it, or use ``with``)."""
        from emulator.control import ControlClient
        if self.control_socket is None:
            raise RuntimeError(f"{self.name}: no control socket known")
        return ControlClient(self.control_socket, timeout=timeout)

    def host(self, cntlid: int = 1, io_queues: int = 1, qsize: int = 64, memory_mb: int = 32) -> Any:
        """An initialised :class:`emulator.host.driver.NvmeHost` on controller ``cntlid``
        over vfio-user, as QEMU would connect (closed at teardown)."""
        from emulator.host.driver import NvmeHost
        from emulator.host.memory import HostMemory
        from emulator.host.transport import VfioUserTransport
        from emulator.vfio_user.client import VfioUserClient
        h = NvmeHost(VfioUserTransport(VfioUserClient(str(self.socket_of(cntlid))),
                                       HostMemory(memory_mb << 20)))
        self._hosts.append(h)
        h.init(io_queues=io_queues, qsize=qsize)
        return h

    def socket_of(self, cntlid: int) -> Path:
        """The vfio-user socket of controller ``cntlid``."""
        if self.config is not None:
            from emulator.subsystem.config import load_config
            for cc in load_config(self.config).controllers:
                if cc.cntlid == cntlid:
                    return Path(cc.socket)
        raise KeyError(f"{self.name}: no controller {cntlid}")

    def select(self, *cntlids: int) -> "Selection":
        """Some of this emulator's controllers, for ``nvme_guest(..., on=[emu.select(1)])``."""
        return Selection(self, [self.socket_of(c) for c in cntlids])

    def namespaces_for(self, sockets: Sequence[Path]) -> int:
        """How many namespace block devices a guest given ``sockets`` should see."""
        if self.config is None:
            return len(sockets)
        from emulator.subsystem.config import load_config
        cfg = load_config(self.config)
        want = {Path(s) for s in sockets}
        return len({n for cc in cfg.controllers if Path(cc.socket) in want for n in cc.namespaces})

    def stop(self, timeout: float = 10.0) -> int | None:
        for h in self._hosts:
            try:
                h.close()
            except Exception:  # noqa: BLE001 - the emulator may be gone already
                pass
        self._hosts.clear()
        return super().stop(timeout)


@dataclasses.dataclass
class Selection:
    """Chosen controllers (their sockets) of one emulator."""
    emu: NvmeEmu
    sockets: list[Path]


@pytest.fixture
def nvme_emu_workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    WORK_BASE.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="t-", dir=WORK_BASE))
    _registry(request.node).workdirs.append(d)
    yield d
    if request.config.getoption("nvme_emu_keep"):
        request.config._nvme_emu_kept.append(d)  # type: ignore[attr-defined]
    elif not getattr(request.node, "_nvme_emu_failed", False):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def nvme_emu(request: pytest.FixtureRequest, nvme_emu_workdir: Path) -> Iterator[Callable[..., NvmeEmu]]:
    import yaml
    reg = _registry(request.node)

    def start(config: Path | str | Mapping[str, Any] | None = None, *, name: str = "emu",
              expect: int | None = None, command: Sequence[str] | None = None, args: Sequence[str] = (),
              timeout: float = 60.0, settle: float = 0.0, env: Mapping[str, str] | None = None) -> NvmeEmu:
        """Start an emulator; ``config`` is a YAML path, a dict, or None (a small default)."""
        if config is None and command is None:
            config = DEFAULT_CONFIG
        state_dir: Path | None = None
        if isinstance(config, Mapping):
            cfg = dict(config)
            cfg.setdefault("state_dir", str(nvme_emu_workdir / name))
            state_dir = nvme_emu_workdir / Path(cfg["state_dir"]).expanduser()  # relative: to the YAML's dir
            state_dir.mkdir(parents=True, exist_ok=True)
            cfg_path: Path | None = nvme_emu_workdir / f"{name}.yaml"
            Path(nvme_emu_workdir / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        else:
            cfg_path = Path(config) if config is not None else None
            if cfg_path is not None:
                try:
                    from emulator.subsystem.config import load_config
                    state_dir = load_config(cfg_path).state_dir
                except Exception:  # noqa: BLE001 - a fake emulator's config, or a bad one (serve says why)
                    state_dir = None
        n = sum(1 for e in reg.emulators if e.name.split("#")[0] == name)
        log = nvme_emu_workdir / (f"{name}.log" if n == 0 else f"{name}.{n + 1}.log")
        proc = NvmeEmu(cfg_path, log, name=name if n == 0 else f"{name}#{n + 1}", expect=expect,
                       command=command, args=args, cwd=nvme_emu_workdir, settle=settle, env=env,
                       state_dir=state_dir)
        reg.emulators.append(proc)
        proc.start(timeout=timeout)
        return proc

    yield start
    for p in reg.emulators:
        p.stop()


# --------------------------------------------------------------------------- guest

@pytest.fixture(scope="session")
def nvme_emu_env() -> GuestEnv:
    try:
        return GuestEnv.load()
    except GuestEnvMissing as e:
        if in_ci():
            pytest.fail(f"CI=true and the nvme-emu guest tool box is missing; guest tests never skip "
                        f"in CI ({e})", pytrace=False)
        pytest.skip(f"nvme-emu guest tool box missing: run `{GUEST_ENV_HINT}` ({e})")
        raise  # unreachable


Target = Any  # an NvmeEmu (all its controllers), emu.select(cntlid...), a socket path, a VfioUserDevice


class GuestBooter:
    """The ``nvme_guest`` fixture: call it to run commands; ``boot`` for markers."""

    def __init__(self, env: GuestEnv, workdir: Path, reg: _Registry) -> None:
        self.env = env
        self.workdir = workdir
        self.reg = reg

    def _name(self, name: str) -> str:
        n = sum(1 for g in self.reg.guests if g.name.split("#")[0] == name)
        return name if n == 0 else f"{name}#{n + 1}"

    def boot(self, body_or_spec: str | GuestSpec, *, vfio_user: Sequence[Path | str | VfioUserDevice] = (),
             qemu_nvme: Sequence[QemuNvme] = (), timeout: float = 180.0, check: bool = True,
             wait: bool = True, qmp: bool = False, name: str = "guest",
             emulators: Sequence[EmulatorProcess] | None = None) -> GuestResult | Guest:
        """Boot a guest whose /init runs ``body`` (marker helpers: emulator.guest.qemu);
        returns its GuestResult, or the running Guest with ``wait=False``."""
        spec = body_or_spec if isinstance(body_or_spec, GuestSpec) else GuestSpec(init=body_or_spec)
        spec.vfio_user += [d if isinstance(d, VfioUserDevice) else VfioUserDevice(d) for d in vfio_user]
        spec.qemu_nvme += list(qemu_nvme)
        name = self._name(name)
        g = Guest(self.env, spec, self.workdir / name.replace("#", "-"), name=name, qmp=qmp,
                  emulators=self.reg.emulators if emulators is None else emulators)
        self.reg.guests.append(g)
        g.start()
        if not wait:
            return g
        return g.wait(timeout=timeout, check=check)

    def spec_for(self, commands: Sequence[str] | Mapping[str, str] | str, *, on: Sequence[Target] | Target = (),
                 kernel: Path | str | None = None, initramfs: Path | str | None = None, append: str = "",
                 memory_mb: int = 512, qemu_nvme: Sequence[QemuNvme] = (), probe_timeout: float = 90.0
                 ) -> tuple[GuestSpec, list[tuple[str, str]], list[EmulatorProcess]]:
        """The guest ``__call__`` boots: its spec, the named commands, the emulators behind it."""
        targets = list(on) if isinstance(on, (list, tuple)) else [on] if on != () else []
        devices: list[VfioUserDevice] = []
        emus: list[EmulatorProcess] = []
        namespaces = 0
        for t in targets:
            if isinstance(t, (NvmeEmu, Selection)):
                emu, sockets = (t, t.sockets) if isinstance(t, NvmeEmu) else (t.emu, t.sockets)
                emus.append(emu)
                devices += [VfioUserDevice(s) for s in sockets]
                namespaces += emu.namespaces_for(sockets)
            elif isinstance(t, VfioUserDevice):
                devices.append(t)
            else:
                devices.append(VfioUserDevice(t))
        pairs = normalize(commands)
        spec = GuestSpec(init=body(pairs, controllers=len(devices) + len(qemu_nvme), namespaces=namespaces,
                                   probe_seconds=int(probe_timeout)),
                         memory_mb=memory_mb, vfio_user=devices, qemu_nvme=list(qemu_nvme), append=append,
                         kernel=Path(kernel) if kernel else None,
                         initramfs=Path(initramfs) if initramfs else None)
        return spec, pairs, emus

    def __call__(self, commands: Sequence[str] | Mapping[str, str] | str, *, on: Sequence[Target] | Target = (),
                 kernel: Path | str | None = None, initramfs: Path | str | None = None,
                 append: str = "", memory_mb: int = 512, qemu_nvme: Sequence[QemuNvme] = (),
                 boot_timeout: float = 180.0, probe_timeout: float = 90.0, command_timeout: float = 120.0,
                 poweroff_timeout: float = 60.0, require_probe: bool = True,
                 name: str = "guest") -> GuestRun:
        """Boot a guest on the controllers ``on``, run ``commands`` (a list, or a dict
        name -> command) with ``sh -c``, and return each one's rc and output."""
        spec, pairs, emus = self.spec_for(commands, on=on, kernel=kernel, initramfs=initramfs, append=append,
                                          memory_mb=memory_mb, qemu_nvme=qemu_nvme, probe_timeout=probe_timeout)
        name = self._name(name)
        g = Guest(self.env, spec, self.workdir / name.replace("#", "-"), name=name,
                  emulators=emus or self.reg.emulators)
        self.reg.guests.append(g)
        g.start()
        run = run_commands(g, pairs, boot_timeout=boot_timeout, probe_timeout=probe_timeout + 30,
                           command_timeout=command_timeout, poweroff_timeout=poweroff_timeout)
        if require_probe and run.probe != "ok":
            raise PhaseFailed("probe", g.error(GuestFailed, f"controllers not ready: {run.probe}\n"
                                                            f"{run.summary()}"))
        return run


@pytest.fixture
def nvme_guest(request: pytest.FixtureRequest, nvme_emu_env: GuestEnv,
               nvme_emu_workdir: Path) -> Iterator[GuestBooter]:
    reg = _registry(request.node)
    booter = GuestBooter(nvme_emu_env, nvme_emu_workdir, reg)
    yield booter
    for g in reg.guests:
        g.kill()


__all__ = ["GuestBooter", "GuestRun", "NvmeEmu", "Selection"]
